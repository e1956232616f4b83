// The small legacy devices: the MC146818 RTC/CMOS, the i8042's reset line,
// the ACPI hardware-reduced sleep/reset registers, the GED event register,
// the ACPI PCI hotplug registers, pvpanic and the debug-exit port.
#include <time.h>

#include <array>
#include <cstring>
#include <ctime>
#include <vector>

#include <gtest/gtest.h>

#include "devices/acpi_pm.h"
#include "devices/ged.h"
#include "devices/i8042.h"
#include "devices/pci_hotplug.h"
#include "devices/pvpanic.h"
#include "devices/rtc.h"

namespace keel::devices {
namespace {

uint8_t read_byte(IoHandler& device, uint64_t offset) {
  std::byte value{0};
  device.read(offset, std::span(&value, 1));
  return static_cast<uint8_t>(value);
}

void write_byte(IoHandler& device, uint64_t offset, uint8_t value) {
  std::byte byte{value};
  device.write(offset, std::span<const std::byte>(&byte, 1));
}

// ---- RTC ----

uint8_t cmos_read(Rtc& rtc, uint8_t index) {
  write_byte(rtc, 0, index);
  return read_byte(rtc, 1);
}

void cmos_write(Rtc& rtc, uint8_t index, uint8_t value) {
  write_byte(rtc, 0, index);
  write_byte(rtc, 1, value);
}

bool is_bcd(uint8_t value) { return (value & 0x0f) <= 9 && (value >> 4) <= 9; }
int from_bcd(uint8_t value) { return (value >> 4) * 10 + (value & 0x0f); }

// Reads the RTC's date and time as a time_t (UTC), like a guest would.
time_t rtc_time(Rtc& rtc) {
  std::tm tm{};
  uint8_t seconds = cmos_read(rtc, 0x00);
  uint8_t minutes = cmos_read(rtc, 0x02);
  uint8_t hours = cmos_read(rtc, 0x04);
  uint8_t day = cmos_read(rtc, 0x07);
  uint8_t month = cmos_read(rtc, 0x08);
  uint8_t year = cmos_read(rtc, 0x09);
  uint8_t century = cmos_read(rtc, 0x32);
  for (uint8_t value : {seconds, minutes, hours, day, month, year, century}) {
    EXPECT_TRUE(is_bcd(value)) << std::hex << int(value);
  }
  tm.tm_sec = from_bcd(seconds);
  tm.tm_min = from_bcd(minutes);
  tm.tm_hour = from_bcd(hours);
  tm.tm_mday = from_bcd(day);
  tm.tm_mon = from_bcd(month) - 1;
  tm.tm_year = from_bcd(century) * 100 + from_bcd(year) - 1900;
  return timegm(&tm);
}

TEST(RtcTest, ReportsTheHostTimeInBcd) {
  Rtc rtc;
  // Reading seven registers can straddle a minute or hour boundary; a guest
  // would re-read, and so do we.
  bool close = false;
  for (int attempt = 0; attempt < 3 && !close; ++attempt) {
    time_t before = std::time(nullptr);
    time_t reported = rtc_time(rtc);
    time_t after = std::time(nullptr);
    close = reported >= before - 2 && reported <= after + 2;
  }
  EXPECT_TRUE(close) << "the RTC should read the host's UTC time";
}

TEST(RtcTest, DayOfWeekMatches) {
  Rtc rtc;
  for (int attempt = 0; attempt < 3; ++attempt) {
    time_t now = std::time(nullptr);
    std::tm utc{};
    gmtime_r(&now, &utc);
    uint8_t weekday = cmos_read(rtc, 0x06);
    if (std::time(nullptr) != now) continue;  // crossed a second: maybe midnight
    EXPECT_EQ(weekday, utc.tm_wday + 1) << "1 = Sunday";
    return;
  }
}

TEST(RtcTest, StatusRegisters) {
  Rtc rtc;
  uint8_t a = cmos_read(rtc, 0x0a);
  EXPECT_EQ(a & 0x80, 0) << "no update in progress";
  EXPECT_EQ(a, 0x26);
  uint8_t b = cmos_read(rtc, 0x0b);
  EXPECT_EQ(b & 0x04, 0) << "BCD mode (DM clear)";
  EXPECT_EQ(b & 0x02, 0x02) << "24-hour mode";
  EXPECT_EQ(b & 0x70, 0) << "no interrupts enabled";
  EXPECT_EQ(cmos_read(rtc, 0x0c), 0x00) << "no interrupt flags";
  EXPECT_EQ(cmos_read(rtc, 0x0d), 0x80) << "valid RAM and time";
}

TEST(RtcTest, CmosRamIsWritable) {
  Rtc rtc;
  cmos_write(rtc, 0x0e, 0x11);
  cmos_write(rtc, 0x40, 0x5a);
  cmos_write(rtc, 0x7f, 0xa5);
  EXPECT_EQ(cmos_read(rtc, 0x0e), 0x11);
  EXPECT_EQ(cmos_read(rtc, 0x40), 0x5a);
  EXPECT_EQ(cmos_read(rtc, 0x7f), 0xa5);
  EXPECT_EQ(cmos_read(rtc, 0x41), 0x00);
}

TEST(RtcTest, IndexBit7IsTheNmiMaskNotPartOfTheIndex) {
  Rtc rtc;
  cmos_write(rtc, 0x40, 0x77);
  EXPECT_EQ(cmos_read(rtc, 0x80 | 0x40), 0x77);
  cmos_write(rtc, 0x80 | 0x41, 0x66);
  EXPECT_EQ(cmos_read(rtc, 0x41), 0x66);
}

TEST(RtcTest, TimeAndStatusRegistersAreNotWritable) {
  Rtc rtc;
  cmos_write(rtc, 0x00, 0x99);  // not a valid BCD second
  cmos_write(rtc, 0x04, 0x99);
  cmos_write(rtc, 0x09, 0x99);
  cmos_write(rtc, 0x32, 0x99);  // century
  cmos_write(rtc, 0x0b, 0x06);  // binary mode
  cmos_write(rtc, 0x0d, 0x00);
  EXPECT_LE(from_bcd(cmos_read(rtc, 0x00)), 59);
  EXPECT_LE(from_bcd(cmos_read(rtc, 0x04)), 23);
  EXPECT_NE(cmos_read(rtc, 0x09), 0x99);
  EXPECT_EQ(cmos_read(rtc, 0x32), 0x20) << "this century";
  EXPECT_EQ(cmos_read(rtc, 0x0b), 0x02);
  EXPECT_EQ(cmos_read(rtc, 0x0d), 0x80);
}

TEST(RtcTest, IndexPortReadsAllOnes) {
  Rtc rtc;
  EXPECT_EQ(read_byte(rtc, 0), 0xff);
  std::array<std::byte, 2> empty{};
  rtc.read(1, std::span(empty).first(0));  // no crash on an empty access
  rtc.write(1, std::span<const std::byte>());
}

// ---- i8042 ----

TEST(I8042Test, CommandFePulsesReset) {
  int resets = 0;
  I8042 i8042([&resets] { ++resets; });
  write_byte(i8042, 4, 0xfe);
  EXPECT_EQ(resets, 1);
  write_byte(i8042, 4, 0xfe);
  EXPECT_EQ(resets, 2);
}

TEST(I8042Test, OtherWritesDoNotReset) {
  int resets = 0;
  I8042 i8042([&resets] { ++resets; });
  write_byte(i8042, 0, 0xfe);  // data port, not the command port
  write_byte(i8042, 4, 0xd1);  // write output port
  write_byte(i8042, 4, 0xff);
  write_byte(i8042, 4, 0x00);
  write_byte(i8042, 1, 0xfe);
  i8042.write(4, std::span<const std::byte>());
  EXPECT_EQ(resets, 0);
}

TEST(I8042Test, StatusShowsEmptyBuffers) {
  I8042 i8042([] {});
  uint8_t status = read_byte(i8042, 4);
  EXPECT_EQ(status & 0x01, 0) << "output buffer empty";
  EXPECT_EQ(status & 0x02, 0) << "input buffer empty: the guest may send a command";
  std::array<std::byte, 4> wide;
  wide.fill(std::byte{0xaa});
  i8042.read(0, wide);
  for (std::byte b : wide) EXPECT_EQ(b, std::byte{0});
}

// ---- ACPI PM ----

struct PmCounts {
  int power_offs = 0;
  int resets = 0;
};

AcpiPm make_pm(PmCounts& counts) {
  return AcpiPm(5, 0x1, [&counts] { ++counts.power_offs; }, [&counts] { ++counts.resets; });
}

TEST(AcpiPmTest, S5PowersOff) {
  PmCounts counts;
  AcpiPm pm = make_pm(counts);
  write_byte(pm, 0, (5 << 2) | (1 << 5));  // SLP_TYP = 5, SLP_EN
  EXPECT_EQ(counts.power_offs, 1);
  EXPECT_EQ(counts.resets, 0);
}

TEST(AcpiPmTest, OtherSleepWritesDoNothing) {
  PmCounts counts;
  AcpiPm pm = make_pm(counts);
  write_byte(pm, 0, 5 << 2);                   // S5 without SLP_EN
  write_byte(pm, 0, (3 << 2) | (1 << 5));      // S3
  write_byte(pm, 0, (0 << 2) | (1 << 5));      // S0
  write_byte(pm, 0, (7 << 2) | (1 << 5));
  write_byte(pm, 1, (5 << 2) | (1 << 5));      // the status register
  write_byte(pm, 2, (5 << 2) | (1 << 5));      // the reset register, wrong value
  pm.write(0, std::span<const std::byte>());
  EXPECT_EQ(counts.power_offs, 0);
  EXPECT_EQ(counts.resets, 0);
}

TEST(AcpiPmTest, S5WithOtherBitsStillPowersOff) {
  PmCounts counts;
  AcpiPm pm = make_pm(counts);
  write_byte(pm, 0, (5 << 2) | (1 << 5) | 0xc3);  // reserved bits and WAK_STS set
  EXPECT_EQ(counts.power_offs, 1);
}

TEST(AcpiPmTest, ResetValueOnTheResetRegisterResets) {
  PmCounts counts;
  AcpiPm pm = make_pm(counts);
  write_byte(pm, 2, 0x1);
  EXPECT_EQ(counts.resets, 1);
  write_byte(pm, 2, 0x2);
  write_byte(pm, 0, 0x1);
  write_byte(pm, 1, 0x1);
  EXPECT_EQ(counts.resets, 1);
  EXPECT_EQ(counts.power_offs, 0);
}

TEST(AcpiPmTest, SleepStatusReadsZero) {
  PmCounts counts;
  AcpiPm pm = make_pm(counts);
  EXPECT_EQ(read_byte(pm, 1), 0);
  EXPECT_EQ(read_byte(pm, 0), 0);
}

// ---- DebugExit ----

TEST(DebugExitTest, PassesTheByte) {
  std::vector<uint8_t> codes;
  DebugExit debug_exit([&codes](uint8_t code) { codes.push_back(code); });
  write_byte(debug_exit, 0, 0x2a);
  write_byte(debug_exit, 0, 0);
  write_byte(debug_exit, 0, 0xff);
  std::array<std::byte, 2> word{std::byte{7}, std::byte{9}};
  debug_exit.write(0, word);
  debug_exit.write(0, std::span<const std::byte>());
  EXPECT_EQ(codes, (std::vector<uint8_t>{0x2a, 0, 0xff, 7}));
  EXPECT_EQ(read_byte(debug_exit, 0), 0xff);
}

// The shared snapshot shape: save, mutate, save differs; restore, the
// restored RTC saves equal to the first save and reads the same CMOS RAM.
TEST(RtcTest, SaveAndRestoreKeepCmosRamAndTheSelectedRegister) {
  Rtc rtc;
  cmos_write(rtc, 0x40, 0xab);
  cmos_write(rtc, 0x41, 0xcd);
  RtcState first = rtc.save();
  cmos_write(rtc, 0x40, 0x00);
  EXPECT_NE(rtc.save(), first);

  Result<std::unique_ptr<Rtc>> restored = Rtc::restore(first);
  ASSERT_TRUE(restored) << restored.error().message();
  EXPECT_EQ((*restored)->save(), first);
  EXPECT_EQ(cmos_read(**restored, 0x40), 0xab);
  EXPECT_EQ(cmos_read(**restored, 0x41), 0xcd);

  RtcState bad = first;
  bad.index = 0x80;
  Result<std::unique_ptr<Rtc>> refused = Rtc::restore(bad);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code(), Errc::Corrupt);
}

// ---- GED ----

uint32_t read_u32(IoHandler& device, uint64_t offset) {
  std::array<std::byte, 4> bytes{};
  device.read(offset, bytes);
  uint32_t value = 0;
  std::memcpy(&value, bytes.data(), sizeof(value));
  return value;
}

TEST(GedTest, TriggerRaisesTheInterruptAndTheRegisterClearsOnRead) {
  int interrupts = 0;
  Ged ged([&interrupts] { ++interrupts; });
  EXPECT_EQ(read_u32(ged, 0), 0u);
  ged.trigger(1);
  EXPECT_EQ(interrupts, 1);
  EXPECT_EQ(ged.pending(), 1u);
  EXPECT_EQ(read_u32(ged, 0), 1u);
  EXPECT_EQ(read_u32(ged, 0), 0u) << "a read clears what it returned";
  EXPECT_EQ(ged.pending(), 0u);
}

TEST(GedTest, EventsAccumulateUntilRead) {
  int interrupts = 0;
  Ged ged([&interrupts] { ++interrupts; });
  ged.trigger(1);
  ged.trigger(1u << 9);
  EXPECT_EQ(interrupts, 2);
  EXPECT_EQ(read_u32(ged, 0), 1u | (1u << 9));
}

TEST(GedTest, PartialReadsClearOnlyTheirBytesAndWritesAreIgnored) {
  Ged ged([] {});
  ged.trigger(0x0102);
  write_byte(ged, 0, 0);
  EXPECT_EQ(ged.pending(), 0x0102u) << "the guest cannot clear the register by writing";
  EXPECT_EQ(read_byte(ged, 1), 0x01);
  EXPECT_EQ(ged.pending(), 0x0002u);
  EXPECT_EQ(read_byte(ged, 0), 0x02);
  EXPECT_EQ(ged.pending(), 0u);
  // Past the register: zeros, nothing cleared, no crash.
  ged.trigger(1);
  EXPECT_EQ(read_byte(ged, 7), 0);
  std::array<std::byte, 8> wide{};
  ged.read(2, wide);
  EXPECT_EQ(ged.pending(), 1u);
}

// ---- ACPI PCI hotplug ----

void write_u32(IoHandler& device, uint64_t offset, uint32_t value) {
  std::array<std::byte, 4> bytes{};
  std::memcpy(bytes.data(), &value, sizeof(value));
  device.write(offset, bytes);
}

TEST(PciHotplugTest, PlugSetsTheUpBitWhichAReadClears) {
  std::vector<uint8_t> ejected;
  PciHotplug hotplug([&ejected](uint8_t slot) { ejected.push_back(slot); });
  hotplug.plugged(3);
  hotplug.plugged(31);
  EXPECT_EQ(read_u32(hotplug, PciHotplug::kUpOffset), (1u << 3) | (1u << 31));
  EXPECT_EQ(read_u32(hotplug, PciHotplug::kUpOffset), 0u) << "PCIU clears on read";
  EXPECT_EQ(read_u32(hotplug, PciHotplug::kDownOffset), 0u);
  EXPECT_TRUE(ejected.empty());
}

TEST(PciHotplugTest, EjectOfARequestedSlotCompletesOnceAndClearsTheDownBit) {
  std::vector<uint8_t> ejected;
  PciHotplug hotplug([&ejected](uint8_t slot) { ejected.push_back(slot); });
  hotplug.request_eject(5);
  EXPECT_EQ(read_u32(hotplug, PciHotplug::kDownOffset), 1u << 5);
  EXPECT_EQ(read_u32(hotplug, PciHotplug::kDownOffset), 1u << 5) << "PCID stays until ejected";
  write_u32(hotplug, PciHotplug::kEjectOffset, 1u << 5);
  EXPECT_EQ(ejected, std::vector<uint8_t>{5});
  EXPECT_EQ(hotplug.down(), 0u);
  write_u32(hotplug, PciHotplug::kEjectOffset, 1u << 5);
  EXPECT_EQ(ejected, std::vector<uint8_t>{5}) << "a second _EJ0 of the same slot does nothing";
}

TEST(PciHotplugTest, TheGuestCannotEjectASlotTheHostDidNotOffer) {
  std::vector<uint8_t> ejected;
  PciHotplug hotplug([&ejected](uint8_t slot) { ejected.push_back(slot); });
  hotplug.request_eject(2);
  write_u32(hotplug, PciHotplug::kEjectOffset, 0xffffffffu);
  EXPECT_EQ(ejected, std::vector<uint8_t>{2});
  hotplug.request_eject(4);
  hotplug.cancel_eject(4);
  write_u32(hotplug, PciHotplug::kEjectOffset, 1u << 4);
  EXPECT_EQ(ejected, std::vector<uint8_t>{2}) << "a withdrawn request cannot be ejected";
}

TEST(PciHotplugTest, OddAccessesAreIgnored) {
  std::vector<uint8_t> ejected;
  PciHotplug hotplug([&ejected](uint8_t slot) { ejected.push_back(slot); });
  hotplug.plugged(1);
  hotplug.request_eject(6);
  EXPECT_EQ(read_byte(hotplug, PciHotplug::kUpOffset), 0) << "1-byte reads see zero";
  EXPECT_EQ(hotplug.up(), 1u << 1) << "and clear nothing";
  write_byte(hotplug, PciHotplug::kEjectOffset, 1u << 6);
  write_u32(hotplug, PciHotplug::kUpOffset, 0xffffffffu);
  write_u32(hotplug, PciHotplug::kDownOffset, 0);
  EXPECT_TRUE(ejected.empty());
  EXPECT_EQ(hotplug.down(), 1u << 6) << "PCID is not writable";
  EXPECT_EQ(read_u32(hotplug, 0x40), 0u);
  // Plugging a slot again withdraws its pending eject request.
  hotplug.plugged(6);
  EXPECT_EQ(hotplug.down(), 0u);
}

// ---- pvpanic ----

TEST(PvpanicTest, ReadGivesTheSupportedEvents) {
  Pvpanic pvpanic([](uint8_t) {});
  EXPECT_EQ(read_byte(pvpanic, 0), Pvpanic::kPanicked | Pvpanic::kCrashLoaded);
}

TEST(PvpanicTest, WritesReportSupportedEventsOnly) {
  std::vector<uint8_t> events;
  Pvpanic pvpanic([&events](uint8_t value) { events.push_back(value); });
  write_byte(pvpanic, 0, Pvpanic::kPanicked);
  write_byte(pvpanic, 0, Pvpanic::kCrashLoaded);
  write_byte(pvpanic, 0, 0);     // nothing
  write_byte(pvpanic, 0, 0xfc);  // only unsupported bits
  write_byte(pvpanic, 0, 0xff);  // both supported ones, the rest dropped
  pvpanic.write(0, std::span<const std::byte>());
  EXPECT_EQ(events, (std::vector<uint8_t>{Pvpanic::kPanicked, Pvpanic::kCrashLoaded,
                                          Pvpanic::kPanicked | Pvpanic::kCrashLoaded}));
}

}  // namespace
}  // namespace keel::devices
