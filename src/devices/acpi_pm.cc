#include "devices/acpi_pm.h"

#include <cstring>

namespace keel::devices {

void AcpiPm::read(uint64_t, std::span<std::byte> data) {
  // Sleep status: WAK_STS clear; nothing else to report.
  std::memset(data.data(), 0, data.size());
}

void AcpiPm::write(uint64_t offset, std::span<const std::byte> data) {
  if (data.empty()) return;
  uint8_t value = static_cast<uint8_t>(data[0]);
  constexpr uint8_t kSleepEnable = 1 << 5;
  if (offset == 0 && (value & kSleepEnable) && ((value >> 2) & 0x7) == s5_sleep_type_) {
    power_off_();
  } else if (offset == 2 && value == reset_value_) {
    reset_();
  }
}

void DebugExit::read(uint64_t, std::span<std::byte> data) {
  std::memset(data.data(), 0xff, data.size());
}

void DebugExit::write(uint64_t, std::span<const std::byte> data) {
  if (!data.empty()) exit_(static_cast<uint8_t>(data[0]));
}

}  // namespace keel::devices
