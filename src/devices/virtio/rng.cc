// virtio-rng: see rng.h for the status card.
#include "devices/virtio/rng.h"

#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "base/log.h"
#include "devices/virtio/loop_work.h"

namespace keel::devices::virtio {

Result<std::unique_ptr<Rng>> Rng::create(Source source) {
  if (!source) {
    source = [](void* buffer, size_t length) { return ::getrandom(buffer, length, 0); };
  }
  EventFd resume = TRY_CONTEXT(EventFd::create(), "virtio-rng: resume eventfd");
  return std::unique_ptr<Rng>(new Rng(std::move(source), std::move(resume)));
}

Rng::~Rng() { reset(); }

Result<void> Rng::activate(ActivateContext context) {
  std::lock_guard lock(mutex_);
  if (active_) return fail(Errc::Busy, "virtio-rng: activated twice without a reset");
  if (context.memory == nullptr || !context.interrupt || context.queues.size() != 1 ||
      context.event_loop == nullptr) {
    return fail(Errc::InvalidArgument,
                "virtio-rng: activate needs memory, an interrupt, an event loop and 1 queue");
  }
  watch_ = TRY_CONTEXT(context.event_loop->add(resume_.get(), Ready::In,
                                               [this](uint32_t) { on_resume(); }),
                       "virtio-rng: watch the resume eventfd");
  memory_ = context.memory;
  queue_ = std::move(context.queues[0]);
  interrupt_ = std::move(context.interrupt);
  event_loop_ = context.event_loop;
  chain_.segments.reserve(kQueueSize);
  active_ = true;
  broken_ = false;
  deferred_ = false;
  // One round on the loop for chains posted before DRIVER_OK, whatever
  // became of their notification.
  (void)resume_.signal();
  return ok();
}

void Rng::notify(uint16_t queue) {
  std::lock_guard lock(mutex_);
  if (!active_ || broken_ || queue != 0 || !queue_) return;
  // A round is already owed to the resume event; it will see these chains.
  if (deferred_) return;
  process_queue();
}

void Rng::on_resume() {
  (void)resume_.consume();
  std::lock_guard lock(mutex_);
  if (!active_ || broken_ || !queue_) return;
  deferred_ = false;
  process_queue();
}

bool Rng::deferred() const {
  std::lock_guard lock(mutex_);
  return deferred_;
}

void Rng::process_queue() {
  DrainResult result = drain_bounded(
      *queue_, chain_, DrainBudget{kMaxBytesPerRound, kMaxChainsPerRound},
      [this](const DescriptorChain& chain, uint64_t bytes_left) -> std::optional<ChainWork> {
        uint32_t written = fill_chain(chain, bytes_left);
        if (broken_) return std::nullopt;
        return ChainWork{.used_len = written, .cost_bytes = written};
      });
  if (result.outcome == DrainResult::Outcome::Broken) {
    if (!result.broken_why.empty()) mark_broken(result.broken_why);
    return;
  }
  if (result.outcome == DrainResult::Outcome::BudgetSpent) {
    // Let the loop serve other fds before the next round.
    deferred_ = true;
    if (Result<void> signalled = resume_.signal(); !signalled) {
      // Short of an eventfd overflow this cannot happen; the driver's next
      // notification takes over.
      LOG_RATELIMITED(warn, "virtio-rng: resume: {}", signalled.error().message());
      deferred_ = false;
      (void)queue_->enable_driver_notifications();
    }
  }
  if (result.pushed && queue_->needs_notification()) interrupt_->notify_queue(0);
}

uint32_t Rng::fill_chain(const DescriptorChain& chain, uint64_t budget) {
  // §5.4.6.1: the driver MUST NOT place device-readable buffers here.
  if (chain.readable_bytes > 0) {
    LOG_RATELIMITED(warn, "virtio-rng: chain {} has {} device-readable bytes", chain.head,
                    chain.readable_bytes);
    mark_broken("device-readable buffer in the requestq");
    return 0;
  }
  uint64_t want = std::min<uint64_t>({chain.writable_bytes, kMaxBytesPerChain, budget});
  uint64_t written = 0;
  for (const Segment& segment : chain.segments) {
    if (written == want) break;
    uint64_t len = std::min<uint64_t>(segment.len, want - written);
    // pop_into checked every segment against RAM.
    Result<std::span<std::byte>> host = memory_->host_span(segment.addr, len);
    if (!host) {
      mark_broken("buffer outside RAM");
      return 0;
    }
    size_t filled = fill(*host);
    written += filled;
    if (filled < len) break;  // the source failed; hand over what we have
  }
  return static_cast<uint32_t>(written);
}

size_t Rng::fill(std::span<std::byte> data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = source_(data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      LOG_RATELIMITED(warn, "virtio-rng: getrandom: {}", std::strerror(errno));
      break;
    }
    if (n == 0) {
      LOG_RATELIMITED(warn, "virtio-rng: entropy source returned nothing");
      break;
    }
    done += static_cast<size_t>(n);
  }
  return done;
}

void Rng::mark_broken(std::string_view why) {
  if (broken_) return;
  broken_ = true;
  LOG_RATELIMITED(warn, "virtio-rng: {}: the driver broke the spec; device needs reset", why);
  interrupt_->needs_reset();
}

Result<VirtioDeviceState> Rng::save_state() const {
  std::lock_guard lock(mutex_);
  return VirtioDeviceState{.queues = {saved_queue(queue_)}, .extra = {}};
}

Result<void> Rng::restore_state(ActivateContext context, std::span<const std::byte> extra) {
  TRY(expect_no_extra(name(), extra));
  return activate(std::move(context));
}

void Rng::reset() {
  stop_watching(mutex_, active_, watch_, event_loop_);
  std::lock_guard lock(mutex_);
  queue_.reset();
  interrupt_.reset();
  memory_ = nullptr;
  event_loop_ = nullptr;
  broken_ = false;
  deferred_ = false;
}

}  // namespace keel::devices::virtio
