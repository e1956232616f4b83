// MC146818 CMOS real-time clock, read-only time. Spec: the MC146818A
// datasheet (registers 0x00-0x0D), century at 0x32 as on PCs.
// Implemented: time and date from the host clock (UTC) in BCD 24-hour mode,
// status registers A-D, 128 bytes of CMOS RAM. Missing: alarms, periodic
// and update interrupts, setting the time (writes to the time registers are
// ignored; the guest keeps its own offset, as with a read-only hardware RTC).
#pragma once

#include <array>
#include <mutex>

#include "devices/io_handler.h"

namespace keel::devices {

class Rtc : public IoHandler {
 public:
  // Mapped at port 0x70 with length 2: offset 0 selects a register, 1 is data.
  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

 private:
  uint8_t read_register(uint8_t index) const;

  std::mutex mutex_;  // guards index_ and cmos_
  uint8_t index_ = 0;
  std::array<uint8_t, 128> cmos_{};
};

}  // namespace keel::devices
