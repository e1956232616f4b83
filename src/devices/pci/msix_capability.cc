// MSI-X capability structure. Spec: PCI Local Bus 3.0 §6.8.2.
#include "devices/pci/msix_capability.h"

#include <fmt/format.h>

#include <array>
#include <cstddef>

namespace keel::devices {
namespace {

constexpr uint16_t kMessageControl = 2;  // from the capability's start
constexpr uint32_t kBirMask = 0x7;

void put_u16(std::span<std::byte> out, size_t at, uint16_t value) {
  out[at] = std::byte(value & 0xff);
  out[at + 1] = std::byte(value >> 8);
}
void put_u32(std::span<std::byte> out, size_t at, uint32_t value) {
  for (size_t i = 0; i < 4; ++i) out[at + i] = std::byte((value >> (8 * i)) & 0xff);
}

Result<void> check_region(const PciConfigSpace& config, const char* what, int bar, uint32_t offset,
                          uint64_t size_bytes) {
  const auto info = config.bar(bar);
  if (!info || info->kind == BarKind::Io) {
    return fail(Errc::InvalidArgument,
                fmt::format("MSI-X {}: BAR {} is not a memory BAR", what, bar));
  }
  // The low three bits of the offset dword carry the BIR (§6.8.2.4).
  if ((offset & kBirMask) != 0) {
    return fail(Errc::InvalidArgument,
                fmt::format("MSI-X {} offset {:#x} not 8-byte aligned", what, offset));
  }
  if (offset > info->size_bytes || size_bytes > info->size_bytes - offset) {
    return fail(Errc::InvalidArgument, fmt::format("MSI-X {} runs past BAR {}", what, bar));
  }
  return ok();
}

}  // namespace

Result<uint8_t> add_msix_capability(PciConfigSpace& config, const MsixCapability& msix) {
  if (msix.table_size == 0 || msix.table_size > kMsixMaxTableSize) {
    return fail(Errc::InvalidArgument, fmt::format("MSI-X table size {}", msix.table_size));
  }
  TRY(check_region(config, "table", msix.table_bar, msix.table_offset,
                   uint64_t{msix.table_size} * kMsixTableEntryBytes));
  // The PBA holds one pending bit per vector, in whole qwords.
  TRY(check_region(config, "PBA", msix.pba_bar, msix.pba_offset,
                   (uint64_t{msix.table_size} + 63) / 64 * 8));

  // Body after ID and Next: Message Control, Table Offset/BIR, PBA Offset/BIR.
  std::array<std::byte, 10> body{};
  put_u16(body, 0, static_cast<uint16_t>(msix.table_size - 1));  // N-1 encoded
  put_u32(body, 2, msix.table_offset | static_cast<uint32_t>(msix.table_bar));
  put_u32(body, 6, msix.pba_offset | static_cast<uint32_t>(msix.pba_bar));
  const uint8_t offset = TRY(config.add_capability(kPciCapabilityMsix, body));
  config.set_write_mask(static_cast<uint16_t>(offset + kMessageControl), 2,
                        kMsixEnable | kMsixFunctionMask);
  return offset;
}

uint16_t msix_message_control(const PciConfigSpace& config, uint8_t capability_offset) {
  return config.get_u16(static_cast<uint16_t>(capability_offset + kMessageControl));
}

}  // namespace keel::devices
