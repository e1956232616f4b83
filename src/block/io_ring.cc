#include "block/io_ring.h"

#include <cerrno>

#include <fmt/format.h>

namespace keel::block {

Result<std::unique_ptr<IoRing>> IoRing::create(uint32_t queue_depth, uint32_t cq_entries,
                                               std::string owner) {
  EventFd completion_event =
      TRY_CONTEXT(EventFd::create(EventFdMode::NonBlocking), owner);
  std::unique_ptr<IoRing> ring(new IoRing(std::move(owner), std::move(completion_event)));
  io_uring_params params{};
  params.flags = IORING_SETUP_CQSIZE;
  params.cq_entries = cq_entries;
  int rc = io_uring_queue_init_params(queue_depth, &ring->ring_, &params);
  if (rc < 0) return fail_errno(fmt::format("{}: io_uring_queue_init", ring->owner_), -rc);
  ring->ready_ = true;
  rc = io_uring_register_eventfd(&ring->ring_, ring->completion_event_.get());
  if (rc < 0) return fail_errno(fmt::format("{}: io_uring_register_eventfd", ring->owner_), -rc);
  return ring;
}

IoRing::~IoRing() {
  if (ready_) io_uring_queue_exit(&ring_);
}

io_uring_sqe* IoRing::next_sqe() {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) {
    // The submission queue is full: hand it to the kernel and take a fresh entry.
    if (io_uring_submit(&ring_) < 0) return nullptr;
    unsubmitted_ = 0;
    sqe = io_uring_get_sqe(&ring_);
  }
  if (sqe != nullptr) ++unsubmitted_;
  return sqe;
}

Result<void> IoRing::kick() {
  if (unsubmitted_ == 0) return ok();
  while (true) {
    int rc = io_uring_submit(&ring_);
    if (rc >= 0) break;
    if (rc == -EINTR) continue;
    // The kernel is short of resources; the entries stay in the queue and
    // go with the next kick or submit.
    if (rc == -EAGAIN || rc == -EBUSY) return ok();
    return fail_errno(fmt::format("{}: io_uring_submit", owner_), -rc);
  }
  unsubmitted_ = 0;
  return ok();
}

Result<void> IoRing::wait_one() {
  while (true) {
    io_uring_cqe* cqe = nullptr;
    int rc = io_uring_submit_and_wait(&ring_, 1);
    if (rc >= 0) unsubmitted_ = 0;
    if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
      return fail_errno(fmt::format("{}: io_uring_submit_and_wait", owner_), -rc);
    }
    if (io_uring_peek_cqe(&ring_, &cqe) == 0 && cqe != nullptr) return ok();
  }
}

}  // namespace keel::block
