// PCIe ECAM. Spec: PCI Express Base 3.0 §7.2.2.
#include "devices/pci/pci_ecam.h"

#include <cstring>

namespace keel::devices {
namespace {

PciAddress decode(uint64_t offset) {
  return PciAddress{static_cast<uint8_t>((offset >> 20) & 0xff),
                    static_cast<uint8_t>((offset >> 15) & 0x1f),
                    static_cast<uint8_t>((offset >> 12) & 0x7)};
}

uint32_t register_of(uint64_t offset) {
  return static_cast<uint32_t>(offset & 0xfff);
}

}  // namespace

void PciEcam::read(uint64_t offset, std::span<std::byte> data) {
  // Mapped larger than 256 buses, the extra would alias bus 0 again.
  if (offset >= kSizeBytes) {
    std::memset(data.data(), 0xff, data.size());
    return;
  }
  bus_->config_read(decode(offset), register_of(offset), data);
}

void PciEcam::write(uint64_t offset, std::span<const std::byte> data) {
  if (offset >= kSizeBytes) return;
  bus_->config_write(decode(offset), register_of(offset), data);
}

}  // namespace keel::devices
