#include "devices/pci_hotplug.h"

#include <cstring>
#include <utility>

#include "base/check.h"
#include "base/log.h"

namespace keel::devices {
namespace {

uint32_t slot_bit(uint8_t slot) {
  CHECK(slot < 32, "PCI slot out of range");
  return uint32_t{1} << slot;
}

}  // namespace

void PciHotplug::plugged(uint8_t slot) {
  std::lock_guard lock(mutex_);
  up_ |= slot_bit(slot);
  down_ &= ~slot_bit(slot);
}

void PciHotplug::request_eject(uint8_t slot) {
  std::lock_guard lock(mutex_);
  down_ |= slot_bit(slot);
  up_ &= ~slot_bit(slot);
}

void PciHotplug::cancel_eject(uint8_t slot) {
  std::lock_guard lock(mutex_);
  down_ &= ~slot_bit(slot);
}

uint32_t PciHotplug::up() const {
  std::lock_guard lock(mutex_);
  return up_;
}

uint32_t PciHotplug::down() const {
  std::lock_guard lock(mutex_);
  return down_;
}

void PciHotplug::read(uint64_t offset, std::span<std::byte> data) {
  std::memset(data.data(), 0, data.size());
  if (data.size() != 4) return;
  uint32_t value = 0;
  {
    std::lock_guard lock(mutex_);
    if (offset == kUpOffset) {
      value = std::exchange(up_, 0);
    } else if (offset == kDownOffset) {
      value = down_;
    }
  }
  std::memcpy(data.data(), &value, 4);
}

void PciHotplug::write(uint64_t offset, std::span<const std::byte> data) {
  if (offset != kEjectOffset || data.size() != 4) {
    LOG_RATELIMITED(debug, "pci hotplug: ignoring a {}-byte write at {:#x}", data.size(), offset);
    return;
  }
  uint32_t value = 0;
  std::memcpy(&value, data.data(), 4);
  uint32_t ejected = 0;
  {
    std::lock_guard lock(mutex_);
    ejected = value & down_;
    down_ &= ~ejected;
  }
  if (value & ~ejected) {
    LOG_RATELIMITED(warn, "pci hotplug: the guest ejected slots {:#x} the host did not offer",
                    value & ~ejected);
  }
  for (uint8_t slot = 0; slot < 32; ++slot) {
    if (ejected & slot_bit(slot)) on_eject_(slot);
  }
}

}  // namespace keel::devices
