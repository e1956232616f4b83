// The ACPI tables of a Keel PC, built as one blob to copy into guest memory.
// Spec: ACPI 6.4 chapter 5 (5.2.5 RSDP, 5.2.8 XSDT, 5.2.9 FADT, 5.2.11.1
// DSDT, 5.2.12 MADT), chapter 6 (6.1 device identification, 6.2.13 _PRT,
// 6.4 resources), 7.4.2 (\_S5), and the PCI Firmware Specification 3.2
// section 4.1.2 (MCFG).
// Implemented: RSDP (revision 2) -> XSDT -> FADT (6.4, hardware-reduced,
// sleep control/status and reset registers), MADT (xAPIC entries for APIC
// IDs below 255, x2APIC entries above; one IOAPIC; IRQ0 -> GSI2 override;
// LINT1 NMI), MCFG (one segment), DSDT (PCI0 host bridge with _CRS and a
// GSI-routed _PRT and ACPI PCI hotplug slots, an ECAM motherboard resource,
// COM1, a GED with a power button and the hotplug event, a pvpanic device,
// \_S5).
// Missing: no RSDT (64-bit-aware OSes only), no FACS (hardware-reduced
// needs none), no processor objects in the DSDT, no _OSC on PCI0 (Linux
// keeps native PCIe hotplug/AER/PME off), no HPET/SRAT/SLIT, no S1-S4.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "base/result.h"

namespace keel::boot::acpi {

// One PCI segment (0), buses 0..bus_end behind one host bridge.
struct PciHostConfig {
  uint64_t ecam_base;  // 1 MiB aligned; bus n's config space at ecam_base + n MiB
  uint8_t bus_end;
  uint64_t mmio32_base, mmio32_size;  // 32-bit BAR window, below 4 GiB
  uint64_t mmio64_base, mmio64_size;  // 64-bit BAR window (size 0: none)
  uint16_t io_base, io_size;          // port window for I/O BARs (size 0: none)
  // INTx routing: device slot s, pin p (0 = INTA) -> IOAPIC GSI 16 + ((s + p) % 8),
  // level-triggered and active-low as PCI interrupts are.
};

struct AcpiConfig {
  uint32_t cpu_count;  // LAPIC IDs 0..cpu_count-1, all enabled
  uint64_t ioapic_address;
  uint32_t ioapic_id;  // GSI base 0, 24 pins
  uint64_t lapic_address;
  PciHostConfig pci;
  uint16_t com1_port;
  uint32_t com1_irq;  // ISA IRQ
  uint16_t sleep_control_port, sleep_status_port, reset_port;
  uint8_t reset_value;
  uint8_t s5_sleep_type;  // SLP_TYP for S5 (0-7), also the _S5_ package's first value
  // The Generic Event Device (ACPI0013) and the power button it notifies:
  // an edge-triggered GSI and the 32-bit event register its _EVT reads
  // (kGedEvent* bits). ged_address 0: neither device.
  uint64_t ged_address;
  uint32_t ged_gsi;
  // QEMU's ISA pvpanic (QEMU0001), one I/O port; 0: none.
  uint16_t pvpanic_port;
  // ACPI PCI hotplug (src/devices/pci_hotplug.h): the MMIO address of its
  // register block; 0: none. Needs the GED, whose kGedEventPciHotplug bit
  // runs \_SB.PCI0.PCNT, which notifies slot objects S01..S1F.
  uint64_t pci_hotplug_address;
};

// The GED event register's bits: which event the interrupt was for.
inline constexpr uint32_t kGedEventPowerButton = 1u << 0;
inline constexpr uint32_t kGedEventPciHotplug = 1u << 1;
inline constexpr uint64_t kGedRegisterBytes = 4;
// The PCI hotplug register block: PCIU, PCID, B0EJ (32 bits each).
inline constexpr uint64_t kPciHotplugRegisterBytes = 12;

struct AcpiTables {
  std::vector<std::byte> bytes;  // to be copied to guest memory at `base`
  uint64_t rsdp_address;         // == base (RSDP first, 16-byte aligned)
};

// The first GSI of PCI INTx and how many GSIs the swizzle spreads over.
inline constexpr uint32_t kPciIntxFirstGsi = 16;
inline constexpr uint32_t kPciIntxGsiCount = 8;
inline constexpr uint32_t kIoapicPinCount = 24;

// The GSI of PCI device `slot` (0-31) interrupt pin `pin` (0 = INTA .. 3 = INTD).
constexpr uint32_t pci_intx_gsi(uint32_t slot, uint32_t pin) {
  return kPciIntxFirstGsi + (slot + pin) % kPciIntxGsiCount;
}

// A config with the addresses and ports of src/machine/layout.h for
// cpu_count CPUs and a 64-bit window of mmio64_size bytes at mmio64_base.
AcpiConfig default_config(uint32_t cpu_count, uint64_t mmio64_base, uint64_t mmio64_size);

// Builds the tables for guest-physical address `base` (16-byte aligned):
// the RSDP at base, then RSDT (if all below 4 GiB), XSDT, FADT, MADT, MCFG
// and DSDT, each 8-byte aligned. Fails with InvalidArgument for a config the
// tables cannot express, and OutOfRange if they would not fit in max_bytes.
Result<AcpiTables> build_tables(const AcpiConfig& config, uint64_t base, uint64_t max_bytes);

}  // namespace keel::boot::acpi
