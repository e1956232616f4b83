// RSDP, RSDT/XSDT, FADT, MADT and MCFG. Spec: ACPI 6.4 sections 5.2.5
// (RSDP), 5.2.7 (RSDT), 5.2.8 (XSDT), 5.2.9 (FADT), 5.2.12 (MADT), 4.8.3.6
// and 4.8.3.7 (reset, sleep control/status registers of hardware-reduced
// platforms); PCI Firmware Specification 3.2 section 4.1.2 (MCFG).
// Implemented: what acpi.h lists. Missing: see acpi.h.
#include "boot/acpi/tables.h"

#include <algorithm>

#include "base/check.h"

namespace keel::boot::acpi {

Bytes build_rsdp(uint64_t rsdt_address, uint64_t xsdt_address) {
  CHECK(rsdt_address <= UINT32_MAX, "RSDT above 4 GiB");
  ByteWriter w;
  w.ascii("RSD PTR ");
  w.u8(0);  // checksum of the first 20 bytes, below
  w.ascii(kOemId);
  w.u8(kRsdpRevision);
  w.u32(static_cast<uint32_t>(rsdt_address));
  w.u32(kRsdpSize);
  w.u64(xsdt_address);
  w.u8(0);  // extended checksum of all 36 bytes, below
  w.zeros(3);
  CHECK(w.size() == kRsdpSize, "RSDP size");
  // ACPI 6.4 section 5.2.5.3: the checksum covers the ACPI 1.0 part (bytes
  // 0-19), the extended checksum the whole structure including the first.
  w.patch_u8(8, checksum_for(std::span(w.bytes()).first(kRsdpV1ChecksummedSize)));
  w.patch_u8(32, checksum_for(w.bytes()));
  return std::move(w).bytes();
}

Bytes build_rsdt(std::span<const uint64_t> table_addresses) {
  SdtBuilder table("RSDT", kRsdtRevision);
  for (uint64_t address : table_addresses) {
    CHECK(address <= UINT32_MAX, "RSDT entry above 4 GiB");
    table.writer().u32(static_cast<uint32_t>(address));
  }
  return std::move(table).finish();
}

Bytes build_xsdt(std::span<const uint64_t> table_addresses) {
  SdtBuilder table("XSDT", kXsdtRevision);
  for (uint64_t address : table_addresses) table.writer().u64(address);
  return std::move(table).finish();
}

Bytes build_fadt(const AcpiConfig& config, uint64_t dsdt_address) {
  SdtBuilder table("FACP", kFadtRevision);
  ByteWriter& w = table.writer();
  // A hardware-reduced platform has no FACS (ACPI 6.4 section 5.2.9:
  // FIRMWARE_CTRL and X_FIRMWARE_CTRL both 0), no SMI command port, no
  // PM1/PM2/PM timer/GPE blocks and no SCI (section 4.1, "Hardware-Reduced
  // ACPI"): all those fields stay 0.
  w.u32(0);  // FIRMWARE_CTRL
  // The 32-bit DSDT field too when it fits; ACPICA accepts both when they
  // agree, and X_DSDT wins otherwise.
  w.u32(dsdt_address <= UINT32_MAX ? static_cast<uint32_t>(dsdt_address) : 0);
  w.u8(0);         // reserved (the ACPI 1.0 INT_MODEL)
  w.u8(0);         // Preferred_PM_Profile: unspecified
  w.u16(0);        // SCI_INT
  w.u32(0);        // SMI_CMD
  w.u8(0);         // ACPI_ENABLE
  w.u8(0);         // ACPI_DISABLE
  w.u8(0);         // S4BIOS_REQ
  w.u8(0);         // PSTATE_CNT
  w.zeros(8 * 4);  // PM1a_EVT_BLK .. GPE1_BLK
  w.zeros(8);      // PM1_EVT_LEN .. GPE1_BASE, CST_CNT
  // Latencies above 100 and 1000 us say C2 and C3 are not supported.
  w.u16(101);              // P_LVL2_LAT
  w.u16(1001);             // P_LVL3_LAT
  w.u16(0);                // FLUSH_SIZE
  w.u16(0);                // FLUSH_STRIDE
  w.u8(0);                 // DUTY_OFFSET
  w.u8(0);                 // DUTY_WIDTH
  w.u8(0);                 // DAY_ALRM: no alarm day register
  w.u8(0);                 // MON_ALRM: no alarm month register
  w.u8(kRtcCenturyIndex);  // CENTURY
  // IA-PC boot architecture (section 5.2.9.3): no VGA, and no 8042: Keel's
  // i8042 only takes the reset command, and announcing a controller makes
  // Linux probe it and wait out its timeouts (over a second of boot). The
  // keyboard-controller reboot path writes port 0x64 regardless. CMOS RTC
  // Not Present stays clear because the RTC is at 0x70.
  w.u16(kBootArchVgaNotPresent);
  w.u8(0);  // reserved
  // Hardware-reduced ACPI (section 4.1): power and sleep buttons, if any,
  // are devices in the namespace, not fixed hardware, so both "button is a
  // control method device" flags are set.
  w.u32(kFadtWbinvd | kFadtPowerButton | kFadtSleepButton | kFadtResetRegSupported |
        kFadtHardwareReduced);
  write_generic_address(w, io_port_u8(config.reset_port));  // RESET_REG (section 4.8.3.6)
  w.u8(config.reset_value);                                 // RESET_VALUE
  w.u16(0);                                                 // ARM_BOOT_ARCH
  w.u8(kFadtMinorRevision);
  w.u64(0);                                                  // X_FIRMWARE_CTRL
  w.u64(dsdt_address);                                       // X_DSDT
  for (int i = 0; i < 8; ++i) write_generic_address(w, {});  // X_PM1a_EVT_BLK .. X_GPE1_BLK
  // Section 4.8.3.7: OSPM enters S5 by writing SLP_TYP (from \_S5) << 2 |
  // SLP_EN (bit 5) to the sleep control register.
  write_generic_address(w, io_port_u8(config.sleep_control_port));  // SLEEP_CONTROL_REG
  write_generic_address(w, io_port_u8(config.sleep_status_port));   // SLEEP_STATUS_REG
  w.ascii(kOemTableId);  // Hypervisor Vendor Identity: 8 bytes, "KEELVMM "
  CHECK(w.size() == kFadtSize, "FADT size");
  return std::move(table).finish();
}

uint64_t madt_size(uint32_t cpu_count) {
  uint64_t xapic_count = std::min<uint64_t>(cpu_count, kFirstX2ApicId);
  uint64_t x2apic_count = cpu_count - xapic_count;
  return kSdtHeaderSize + 8 + xapic_count * 8 + x2apic_count * 16 + 12 + 10 + 6 +
         (x2apic_count > 0 ? 12 : 0);
}

Bytes build_madt(const AcpiConfig& config) {
  CHECK(config.lapic_address <= UINT32_MAX && config.ioapic_address <= UINT32_MAX &&
            config.ioapic_id <= UINT8_MAX,
        "MADT config not validated");
  SdtBuilder table("APIC", kMadtRevision);
  ByteWriter& w = table.writer();
  w.u32(static_cast<uint32_t>(config.lapic_address));
  // PCAT_COMPAT: KVM's in-kernel irqchip has the PC-AT dual 8259s too, which
  // the OS masks before using the APICs (section 5.2.12, MADT flags).
  w.u32(kMadtPcatCompat);

  // Section 5.2.12, Processor Local x2APIC Structure: APIC IDs below 255 use Processor Local APIC
  // structures, the rest Processor Local x2APIC structures. The ACPI
  // processor UID equals the APIC ID. The boot CPU (ID 0) comes first.
  for (uint32_t id = 0; id < config.cpu_count; ++id) {
    if (id < kFirstX2ApicId) {
      w.u8(kMadtLocalApic);
      w.u8(8);
      w.u8(static_cast<uint8_t>(id));  // ACPI processor UID
      w.u8(static_cast<uint8_t>(id));  // APIC ID
      w.u32(kMadtApicEnabled);
    } else {
      w.u8(kMadtLocalX2Apic);
      w.u8(16);
      w.u16(0);   // reserved
      w.u32(id);  // x2APIC ID
      w.u32(kMadtApicEnabled);
      w.u32(id);  // ACPI processor UID
    }
  }

  w.u8(kMadtIoApic);
  w.u8(12);
  w.u8(static_cast<uint8_t>(config.ioapic_id));
  w.u8(0);  // reserved
  w.u32(static_cast<uint32_t>(config.ioapic_address));
  w.u32(0);  // global system interrupt base

  // The PIT's IRQ0 is wired to IOAPIC pin 2 on PCs; MPS INTI flags
  // (section 5.2.12, Interrupt Source Override Structure): bits 1-0 polarity 01 active high, bits
  // 3-2 trigger 01 edge.
  w.u8(kMadtInterruptOverride);
  w.u8(10);
  w.u8(0);   // bus: ISA
  w.u8(0);   // source: IRQ0
  w.u32(2);  // GSI
  w.u16(0x0005);

  // Each CPU's LINT1 is the NMI input (section 5.2.12, Local APIC NMI
  // Structure); UID 0xff: all processors.
  w.u8(kMadtLocalApicNmi);
  w.u8(6);
  w.u8(0xff);
  w.u16(0);  // flags: conforming to the bus
  w.u8(1);   // LINT1
  if (config.cpu_count > kFirstX2ApicId) {
    // The same for x2APIC processors (Local x2APIC NMI Structure); UID ~0: all.
    w.u8(kMadtLocalX2ApicNmi);
    w.u8(12);
    w.u16(0);
    w.u32(0xffffffff);
    w.u8(1);
    w.zeros(3);
  }
  CHECK(w.size() == madt_size(config.cpu_count), "MADT size");
  return std::move(table).finish();
}

Bytes build_mcfg(const PciHostConfig& pci) {
  SdtBuilder table("MCFG", kMcfgRevision);
  ByteWriter& w = table.writer();
  w.zeros(8);  // reserved
  // One configuration space base address allocation structure.
  w.u64(pci.ecam_base);
  w.u16(0);  // PCI segment group
  w.u8(0);   // start bus
  w.u8(pci.bus_end);
  w.u32(0);  // reserved
  return std::move(table).finish();
}

}  // namespace keel::boot::acpi
