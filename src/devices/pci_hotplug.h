// ACPI PCI hotplug registers: how the DSDT's slot objects learn which slots
// of bus 0 gained or should lose a device, and how the guest's _EJ0 says it
// let one go. The scheme of QEMU's acpi-pci-hotplug (hw/acpi/pcihp.c, as
// on piix4), which Linux's acpiphp driver serves through ACPI Notify:
// Device Check (1) on \_SB.PCI0.Sxx for an insertion, Eject Request (3)
// for a removal (ACPI 6.4 section 5.6.6, table 5.166; 6.3.3 _EJx).
// Layout (MMIO, 32-bit registers, little-endian; bit n is slot n):
//   0x0 PCIU  slots a device was plugged into; cleared by the read
//   0x4 PCID  slots the host asks the guest to eject; read-only
//   0x8 B0EJ  write: the guest ejected the slots whose bits are set
// The DSDT (src/boot/acpi/dsdt.cc, PCNT) reads PCIU and PCID when the GED
// signals kGedEventPciHotplug and notifies each slot named.
// Implemented: insert and eject request per slot; an eject is honoured only
// for a slot the host asked to eject (a guest cannot pull a device the host
// did not offer to remove). Missing: bus select (bridges), _RMV/_STA.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <span>

#include "devices/io_handler.h"

namespace keel::devices {

class PciHotplug : public IoHandler {
 public:
  static constexpr uint64_t kRegisterBytes = 12;
  static constexpr uint64_t kUpOffset = 0x0;
  static constexpr uint64_t kDownOffset = 0x4;
  static constexpr uint64_t kEjectOffset = 0x8;

  // on_eject runs on the vCPU thread of the guest's B0EJ write, once per
  // slot it ejected, without the register lock held.
  explicit PciHotplug(std::function<void(uint8_t slot)> on_eject)
      : on_eject_(std::move(on_eject)) {}

  // The host plugged a device into slot (0-31): the next PCIU read names it.
  // Cancels an eject request still pending for that slot.
  void plugged(uint8_t slot);
  // The host asks the guest to eject the device in slot.
  void request_eject(uint8_t slot);
  // Withdraws an eject request (the guest did not answer in time).
  void cancel_eject(uint8_t slot);
  uint32_t up() const;
  uint32_t down() const;

  // Accesses must be 4 bytes at a register's offset; others read zeroes
  // and are ignored.
  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

 private:
  std::function<void(uint8_t)> on_eject_;
  mutable std::mutex mutex_;  // guards up_, down_
  uint32_t up_ = 0;
  uint32_t down_ = 0;
};

}  // namespace keel::devices
