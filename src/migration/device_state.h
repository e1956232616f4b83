// Device sections' payloads (docs/snapshot-format.md, "Device payloads"),
// as tagged records like the vCPU's. One encode/decode pair per device
// state struct; decoding checks every field and names the section.
#pragma once

#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "devices/rtc.h"
#include "devices/serial.h"

namespace keel::migration {

inline constexpr std::string_view kSerialSectionName = "serial0";
inline constexpr std::string_view kRtcSectionName = "rtc";

std::vector<std::byte> encode_serial_state(const devices::SerialState& state);
Result<devices::SerialState> decode_serial_state(std::span<const std::byte> payload,
                                                 std::string_view label);

std::vector<std::byte> encode_rtc_state(const devices::RtcState& state);
Result<devices::RtcState> decode_rtc_state(std::span<const std::byte> payload,
                                           std::string_view label);

}  // namespace keel::migration
