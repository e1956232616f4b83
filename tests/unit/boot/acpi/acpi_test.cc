// The ACPI table set, read back the way an OS finds it (RSDP -> XSDT ->
// tables). Spec: ACPI 6.4 sections 5.2.5 (RSDP), 5.2.6 (header), 5.2.7/5.2.8
// (RSDT/XSDT), 5.2.9 (FADT), 5.2.12 (MADT), PCI Firmware 3.2 section 4.1.2
// (MCFG). Covered: lengths and checksums of every table, the fields Linux
// reads, 1/2/64/255/300 CPUs, tables above 4 GiB, config validation.
// Missing: nothing known (iasl_test.cc cross-checks with ACPICA).
#include "boot/acpi/acpi.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "machine/layout.h"
#include "table_view.h"

namespace keel::boot::acpi {
namespace {

using testing::ascii_at;
using testing::parse;
using testing::sum_of;
using testing::TableSet;
using testing::u16_at;
using testing::u32_at;
using testing::u64_at;
using testing::u8_at;

constexpr uint64_t kBase = layout::kAcpiStart;
constexpr uint64_t kMaxBytes = layout::kAcpiEnd - layout::kAcpiStart;
constexpr uint64_t kMmio64Base = 0x200000000;  // above 8 GiB of RAM

AcpiConfig config_for(uint32_t cpu_count) {
  return default_config(cpu_count, kMmio64Base, layout::kPciMmio64Size);
}

AcpiTables build(const AcpiConfig& config, uint64_t base = kBase) {
  auto built = build_tables(config, base, kMaxBytes);
  EXPECT_TRUE(built.has_value()) << (built ? "" : built.error().message());
  return built ? std::move(*built) : AcpiTables{};
}

// One table of a freshly built set, copied out so that it outlives the set.
std::vector<std::byte> built_table(const AcpiConfig& config, const std::string& signature) {
  AcpiTables built = build(config);
  auto table = parse(built).get(signature);
  return {table.begin(), table.end()};
}

bool contains(std::span<const std::byte> haystack, std::string_view needle) {
  auto it = std::search(haystack.begin(), haystack.end(), needle.begin(), needle.end(),
                        [](std::byte b, char c) { return static_cast<char>(b) == c; });
  return it != haystack.end();
}

struct GenericAddressFields {
  uint8_t space_id, bit_width, bit_offset, access_size;
  uint64_t address;
  bool operator==(const GenericAddressFields&) const = default;
};

GenericAddressFields gas_at(std::span<const std::byte> table, size_t offset) {
  return {u8_at(table, offset), u8_at(table, offset + 1), u8_at(table, offset + 2),
          u8_at(table, offset + 3), u64_at(table, offset + 4)};
}

TEST(AcpiTablesTest, RsdpComesFirstWithBothChecksums) {
  AcpiTables built = build(config_for(2));
  EXPECT_EQ(built.rsdp_address, kBase);
  EXPECT_EQ(built.rsdp_address % 16, 0u);
  EXPECT_LE(built.bytes.size(), kMaxBytes);
  TableSet set = parse(built);
  ASSERT_EQ(set.rsdp.size(), 36u);
  EXPECT_EQ(ascii_at(set.rsdp, 0, 8), "RSD PTR ");
  EXPECT_EQ(ascii_at(set.rsdp, 9, 6), "KEEL  ");
  EXPECT_EQ(u8_at(set.rsdp, 15), 2);     // revision: ACPI 2.0+
  EXPECT_EQ(u32_at(set.rsdp, 20), 36u);  // length
  EXPECT_EQ(sum_of(set.rsdp.first(20)), 0) << "ACPI 1.0 checksum";
  EXPECT_EQ(sum_of(set.rsdp), 0) << "extended checksum";
  EXPECT_NE(u64_at(set.rsdp, 24), 0u);  // XSDT
  EXPECT_NE(u32_at(set.rsdp, 16), 0u);  // RSDT: the tables are below 4 GiB
}

TEST(AcpiTablesTest, EveryTableHasItsLengthAndAZeroChecksum) {
  for (uint32_t cpus : {1u, 2u, 64u, 255u, 300u}) {
    AcpiTables built = build(config_for(cpus));
    TableSet set = parse(built);
    for (const char* signature : {"RSDT", "XSDT", "FACP", "APIC", "MCFG", "DSDT"}) {
      auto table = set.get(signature);
      ASSERT_GE(table.size(), 36u) << signature;
      EXPECT_EQ(ascii_at(table, 0, 4), signature);
      EXPECT_EQ(u32_at(table, 4), table.size()) << signature;
      EXPECT_EQ(sum_of(table), 0) << signature << " checksum, " << cpus << " CPUs";
      EXPECT_EQ(ascii_at(table, 10, 6), "KEEL  ") << signature;
      EXPECT_EQ(ascii_at(table, 16, 8), "KEELVMM ") << signature;
      EXPECT_EQ(ascii_at(table, 28, 4), "KEEL") << signature;
      EXPECT_EQ(u32_at(table, 24), 1u) << signature << " OEM revision";
    }
  }
}

TEST(AcpiTablesTest, XsdtAndRsdtPointAtEachTable) {
  AcpiTables built = build(config_for(2));
  TableSet set = parse(built);
  ASSERT_EQ(set.xsdt_entries.size(), 3u);
  std::vector<std::string> signatures;
  for (uint64_t address : set.xsdt_entries) {
    auto table = testing::table_at(built, address);
    signatures.push_back(ascii_at(table, 0, 4));
    EXPECT_EQ(address % 8, 0u);
  }
  EXPECT_EQ(signatures, (std::vector<std::string>{"FACP", "APIC", "MCFG"}));
  auto rsdt = set.get("RSDT");
  ASSERT_EQ(rsdt.size(), 36u + 3 * 4);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(u32_at(rsdt, 36 + 4 * i), set.xsdt_entries[i]);
  EXPECT_EQ(u8_at(set.get("XSDT"), 8), 1);  // revision
}

TEST(AcpiTablesTest, FadtIsHardwareReducedWithSleepAndResetRegisters) {
  AcpiConfig config = config_for(2);
  AcpiTables built = build(config);
  TableSet set = parse(built);
  auto fadt = set.get("FACP");
  ASSERT_EQ(fadt.size(), 276u);
  EXPECT_EQ(u8_at(fadt, 8), 6);    // revision
  EXPECT_EQ(u8_at(fadt, 131), 4);  // minor revision: ACPI 6.4

  uint32_t flags = u32_at(fadt, 112);
  EXPECT_TRUE(flags & (1u << 20)) << "HW_REDUCED_ACPI";
  EXPECT_TRUE(flags & (1u << 10)) << "RESET_REG_SUP";
  EXPECT_TRUE(flags & (1u << 4)) << "PWR_BUTTON: no fixed power button";
  EXPECT_TRUE(flags & (1u << 5)) << "SLP_BUTTON: no fixed sleep button";
  EXPECT_EQ(flags & (1u << 12), 0u) << "not HEADLESS";

  // IA-PC boot architecture: no 8042 (Linux would probe it), no VGA; the
  // RTC is present, no MSI bar.
  EXPECT_EQ(u16_at(fadt, 109), 0x0004);
  EXPECT_EQ(u8_at(fadt, 108), 0x32);  // RTC century register

  // Nothing of the fixed hardware model: FACS, SCI, SMI, PM1/PM2/timer/GPE.
  EXPECT_EQ(u32_at(fadt, 36), 0u);
  EXPECT_EQ(u16_at(fadt, 46), 0u);
  EXPECT_EQ(u32_at(fadt, 48), 0u);
  for (size_t offset = 56; offset < 88; offset += 4) EXPECT_EQ(u32_at(fadt, offset), 0u);
  for (size_t offset = 148; offset < 244; ++offset) EXPECT_EQ(u8_at(fadt, offset), 0);
  EXPECT_EQ(u64_at(fadt, 132), 0u);  // X_FIRMWARE_CTRL

  // SystemIO (1), 8 bits at offset 0, byte access.
  EXPECT_EQ(gas_at(fadt, 116), (GenericAddressFields{1, 8, 0, 1, layout::kAcpiResetPort}));
  EXPECT_EQ(u8_at(fadt, 128), layout::kAcpiResetValue);
  EXPECT_EQ(gas_at(fadt, 244), (GenericAddressFields{1, 8, 0, 1, layout::kAcpiSleepControlPort}));
  EXPECT_EQ(gas_at(fadt, 256), (GenericAddressFields{1, 8, 0, 1, layout::kAcpiSleepStatusPort}));

  // X_DSDT and DSDT both name the DSDT.
  uint64_t dsdt = u64_at(fadt, 140);
  EXPECT_EQ(u32_at(fadt, 40), dsdt);
  EXPECT_EQ(ascii_at(testing::table_at(built, dsdt), 0, 4), "DSDT");
}

TEST(AcpiTablesTest, FadtRegistersFollowTheConfig) {
  AcpiConfig config = config_for(1);
  config.sleep_control_port = 0x600;
  config.sleep_status_port = 0x601;
  config.reset_port = 0xcf9;
  config.reset_value = 0x06;
  auto fadt = built_table(config, "FACP");
  EXPECT_EQ(u64_at(fadt, 120), 0xcf9u);
  EXPECT_EQ(u8_at(fadt, 128), 0x06);
  EXPECT_EQ(u64_at(fadt, 248), 0x600u);
  EXPECT_EQ(u64_at(fadt, 260), 0x601u);
}

// Walks the MADT's interrupt controller structures.
struct MadtContents {
  std::vector<std::pair<uint32_t, uint32_t>> lapics;  // (UID, APIC ID), xAPIC and x2APIC
  int xapic_count = 0, x2apic_count = 0, ioapic_count = 0, override_count = 0;
  int nmi_count = 0, x2apic_nmi_count = 0;
  bool all_enabled = true;
  bool walked_to_end = false;
};

MadtContents walk_madt(std::span<const std::byte> madt) {
  MadtContents out;
  size_t offset = 44;
  while (offset + 2 <= madt.size()) {
    uint8_t type = u8_at(madt, offset);
    uint8_t length = u8_at(madt, offset + 1);
    if (length < 2 || offset + length > madt.size()) break;
    switch (type) {
      case 0:
        EXPECT_EQ(length, 8);
        out.lapics.emplace_back(u8_at(madt, offset + 2), u8_at(madt, offset + 3));
        out.all_enabled &= (u32_at(madt, offset + 4) & 1) != 0;
        ++out.xapic_count;
        break;
      case 9:
        EXPECT_EQ(length, 16);
        out.lapics.emplace_back(u32_at(madt, offset + 12), u32_at(madt, offset + 4));
        out.all_enabled &= (u32_at(madt, offset + 8) & 1) != 0;
        ++out.x2apic_count;
        break;
      case 1:
        EXPECT_EQ(length, 12);
        EXPECT_EQ(u8_at(madt, offset + 2), 0);  // IOAPIC ID
        EXPECT_EQ(u32_at(madt, offset + 4), layout::kIoapicStart);
        EXPECT_EQ(u32_at(madt, offset + 8), 0u);  // GSI base
        ++out.ioapic_count;
        break;
      case 2:
        EXPECT_EQ(length, 10);
        EXPECT_EQ(u8_at(madt, offset + 2), 0);     // ISA
        EXPECT_EQ(u8_at(madt, offset + 3), 0);     // IRQ0
        EXPECT_EQ(u32_at(madt, offset + 4), 2u);   // -> GSI 2
        EXPECT_EQ(u16_at(madt, offset + 8), 0x5);  // edge, active high
        ++out.override_count;
        break;
      case 4:
        EXPECT_EQ(length, 6);
        EXPECT_EQ(u8_at(madt, offset + 2), 0xff);  // all processors
        EXPECT_EQ(u8_at(madt, offset + 5), 1);     // LINT1
        ++out.nmi_count;
        break;
      case 10:
        EXPECT_EQ(length, 12);
        EXPECT_EQ(u32_at(madt, offset + 4), 0xffffffffu);
        EXPECT_EQ(u8_at(madt, offset + 8), 1);
        ++out.x2apic_nmi_count;
        break;
      default:
        ADD_FAILURE() << "unexpected MADT structure type " << int{type};
    }
    offset += length;
  }
  out.walked_to_end = offset == madt.size();
  return out;
}

TEST(AcpiTablesTest, MadtHasOneLocalApicPerCpu) {
  for (uint32_t cpus : {1u, 2u, 64u}) {
    auto madt = built_table(config_for(cpus), "APIC");
    EXPECT_EQ(u8_at(madt, 8), 5);  // revision
    EXPECT_EQ(u32_at(madt, 36), layout::kLapicStart);
    EXPECT_EQ(u32_at(madt, 40), 1u);  // PCAT_COMPAT
    MadtContents contents = walk_madt(madt);
    EXPECT_TRUE(contents.walked_to_end);
    EXPECT_EQ(contents.xapic_count, static_cast<int>(cpus));
    EXPECT_EQ(contents.x2apic_count, 0);
    ASSERT_EQ(contents.lapics.size(), cpus);
    for (uint32_t i = 0; i < cpus; ++i) {
      EXPECT_EQ(contents.lapics[i], std::make_pair(i, i));
    }
    EXPECT_TRUE(contents.all_enabled);
    EXPECT_EQ(contents.ioapic_count, 1);
    EXPECT_EQ(contents.override_count, 1);
    EXPECT_EQ(contents.nmi_count, 1);
    EXPECT_EQ(contents.x2apic_nmi_count, 0);
  }
}

TEST(AcpiTablesTest, MadtUsesX2ApicEntriesFromId255) {
  auto madt255 = built_table(config_for(255), "APIC");
  MadtContents c255 = walk_madt(madt255);
  EXPECT_EQ(c255.xapic_count, 255);
  EXPECT_EQ(c255.x2apic_count, 0);

  auto madt = built_table(config_for(300), "APIC");
  MadtContents contents = walk_madt(madt);
  EXPECT_TRUE(contents.walked_to_end);
  EXPECT_EQ(contents.xapic_count, 255);
  EXPECT_EQ(contents.x2apic_count, 45);
  ASSERT_EQ(contents.lapics.size(), 300u);
  for (uint32_t i = 0; i < 300; ++i) EXPECT_EQ(contents.lapics[i], std::make_pair(i, i));
  EXPECT_TRUE(contents.all_enabled);
  EXPECT_EQ(contents.nmi_count, 1);
  EXPECT_EQ(contents.x2apic_nmi_count, 1);
}

TEST(AcpiTablesTest, McfgDescribesTheEcam) {
  auto mcfg = built_table(config_for(1), "MCFG");
  ASSERT_EQ(mcfg.size(), 60u);
  EXPECT_EQ(u8_at(mcfg, 8), 1);     // revision
  EXPECT_EQ(u64_at(mcfg, 36), 0u);  // reserved
  EXPECT_EQ(u64_at(mcfg, 44), layout::kPciEcamStart);
  EXPECT_EQ(u16_at(mcfg, 52), 0);   // segment
  EXPECT_EQ(u8_at(mcfg, 54), 0);    // start bus
  EXPECT_EQ(u8_at(mcfg, 55), layout::kPciLastBus);  // end bus: only the buses that exist
  EXPECT_EQ(u32_at(mcfg, 56), 0u);

  AcpiConfig config = config_for(1);
  config.pci.ecam_base = 0xb0000000;
  config.pci.bus_end = 15;
  auto small = built_table(config, "MCFG");
  EXPECT_EQ(u64_at(small, 44), 0xb0000000u);
  EXPECT_EQ(u8_at(small, 55), 15);
}

TEST(AcpiTablesTest, DsdtHoldsTheNamespace) {
  auto dsdt = built_table(config_for(2), "DSDT");
  EXPECT_EQ(u8_at(dsdt, 8), 2);  // revision 2: 64-bit integers
  for (std::string_view name :
       {"_SB_", "PCI0", "_HID", "_CID", "_SEG", "_BBN", "_UID", "_CRS", "_PRT", "COM1", "MRES"}) {
    EXPECT_TRUE(contains(dsdt, name)) << name;
  }
  // Name(\_S5_, Package(2) {5, 0}) at the end.
  const std::string s5 = {0x08, '\\', '_', 'S', '5', '_', 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00};
  EXPECT_TRUE(contains(dsdt, s5));
  // EISAID("PNP0A08"), ("PNP0501").
  EXPECT_TRUE(contains(dsdt, std::string{0x0c, 0x41, char(0xd0), 0x0a, 0x08}));
  EXPECT_TRUE(contains(dsdt, std::string{0x0c, 0x41, char(0xd0), 0x05, 0x01}));
}

TEST(AcpiTablesTest, S5FollowsTheConfiguredSleepType) {
  AcpiConfig config = config_for(1);
  config.s5_sleep_type = 7;
  auto dsdt = built_table(config, "DSDT");
  const std::string s5 = {'_', 'S', '5', '_', 0x12, 0x05, 0x02, 0x0a, 0x07, 0x00};
  EXPECT_TRUE(contains(dsdt, s5));
}

TEST(AcpiTablesTest, TablesAbove4GiBDropTheRsdt) {
  constexpr uint64_t kHighBase = 0x100000000;
  AcpiTables built = build(config_for(2), kHighBase);
  EXPECT_EQ(built.rsdp_address, kHighBase);
  TableSet set = parse(built);
  EXPECT_EQ(u32_at(set.rsdp, 16), 0u);
  EXPECT_EQ(set.tables.count("RSDT"), 0u);
  auto fadt = set.get("FACP");
  EXPECT_EQ(u32_at(fadt, 40), 0u);  // the 32-bit DSDT pointer cannot hold it
  EXPECT_GE(u64_at(fadt, 140), kHighBase);
  EXPECT_EQ(sum_of(fadt), 0);
}

TEST(AcpiTablesTest, IsDeterministic) {
  EXPECT_EQ(build(config_for(4)).bytes, build(config_for(4)).bytes);
}

TEST(AcpiTablesTest, Without64BitWindowTheDsdtShrinks) {
  AcpiConfig config = config_for(1);
  auto with = built_table(config, "DSDT").size();
  config.pci.mmio64_size = 0;
  auto without = built_table(config, "DSDT").size();
  EXPECT_EQ(with - without, 46u);  // one QWordMemory descriptor
}

void expect_invalid(const AcpiConfig& config, std::string_view what, uint64_t base = kBase,
                    uint64_t max_bytes = kMaxBytes) {
  auto built = build_tables(config, base, max_bytes);
  ASSERT_FALSE(built.has_value()) << what;
  EXPECT_EQ(built.error().code(), Errc::InvalidArgument) << built.error().message();
  EXPECT_NE(built.error().message().find(what), std::string::npos) << built.error().message();
}

TEST(AcpiTablesTest, RefusesConfigsTheTablesCannotExpress) {
  expect_invalid(config_for(0), "cpu_count");
  expect_invalid(config_for(1), "16-byte", kBase + 8);
  expect_invalid(config_for(1), "wraps", UINT64_MAX - 15, 64);

  AcpiConfig c = config_for(1);
  c.lapic_address = 0x100000000;
  expect_invalid(c, "LAPIC");
  c = config_for(1);
  c.ioapic_address = 0x100000000;
  expect_invalid(c, "IOAPIC address");
  c = config_for(1);
  c.ioapic_id = 256;
  expect_invalid(c, "IOAPIC ID");
  for (uint32_t irq : {0u, 2u, 16u}) {
    c = config_for(1);
    c.com1_irq = irq;
    expect_invalid(c, "COM1 IRQ");
  }
  c = config_for(1);
  c.com1_port = 0xfffc;
  expect_invalid(c, "COM1 port");
  c = config_for(1);
  c.s5_sleep_type = 8;
  expect_invalid(c, "SLP_TYP");
  c = config_for(1);
  c.pci.ecam_base = 0xe0080000;
  expect_invalid(c, "1 MiB aligned");
  c = config_for(1);
  c.pci.mmio32_base = 0xf0000000;
  c.pci.mmio32_size = 0x20000000;
  expect_invalid(c, "4 GiB");
  c = config_for(1);
  c.pci.mmio32_size = 0;
  expect_invalid(c, "32-bit window");
  c = config_for(1);
  c.pci.mmio64_base = UINT64_MAX - 0xfff;
  c.pci.mmio64_size = 0x2000;
  expect_invalid(c, "64-bit window");
  c = config_for(1);
  c.pci.io_base = 0xc000;
  c.pci.io_size = 0x8000;
  expect_invalid(c, "passes port 0xffff");
  c = config_for(1);
  c.pci.io_base = 0x0c00;
  c.pci.io_size = 0x1000;
  expect_invalid(c, "config ports");
}

TEST(AcpiTablesTest, RefusesTablesLargerThanTheSpace) {
  auto tiny = build_tables(config_for(1), kBase, 256);
  ASSERT_FALSE(tiny.has_value());
  EXPECT_EQ(tiny.error().code(), Errc::OutOfRange);

  // A huge CPU count is refused from the computed size, before building.
  auto huge = build_tables(config_for(UINT32_MAX), kBase, kMaxBytes);
  ASSERT_FALSE(huge.has_value());
  EXPECT_EQ(huge.error().code(), Errc::OutOfRange);

  // Exactly enough space is enough.
  auto fitting = build_tables(config_for(2), kBase, kMaxBytes);
  ASSERT_TRUE(fitting.has_value());
  auto exact = build_tables(config_for(2), kBase, fitting->bytes.size());
  ASSERT_TRUE(exact.has_value()) << exact.error().message();
  EXPECT_EQ(exact->bytes, fitting->bytes);
}

TEST(AcpiTablesTest, PciIntxSwizzle) {
  EXPECT_EQ(pci_intx_gsi(0, 0), 16u);
  EXPECT_EQ(pci_intx_gsi(0, 3), 19u);
  EXPECT_EQ(pci_intx_gsi(5, 3), 16u);
  EXPECT_EQ(pci_intx_gsi(31, 3), 18u);
  for (uint32_t slot = 0; slot < 32; ++slot) {
    for (uint32_t pin = 0; pin < 4; ++pin) EXPECT_LT(pci_intx_gsi(slot, pin), kIoapicPinCount);
  }
}

}  // namespace
}  // namespace keel::boot::acpi
