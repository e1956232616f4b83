// PCI bus 0 behind the host bridge: 32 device slots, configuration routing
// and BAR placement. Spec: PCI Local Bus 3.0 §3.2.2.3 (configuration
// addressing), §6.2.2 (decode enables), §6.2.5.1 (BAR placement and natural
// alignment); PCI Express Base 3.0 §7.2.2 (ECAM bus/device/function).
// Implemented: bus 0, function 0 of each slot, the host bridge at slot 0,
// hot add/remove of devices, BAR mapping on the MMIO and port I/O buses that
// follows the guest's BAR and command writes, firmware-style BAR assignment.
// Missing: other buses (no PCI-to-PCI bridges), functions 1-7, INTx routing
// (interrupt line/pin are left to the device; virtio uses MSI-X), hotplug
// signalling to the guest (ACPI or native PCIe hotplug).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>

#include "base/result.h"
#include "devices/io_bus.h"
#include "devices/pci/pci_device.h"

namespace keel::devices {

// Where assign_bars() places BARs, guest-physical (MMIO) or port numbers
// (I/O). These must match what ACPI's host bridge _CRS describes. A Mem64
// BAR goes to the 64-bit window, or to the 32-bit one if that has size 0.
struct PciWindows {
  uint64_t mmio32_base = 0;
  uint64_t mmio32_size_bytes = 0;
  uint64_t mmio64_base = 0;
  uint64_t mmio64_size_bytes = 0;
  uint64_t io_base = 0;
  uint64_t io_size_bytes = 0;
};

// A function's configuration address: bus 0-255, device 0-31, function 0-7.
struct PciAddress {
  uint8_t bus = 0;
  uint8_t device = 0;
  uint8_t function = 0;
};

class PciBus {
 public:
  static constexpr int kSlotCount = 32;
  static constexpr uint8_t kHostBridgeSlot = 0;

  // Puts a PciHostBridge in slot 0. Both IoBuses must outlive the PciBus;
  // BAR handlers are mapped on mmio_bus (Mem32/Mem64) and pio_bus (Io).
  PciBus(IoBus& mmio_bus, IoBus& pio_bus, const PciWindows& windows);
  PciBus(const PciBus&) = delete;
  PciBus& operator=(const PciBus&) = delete;

  // Plugs device into slot, or into the lowest free slot; returns the slot.
  // Busy if the slot is taken or none is free. BARs it already has
  // programmed with decode enabled are mapped at once.
  Result<uint8_t> add_device(std::shared_ptr<PciDevice> device,
                             std::optional<uint8_t> slot = std::nullopt);
  // Unplugs the device in slot (not the host bridge), unmapping its BARs.
  Result<std::shared_ptr<PciDevice>> remove_device(uint8_t slot);
  std::shared_ptr<PciDevice> device(uint8_t slot) const;

  // Does what firmware would before the OS runs: places every BAR of every
  // device naturally aligned in its window (largest first, so no space is
  // lost to alignment), turns on I/O and memory decode for devices that have
  // such BARs, and maps the handlers. OutOfRange if a window is too small.
  Result<void> assign_bars();

  // Configuration accesses from PciConfigIo and PciEcam (or tests). Absent
  // functions read all ones and drop writes (a master abort, §6.1);
  // accesses valid_access() rejects do the same, with a rate-limited log.
  void config_read(PciAddress address, uint32_t offset, std::span<std::byte> data);
  void config_write(PciAddress address, uint32_t offset, std::span<const std::byte> data);

  // Maps the BARs of the device in slot where its configuration space says
  // now (a snapshot's restore changed them behind the bus's back).
  // NotFound for an empty slot; a mapping that fails is an error.
  Result<void> refresh_mappings(uint8_t slot);

  // Where BAR bar of the device in slot is mapped now, if anywhere.
  std::optional<uint64_t> mapped_bar_address(uint8_t slot, int bar) const;

 private:
  struct Slot {
    std::shared_ptr<PciDevice> device;
    // The base each BAR's handler is mapped at on its IoBus, if it is.
    std::array<std::optional<uint64_t>, kPciBarCount> mapped{};
  };

  // The occupied slot for address, or nullptr. Caller holds mutex_.
  Slot* find_locked(PciAddress address);
  // Makes the IoBus mappings of slot match its BARs and command register;
  // logs (rate-limited) and returns the first mapping that failed.
  Result<void> update_mappings_locked(uint8_t slot);
  void unmap_all_locked(Slot& slot);
  IoBus& bus_for(BarKind kind) { return kind == BarKind::Io ? pio_bus_ : mmio_bus_; }

  IoBus& mmio_bus_;
  IoBus& pio_bus_;
  const PciWindows windows_;
  // Guards slots_ (which device is plugged where and where its BARs are
  // mapped) and serializes configuration accesses, so that BAR remapping
  // and the device hooks see one guest write at a time, in order.
  mutable std::mutex mutex_;
  std::array<Slot, kSlotCount> slots_{};
};

}  // namespace keel::devices
