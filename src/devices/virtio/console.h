// virtio-console. Spec: virtio 1.2 §5.3 (console device): §5.3.2 queues
// (receiveq0 = 0, transmitq0 = 1 without MULTIPORT), §5.3.3 feature bits,
// §5.3.4 configuration layout (cols, rows, max_nr_ports, emerg_wr), §5.3.6
// device operation, §5.3.6.1/§5.3.6.2 driver and device requirements.
// Implemented: one port (the guest's hvc0), queues of max size 128;
// EMERG_WRITE (a write of emerg_wr puts its low byte on the output, even
// before DRIVER_OK). Transmitq chains go to the Output callback on the event
// loop thread, at most kMaxBytesPerChain per chain (the rest is dropped with
// a rate-limited log line) and kMaxOutputBytesPerRound / kMaxChainsPerRound
// per round; further chains wait, driver notifications off, for the wake
// eventfd (which activate() signals too, for chains posted before
// DRIVER_OK). Host input (enqueue_input, any thread) waits in a pending buffer
// of kMaxPendingInputBytes until the driver posts receive buffers; it
// survives a device reset. When the buffer is full, further input is
// dropped with a rate-limited log line (an interactive console prefers
// losing a flood to stalling the host's input loop). A chain in the wrong
// direction (device-readable in the receiveq, device-writable in the
// transmitq) breaks §2.7.4 / §5.3.6.1: needs_reset().
// Missing: MULTIPORT (control queues, more ports), SIZE (keel-vmm does not
// know the host terminal's size; cols and rows read 0).
// Snapshots: the queues, and the host input not yet delivered as the
// device-specific bytes.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "base/event_fd.h"
#include "devices/virtio/device.h"

namespace keel::devices::virtio {

// Feature bits (§5.3.3).
inline constexpr uint64_t kConsoleFeatureSize = 1ull << 0;
inline constexpr uint64_t kConsoleFeatureMultiport = 1ull << 1;
inline constexpr uint64_t kConsoleFeatureEmergWrite = 1ull << 2;

// struct virtio_console_config (§5.3.4).
struct ConsoleConfigSpace {
  uint16_t cols;
  uint16_t rows;
  uint32_t max_nr_ports;
  uint32_t emerg_wr;
};
static_assert(sizeof(ConsoleConfigSpace) == 12);
static_assert(offsetof(ConsoleConfigSpace, emerg_wr) == 8);

class VirtioConsole final : public VirtioDevice {
 public:
  static constexpr uint16_t kQueueSize = 128;
  static constexpr uint16_t kReceiveQueue = 0;
  static constexpr uint16_t kTransmitQueue = 1;
  static constexpr size_t kMaxPendingInputBytes = 64 << 10;
  static constexpr uint32_t kMaxBytesPerChain = 64 << 10;
  static constexpr uint64_t kMaxOutputBytesPerRound = 256 << 10;
  static constexpr uint32_t kMaxChainsPerRound = kQueueSize;

  // Takes the guest's output: on the event loop thread for the transmitq,
  // on a vCPU thread for emerg_wr; never two calls at once.
  using Output = std::function<void(std::span<const std::byte>)>;

  static Result<std::unique_ptr<VirtioConsole>> create(Output output);
  ~VirtioConsole() override;

  DeviceType type() const override { return DeviceType::Console; }
  std::string_view name() const override { return "virtio-console"; }
  uint64_t features() const override { return kConsoleFeatureEmergWrite; }
  std::vector<uint16_t> queue_max_sizes() const override { return {kQueueSize, kQueueSize}; }
  size_t config_size_bytes() const override { return sizeof(ConsoleConfigSpace); }
  void read_config(uint32_t offset, std::span<std::byte> data) override;
  void write_config(uint32_t offset, std::span<const std::byte> data) override;

  // Needs an event loop: host input and deferred output are taken there.
  Result<void> activate(ActivateContext context) override;
  void notify(uint16_t queue) override;
  void reset() override;
  Result<VirtioDeviceState> save_state() const override;
  Result<void> restore_state(ActivateContext context, std::span<const std::byte> extra) override;

  // Host input for the guest, from any thread: buffered (up to
  // kMaxPendingInputBytes, the excess dropped) and delivered on the event
  // loop thread as soon as the driver has posted receive buffers.
  void enqueue_input(std::span<const std::byte> bytes);

  // For tests and logs.
  size_t pending_input_bytes() const;
  uint64_t dropped_input_bytes() const;
  bool output_deferred() const;

 private:
  VirtioConsole(Output output, EventFd wake) : output_(std::move(output)), wake_(std::move(wake)) {}

  // All below run with mutex_ held.
  void on_wake();
  void deliver_input();
  void process_transmit();
  // Sends a transmit chain's bytes to output_; returns how many.
  uint32_t output_chain(const DescriptorChain& chain);
  void signal_used(uint16_t queue);
  void mark_broken(std::string_view why);

  const Output output_;
  // Signalled by enqueue_input and when a transmit round stopped at its
  // budget; watched on the event loop while active.
  const EventFd wake_;
  ConsoleConfigSpace config_space_{};

  mutable std::mutex mutex_;  // guards everything below but the input buffer
  bool active_ = false;
  bool broken_ = false;
  bool output_deferred_ = false;
  const memory::GuestMemory* memory_ = nullptr;
  std::optional<Virtqueue> receive_queue_;
  std::optional<Virtqueue> transmit_queue_;
  std::shared_ptr<Interrupt> interrupt_;
  EventLoop* event_loop_ = nullptr;
  std::optional<EventLoop::WatchId> watch_;
  DescriptorChain chain_;  // reused by every pop

  // A leaf lock (taken after mutex_, or alone by enqueue_input), so host
  // input never waits for guest output.
  mutable std::mutex input_mutex_;
  std::vector<std::byte> pending_input_;  // guarded by input_mutex_
  uint64_t dropped_input_bytes_ = 0;      // guarded by input_mutex_
};

}  // namespace keel::devices::virtio
