// The MSI-X capability structure in configuration space. Spec: PCI Local
// Bus 3.0 §6.8.2 (capability ID 11h; Message Control with Table Size 10:0,
// Function Mask 14, MSI-X Enable 15; Table and PBA offset/BIR dwords).
// Implemented: building the capability with Enable and Function Mask
// writable, reading those two bits. Missing: the table and PBA themselves,
// which live in a memory BAR and belong to the device's BAR handler.
#pragma once

#include <cstdint>

#include "base/result.h"
#include "devices/pci/pci_config_space.h"

namespace keel::devices {

inline constexpr uint16_t kMsixMaxTableSize = 2048;
inline constexpr uint16_t kMsixEnable = 1u << 15;
inline constexpr uint16_t kMsixFunctionMask = 1u << 14;
inline constexpr uint64_t kMsixTableEntryBytes = 16;  // address low/high, data, control

struct MsixCapability {
  uint16_t table_size = 1;  // vectors, 1-2048
  int table_bar = 0;
  uint32_t table_offset = 0;  // from the BAR's base, 8-byte aligned
  int pba_bar = 0;
  uint32_t pba_offset = 0;  // likewise
};

// Appends the capability to config; the BARs must already be memory BARs.
// Returns the capability's offset, which the accessors below take.
Result<uint8_t> add_msix_capability(PciConfigSpace& config, const MsixCapability& msix);
uint16_t msix_message_control(const PciConfigSpace& config, uint8_t capability_offset);
inline bool msix_enabled(const PciConfigSpace& config, uint8_t capability_offset) {
  return (msix_message_control(config, capability_offset) & kMsixEnable) != 0;
}
inline bool msix_function_masked(const PciConfigSpace& config, uint8_t capability_offset) {
  return (msix_message_control(config, capability_offset) & kMsixFunctionMask) != 0;
}

}  // namespace keel::devices
