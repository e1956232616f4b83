// The individual tables behind build_tables(). Each takes a config that
// build_tables() has already validated; a value out of range here is a bug.
// Spec: see acpi.h.
#pragma once

#include <cstdint>
#include <span>

#include "boot/acpi/acpi.h"
#include "boot/acpi/sdt.h"

namespace keel::boot::acpi {

inline constexpr size_t kRsdpSize = 36;
inline constexpr size_t kRsdpV1ChecksummedSize = 20;  // the ACPI 1.0 part
inline constexpr size_t kFadtSize = 276;              // ACPI 6.0 to 6.5

// Table revisions of ACPI 6.4.
inline constexpr uint8_t kRsdpRevision = 2;
inline constexpr uint8_t kRsdtRevision = 1;
inline constexpr uint8_t kXsdtRevision = 1;
inline constexpr uint8_t kFadtRevision = 6;
inline constexpr uint8_t kFadtMinorRevision = 4;
inline constexpr uint8_t kMadtRevision = 5;
inline constexpr uint8_t kMcfgRevision = 1;
inline constexpr uint8_t kDsdtRevision = 2;  // 2 and up: 64-bit AML integers

// FADT Fixed Feature Flags (ACPI 6.4 section 5.2.9).
inline constexpr uint32_t kFadtWbinvd = 1u << 0;
inline constexpr uint32_t kFadtPowerButton = 1u << 4;  // set: no fixed power button
inline constexpr uint32_t kFadtSleepButton = 1u << 5;  // set: no fixed sleep button
inline constexpr uint32_t kFadtResetRegSupported = 1u << 10;
inline constexpr uint32_t kFadtHardwareReduced = 1u << 20;

// IA-PC Boot Architecture Flags (ACPI 6.4 section 5.2.9.3).
inline constexpr uint16_t kBootArchLegacyDevices = 1u << 0;
inline constexpr uint16_t kBootArch8042 = 1u << 1;
inline constexpr uint16_t kBootArchVgaNotPresent = 1u << 2;
inline constexpr uint16_t kBootArchMsiNotSupported = 1u << 3;
inline constexpr uint16_t kBootArchCmosRtcNotPresent = 1u << 5;

// The CMOS index of the RTC's century register (src/devices/rtc.h).
inline constexpr uint8_t kRtcCenturyIndex = 0x32;

// MADT structure types (ACPI 6.4 section 5.2.12).
inline constexpr uint8_t kMadtLocalApic = 0;
inline constexpr uint8_t kMadtIoApic = 1;
inline constexpr uint8_t kMadtInterruptOverride = 2;
inline constexpr uint8_t kMadtLocalApicNmi = 4;
inline constexpr uint8_t kMadtLocalX2Apic = 9;
inline constexpr uint8_t kMadtLocalX2ApicNmi = 10;
inline constexpr uint32_t kMadtPcatCompat = 1u << 0;
inline constexpr uint32_t kMadtApicEnabled = 1u << 0;
// APIC IDs from here on need x2APIC structures (0xff is the xAPIC broadcast).
inline constexpr uint32_t kFirstX2ApicId = 255;

// The MADT's size for a CPU count, computed without building it so that a
// huge count is refused before anything is allocated.
uint64_t madt_size(uint32_t cpu_count);

Bytes build_rsdp(uint64_t rsdt_address, uint64_t xsdt_address);
Bytes build_rsdt(std::span<const uint64_t> table_addresses);  // addresses below 4 GiB
Bytes build_xsdt(std::span<const uint64_t> table_addresses);
Bytes build_fadt(const AcpiConfig& config, uint64_t dsdt_address);
Bytes build_madt(const AcpiConfig& config);
Bytes build_mcfg(const PciHostConfig& pci);
Bytes build_dsdt(const AcpiConfig& config);

}  // namespace keel::boot::acpi
