#include "devices/ged.h"

#include <algorithm>
#include <cstring>

namespace keel::devices {

void Ged::trigger(uint32_t events) {
  {
    std::lock_guard lock(mutex_);
    pending_ |= events;
  }
  // After the bits are visible: the _EVT the interrupt runs must see them.
  raise_interrupt_();
}

uint32_t Ged::pending() const {
  std::lock_guard lock(mutex_);
  return pending_;
}

void Ged::read(uint64_t offset, std::span<std::byte> data) {
  std::memset(data.data(), 0, data.size());
  if (offset >= kRegisterBytes) return;
  const size_t length = std::min<size_t>(data.size(), kRegisterBytes - offset);
  std::lock_guard lock(mutex_);
  uint32_t covered = 0;
  for (size_t i = 0; i < length; ++i) {
    const unsigned shift = static_cast<unsigned>(8 * (offset + i));
    data[i] = std::byte{static_cast<uint8_t>(pending_ >> shift)};
    covered |= uint32_t{0xff} << shift;
  }
  pending_ &= ~covered;
}

void Ged::write(uint64_t, std::span<const std::byte>) {
  // The register is read-only; _EVT clears it by reading.
}

}  // namespace keel::devices
