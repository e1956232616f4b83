// The tables through an independent implementation: ACPICA's iasl (tested
// with 20200925) disassembles each one, failing on malformed tables, and
// the disassembled DSDT recompiles to the same AML. Spec: as acpi_test.cc.
// Skips, saying so, when iasl is not installed (Debian: acpica-tools).
// Missing: the RSDP, which iasl cannot disassemble from a binary file.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <sstream>
#include <string>

#include "boot/acpi/acpi.h"
#include "machine/layout.h"
#include "table_view.h"

namespace keel::boot::acpi {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kBase = layout::kAcpiStart;
constexpr uint64_t kMaxBytes = layout::kAcpiEnd - layout::kAcpiStart;

std::optional<fs::path> find_iasl() {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  std::stringstream stream(dirs);
  std::string dir;
  while (std::getline(stream, dir, ':')) {
    fs::path candidate = fs::path(dir.empty() ? "." : dir) / "iasl";
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return std::nullopt;
}

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::path(::testing::TempDir()) / "keel-acpi-XXXXXX").string();
    if (::mkdtemp(pattern.data()) != nullptr) path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    if (!path_.empty()) fs::remove_all(path_, ignored);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

void write_file(const fs::path& path, std::span<const std::byte> data) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Runs iasl in dir with the given arguments; returns its exit status and
// leaves its output in dir/<log_name>.
int run_iasl(const fs::path& iasl, const fs::path& dir, const std::string& arguments,
             const std::string& log_name) {
  std::string command = "cd '" + dir.string() + "' && '" + iasl.string() + "' " + arguments +
                        " > " + log_name + " 2>&1";
  int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// iasl aligns its output in columns; compare with single spaces.
std::string squeeze_spaces(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '\t') c = ' ';
    if (c == ' ' && !out.empty() && out.back() == ' ') continue;
    out.push_back(c);
  }
  return out;
}

size_t count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

class AcpiIaslTest : public ::testing::Test {
 protected:
  void SetUp() override {
    iasl_ = find_iasl();
    if (!iasl_) {
      GTEST_SKIP() << "iasl not found in PATH (install acpica-tools): the ACPI tables were NOT "
                      "checked by an independent disassembler";
    }
    ASSERT_FALSE(dir_.path().empty()) << "mkdtemp failed";
  }

  // Disassembles one table; returns the .dsl text with spaces squeezed.
  std::string disassemble(std::span<const std::byte> table, const std::string& name) {
    write_file(dir_.path() / (name + ".dat"), table);
    int status = run_iasl(*iasl_, dir_.path(), "-d " + name + ".dat", name + ".log");
    EXPECT_EQ(status, 0) << "iasl -d " << name << ":\n" << read_file(dir_.path() / (name + ".log"));
    std::string text = read_file(dir_.path() / (name + ".dsl"));
    EXPECT_FALSE(text.empty()) << name;
    return squeeze_spaces(text);
  }

  // Recompiles a disassembled DSDT without optimizations and checks the AML
  // matches ours. iasl writes resource template End Tag checksums as 0,
  // which section 6.4.2.9 allows, so those bytes may differ, nothing else.
  void expect_recompiles_identically(std::span<const std::byte> dsdt, const std::string& name) {
    int status = run_iasl(*iasl_, dir_.path(), "-oa " + name + ".dsl", name + "-asl.log");
    std::string log = read_file(dir_.path() / (name + "-asl.log"));
    ASSERT_EQ(status, 0) << log;
    EXPECT_NE(log.find("0 Errors, 0 Warnings, 0 Remarks"), std::string::npos) << log;
    std::string aml = read_file(dir_.path() / (name + ".aml"));
    ASSERT_EQ(aml.size(), dsdt.size());
    for (size_t i = 36; i < aml.size(); ++i) {
      auto ours = static_cast<uint8_t>(dsdt[i]);
      auto theirs = static_cast<uint8_t>(aml[i]);
      if (ours == theirs) continue;
      bool end_tag_checksum = theirs == 0 && static_cast<uint8_t>(dsdt[i - 1]) == 0x79;
      EXPECT_TRUE(end_tag_checksum)
          << "AML differs at offset " << i << ": ours " << int{ours} << ", iasl " << int{theirs};
    }
  }

  std::optional<fs::path> iasl_;
  TempDir dir_;
};

