#include "devices/pvpanic.h"

#include <cstring>

#include "base/log.h"

namespace keel::devices {

void Pvpanic::read(uint64_t, std::span<std::byte> data) {
  std::memset(data.data(), 0, data.size());
  if (!data.empty()) data[0] = std::byte{kSupported};
}

void Pvpanic::write(uint64_t, std::span<const std::byte> data) {
  if (data.empty()) return;
  const auto value = static_cast<uint8_t>(data[0]);
  if ((value & ~kSupported) != 0) {
    LOG_RATELIMITED(warn, "pvpanic: unsupported event bits {:#x} ignored", value & ~kSupported);
  }
  const auto events = static_cast<uint8_t>(value & kSupported);
  if (events != 0) on_event_(events);
}

}  // namespace keel::devices
