// IoRing: one io_uring with its completion eventfd, shared by the formats
// that run their asynchronous face on it (RawFile for the whole disk,
// Qcow2Image for its data clusters). The owner prepares SQEs, tags each with
// its own user_data, and drains completions; the ring knows no requests.
// Spec: none beyond io_uring(7).
#pragma once

#include <liburing.h>

#include <cstdint>
#include <memory>
#include <string>

#include "base/event_fd.h"
#include "base/result.h"

namespace keel::block {

class IoRing {
 public:
  // queue_depth SQEs; a completion queue of cq_entries, which must be at
  // least the owner's bound on operations in flight, so the kernel never has
  // to drop or buffer a completion. owner names the image in errors.
  static Result<std::unique_ptr<IoRing>> create(uint32_t queue_depth, uint32_t cq_entries,
                                                std::string owner);
  // The owner waits for its operations first (wait_one); see ~RawFile.
  ~IoRing();
  IoRing(const IoRing&) = delete;
  IoRing& operator=(const IoRing&) = delete;

  // Readable (level-triggered) while completions wait to be drained; the
  // owner may also signal it for completions it made without the kernel.
  int completion_fd() const { return completion_event_.get(); }
  Result<void> signal() const { return completion_event_.signal(); }

  // A fresh SQE, handing a full submission queue to the kernel first; null
  // if even that failed.
  io_uring_sqe* next_sqe();
  // Hands prepared SQEs to the kernel. EAGAIN/EBUSY leave them queued for
  // the next kick (not an error).
  Result<void> kick();
  // Blocks until at least one completion is there (submitting what is queued).
  Result<void> wait_one();

  // Calls done(user_data, res) for every completion there is; returns how
  // many. The eventfd is consumed first, so a completion posted meanwhile
  // leaves it readable rather than being missed.
  template <typename Done>
  size_t drain(Done&& done) {
    (void)completion_event_.consume();
    unsigned head = 0;
    unsigned seen = 0;
    io_uring_cqe* cqe = nullptr;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      ++seen;
      done(io_uring_cqe_get_data64(cqe), cqe->res);
    }
    io_uring_cq_advance(&ring_, seen);
    return seen;
  }

 private:
  IoRing(std::string owner, EventFd completion_event)
      : owner_(std::move(owner)), completion_event_(std::move(completion_event)) {}

  std::string owner_;
  EventFd completion_event_;  // registered with the ring
  io_uring ring_{};
  bool ready_ = false;
  uint32_t unsubmitted_ = 0;  // SQEs prepared since the last io_uring_submit
};

}  // namespace keel::block
