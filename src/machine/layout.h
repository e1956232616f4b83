// The guest-physical address map of a Keel PC. e820, the PVH memmap, ACPI
// and the PCI host bridge all describe this one map.
//
//   0x0000_0000  RAM (low); the first pages hold boot structures:
//     0x0500       GDT for the 64-bit Linux entry
//     0x7000       zero page (boot_params) / PVH hvm_start_info
//     0x9000       page tables for the 64-bit entry (PML4, PDPT, PD)
//     0x0002_0000  kernel command line
//     0x000e_0000  ACPI tables, RSDP first (BIOS read-only area)
//   0x0010_0000  kernel (bzImage protected-mode part or PVH ELF segments)
//   ...          initrd near the top of low RAM
//   0xc000_0000  32-bit PCI hole: MMIO window for 32-bit BARs
//   0xe000_0000  PCI ECAM (bus 0..255, 256 MiB)
//   0xfeb0_0000  ACPI GED event register
//   0xfec0_0000  IOAPIC
//   0xfee0_0000  LAPIC
//   0x1_0000_0000  RAM (high), the part above the hole
#pragma once

#include <cstdint>

namespace keel::layout {

inline constexpr uint64_t kGdtStart = 0x500;
inline constexpr uint64_t kBootParamsStart = 0x7000;
inline constexpr uint64_t kPageTablesStart = 0x9000;
inline constexpr uint64_t kCmdlineStart = 0x20000;
inline constexpr uint64_t kCmdlineMaxBytes = 0x10000;
inline constexpr uint64_t kEbdaStart = 0x9fc00;
inline constexpr uint64_t kAcpiStart = 0xe0000;
inline constexpr uint64_t kAcpiEnd = 0x100000;
// The real-mode reset vector (F000:FFF0). No firmware lives here, but Linux
// jumps to it to reboot (machine_real_restart), so Keel puts a stub there.
inline constexpr uint64_t kResetVector = 0xffff0;
inline constexpr uint64_t kHighMemoryStart = 0x100000;  // 1 MiB: the kernel goes here

inline constexpr uint64_t kPciHoleStart = 0xc0000000;
inline constexpr uint64_t kPciMmio32Start = 0xc0000000;
inline constexpr uint64_t kPciMmio32Size = 0x20000000;  // 512 MiB
inline constexpr uint64_t kPciEcamStart = 0xe0000000;
inline constexpr uint64_t kPciEcamSize = 0x10000000;    // room for 256 buses x 1 MiB
// The buses that exist (no bridges yet): ACPI announces only these. Linux
// probes every device of every announced bus for peer host bridges, so
// announcing 256 buses cost ~17,000 port exits per boot.
inline constexpr uint8_t kPciLastBus = 0;
inline constexpr uint64_t kIoapicStart = 0xfec00000;
inline constexpr uint64_t kLapicStart = 0xfee00000;
inline constexpr uint64_t kPciHoleEnd = 0x100000000;
// Port window for PCI I/O BARs (ACPI _CRS and the PCI bus use the same).
inline constexpr uint16_t kPciIoStart = 0x1000;
inline constexpr uint16_t kPciIoSize = 0xf000;
// 64-bit BARs go above RAM; the start is computed from the RAM size.
inline constexpr uint64_t kPciMmio64Size = 0x1000000000;  // 64 GiB

inline constexpr uint64_t kTssAddress = 0xfffbd000;       // KVM's three TSS pages
inline constexpr uint64_t kIdentityMapAddress = 0xfffbc000;

// Legacy ports.
inline constexpr uint16_t kCom1Port = 0x3f8;
inline constexpr uint32_t kCom1Irq = 4;
inline constexpr uint16_t kI8042Port = 0x60;   // and 0x64
inline constexpr uint16_t kRtcPort = 0x70;     // and 0x71
inline constexpr uint16_t kPciConfigAddressPort = 0xcf8;  // 8 bytes: 0xcf8..0xcff
// ACPI hardware-reduced sleep/reset registers (FADT SLEEP_CONTROL_REG,
// SLEEP_STATUS_REG and RESET_REG point here).
inline constexpr uint16_t kAcpiSleepControlPort = 0x3c0;
inline constexpr uint16_t kAcpiSleepStatusPort = 0x3c1;
inline constexpr uint16_t kAcpiResetPort = 0x3c2;
inline constexpr uint8_t kAcpiResetValue = 0x1;
inline constexpr uint8_t kAcpiS5SleepType = 5;  // the _S5_ package's SLP_TYP
// QEMU's ISA pvpanic port: the guest writes here when it panics.
inline constexpr uint16_t kPvpanicPort = 0x505;
// The ACPI Generic Event Device: its 32-bit event register (MMIO, between
// ECAM and the IOAPIC) and its interrupt, an ISA line nothing else uses.
inline constexpr uint64_t kGedStart = 0xfeb00000;
inline constexpr uint32_t kGedGsi = 9;
// ACPI PCI hotplug registers (src/devices/pci_hotplug.h), next to the GED.
inline constexpr uint64_t kPciHotplugStart = 0xfeb01000;
// Tiny test guests write their result here (like QEMU's isa-debug-exit).
inline constexpr uint16_t kDebugExitPort = 0xf4;

}  // namespace keel::layout
