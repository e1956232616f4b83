// MC146818 CMOS real-time clock, read-only time. Spec: the MC146818A
// datasheet (registers 0x00-0x0D), century at 0x32 as on PCs.
// Implemented: time and date from the host clock (UTC) in BCD 24-hour mode,
// status registers A-D, 128 bytes of CMOS RAM. Missing: alarms, periodic
// and update interrupts, setting the time (writes to the time registers are
// ignored; the guest keeps its own offset, as with a read-only hardware RTC).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>

#include "base/result.h"

#include "devices/io_handler.h"

namespace keel::devices {

// What a snapshot keeps of the RTC: the selected register and CMOS RAM (the
// time registers are read from the host clock, so the time is not kept).
struct RtcState {
  uint8_t index = 0;
  std::array<uint8_t, 128> cmos{};
  bool operator==(const RtcState&) const = default;
};

class Rtc : public IoHandler {
 public:
  // Mapped at port 0x70 with length 2: offset 0 selects a register, 1 is data.
  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

  RtcState save() const;
  // An RTC in a saved state (restore as constructor); Corrupt if the
  // selected register is out of range.
  static Result<std::unique_ptr<Rtc>> restore(const RtcState& state);

 private:
  uint8_t read_register(uint8_t index) const;

  mutable std::mutex mutex_;  // guards index_ and cmos_
  uint8_t index_ = 0;
  std::array<uint8_t, 128> cmos_{};
};

}  // namespace keel::devices
