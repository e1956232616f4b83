// The virtio-pci modern transport: one VirtioDevice as a PCI function.
// Spec: virtio 1.2 §4.1 (Virtio Over PCI Bus): §4.1.2 PCI device IDs
// (0x1af4, 0x1040 + device type, revision 1), §4.1.4 the vendor
// capabilities (common, notify, ISR, device and PCI configuration access),
// §4.1.4.3 common configuration, §4.1.4.4 notifications, §4.1.4.5 ISR,
// §4.1.4.9 the PCI configuration access capability, §4.1.5 initialization
// (MSI-X vector configuration), §2.1 device status (FEATURES_OK checking,
// DEVICE_NEEDS_RESET, reset by writing 0), §2.2 feature negotiation.
// Implemented: all five capabilities in one 32-bit memory BAR; MSI-X with
// one vector per queue plus one for configuration changes, delivered through
// irqfd; doorbells through ioeventfd (a write the ioeventfd does not take
// exits and is forwarded to the same eventfd); VERSION_1, INDIRECT_DESC and
// EVENT_IDX offered for every device.
// Missing: INTx (a driver that cannot enable MSI-X gets no interrupts;
// Linux always enables it), VIRTIO_F_RING_RESET and per-queue reset,
// VIRTIO_F_NOTIFICATION_DATA, packed queues.
// Snapshots: save_state()/restore_state() carry the registers, the
// configuration space's writable bits, the MSI-X table and an active
// device's queues and own state (VirtioPciState).
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "base/event_fd.h"
#include "base/event_loop.h"
#include "base/result.h"
#include "devices/interrupt_fabric.h"
#include "devices/pci/msix_table.h"
#include "devices/pci/pci_device.h"
#include "devices/virtio/device.h"
#include "memory/guest_memory.h"

namespace keel::devices::virtio {

inline constexpr uint16_t kVirtioPciVendorId = 0x1af4;
inline constexpr uint16_t kVirtioPciDeviceIdBase = 0x1040;
inline constexpr uint16_t kVirtioNoVector = 0xffff;

// Device status bits (§2.1).
inline constexpr uint8_t kStatusAcknowledge = 1;
inline constexpr uint8_t kStatusDriver = 2;
inline constexpr uint8_t kStatusDriverOk = 4;
inline constexpr uint8_t kStatusFeaturesOk = 8;
inline constexpr uint8_t kStatusNeedsReset = 64;
inline constexpr uint8_t kStatusFailed = 128;

// Capability types (§4.1.4) and where each structure lives in BAR 0.
inline constexpr uint8_t kCapCommon = 1;
inline constexpr uint8_t kCapNotify = 2;
inline constexpr uint8_t kCapIsr = 3;
inline constexpr uint8_t kCapDevice = 4;
inline constexpr uint8_t kCapPciCfg = 5;

struct VirtioPciLayout {
  static constexpr int kBar = 0;
  static constexpr uint64_t kCommonOffset = 0x0000;
  static constexpr uint64_t kCommonSize = 0x40;
  static constexpr uint64_t kIsrOffset = 0x1000;
  static constexpr uint64_t kIsrSize = 0x4;
  static constexpr uint64_t kDeviceOffset = 0x2000;
  static constexpr uint64_t kDeviceMaxSize = 0x1000;
  static constexpr uint64_t kNotifyOffset = 0x3000;
  static constexpr uint32_t kNotifyMultiplier = 4;
  static constexpr uint64_t kMsixTableOffset = 0x4000;
  static constexpr uint64_t kMsixPbaOffset = 0x6000;
  static constexpr uint64_t kBarSize = 0x8000;
};

// One queue's registers as the driver programmed them (§4.1.4.3).
struct VirtioPciQueueState {
  uint16_t size = 0;
  uint16_t msix_vector = kVirtioNoVector;
  bool enabled = false;
  uint64_t desc = 0;
  uint64_t driver = 0;
  uint64_t device = 0;
  bool operator==(const VirtioPciQueueState&) const = default;
};

// Everything a snapshot keeps of one virtio-pci function
// (docs/snapshot-format.md, "virtio devices").
struct VirtioPciState {
  uint16_t device_type = 0;  // DeviceType: a restore into another device is refused
  PciConfigBytes config{};
  uint8_t status = 0;
  uint8_t isr = 0;
  uint8_t config_generation = 0;
  uint16_t config_vector = kVirtioNoVector;
  uint16_t queue_select = 0;
  uint32_t device_feature_select = 0;
  uint32_t driver_feature_select = 0;
  uint64_t driver_features = 0;
  std::vector<VirtioPciQueueState> queues;
  std::vector<MsixEntryState> msix;
  // Set when the device was active (DRIVER_OK accepted): the positions in
  // its queues (their configs come from queues above) and its own bytes.
  std::optional<VirtioDeviceState> device;
  bool operator==(const VirtioPciState&) const = default;
};

class VirtioPci : public PciDevice {
 public:
  // fabric and event_loop outlive the function; memory outlives it too.
  static Result<std::shared_ptr<VirtioPci>> create(std::shared_ptr<VirtioDevice> device,
                                                   const memory::GuestMemory& memory,
                                                   InterruptFabric& fabric,
                                                   EventLoop& event_loop);
  ~VirtioPci() override;

