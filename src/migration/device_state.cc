#include "migration/device_state.h"

#include "migration/records.h"

namespace keel::migration {
namespace {

// Record tags of the serial0 section. Never reuse one.
enum class SerialField : uint16_t { Registers = 1, Flags = 2, Input = 3 };
constexpr uint16_t kLastSerialField = 3;
constexpr size_t kMaxSerialInput = 64 * 1024;

// IER, LCR, MCR, SCR, FCR, DLL, DLM, MSR in that order.
using SerialRegisters = std::array<uint8_t, 8>;
constexpr uint8_t kThrEmptyPending = 1 << 0;
constexpr uint8_t kInterruptAsserted = 1 << 1;

// Record tags of the rtc section.
enum class RtcField : uint16_t { Index = 1, Cmos = 2 };
constexpr uint16_t kLastRtcField = 2;
using Cmos = std::array<uint8_t, 128>;

}  // namespace

std::vector<std::byte> encode_serial_state(const devices::SerialState& state) {
  RecordWriter out;
  out.value(SerialField::Registers, SerialRegisters{state.ier, state.lcr, state.mcr, state.scr,
                                                    state.fcr, state.dll, state.dlm, state.msr});
  out.value(SerialField::Flags,
            static_cast<uint8_t>((state.thr_empty_pending ? kThrEmptyPending : 0) |
                                 (state.interrupt_asserted ? kInterruptAsserted : 0)));
  out.bytes(SerialField::Input, std::as_bytes(std::span(state.input)));
  return out.take();
}

Result<devices::SerialState> decode_serial_state(std::span<const std::byte> payload,
                                                 std::string_view label) {
  Records records = TRY(Records::parse(payload, label, kLastSerialField));
  auto registers = TRY(records.required<SerialRegisters>(SerialField::Registers, "registers"));
  auto flags = TRY(records.required<uint8_t>(SerialField::Flags, "flags"));
  if ((flags & ~(kThrEmptyPending | kInterruptAsserted)) != 0) {
    return fail(Errc::Corrupt, fmt::format("{}: unknown flags {:#x}", label, flags));
  }
  devices::SerialState state{.ier = registers[0],
                             .lcr = registers[1],
                             .mcr = registers[2],
                             .scr = registers[3],
                             .fcr = registers[4],
                             .dll = registers[5],
                             .dlm = registers[6],
                             .msr = registers[7],
                             .thr_empty_pending = (flags & kThrEmptyPending) != 0,
                             .interrupt_asserted = (flags & kInterruptAsserted) != 0,
                             .input = {}};
  state.input = TRY(records.array<uint8_t>(SerialField::Input, "input", kMaxSerialInput));
  return state;
}

std::vector<std::byte> encode_rtc_state(const devices::RtcState& state) {
  RecordWriter out;
  out.value(RtcField::Index, state.index);
  out.value(RtcField::Cmos, state.cmos);
  return out.take();
}

Result<devices::RtcState> decode_rtc_state(std::span<const std::byte> payload,
                                           std::string_view label) {
  Records records = TRY(Records::parse(payload, label, kLastRtcField));
  devices::RtcState state;
  state.index = TRY(records.required<uint8_t>(RtcField::Index, "register index"));
  state.cmos = TRY(records.required<Cmos>(RtcField::Cmos, "CMOS RAM"));
  return state;
}

}  // namespace keel::migration
