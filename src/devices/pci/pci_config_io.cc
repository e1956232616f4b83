// PCI configuration mechanism #1. Spec: PCI Local Bus 3.0 §3.2.2.3.2.
#include "devices/pci/pci_config_io.h"

#include <cstring>

namespace keel::devices {
namespace {

constexpr uint64_t kDataOffset = 4;  // 0xcfc
constexpr uint32_t kEnable = 1u << 31;
// Bits that hold state: enable, bus, device, function, register; the rest
// are reserved and read as zero.
constexpr uint32_t kAddressMask = kEnable | 0x00fffffc;

void fill_ones(std::span<std::byte> data) {
  std::memset(data.data(), 0xff, data.size());
}

PciAddress target_of(uint32_t address) {
  return PciAddress{static_cast<uint8_t>((address >> 16) & 0xff),
                    static_cast<uint8_t>((address >> 11) & 0x1f),
                    static_cast<uint8_t>((address >> 8) & 0x7)};
}

// The data port offset selects the byte lane within the addressed dword.
uint32_t register_of(uint32_t address, uint64_t offset) {
  return static_cast<uint32_t>((address & 0xfc) + (offset - kDataOffset));
}

}  // namespace

void PciConfigIo::read(uint64_t offset, std::span<std::byte> data) {
  if (offset == 0 && data.size() == 4) {
    const uint32_t value = address_.load(std::memory_order_relaxed);
    std::memcpy(data.data(), &value, sizeof(value));  // x86 is little-endian
    return;
  }
  // Only dword accesses reach CONFIG_ADDRESS; narrower ones at 0xcf8-0xcfb
  // are ordinary I/O that nothing here claims (§3.2.2.3.2).
  if (offset < kDataOffset || offset >= kSizeBytes) {
    fill_ones(data);
    return;
  }
  const uint32_t address = address_.load(std::memory_order_relaxed);
  if ((address & kEnable) == 0) {
    fill_ones(data);
    return;
  }
  bus_->config_read(target_of(address), register_of(address, offset), data);
}

void PciConfigIo::write(uint64_t offset, std::span<const std::byte> data) {
  if (offset == 0 && data.size() == 4) {
    uint32_t value = 0;
    std::memcpy(&value, data.data(), sizeof(value));
    address_.store(value & kAddressMask, std::memory_order_relaxed);
    return;
  }
  // Narrower writes to 0xcf8-0xcfb (Linux probes with a byte at 0xcfb) are
  // not configuration cycles.
  if (offset < kDataOffset || offset >= kSizeBytes) return;
  const uint32_t address = address_.load(std::memory_order_relaxed);
  if ((address & kEnable) == 0) return;
  bus_->config_write(target_of(address), register_of(address, offset), data);
}

}  // namespace keel::devices
