#include "machine/acpi_setup.h"

#include <algorithm>

#include "boot/acpi/acpi.h"
#include "machine/layout.h"

namespace keel::machine {

uint64_t pci_mmio64_base(const memory::GuestMemory& memory) {
  uint64_t ram_end = 0;
  for (const memory::MemoryRegion& region : memory.regions()) {
    ram_end = std::max(ram_end, region.start.value + region.size_bytes);
  }
  constexpr uint64_t kGiB = 1ull << 30;
  return (std::max(ram_end, layout::kPciHoleEnd) + kGiB - 1) & ~(kGiB - 1);
}

Result<uint64_t> write_acpi_tables(const memory::GuestMemory& memory, uint32_t cpu_count) {
  boot::acpi::AcpiConfig config =
      boot::acpi::default_config(cpu_count, pci_mmio64_base(memory), layout::kPciMmio64Size);
  boot::acpi::AcpiTables tables = TRY_CONTEXT(
      boot::acpi::build_tables(config, layout::kAcpiStart, layout::kResetVector - layout::kAcpiStart),
      "ACPI tables");
  TRY(memory.write(memory::GuestAddr(layout::kAcpiStart), tables.bytes));
  return tables.rsdp_address;
}

}  // namespace keel::machine