  PciConfigSpace& config() override { return config_; }
  void before_config_read(uint32_t offset, size_t size_bytes) override;
  void config_written(uint32_t offset, size_t size_bytes) override;
  std::shared_ptr<IoHandler> bar_handler(int bar) override;
  void reset() override;

  VirtioDevice& device() { return *device_; }
  uint8_t status() const { return status_.load(); }
  // The device's counters after the transport's own: queue_notifications
  // (doorbells handed to notify()) and interrupts (MSI-X messages asked
  // for, used buffers and configuration changes alike).
  VirtioDevice::Counters counters() const;

  // Snapshots. The caller has paused the vCPUs and holds the event loop
  // (see VirtioDevice::quiesce); save_state() after quiesce().
  Result<void> quiesce(std::chrono::milliseconds timeout) { return device_->quiesce(timeout); }
  Result<VirtioPciState> save_state();
  // On a fresh function of the same device, before the guest runs (the
  // event loop need not run yet): the registers, the configuration space's
  // writable bits (BAR addresses, command, MSI-X control), the MSI-X table
  // (unmasked vectors routed), the doorbell ioeventfds at the saved BAR
  // address, and a device that was active activated again on its saved
  // queues (VirtioDevice::restore_state). Corrupt, naming the field, for a
  // state that does not fit this function; Busy if the guest used it.
  // The caller remaps the BARs on the bus (PciBus::refresh_mappings).
  Result<void> restore_state(const VirtioPciState& state);
  // Signals each enabled queue's doorbell once: after a restore (the
  // guest's last notification before the snapshot may never have been
  // seen) and after a save (a device that stopped popping while the loop
  // was held must look at its rings again). A spurious notification is
  // harmless (§2.7.10: the device checks the ring).
  void kick_queues();

  // BAR 0 accesses (offsets from the BAR's base); public for tests.
  void bar_read(uint64_t offset, std::span<std::byte> data);
  void bar_write(uint64_t offset, std::span<const std::byte> data);

 private:
  class Link;  // the Interrupt handed to the device
  // The driver's registers (what a snapshot keeps) and the device's limit.
  struct Queue : VirtioPciQueueState {
    uint16_t max_size = 0;
    // Reset state: size reads the maximum (§4.1.4.3), nothing programmed.
    static Queue fresh(uint16_t max_size) {
      Queue queue;
      queue.max_size = max_size;
      queue.size = max_size;
      return queue;
    }
  };

  VirtioPci(std::shared_ptr<VirtioDevice> device, const memory::GuestMemory& memory,
            InterruptFabric& fabric, EventLoop& event_loop, const PciHeader& header);
  Result<void> build();

  void common_read(uint64_t offset, std::span<std::byte> data);
  void common_write(uint64_t offset, std::span<const std::byte> data);
  void status_write_locked(uint8_t value);
  void activate_locked();
  // restore_state() once the state is checked against this function.
  Result<void> restore_locked(const VirtioPciState& state);
  // The context activate() gets: new queues from the registers, or with
  // saved, restored at the saved positions.
  Result<ActivateContext> activation_context_locked(const VirtioDeviceState* saved);
  // Watches the doorbell of every enabled queue on the event loop.
  Result<void> watch_doorbells_locked();
  void unwatch_doorbells_locked();
  void reset_locked();
  void notify_write(uint64_t offset, std::span<const std::byte> data);
  // Keeps the doorbell ioeventfds at the BAR's current address.
  void update_doorbells_locked();
  void unregister_doorbells_locked();
  void update_msix_control();
  uint64_t offered_features() const;

  // Interrupt paths (any thread; take only the MSI-X table's leaf lock).
  void signal_queue(uint16_t queue);
  void signal_config();
  void signal_needs_reset();

  std::shared_ptr<VirtioDevice> device_;
  const memory::GuestMemory& memory_;
  InterruptFabric& fabric_;
  EventLoop& event_loop_;
  PciConfigSpace config_;
  std::unique_ptr<MsixTable> msix_;
  uint8_t msix_cap_offset_ = 0;
  uint8_t pci_cfg_cap_offset_ = 0;
  std::shared_ptr<IoHandler> bar_handler_;
  std::shared_ptr<Link> link_;
  const uint64_t device_features_;
  const size_t device_config_size_;

  // Guest-visible transport state, written on vCPU threads.
  std::mutex mutex_;  // guards everything below except the atomics
  uint32_t device_feature_select_ = 0;
  uint32_t driver_feature_select_ = 0;
  uint64_t driver_features_ = 0;
  uint16_t queue_select_ = 0;
  std::vector<Queue> queues_;
  std::vector<EventFd> doorbells_;  // one per queue
  std::optional<uint64_t> doorbell_base_;  // where the ioeventfds are registered
  std::vector<EventLoop::WatchId> watches_;
  bool active_ = false;
  // Read by interrupt paths on other threads.
  std::atomic<uint8_t> status_{0};
  std::atomic<uint64_t> queue_notifications_{0};
  std::atomic<uint64_t> interrupts_{0};
  std::atomic<uint8_t> isr_{0};
  std::atomic<uint8_t> config_generation_{0};
  std::atomic<uint16_t> config_vector_{kVirtioNoVector};
  std::unique_ptr<std::atomic<uint16_t>[]> queue_vectors_;  // mirrors Queue::msix_vector
};

}  // namespace keel::devices::virtio