TEST_F(AcpiIaslTest, DsdtDisassemblesAndRecompiles) {
  auto built =
      build_tables(default_config(2, 0x200000000, layout::kPciMmio64Size), kBase, kMaxBytes);
  ASSERT_TRUE(built.has_value());
  auto dsdt = testing::parse(*built).get("DSDT");
  std::string asl = disassemble(dsdt, "dsdt");
  for (const char* expected :
       {"DefinitionBlock (\"\", \"DSDT\", 2, \"KEEL \", \"KEELVMM \", 0x00000001)",
        "Scope (\\_SB)",
        "Device (PCI0)",
        "Name (_HID, EisaId (\"PNP0A08\")",
        "Name (_CID, EisaId (\"PNP0A03\")",
        "Name (_SEG, Zero)",
        "Name (_BBN, Zero)",
        "Name (_UID, Zero)",
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,",
        "0x0000, // Range Maximum",  // bus 0 only (layout::kPciLastBus)
        "IO (Decode16,\n 0x0CF8, // Range Minimum",
        "WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,",
        "0xF000, // Length",
        "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
        "0xDFFFFFFF, // Range Maximum",
        "QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite,",
        "0x00000011FFFFFFFF, // Range Maximum",
        "Name (_PRT, Package (0x80)",
        "0x001FFFFF, \n 0x03, \n Zero, \n 0x12",
        "Device (MRES)",
        "Name (_HID, EisaId (\"PNP0C02\")",
        "Memory32Fixed (ReadWrite,\n 0xE0000000,",
        "Device (COM1)",
        "Name (_HID, EisaId (\"PNP0501\")",
        "Name (_UID, One)",
        "0x03F8, // Range Minimum",
        "IRQNoFlags ()\n {4}",
        "Name (\\_S5, Package (0x02) // _S5_: S5 System State\n {\n 0x05, \n Zero"}) {
    EXPECT_NE(asl.find(expected), std::string::npos) << "missing: " << expected << "\n" << asl;
  }
  // Slot 0 INTA is GSI 16: the first _PRT entry.
  EXPECT_NE(asl.find("Package (0x04)\n {\n 0xFFFF, \n Zero, \n Zero, \n 0x10\n }"),
            std::string::npos);
  EXPECT_EQ(count(asl, "Package (0x04)"), 128u);
  expect_recompiles_identically(dsdt, "dsdt");
}

TEST_F(AcpiIaslTest, DsdtHasAGedPowerButtonAndPvpanic) {
  auto built =
      build_tables(default_config(1, 0x200000000, layout::kPciMmio64Size), kBase, kMaxBytes);
  ASSERT_TRUE(built.has_value());
  auto dsdt = testing::parse(*built).get("DSDT");
  std::string asl = disassemble(dsdt, "ged");
  for (const char* expected :
       {"Device (PWRB)",
        "Name (_HID, EisaId (\"PNP0C0C\")",
        "Device (GED0)",
        "Name (_HID, \"ACPI0013\" /* Generic Event Device */)",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )\n {\n 0x00000009,\n }",
        "OperationRegion (EREG, SystemMemory, 0xFEB00000, 0x04)",
        "Field (EREG, DWordAcc, NoLock, WriteAsZeros)\n {\n ESEL, 32\n }",
        "Method (_EVT, 1, Serialized)",
        "Local0 = ESEL",
        "If ((Local0 & One))",
        "Notify (\\_SB.PWRB, 0x80)",
        // The register is reserved as a motherboard resource.
        "Memory32Fixed (ReadWrite,\n 0xFEB00000, // Address Base\n 0x00000004, // Address Length",
        "Device (PEVT)",
        "Name (_HID, \"QEMU0001\")",
        "IO (Decode16,\n 0x0505, // Range Minimum\n 0x0505, // Range Maximum\n 0x01, // Alignment\n "
        "0x01, // Length"}) {
    EXPECT_NE(asl.find(expected), std::string::npos) << "missing: " << expected << "\n" << asl;
  }
  expect_recompiles_identically(dsdt, "ged");
}

TEST_F(AcpiIaslTest, DsdtHasPciHotplugSlotsNotifiedByTheGed) {
  auto built =
      build_tables(default_config(1, 0x200000000, layout::kPciMmio64Size), kBase, kMaxBytes);
  ASSERT_TRUE(built.has_value());
  auto dsdt = testing::parse(*built).get("DSDT");
  std::string asl = disassemble(dsdt, "hotplug");
  for (const char* expected :
       {"OperationRegion (PCST, SystemMemory, 0xFEB01000, 0x0C)",
        "Field (PCST, DWordAcc, NoLock, WriteAsZeros)\n {\n PCIU, 32, \n PCID, 32, \n B0EJ, 32\n }",
        "Device (S01)\n {\n Name (_ADR, 0x00010000) // _ADR: Address\n Name (_SUN, One)",
        "Device (S1F)\n {\n Name (_ADR, 0x001F0000) // _ADR: Address\n Name (_SUN, 0x1F)",
        "Method (_EJ0, 1, NotSerialized) // _EJx: Eject Device, x=0-9\n {\n B0EJ = 0x02\n }",
        "B0EJ = 0x80000000",
        "Method (PCNT, 0, Serialized)",
        "Local0 = PCIU",
        "Local1 = PCID",
        "If ((Local0 & 0x02))\n {\n Notify (S01, One) // Device Check",
        "If ((Local1 & 0x80000000))\n {\n Notify (S1F, 0x03) // Eject Request",
        "If ((Local0 & 0x02))\n {\n \\_SB.PCI0.PCNT ()",
        // The registers are reserved as a motherboard resource.
        "Memory32Fixed (ReadWrite,\n 0xFEB01000, // Address Base\n 0x0000000C, // Address Length"}) {
    EXPECT_NE(asl.find(expected), std::string::npos) << "missing: " << expected << "\n" << asl;
  }
  EXPECT_EQ(count(asl, "Method (_EJ0"), 31u);
  EXPECT_EQ(asl.find("Device (S00)"), std::string::npos) << "slot 0 is the host bridge";
  expect_recompiles_identically(dsdt, "hotplug");
}

