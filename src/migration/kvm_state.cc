#include "migration/kvm_state.h"

#include <cstring>

#include <fmt/format.h>

#include "base/records.h"

namespace keel::migration {
namespace {

// Record tags of the vcpu section (docs/snapshot-format.md). Never reuse one.
enum class VcpuField : uint16_t {
  Cpuid = 1,
  MpState = 2,
  Regs = 3,
  Sregs = 4,
  Sregs2 = 5,
  Xsave = 6,
  Fpu = 7,
  Xcrs = 8,
  Lapic = 9,
  Msrs = 10,
  Events = 11,
  DebugRegs = 12,
  TscKhz = 13,
};
constexpr uint16_t kLastVcpuField = 13;

enum class VmField : uint16_t { PicMaster = 1, PicSlave = 2, Ioapic = 3, Pit = 4, Clock = 5 };
constexpr uint16_t kLastVmField = 5;

constexpr size_t kMaxCpuidEntries = 4096;
constexpr size_t kMaxMsrs = 4096;
constexpr size_t kMaxXsaveBytes = 1 << 20;

// An MSR as stored: index, zero, value (16 bytes).
struct StoredMsr {
  uint32_t index;
  uint32_t reserved;
  uint64_t value;
};
static_assert(sizeof(StoredMsr) == 16);

}  // namespace

std::vector<std::byte> encode_vcpu_state(const kvm::VcpuState& state) {
  RecordWriter out;
  out.bytes(VcpuField::Cpuid, std::as_bytes(std::span(state.cpuid)));
  out.value(VcpuField::MpState, static_cast<uint32_t>(state.mp_state));
  out.value(VcpuField::Regs, state.regs);
  out.value(VcpuField::Sregs, state.sregs);
  out.optional(VcpuField::Sregs2, state.sregs2);
  if (!state.xsave.empty()) out.bytes(VcpuField::Xsave, state.xsave);
  out.optional(VcpuField::Fpu, state.fpu);
  out.optional(VcpuField::Xcrs, state.xcrs);
  out.optional(VcpuField::Lapic, state.lapic);
  std::vector<StoredMsr> msrs;
  msrs.reserve(state.msrs.size());
  for (const kvm::MsrEntry& msr : state.msrs) msrs.push_back({msr.index, 0, msr.value});
  out.bytes(VcpuField::Msrs, std::as_bytes(std::span(msrs)));
  out.optional(VcpuField::Events, state.events);
  out.optional(VcpuField::DebugRegs, state.debug_regs);
  out.value(VcpuField::TscKhz, state.tsc_khz);
  return out.take();
}

Result<kvm::VcpuState> decode_vcpu_state(std::span<const std::byte> payload,
                                         std::string_view label) {
  Records records = TRY(Records::parse(payload, label, kLastVcpuField));
  kvm::VcpuState state;
  state.cpuid = TRY(records.array<kvm::CpuidEntry>(VcpuField::Cpuid, "CPUID", kMaxCpuidEntries));
  state.mp_state =
      static_cast<kvm::MpState>(TRY(records.required<uint32_t>(VcpuField::MpState, "MP state")));
  state.regs = TRY(records.required<kvm::Regs>(VcpuField::Regs, "registers"));
  state.sregs = TRY(records.required<kvm::Sregs>(VcpuField::Sregs, "special registers"));
  state.sregs2 = TRY(records.optional<kvm::SregsV2>(VcpuField::Sregs2, "sregs2"));
  auto xsave_tag = static_cast<uint16_t>(VcpuField::Xsave);
  if (records.has(xsave_tag)) {
    std::span<const std::byte> xsave = records.raw(xsave_tag);
    if (xsave.size() < kvm::kXsaveLegacyBytes || xsave.size() > kMaxXsaveBytes ||
        xsave.size() % 4 != 0) {
      return fail(Errc::Corrupt,
                  fmt::format("{}: XSAVE area of {} bytes (4096 to {}, a multiple of 4)", label,
                              xsave.size(), kMaxXsaveBytes));
    }
    state.xsave.assign(xsave.begin(), xsave.end());
  }
  state.fpu = TRY(records.optional<kvm::Fpu>(VcpuField::Fpu, "FPU"));
  if (state.xsave.empty() == !state.fpu.has_value()) {
    return fail(Errc::Corrupt, fmt::format("{}: needs exactly one of XSAVE and FPU", label));
  }
  state.xcrs = TRY(records.optional<kvm::XcrList>(VcpuField::Xcrs, "XCRs"));
  if (state.xcrs && state.xcrs->nr_xcrs > KVM_MAX_XCRS) {
    return fail(Errc::Corrupt, fmt::format("{}: {} XCRs (at most {})", label,
                                           state.xcrs->nr_xcrs, KVM_MAX_XCRS));
  }
  state.lapic = TRY(records.optional<kvm::Lapic>(VcpuField::Lapic, "LAPIC"));
  for (const StoredMsr& msr : TRY(records.array<StoredMsr>(VcpuField::Msrs, "MSRs", kMaxMsrs))) {
    if (msr.reserved != 0) {
      return fail(Errc::Corrupt,
                  fmt::format("{}: MSR {:#x} has reserved bits set", label, msr.index));
    }
    state.msrs.push_back({msr.index, msr.value});
  }
  state.events = TRY(records.optional<kvm::PendingEvents>(VcpuField::Events, "events"));
  state.debug_regs =
      TRY(records.optional<kvm::DebugRegisters>(VcpuField::DebugRegs, "debug registers"));
  state.tsc_khz = TRY(records.required<uint32_t>(VcpuField::TscKhz, "TSC frequency"));
  return state;
}

std::vector<std::byte> encode_vm_state(const kvm::VmState& state) {
  RecordWriter out;
  out.optional(VmField::PicMaster, state.pic_master);
  out.optional(VmField::PicSlave, state.pic_slave);
  out.optional(VmField::Ioapic, state.ioapic);
  out.optional(VmField::Pit, state.pit);
  out.optional(VmField::Clock, state.clock);
  return out.take();
}

Result<kvm::VmState> decode_vm_state(std::span<const std::byte> payload, std::string_view label) {
  Records records = TRY(Records::parse(payload, label, kLastVmField));
  kvm::VmState state;
  state.pic_master = TRY(records.optional<kvm::IrqchipState>(VmField::PicMaster, "PIC master"));
  state.pic_slave = TRY(records.optional<kvm::IrqchipState>(VmField::PicSlave, "PIC slave"));
  state.ioapic = TRY(records.optional<kvm::IrqchipState>(VmField::Ioapic, "IOAPIC"));
  bool chips = state.pic_master.has_value();
  if (state.pic_slave.has_value() != chips || state.ioapic.has_value() != chips) {
    return fail(Errc::Corrupt,
                fmt::format("{}: PIC master, PIC slave and IOAPIC come together", label));
  }
  state.pit = TRY(records.optional<kvm::PitState>(VmField::Pit, "PIT"));
  state.clock = TRY(records.optional<kvm::ClockData>(VmField::Clock, "KVM clock"));
  return state;
}

}  // namespace keel::migration
