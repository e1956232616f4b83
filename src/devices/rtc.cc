#include "devices/rtc.h"

#include <ctime>

#include <fmt/format.h>

namespace keel::devices {
namespace {

uint8_t to_bcd(int value) { return static_cast<uint8_t>(((value / 10) << 4) | (value % 10)); }

}  // namespace

uint8_t Rtc::read_register(uint8_t index) const {
  std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  switch (index) {
    case 0x00: return to_bcd(utc.tm_sec);
    case 0x02: return to_bcd(utc.tm_min);
    case 0x04: return to_bcd(utc.tm_hour);
    case 0x06: return to_bcd(utc.tm_wday + 1);
    case 0x07: return to_bcd(utc.tm_mday);
    case 0x08: return to_bcd(utc.tm_mon + 1);
    case 0x09: return to_bcd(utc.tm_year % 100);
    case 0x32: return to_bcd(19 + utc.tm_year / 100);
    case 0x0a: return 0x26;  // no update in progress; 32.768 kHz divider, 1024 Hz rate
    case 0x0b: return 0x02;  // 24-hour, BCD, no interrupts
    case 0x0c: return 0x00;  // no interrupt flags
    case 0x0d: return 0x80;  // valid RAM and time
    default: return cmos_[index];
  }
}

void Rtc::read(uint64_t offset, std::span<std::byte> data) {
  if (data.empty()) return;
  std::lock_guard lock(mutex_);
  data[0] = std::byte{offset == 1 ? read_register(index_) : uint8_t{0xff}};
}

void Rtc::write(uint64_t offset, std::span<const std::byte> data) {
  if (data.empty()) return;
  std::lock_guard lock(mutex_);
  uint8_t value = static_cast<uint8_t>(data[0]);
  if (offset == 0) {
    index_ = value & 0x7f;  // bit 7 masks NMIs on PCs; nothing to mask here
  } else if (index_ >= 0x0e && index_ != 0x32) {
    cmos_[index_] = value;  // general-purpose CMOS RAM
  }
}

RtcState Rtc::save() const {
  std::lock_guard lock(mutex_);
  return RtcState{.index = index_, .cmos = cmos_};
}

Result<std::unique_ptr<Rtc>> Rtc::restore(const RtcState& state) {
  if (state.index >= 0x80) {
    return fail(Errc::Corrupt, fmt::format("RTC state: register index {:#x} (at most 0x7f)",
                                           state.index));
  }
  auto rtc = std::make_unique<Rtc>();
  rtc->index_ = state.index;
  rtc->cmos_ = state.cmos;
  return rtc;
}

}  // namespace keel::devices