TEST_F(AcpiIaslTest, DsdtVariantsDisassembleAndRecompile) {
  AcpiConfig config = default_config(1, 0, 0);  // no 64-bit window
  config.pci.ecam_base = 0x1000000000;          // ECAM above 4 GiB
  config.pci.bus_end = 7;
  config.pci.io_size = 0;  // no I/O window
  config.com1_port = 0x2f8;
  config.com1_irq = 3;
  config.s5_sleep_type = 0;
  config.ged_address = 0;  // no GED, no power button
  config.pci_hotplug_address = 0;  // which needs the GED
  config.pvpanic_port = 0;
  auto built = build_tables(config, kBase, kMaxBytes);
  ASSERT_TRUE(built.has_value()) << built.error().message();
  auto dsdt = testing::parse(*built).get("DSDT");
  std::string asl = disassemble(dsdt, "variant");
  EXPECT_EQ(asl.find("QWordMemory (ResourceProducer"), std::string::npos) << asl;
  EXPECT_EQ(asl.find("WordIO"), std::string::npos) << asl;
  EXPECT_NE(asl.find("0x0007, // Range Maximum"), std::string::npos) << asl;
  // The ECAM reservation as a consumed 64-bit range of 8 buses.
  EXPECT_NE(asl.find("QWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, NonCacheable"),
            std::string::npos)
      << asl;
  EXPECT_NE(asl.find("0x0000001000000000, // Range Minimum"), std::string::npos) << asl;
  EXPECT_NE(asl.find("0x0000000000800000, // Length"), std::string::npos) << asl;
  EXPECT_NE(asl.find("0x02F8, // Range Minimum"), std::string::npos) << asl;
  EXPECT_NE(asl.find("IRQNoFlags ()\n {3}"), std::string::npos) << asl;
  EXPECT_NE(asl.find("// _S5_: S5 System State\n {\n Zero, \n Zero"), std::string::npos) << asl;
  EXPECT_EQ(asl.find("GED0"), std::string::npos) << asl;
  EXPECT_EQ(asl.find("PWRB"), std::string::npos) << asl;
  EXPECT_EQ(asl.find("QEMU0001"), std::string::npos) << asl;
  EXPECT_EQ(asl.find("PCNT"), std::string::npos) << asl;
  EXPECT_EQ(asl.find("_EJ0"), std::string::npos) << asl;
  expect_recompiles_identically(dsdt, "variant");
}

TEST_F(AcpiIaslTest, FadtShowsHardwareReducedSleepAndReset) {
  auto built = build_tables(default_config(2, 0x200000000, 0x1000000000), kBase, kMaxBytes);
  ASSERT_TRUE(built.has_value());
  auto set = testing::parse(*built);
  std::string fadt = disassemble(set.get("FACP"), "fadt");
  for (const char* expected : {"Signature : \"FACP\"",
                               "Table Length : 00000114",
                               "Revision : 06",
                               "FADT Minor Revision : 04",
                               "SCI Interrupt : 0000",
                               "FACS Address : 00000000\n",
                               "Hardware Reduced (V5) : 1",
                               "Reset Register Supported (V2) : 1",
                               "Control Method Power Button (V1) : 1",
                               "Control Method Sleep Button (V1) : 1",
                               "8042 Present on ports 60/64 (V2) : 0",
                               "VGA Not Present (V4) : 1",
                               "CMOS RTC Not Present (V5) : 0",
                               "MSI Not Supported (V4) : 0",
                               "RTC Century Index : 32",
                               "Reset Register : [Generic Address Structure]\n"
                               "[074h 0116 1] Space ID : 01 [SystemIO]\n"
                               "[075h 0117 1] Bit Width : 08\n"
                               "[076h 0118 1] Bit Offset : 00\n"
                               "[077h 0119 1] Encoded Access Width : 01 [Byte Access:8]\n"
                               "[078h 0120 8] Address : 00000000000003C2",
                               "Value to cause reset : 01",
                               "Sleep Control Register : [Generic Address Structure]\n"
                               "[0F4h 0244 1] Space ID : 01 [SystemIO]\n"
                               "[0F5h 0245 1] Bit Width : 08\n"
                               "[0F6h 0246 1] Bit Offset : 00\n"
                               "[0F7h 0247 1] Encoded Access Width : 01 [Byte Access:8]\n"
                               "[0F8h 0248 8] Address : 00000000000003C0",
                               "Sleep Status Register : [Generic Address Structure]\n"
                               "[100h 0256 1] Space ID : 01 [SystemIO]\n"
                               "[101h 0257 1] Bit Width : 08",
                               "[104h 0260 8] Address : 00000000000003C1"}) {
    EXPECT_NE(fadt.find(expected), std::string::npos) << "missing: " << expected << "\n" << fadt;
  }
  uint64_t dsdt_address = testing::u64_at(set.get("FACP"), 140);
  char dsdt_line[64];
  std::snprintf(dsdt_line, sizeof dsdt_line, "DSDT Address : %016llX",
                static_cast<unsigned long long>(dsdt_address));
  EXPECT_NE(fadt.find(dsdt_line), std::string::npos) << dsdt_line << "\n" << fadt;
}

