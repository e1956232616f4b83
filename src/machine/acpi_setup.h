// Builds the ACPI tables for this machine's layout and writes them into
// guest memory at layout::kAcpiStart; returns the RSDP's address.
#pragma once

#include <cstdint>

#include "base/result.h"
#include "memory/guest_memory.h"

namespace keel::machine {

// Where 64-bit PCI BARs go: above the end of RAM, 1 GiB aligned.
uint64_t pci_mmio64_base(const memory::GuestMemory& memory);

Result<uint64_t> write_acpi_tables(const memory::GuestMemory& memory, uint32_t cpu_count);

}  // namespace keel::machine
