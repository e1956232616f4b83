// The seam between a virtio device and its transport. Spec: virtio 1.2
// §2.1 (device status), §2.2 (feature bits), §2.3/§2.4 (notifications,
// configuration change), §2.5 (device configuration space), §3.1 (driver
// initialization), §5 (device types), §6 (reserved feature bits).
// A device knows queues, not transports: the transport (virtio-pci today)
// negotiates features, collects queue addresses and calls activate() when
// the driver sets DRIVER_OK; it maps notifications to notify() and the
// device's Interrupt calls to MSI-X vectors.
// Implemented: the interface. Missing: packed queues (the transport never
// offers VIRTIO_F_RING_PACKED).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "base/event_loop.h"
#include "base/result.h"
#include "devices/virtio/queue.h"
#include "memory/guest_memory.h"

namespace keel::devices::virtio {

// Device IDs (§5).
enum class DeviceType : uint16_t {
  Net = 1,
  Block = 2,
  Console = 3,
  Entropy = 4,
  Balloon = 5,
  Vsock = 19,
};

// Transport-level feature bits (§6). The transport always offers VERSION_1
// and the queue features; devices offer only their own bits (0-23) plus
// any of these they handle themselves.
inline constexpr uint64_t kFeatureVersion1 = 1ull << 32;
inline constexpr uint64_t kFeatureAccessPlatform = 1ull << 33;
inline constexpr uint64_t kFeatureRingPacked = 1ull << 34;

// The device's way back to the driver. Implemented by the transport; safe
// to call from any thread, including with the device's own lock held.
class Interrupt {
 public:
  virtual ~Interrupt() = default;
  // A used buffer notification for queue (§2.3). Devices call it only when
  // Virtqueue::needs_notification() says the driver wants one.
  virtual void notify_queue(uint16_t queue) = 0;
  // A configuration change notification (§2.4.2), after the device changed
  // its configuration space (capacity, link status, balloon target).
  virtual void notify_config() = 0;
  // The device hit an error it cannot recover from without a reset (a
  // driver that broke the spec): the transport sets DEVICE_NEEDS_RESET and
  // sends a configuration change notification (§2.1.2). The device stops
  // using its queues until reset().
  virtual void needs_reset() = 0;
};

// What activate() hands over when the driver sets DRIVER_OK (§3.1.1).
struct ActivateContext {
  const memory::GuestMemory* memory = nullptr;  // outlives the activation
  uint64_t features = 0;                        // what the driver accepted
  // One entry per queue the device declared; nullopt where the driver left
  // the queue disabled (queue_enable 0, which §4.1.4.3 allows).
  std::vector<std::optional<Virtqueue>> queues;
  std::shared_ptr<Interrupt> interrupt;
  // The device I/O loop: devices watch their own fds (io_uring completion
  // eventfd, tap, sockets) here, and remove every watch in reset().
  EventLoop* event_loop = nullptr;
};

// What a snapshot keeps of an active device besides its transport's
// registers (docs/snapshot-format.md, "virtio devices").
struct VirtioDeviceState {
  // One entry per queue the device declared; nullopt where the driver left
  // it disabled. last_avail_idx counts only chains the device is done with:
  // a chain it popped and still holds (a net frame's buffers, a blocked
  // transmit) is given back, so the restored device pops it again.
  std::vector<std::optional<VirtqueueState>> queues;
  // Device-specific bytes, empty for most (virtio-console: host input not
  // yet delivered). The device checks them on restore.
  std::vector<std::byte> extra;
  bool operator==(const VirtioDeviceState&) const = default;
};

// For devices whose snapshot state is their queues only.
inline std::optional<VirtqueueState> saved_queue(const std::optional<Virtqueue>& queue) {
  return queue ? std::optional<VirtqueueState>(queue->save()) : std::nullopt;
}
inline Result<void> expect_no_extra(std::string_view device, std::span<const std::byte> extra) {
  if (extra.empty()) return ok();
  return fail(Errc::Corrupt, std::string(device) + ": " + std::to_string(extra.size()) +
                                 " bytes of device state where none are kept");
}

// Threading: config reads and writes, activate() and reset() come from
// vCPU threads; notify() and the device's own event-loop callbacks run on
// the event loop thread. A device guards its state with its own mutex.
// Guest input (queue contents, config writes) is hostile: bad input gives an
// error status in the request or needs_reset() and a rate-limited log line.
class VirtioDevice {
 public:
  virtual ~VirtioDevice() = default;

  virtual DeviceType type() const = 0;
  // A short name for logs and the device tree: "virtio-blk".
  virtual std::string_view name() const = 0;
  // Device feature bits offered to the driver (§2.2); constant for a device.
  virtual uint64_t features() const = 0;
  // The maximum size of each queue; the vector's length is the number of
  // queues. Constant for a device.
  virtual std::vector<uint16_t> queue_max_sizes() const = 0;

  // The device-specific configuration space (§2.5), little-endian.
  virtual size_t config_size_bytes() const = 0;
  // Reads [offset, offset + data.size()) of it; the transport has checked
  // that the range lies inside config_size_bytes().
  virtual void read_config(uint32_t offset, std::span<std::byte> data) = 0;
  // Most fields are read-only; a device with writable ones overrides this.
  virtual void write_config(uint32_t /*offset*/, std::span<const std::byte> /*data*/) {}

  // The driver set DRIVER_OK. An error leaves the device inactive and the
  // transport sets DEVICE_NEEDS_RESET.
  virtual Result<void> activate(ActivateContext context) = 0;
  // The driver notified queue (§2.3), directly or through an ioeventfd.
  // Called on the event loop thread, only while active.
  virtual void notify(uint16_t queue) = 0;
  // The driver reset the device (§2.1, status 0) or the VM resets: stop
  // all I/O (wait for in-flight host requests), remove event-loop watches,
  // drop the queues, forget negotiated state. No Interrupt call after this
  // returns. Safe to call when not active.
  virtual void reset() = 0;

  // Snapshots. The caller has paused the vCPUs and holds the event loop
  // (EventLoop::hold), so no notify() or device callback runs meanwhile: it
  // owns the device's loop-side state and may call these from its thread.
  // quiesce() finishes what the host still does for the guest, at most
  // timeout (Timeout names the device); afterwards nothing the device holds
  // is in flight on the host. virtio-blk also completes every request the
  // driver made available before the pause, so the disk holds all of them.
  // The default does nothing: the other devices do their work at once.
  virtual Result<void> quiesce(std::chrono::milliseconds /*timeout*/) { return ok(); }
  // The state of an active device. Unsupported, naming the device, where
  // snapshots are not implemented (the default).
  virtual Result<VirtioDeviceState> save_state() const {
    return fail(Errc::Unsupported, std::string(name()) + " cannot be saved in a snapshot yet");
  }
  // Instead of activate() on a restored machine: context.queues are the
  // saved queues (Virtqueue::restore), extra the saved device bytes.
  virtual Result<void> restore_state(ActivateContext /*context*/,
                                     std::span<const std::byte> /*extra*/) {
    return fail(Errc::Unsupported, std::string(name()) + " cannot be restored from a snapshot yet");
  }

  // Monotonic counters for the control API's metrics, (name, value) with
  // names in snake_case ("read_bytes"); thread-safe. None by default; the
  // transport adds its own (queue notifications, interrupts).
  using Counters = std::vector<std::pair<std::string_view, uint64_t>>;
  virtual Counters counters() const { return {}; }
};

}  // namespace keel::devices::virtio