TEST_F(AcpiIaslTest, MadtShowsEveryCpuAndTheIoApic) {
  for (uint32_t cpus : {2u, 300u}) {
    auto built = build_tables(default_config(cpus, 0x200000000, 0x1000000000), kBase, kMaxBytes);
    ASSERT_TRUE(built.has_value());
    std::string madt =
        disassemble(testing::parse(*built).get("APIC"), "madt" + std::to_string(cpus));
    EXPECT_EQ(count(madt, "Subtable Type : 00 [Processor Local APIC]"), std::min(cpus, 255u));
    EXPECT_EQ(count(madt, "Subtable Type : 09 [Processor Local x2APIC]"),
              cpus > 255 ? cpus - 255 : 0);
    EXPECT_EQ(count(madt, "Processor Enabled : 1"), cpus);
    for (const char* expected :
         {"Local Apic Address : FEE00000", "PC-AT Compatibility : 1",
          "Subtable Type : 01 [I/O APIC]", "Address : FEC00000",
          "Subtable Type : 02 [Interrupt Source Override]\n"
          "[049h 0073 1] Length : 0A\n",
          "Subtable Type : 04 [Local APIC NMI]", "Interrupt Input LINT : 01"}) {
      // The override's offset moves with the CPU count; check its text only for 2 CPUs.
      if (cpus != 2 && std::string(expected).find("[049h") != std::string::npos) continue;
      EXPECT_NE(madt.find(expected), std::string::npos) << "missing: " << expected << "\n" << madt;
    }
    EXPECT_NE(madt.find("Source : 00\n"), std::string::npos);
    EXPECT_NE(madt.find("Interrupt : 00000002\n"), std::string::npos);
    EXPECT_EQ(count(madt, "[Local x2APIC NMI]"), cpus > 255 ? 1u : 0u);
  }
}

TEST_F(AcpiIaslTest, McfgXsdtAndRsdtDisassemble) {
  auto built = build_tables(default_config(1, 0x200000000, 0x1000000000), kBase, kMaxBytes);
  ASSERT_TRUE(built.has_value());
  auto set = testing::parse(*built);
  std::string mcfg = disassemble(set.get("MCFG"), "mcfg");
  EXPECT_NE(mcfg.find("Base Address : 00000000E0000000"), std::string::npos) << mcfg;
  EXPECT_NE(mcfg.find("Segment Group Number : 0000"), std::string::npos) << mcfg;
  EXPECT_NE(mcfg.find("Start Bus Number : 00"), std::string::npos) << mcfg;
  EXPECT_NE(mcfg.find("End Bus Number : 00"), std::string::npos) << mcfg;

  std::string xsdt = disassemble(set.get("XSDT"), "xsdt");
  std::string rsdt = disassemble(set.get("RSDT"), "rsdt");
  for (size_t i = 0; i < set.xsdt_entries.size(); ++i) {
    char line[80];
    std::snprintf(line, sizeof line, "ACPI Table Address %zu : %016llX", i,
                  static_cast<unsigned long long>(set.xsdt_entries[i]));
    EXPECT_NE(xsdt.find(line), std::string::npos) << line << "\n" << xsdt;
    std::snprintf(line, sizeof line, "ACPI Table Address %zu : %08llX", i,
                  static_cast<unsigned long long>(set.xsdt_entries[i]));
    EXPECT_NE(rsdt.find(line), std::string::npos) << line << "\n" << rsdt;
  }
  // iasl has no binary RSDP disassembly (its signature is not a table
  // NameSeg); acpi_test.cc checks the RSDP field by field.
}

}  // namespace
}  // namespace keel::boot::acpi
