// Keel names for KVM's structs and constants, so code outside src/kvm never
// includes <linux/kvm.h> itself.
#pragma once

#include <linux/kvm.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

namespace keel::kvm {

using Regs = kvm_regs;
using Sregs = kvm_sregs;
using Segment = kvm_segment;
using Fpu = kvm_fpu;
using Lapic = kvm_lapic_state;
using CpuidEntry = kvm_cpuid_entry2;
using CpuidEntries = std::vector<kvm_cpuid_entry2>;
using SregsV2 = kvm_sregs2;
using XcrList = kvm_xcrs;
using PendingEvents = kvm_vcpu_events;
using DebugRegisters = kvm_debugregs;
using IrqchipState = kvm_irqchip;
using PitState = kvm_pit_state2;
using ClockData = kvm_clock_data;

// The fixed-size structs a snapshot stores byte for byte (the x86-64 uapi
// ABI, which the kernel keeps stable). Pinned so that a header change or a
// C/C++ layout difference (see kvm.cc) cannot slip into the snapshot format.
static_assert(sizeof(Regs) == 144 && sizeof(Sregs) == 312 && sizeof(SregsV2) == 320);
static_assert(sizeof(Fpu) == 416 && sizeof(XcrList) == 392 && sizeof(Lapic) == 1024);
static_assert(sizeof(PendingEvents) == 64 && sizeof(DebugRegisters) == 128);
static_assert(sizeof(IrqchipState) == 520 && sizeof(PitState) == 112 && sizeof(ClockData) == 48);
static_assert(sizeof(CpuidEntry) == 40);
// struct kvm_xsave's fixed part (its tail is a flex array, see kvm.cc).
inline constexpr size_t kXsaveLegacyBytes = 4096;

inline constexpr uint32_t kCpuidFlagSignificantIndex = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

enum class Capability : int {
  Irqchip = KVM_CAP_IRQCHIP,
  Hlt = KVM_CAP_HLT,
  UserMemory = KVM_CAP_USER_MEMORY,
  SetTssAddr = KVM_CAP_SET_TSS_ADDR,
  ExtCpuid = KVM_CAP_EXT_CPUID,
  Pit2 = KVM_CAP_PIT2,
  Irqfd = KVM_CAP_IRQFD,
  Ioeventfd = KVM_CAP_IOEVENTFD,
  IrqRouting = KVM_CAP_IRQ_ROUTING,
  SignalMsi = KVM_CAP_SIGNAL_MSI,
  ImmediateExit = KVM_CAP_IMMEDIATE_EXIT,
  NrVcpus = KVM_CAP_NR_VCPUS,
  MaxVcpus = KVM_CAP_MAX_VCPUS,
  TscControl = KVM_CAP_TSC_CONTROL,
  TscDeadlineTimer = KVM_CAP_TSC_DEADLINE_TIMER,
  Xsave = KVM_CAP_XSAVE,
  Xcrs = KVM_CAP_XCRS,
  DirtyLogRing = KVM_CAP_DIRTY_LOG_RING,
  DirtyLogRingAcqRel = KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
  ManualDirtyLogProtect2 = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
  SyncMmu = KVM_CAP_SYNC_MMU,
  VcpuEvents = KVM_CAP_VCPU_EVENTS,
  DebugRegs = KVM_CAP_DEBUGREGS,
  Sregs2 = KVM_CAP_SREGS2,
  Xsave2 = KVM_CAP_XSAVE2,
  AdjustClock = KVM_CAP_ADJUST_CLOCK,
  GetTscKhz = KVM_CAP_GET_TSC_KHZ,
};

std::string_view capability_name(Capability cap);

// A flat (base 0, 4 GiB, present, DPL 0) segment register for entry states.
enum class FlatSegment { Code64, Code32, Data };
inline Segment flat_segment(uint16_t selector, FlatSegment kind) {
  Segment segment{};
  segment.limit = 0xffffffff;
  segment.selector = selector;
  segment.type = kind == FlatSegment::Data ? 0x3 : 0xb;  // read/write data, or execute/read code
  segment.present = 1;
  segment.s = 1;
  segment.l = kind == FlatSegment::Code64 ? 1 : 0;
  segment.db = kind == FlatSegment::Code64 ? 0 : 1;
  segment.g = 1;
  return segment;
}

enum class IoSpace { Pio, Mmio };

struct MsrEntry {
  uint32_t index;
  uint64_t value;
  bool operator==(const MsrEntry&) const = default;
};

enum class MpState : uint32_t {
  Runnable = KVM_MP_STATE_RUNNABLE,
  Uninitialized = KVM_MP_STATE_UNINITIALIZED,
  InitReceived = KVM_MP_STATE_INIT_RECEIVED,
  Halted = KVM_MP_STATE_HALTED,
  SipiReceived = KVM_MP_STATE_SIPI_RECEIVED,
};

// Everything KVM holds for one vCPU, as Vcpu::save_state() reads it. A
// field that is empty/nullopt was not available from this KVM (or, for the
// LAPIC, the VM has no in-kernel irqchip) and is left alone on restore.
struct VcpuState {
  CpuidEntries cpuid;
  MpState mp_state = MpState::Runnable;
  Regs regs{};
  Sregs sregs{};                             // always: carries the pending-interrupt bitmap
  std::optional<SregsV2> sregs2;             // KVM_CAP_SREGS2: adds the PAE PDPTRs
  std::vector<std::byte> xsave;              // KVM_GET_XSAVE(2), at least 4096 bytes
  std::optional<Fpu> fpu;                    // only without KVM_CAP_XSAVE
  std::optional<XcrList> xcrs;               // KVM_CAP_XCRS
  std::optional<Lapic> lapic;                // with an in-kernel irqchip
  std::vector<MsrEntry> msrs;                // every MSR of KVM_GET_MSR_INDEX_LIST this vCPU has
  std::optional<PendingEvents> events;       // KVM_CAP_VCPU_EVENTS
  std::optional<DebugRegisters> debug_regs;  // KVM_CAP_DEBUGREGS
  uint32_t tsc_khz = 0;                      // KVM_GET_TSC_KHZ, 0 if unknown
};

// How a VM logs the guest's writes for live migration (api.rst,
// KVM_GET_DIRTY_LOG and KVM_CAP_DIRTY_LOG_RING). The ring must be chosen
// when the VM is made, before its first vCPU, and rules the bitmap out.
enum class DirtyLogMode {
  Auto,    // the ring where KVM has it, else the bitmap
  Ring,    // the ring, or an error where KVM lacks it
  Bitmap,  // the per-slot bitmap (KVM_GET_DIRTY_LOG/KVM_CLEAR_DIRTY_LOG)
};
std::string_view dirty_log_mode_name(DirtyLogMode mode);

// One entry of a vCPU's dirty ring, shared with KVM (struct kvm_dirty_gfn).
using DirtyGfn = kvm_dirty_gfn;
static_assert(sizeof(DirtyGfn) == 16);
inline constexpr uint32_t kDirtyGfnDirty = KVM_DIRTY_GFN_F_DIRTY;
inline constexpr uint32_t kDirtyGfnReset = KVM_DIRTY_GFN_F_RESET;
inline constexpr uint32_t kDirtyGfnMask = KVM_DIRTY_GFN_F_MASK;

// The VM-wide state of the in-kernel devices and the clock.
struct VmState {
  std::optional<IrqchipState> pic_master;  // with an in-kernel irqchip
  std::optional<IrqchipState> pic_slave;
  std::optional<IrqchipState> ioapic;
  std::optional<PitState> pit;     // with an in-kernel PIT
  std::optional<ClockData> clock;  // KVM_CAP_ADJUST_CLOCK
};

// One GSI routing entry: either an irqchip pin or an MSI message.
struct IrqRoute {
  enum class Kind { IrqchipPin, Msi };
  Kind kind;
  uint32_t gsi;
  uint32_t irqchip = 0;  // KVM_IRQCHIP_PIC_MASTER/SLAVE/IOAPIC for pins
  uint32_t pin = 0;
  uint64_t msi_address = 0;
  uint32_t msi_data = 0;
};
inline constexpr uint32_t kIrqchipPicMaster = KVM_IRQCHIP_PIC_MASTER;
inline constexpr uint32_t kIrqchipPicSlave = KVM_IRQCHIP_PIC_SLAVE;
inline constexpr uint32_t kIrqchipIoapic = KVM_IRQCHIP_IOAPIC;

// Why Vcpu::run() returned, decoded from struct kvm_run.
struct VcpuExit {
  enum class Kind {
    IoIn,         // address = port, size, count; fill Vcpu::io_data()
    IoOut,        // address = port, size, count; data in Vcpu::io_data()
    MmioRead,     // address = gpa, size; fill Vcpu::mmio_data()
    MmioWrite,    // address = gpa, size; data in Vcpu::mmio_data()
    Hlt,
    Shutdown,     // triple fault or similar: the guest cannot go on
    InternalError,
    FailEntry,
    SystemEvent,  // code = KVM_SYSTEM_EVENT_* (shutdown, reset, crash)
    Interrupted,  // a signal or immediate_exit; no guest state changed
    DirtyRingFull,  // this vCPU's dirty ring needs harvesting before it runs on
    Unknown,      // code = raw exit reason
  };
  Kind kind;
  uint64_t address = 0;
  uint32_t size = 0;
  uint32_t count = 0;
  uint64_t code = 0;  // suberror, entry failure reason, event type or raw reason
  std::array<uint64_t, 4> data{};  // internal-error details
};

inline constexpr uint64_t kSystemEventShutdown = KVM_SYSTEM_EVENT_SHUTDOWN;
inline constexpr uint64_t kSystemEventReset = KVM_SYSTEM_EVENT_RESET;
inline constexpr uint64_t kSystemEventCrash = KVM_SYSTEM_EVENT_CRASH;

std::string_view exit_kind_name(VcpuExit::Kind kind);

}  // namespace keel::kvm
