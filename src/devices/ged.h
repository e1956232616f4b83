// ACPI Generic Event Device (GED). Spec: ACPI 6.4 section 5.6.9
// (interrupt-signaled ACPI events); the DSDT's \_SB.GED0
// (src/boot/acpi/dsdt.cc) describes it to the guest.
// Implemented: one 32-bit event register (MMIO). trigger() ORs event bits
// in and pulses the GED's interrupt; the guest's _EVT reads the register,
// which clears what it returned, and notifies the device each bit names
// (bit 0: the power button). Writes are ignored.
// Missing: events other than the power button (memory and CPU hotplug).
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>

#include "devices/io_handler.h"

namespace keel::devices {

class Ged : public IoHandler {
 public:
  static constexpr uint64_t kRegisterBytes = 4;

  // raise_interrupt pulses the GED's (edge-triggered) interrupt.
  explicit Ged(std::function<void()> raise_interrupt)
      : raise_interrupt_(std::move(raise_interrupt)) {}

  // Thread-safe: the API side calls it while vCPUs read the register.
  void trigger(uint32_t events);
  // Events the guest has not read yet.
  uint32_t pending() const;

  // Mapped with length kRegisterBytes; a read of part of the register
  // returns and clears that part.
  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

 private:
  std::function<void()> raise_interrupt_;
  mutable std::mutex mutex_;  // guards pending_
  uint32_t pending_ = 0;
};

}  // namespace keel::devices
