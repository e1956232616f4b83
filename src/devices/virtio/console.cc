// virtio-console: see console.h for the status card.
#include "devices/virtio/console.h"

#include <algorithm>
#include <cstring>

#include "base/log.h"
#include "devices/virtio/loop_work.h"

namespace keel::devices::virtio {

Result<std::unique_ptr<VirtioConsole>> VirtioConsole::create(Output output) {
  if (!output) return fail(Errc::InvalidArgument, "virtio-console: no output");
  EventFd wake = TRY_CONTEXT(EventFd::create(), "virtio-console: wake eventfd");
  auto console =
      std::unique_ptr<VirtioConsole>(new VirtioConsole(std::move(output), std::move(wake)));
  // §5.3.4: max_nr_ports is only meaningful with MULTIPORT; say 1 anyway.
  // cols and rows stay 0: SIZE is not offered.
  console->config_space_.max_nr_ports = 1;
  return console;
}

VirtioConsole::~VirtioConsole() { reset(); }

void VirtioConsole::read_config(uint32_t offset, std::span<std::byte> data) {
  // The transport checked the range. emerg_wr is write-only and reads 0.
  std::memcpy(data.data(), reinterpret_cast<const std::byte*>(&config_space_) + offset,
              data.size());
}

void VirtioConsole::write_config(uint32_t offset, std::span<const std::byte> data) {
  // §5.3.4: a write of emerg_wr outputs its low byte. Any access width the
  // driver picks starts at the field's first byte; the rest is read-only.
  if (offset != offsetof(ConsoleConfigSpace, emerg_wr) || data.empty()) {
    LOG_RATELIMITED(warn, "virtio-console: write of {} bytes at config offset {} ignored",
                    data.size(), offset);
    return;
  }
  std::lock_guard lock(mutex_);
  output_(data.first(1));
}

Result<VirtioDeviceState> VirtioConsole::save_state() const {
  std::lock_guard lock(mutex_);
  VirtioDeviceState state{.queues = {saved_queue(receive_queue_), saved_queue(transmit_queue_)},
                          .extra = {}};
  std::lock_guard input_lock(input_mutex_);
  state.extra = pending_input_;
  return state;
}

Result<void> VirtioConsole::restore_state(ActivateContext context,
                                          std::span<const std::byte> extra) {
  if (extra.size() > kMaxPendingInputBytes) {
    return fail(Errc::Corrupt, fmt::format("virtio-console: {} bytes of pending input, at most {}",
                                           extra.size(), kMaxPendingInputBytes));
  }
  {
    std::lock_guard input_lock(input_mutex_);
    pending_input_.assign(extra.begin(), extra.end());
  }
  // activate() signals the wake eventfd, which delivers that input.
  return activate(std::move(context));
}

Result<void> VirtioConsole::activate(ActivateContext context) {
  std::lock_guard lock(mutex_);
  if (active_) return fail(Errc::Busy, "virtio-console: activated twice without a reset");
  if (context.memory == nullptr || !context.interrupt || context.queues.size() != 2 ||
      context.event_loop == nullptr) {
    return fail(Errc::InvalidArgument,
                "virtio-console: activate needs memory, an interrupt, an event loop and 2 queues");
  }
  watch_ = TRY_CONTEXT(context.event_loop->add(wake_.get(), Ready::In,
                                               [this](uint32_t) { on_wake(); }),
                       "virtio-console: watch the wake eventfd");
  memory_ = context.memory;
  // Either queue may be left disabled (§4.1.4.3); that direction then idles.
  receive_queue_ = std::move(context.queues[kReceiveQueue]);
  transmit_queue_ = std::move(context.queues[kTransmitQueue]);
  interrupt_ = std::move(context.interrupt);
  event_loop_ = context.event_loop;
  chain_.segments.reserve(kQueueSize);
  active_ = true;
  broken_ = false;
  output_deferred_ = false;
  // One round on the loop: input that arrived before the driver was ready,
  // and chains posted before DRIVER_OK whatever became of their
  // notification.
  (void)wake_.signal();
  return ok();
}

void VirtioConsole::notify(uint16_t queue) {
  std::lock_guard lock(mutex_);
  if (!active_ || broken_) return;
  if (queue == kReceiveQueue) {
    deliver_input();  // new receive buffers: pending input may go now
  } else if (queue == kTransmitQueue) {
    if (!output_deferred_) process_transmit();  // else the wake event owes a round
  }
}

void VirtioConsole::on_wake() {
  (void)wake_.consume();
  std::lock_guard lock(mutex_);
  if (!active_ || broken_) return;
  deliver_input();
  if (!broken_) {
    output_deferred_ = false;
    process_transmit();
  }
}

void VirtioConsole::enqueue_input(std::span<const std::byte> bytes) {
  if (bytes.empty()) return;
  size_t dropped = 0;
  {
    std::lock_guard lock(input_mutex_);
    size_t room = kMaxPendingInputBytes - pending_input_.size();
    size_t taken = std::min(room, bytes.size());
    pending_input_.insert(pending_input_.end(), bytes.begin(), bytes.begin() + taken);
    dropped = bytes.size() - taken;
    dropped_input_bytes_ += dropped;
  }
  if (dropped > 0) {
    LOG_RATELIMITED(warn,
                    "virtio-console: {} input bytes dropped: the guest has not taken the {} "
                    "already pending",
                    dropped, kMaxPendingInputBytes);
  }
  // Nobody watches while inactive; activate() signals again if needed.
  if (Result<void> signalled = wake_.signal(); !signalled) {
    LOG_RATELIMITED(warn, "virtio-console: wake: {}", signalled.error().message());
  }
}

size_t VirtioConsole::pending_input_bytes() const {
  std::lock_guard lock(input_mutex_);
  return pending_input_.size();
}

uint64_t VirtioConsole::dropped_input_bytes() const {
  std::lock_guard lock(input_mutex_);
  return dropped_input_bytes_;
}

bool VirtioConsole::output_deferred() const {
  std::lock_guard lock(mutex_);
  return output_deferred_;
}

void VirtioConsole::deliver_input() {
  if (!receive_queue_) return;
  std::lock_guard lock(input_mutex_);
  // The pending buffer bounds this round; receive-queue notifications stay
  // on, since an idle queue waits for exactly those.
  size_t offset = 0;
  bool pushed = false;
  while (offset < pending_input_.size()) {
    Result<bool> popped = receive_queue_->pop_into(chain_);
    if (!popped) {
      mark_broken("receiveq pop");
      break;
    }
    if (!*popped) break;
    if (chain_.readable_bytes > 0) {
      LOG_RATELIMITED(warn, "virtio-console: receive chain {} has {} device-readable bytes",
                      chain_.head, chain_.readable_bytes);
      mark_broken("device-readable buffer in the receiveq");
      break;
    }
    size_t count = std::min<size_t>(chain_.writable_bytes, pending_input_.size() - offset);
    auto bytes = std::span<const std::byte>(pending_input_).subspan(offset, count);
    if (!receive_queue_->write_to_chain(chain_, 0, bytes)) {
      mark_broken("receive buffer outside RAM");
      break;
    }
    if (!receive_queue_->push_used(chain_.head, static_cast<uint32_t>(count))) {
      mark_broken("receiveq push used");
      break;
    }
    offset += count;
    pushed = true;
  }
  // What reached the guest leaves the buffer even if the queue broke after.
  pending_input_.erase(pending_input_.begin(), pending_input_.begin() + offset);
  if (pushed) signal_used(kReceiveQueue);
}

void VirtioConsole::process_transmit() {
  if (!transmit_queue_) return;
  DrainResult result = drain_bounded(
      *transmit_queue_, chain_, DrainBudget{kMaxOutputBytesPerRound, kMaxChainsPerRound},
      [this](const DescriptorChain& chain, uint64_t) -> std::optional<ChainWork> {
        uint32_t sent = output_chain(chain);
        if (broken_) return std::nullopt;
        // §5.3.6: nothing is written into a transmit buffer.
        return ChainWork{.used_len = 0, .cost_bytes = sent};
      });
  if (result.outcome == DrainResult::Outcome::Broken) {
    if (!result.broken_why.empty()) mark_broken(result.broken_why);
    return;
  }
  if (result.outcome == DrainResult::Outcome::BudgetSpent) {
    // Let the loop serve other fds before the next round.
    output_deferred_ = true;
    if (Result<void> signalled = wake_.signal(); !signalled) {
      LOG_RATELIMITED(warn, "virtio-console: wake: {}", signalled.error().message());
      output_deferred_ = false;
      (void)transmit_queue_->enable_driver_notifications();
    }
  }
  if (result.pushed) signal_used(kTransmitQueue);
}

uint32_t VirtioConsole::output_chain(const DescriptorChain& chain) {
  if (chain.writable_bytes > 0) {
    LOG_RATELIMITED(warn, "virtio-console: transmit chain {} has {} device-writable bytes",
                    chain.head, chain.writable_bytes);
    mark_broken("device-writable buffer in the transmitq");
    return 0;
  }
  uint32_t want = std::min(chain.readable_bytes, kMaxBytesPerChain);
  if (want < chain.readable_bytes) {
    LOG_RATELIMITED(warn, "virtio-console: transmit chain of {} bytes cut to {}",
                    chain.readable_bytes, want);
  }
  uint32_t sent = 0;
  for (const Segment& segment : chain.segments) {
    if (sent == want) break;
    uint32_t len = std::min(segment.len, want - sent);
    // pop_into checked every segment against RAM; output straight from it.
    Result<std::span<std::byte>> host = memory_->host_span(segment.addr, len);
    if (!host) {
      mark_broken("transmit buffer outside RAM");
      return sent;
    }
    output_(*host);
    sent += len;
  }
  return sent;
}

void VirtioConsole::signal_used(uint16_t queue) {
  if (broken_) return;
  std::optional<Virtqueue>& vq = queue == kReceiveQueue ? receive_queue_ : transmit_queue_;
  if (vq->needs_notification()) interrupt_->notify_queue(queue);
}

void VirtioConsole::mark_broken(std::string_view why) {
  if (broken_) return;
  broken_ = true;
  LOG_RATELIMITED(warn, "virtio-console: {}: the driver broke the spec; device needs reset", why);
  interrupt_->needs_reset();
}

void VirtioConsole::reset() {
  stop_watching(mutex_, active_, watch_, event_loop_);
  std::lock_guard lock(mutex_);
  receive_queue_.reset();
  transmit_queue_.reset();
  interrupt_.reset();
  memory_ = nullptr;
  event_loop_ = nullptr;
  broken_ = false;
  output_deferred_ = false;
  // Pending input stays: it was typed for whichever driver comes next.
}

}  // namespace keel::devices::virtio
