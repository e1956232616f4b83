// virtio-rng. Spec: virtio 1.2 §5.4 (entropy device): §5.4.2 one
// virtqueue (requestq), §5.4.3 no feature bits, §5.4.4 no configuration
// space, §5.4.6 device operation, §5.4.6.1 the driver places only
// device-writable buffers, §5.4.6.2 the device fills one or more bytes and
// MAY use less than the whole buffer.
// Implemented: requestq (max size 256) filled from getrandom() straight
// into guest RAM (short reads and EINTR retried). A chain with a
// device-readable descriptor breaks §5.4.6.1: needs_reset(), the queue is
// not touched again until reset. Work per notification is bounded: at most
// kMaxBytesPerChain per chain and kMaxBytesPerRound / kMaxChainsPerRound per
// round; the rest waits, driver notifications off, for a resume eventfd on
// the event loop, so a guest posting huge buffers cannot stall the loop.
// activate() signals that eventfd too: chains posted before DRIVER_OK are
// served even if their notification was lost.
// Snapshots: the queue alone (nothing is in flight between rounds; a
// deferred round resumes through activate()'s signal).
// Missing: nothing known.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>

#include "base/event_fd.h"
#include "devices/virtio/device.h"

namespace keel::devices::virtio {

class Rng final : public VirtioDevice {
 public:
  static constexpr uint16_t kQueueSize = 256;
  // §5.4.6.2 lets the device fill less than a buffer; the driver reads the
  // used length. These bound what one round (a notification, or a resume)
  // makes the host do.
  static constexpr uint32_t kMaxBytesPerChain = 64 << 10;
  static constexpr uint64_t kMaxBytesPerRound = 256 << 10;
  static constexpr uint32_t kMaxChainsPerRound = 128;

  // Where the bytes come from, with getrandom(2)'s contract: returns the
  // bytes written (possibly fewer than asked), or -1 with errno set. The
  // default is getrandom(buffer, length, 0); tests inject short reads and
  // errors.
  using Source = std::function<ssize_t(void* buffer, size_t length)>;

  static Result<std::unique_ptr<Rng>> create(Source source = {});
  ~Rng() override;

  DeviceType type() const override { return DeviceType::Entropy; }
  std::string_view name() const override { return "virtio-rng"; }
  uint64_t features() const override { return 0; }
  std::vector<uint16_t> queue_max_sizes() const override { return {kQueueSize}; }
  size_t config_size_bytes() const override { return 0; }
  void read_config(uint32_t, std::span<std::byte>) override {}

  // Needs an event loop: deferred work resumes through it.
  Result<void> activate(ActivateContext context) override;
  void notify(uint16_t queue) override;
  void reset() override;
  Result<VirtioDeviceState> save_state() const override;
  Result<void> restore_state(ActivateContext context, std::span<const std::byte> extra) override;

  // True while chains were left for the resume event (for tests).
  bool deferred() const;

 private:
  Rng(Source source, EventFd resume) : source_(std::move(source)), resume_(std::move(resume)) {}

  // All below run with mutex_ held.
  void process_queue();
  // Fills chain with up to budget bytes; returns the bytes written.
  uint32_t fill_chain(const DescriptorChain& chain, uint64_t budget);
  // Fills data from source_, retrying short reads and EINTR; returns the
  // bytes filled (fewer only if the source failed).
  size_t fill(std::span<std::byte> data);
  void on_resume();
  void mark_broken(std::string_view why);

  const Source source_;
  const EventFd resume_;  // signalled when a round stopped at its budget

  mutable std::mutex mutex_;  // guards everything below
  bool active_ = false;
  bool broken_ = false;
  bool deferred_ = false;
  const memory::GuestMemory* memory_ = nullptr;
  std::optional<Virtqueue> queue_;
  std::shared_ptr<Interrupt> interrupt_;
  EventLoop* event_loop_ = nullptr;
  std::optional<EventLoop::WatchId> watch_;
  DescriptorChain chain_;  // reused by every pop
};

}  // namespace keel::devices::virtio
