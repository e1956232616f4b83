// ACPI hardware-reduced sleep and reset registers. Spec: ACPI 6.4 sections
// 4.8.3.7 (Sleep Control and Status Registers) and 4.8.3.6 (Reset Register).
// The FADT points SLEEP_CONTROL_REG, SLEEP_STATUS_REG and RESET_REG here.
// Implemented: S5 (power off) through SLP_TYP/SLP_EN, reset through the
// reset value. Missing: S1-S4 (suspend is refused by not offering _S3_).
#pragma once

#include <functional>

#include "devices/io_handler.h"

namespace keel::devices {

class AcpiPm : public IoHandler {
 public:
  AcpiPm(uint8_t s5_sleep_type, uint8_t reset_value, std::function<void()> power_off,
         std::function<void()> reset)
      : s5_sleep_type_(s5_sleep_type), reset_value_(reset_value),
        power_off_(std::move(power_off)), reset_(std::move(reset)) {}

  // Mapped with length 3: 0 sleep control, 1 sleep status, 2 reset.
  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

 private:
  uint8_t s5_sleep_type_;
  uint8_t reset_value_;
  std::function<void()> power_off_;
  std::function<void()> reset_;
};

// Tiny test guests write a result byte here to end the VM (like QEMU's
// isa-debug-exit); keel-vmm exits with that byte as its status.
class DebugExit : public IoHandler {
 public:
  explicit DebugExit(std::function<void(uint8_t)> exit) : exit_(std::move(exit)) {}
  void read(uint64_t, std::span<std::byte> data) override;
  void write(uint64_t, std::span<const std::byte> data) override;

 private:
  std::function<void(uint8_t)> exit_;
};

}  // namespace keel::devices
