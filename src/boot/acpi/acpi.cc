// ACPI table set: validation and layout. Spec: ACPI 6.4 section 5.2
// (5.2.5.1: the RSDP on a 16-byte boundary). Implemented and missing: see
// acpi.h.
#include "boot/acpi/acpi.h"

#include <fmt/format.h>

#include <array>

#include "boot/acpi/tables.h"
#include "machine/layout.h"

namespace keel::boot::acpi {
namespace {

constexpr uint64_t k4GiB = uint64_t{1} << 32;
constexpr uint64_t kEcamAlignment = uint64_t{1} << 20;
constexpr size_t kTableAlignment = 8;

Failure invalid(std::string what) {
  return fail(Errc::InvalidArgument, "ACPI tables: " + std::move(what));
}

// A window [base, base + size) that is non-empty and does not wrap.
bool is_range(uint64_t base, uint64_t size) {
  return size > 0 && base + (size - 1) >= base;
}

Result<void> validate_pci(const PciHostConfig& pci) {
  if (pci.ecam_base % kEcamAlignment != 0) {
    return invalid(fmt::format("PCI ECAM base {:#x} is not 1 MiB aligned", pci.ecam_base));
  }
  if (!is_range(pci.ecam_base, (uint64_t{pci.bus_end} + 1) * kEcamAlignment)) {
    return invalid(fmt::format("PCI ECAM at {:#x} wraps around", pci.ecam_base));
  }
  if (!is_range(pci.mmio32_base, pci.mmio32_size) || pci.mmio32_base + pci.mmio32_size > k4GiB) {
    return invalid(fmt::format("PCI 32-bit window {:#x}+{:#x} is empty or not below 4 GiB",
                               pci.mmio32_base, pci.mmio32_size));
  }
  if (pci.mmio64_size > 0 && !is_range(pci.mmio64_base, pci.mmio64_size)) {
    return invalid(fmt::format("PCI 64-bit window {:#x}+{:#x} wraps around", pci.mmio64_base,
                               pci.mmio64_size));
  }
  if (pci.io_size > 0) {
    uint32_t io_end = uint32_t{pci.io_base} + pci.io_size;  // exclusive
    if (io_end > 0x10000) {
      return invalid(
          fmt::format("PCI I/O window {:#x}+{:#x} passes port 0xffff", pci.io_base, pci.io_size));
    }
    if (pci.io_base < 0xd00 && io_end > 0xcf8) {
      return invalid(fmt::format("PCI I/O window {:#x}+{:#x} overlaps the config ports 0xcf8-0xcff",
                                 pci.io_base, pci.io_size));
    }
  }
  return ok();
}

Result<void> validate(const AcpiConfig& config, uint64_t base, uint64_t max_bytes) {
  if (base % 16 != 0) {
    // ACPI 6.4 section 5.2.5.1: OSPM searches for the RSDP on 16-byte boundaries.
    return invalid(fmt::format("base {:#x} is not 16-byte aligned", base));
  }
  if (max_bytes > UINT64_MAX - base) return invalid("base + max_bytes wraps around");
  if (config.cpu_count == 0) return invalid("cpu_count is 0");
  if (config.lapic_address > UINT32_MAX) {
    return invalid(fmt::format("LAPIC address {:#x} is above 4 GiB", config.lapic_address));
  }
  if (config.ioapic_address > UINT32_MAX) {
    return invalid(fmt::format("IOAPIC address {:#x} is above 4 GiB", config.ioapic_address));
  }
  if (config.ioapic_id > UINT8_MAX) {
    return invalid(fmt::format("IOAPIC ID {} does not fit the MADT's 8 bits", config.ioapic_id));
  }
  TRY(validate_pci(config.pci));
  // IRQ descriptors name ISA IRQs 0-15; IRQ 0 (timer) and 2 (cascade) are
  // not device IRQs on a PC, and Linux rejects them in _CRS.
  if (config.com1_irq >= 16 || config.com1_irq == 0 || config.com1_irq == 2) {
    return invalid(fmt::format("COM1 IRQ {} is not an ISA device IRQ", config.com1_irq));
  }
  if (config.com1_port > 0xfff8) {
    return invalid(fmt::format("COM1 port {:#x} + 8 passes port 0xffff", config.com1_port));
  }
  if (config.s5_sleep_type > 7) {
    // SLP_TYP is the 3-bit field 4:2 of the sleep control register.
    return invalid(
        fmt::format("S5 sleep type {} does not fit SLP_TYP's 3 bits", config.s5_sleep_type));
  }
  if (config.ged_address != 0) {
    // The OperationRegion and the MRES reservation are 32-bit here.
    if (config.ged_address % kGedRegisterBytes != 0 ||
        config.ged_address > UINT32_MAX - kGedRegisterBytes) {
      return invalid(fmt::format("GED register {:#x} is not an aligned address below 4 GiB",
                                 config.ged_address));
    }
    if (config.ged_gsi >= kIoapicPinCount || config.ged_gsi == 0 || config.ged_gsi == 2) {
      return invalid(fmt::format("GED GSI {} is not a free IOAPIC pin", config.ged_gsi));
    }
  }
  if (config.pci_hotplug_address != 0) {
    if (config.ged_address == 0) {
      return invalid("PCI hotplug needs the GED to signal it");
    }
    if (config.pci_hotplug_address % 4 != 0 ||
        config.pci_hotplug_address > UINT32_MAX - kPciHotplugRegisterBytes) {
      return invalid(fmt::format("PCI hotplug registers {:#x}: not an aligned address below 4 GiB",
                                 config.pci_hotplug_address));
    }
  }
  if (madt_size(config.cpu_count) > max_bytes) {
    return fail(Errc::OutOfRange, fmt::format("ACPI tables: the MADT for {} CPUs exceeds {} bytes",
                                              config.cpu_count, max_bytes));
  }
  return ok();
}

void align_to(Bytes& bytes, size_t alignment) {
  bytes.resize((bytes.size() + alignment - 1) / alignment * alignment, std::byte{0});
}

}  // namespace

AcpiConfig default_config(uint32_t cpu_count, uint64_t mmio64_base, uint64_t mmio64_size) {
  return AcpiConfig{
      .cpu_count = cpu_count,
      .ioapic_address = layout::kIoapicStart,
      .ioapic_id = 0,
      .lapic_address = layout::kLapicStart,
      .pci = {.ecam_base = layout::kPciEcamStart,
              .bus_end = layout::kPciLastBus,
              .mmio32_base = layout::kPciMmio32Start,
              .mmio32_size = layout::kPciMmio32Size,
              .mmio64_base = mmio64_base,
              .mmio64_size = mmio64_size,
              .io_base = layout::kPciIoStart,
              .io_size = layout::kPciIoSize},
      .com1_port = layout::kCom1Port,
      .com1_irq = layout::kCom1Irq,
      .sleep_control_port = layout::kAcpiSleepControlPort,
      .sleep_status_port = layout::kAcpiSleepStatusPort,
      .reset_port = layout::kAcpiResetPort,
      .reset_value = layout::kAcpiResetValue,
      .s5_sleep_type = layout::kAcpiS5SleepType,
      .ged_address = layout::kGedStart,
      .ged_gsi = layout::kGedGsi,
      .pvpanic_port = layout::kPvpanicPort,
      .pci_hotplug_address = layout::kPciHotplugStart,
  };
}

Result<AcpiTables> build_tables(const AcpiConfig& config, uint64_t base, uint64_t max_bytes) {
  TRY(validate(config, base, max_bytes));

  // The address-independent tables first; then lay everything out in order
  // RSDP, [RSDT], XSDT, FADT, MADT, MCFG, DSDT, each 8-byte aligned, and
  // build the tables that hold pointers.
  Bytes madt = build_madt(config);
  Bytes mcfg = build_mcfg(config.pci);
  Bytes dsdt = build_dsdt(config);

  constexpr size_t kTableCount = 3;  // FADT, MADT, MCFG; the DSDT hangs off the FADT
  auto aligned = [](uint64_t size) {
    return (size + kTableAlignment - 1) / kTableAlignment * kTableAlignment;
  };
  uint64_t rsdt_size = kSdtHeaderSize + 4 * kTableCount;
  uint64_t xsdt_size = kSdtHeaderSize + 8 * kTableCount;
  uint64_t total_size = aligned(kRsdpSize) + aligned(rsdt_size) + aligned(xsdt_size) +
                        aligned(kFadtSize) + aligned(madt.size()) + aligned(mcfg.size()) +
                        dsdt.size();
  if (total_size > max_bytes) {
    return fail(Errc::OutOfRange, fmt::format("ACPI tables: {} bytes exceed the {} available",
                                              total_size, max_bytes));
  }
  // An RSDT only when everything is below 4 GiB, as its pointers are 32-bit.
  bool with_rsdt = base + total_size <= k4GiB;

  uint64_t next = base + aligned(kRsdpSize);
  uint64_t rsdt_address = 0;
  if (with_rsdt) {
    rsdt_address = next;
    next += aligned(rsdt_size);
  }
  uint64_t xsdt_address = next;
  uint64_t fadt_address = xsdt_address + aligned(xsdt_size);
  uint64_t madt_address = fadt_address + aligned(kFadtSize);
  uint64_t mcfg_address = madt_address + aligned(madt.size());
  uint64_t dsdt_address = mcfg_address + aligned(mcfg.size());
  std::array<uint64_t, kTableCount> pointers = {fadt_address, madt_address, mcfg_address};

  Bytes out;
  out.reserve(total_size);
  auto place = [&](const Bytes& table, uint64_t address) {
    CHECK(base + out.size() == address, "ACPI table layout");
    out.insert(out.end(), table.begin(), table.end());
    align_to(out, kTableAlignment);
  };
  place(build_rsdp(rsdt_address, xsdt_address), base);
  if (with_rsdt) place(build_rsdt(pointers), rsdt_address);
  place(build_xsdt(pointers), xsdt_address);
  place(build_fadt(config, dsdt_address), fadt_address);
  place(madt, madt_address);
  place(mcfg, mcfg_address);
  place(dsdt, dsdt_address);
  out.resize(dsdt_address - base + dsdt.size());  // no padding after the last table
  CHECK(out.size() <= max_bytes, "ACPI tables larger than computed");
  return AcpiTables{.bytes = std::move(out), .rsdp_address = base};
}

}  // namespace keel::boot::acpi
