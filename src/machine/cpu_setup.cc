#include "machine/cpu_setup.h"

#include <cpuid.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <vector>

#include "base/log.h"
#include "machine/layout.h"

namespace keel::machine {
namespace {

constexpr uint32_t kMsrSysenterCs = 0x174;
constexpr uint32_t kMsrSysenterEsp = 0x175;
constexpr uint32_t kMsrSysenterEip = 0x176;
constexpr uint32_t kMsrMiscEnable = 0x1a0;
constexpr uint32_t kMsrMtrrDefType = 0x2ff;
constexpr uint32_t kMsrStar = 0xc0000081;
constexpr uint32_t kMsrLstar = 0xc0000082;
constexpr uint32_t kMsrCstar = 0xc0000083;
constexpr uint32_t kMsrSyscallMask = 0xc0000084;
constexpr uint32_t kMsrKernelGsBase = 0xc0000102;

constexpr uint64_t kMiscEnableFastStrings = 1;
constexpr uint64_t kMtrrEnable = 1 << 11;
constexpr uint64_t kMtrrTypeWriteBack = 6;

constexpr size_t kLapicLvtLint0 = 0x350;
constexpr size_t kLapicLvtLint1 = 0x360;
constexpr uint32_t kDeliveryModeExtInt = 0x7 << 8;
constexpr uint32_t kDeliveryModeNmi = 0x4 << 8;

uint32_t ceil_log2(uint32_t value) { return value <= 1 ? 0 : std::bit_width(value - 1); }

// Leaves 0BH and 1FH: SMT level (1 thread) and core level (count cores).
void add_extended_topology(kvm::CpuidEntries& entries, uint32_t leaf, uint32_t index,
                           uint32_t count) {
  std::erase_if(entries, [leaf](const kvm::CpuidEntry& e) { return e.function == leaf; });
  for (uint32_t level = 0; level < 3; ++level) {
    kvm::CpuidEntry entry{};
    entry.function = leaf;
    entry.index = level;
    entry.flags = kvm::kCpuidFlagSignificantIndex;
    entry.edx = index;  // x2APIC ID
    if (level == 0) {
      entry.eax = 0;             // no bits for threads: one thread per core
      entry.ebx = 1;
      entry.ecx = (1 << 8) | 0;  // type SMT
    } else if (level == 1) {
      entry.eax = ceil_log2(count);
      entry.ebx = count;
      entry.ecx = (2 << 8) | 1;  // type Core
    } else {
      entry.ecx = level;  // type Invalid ends the enumeration
    }
    entries.push_back(entry);
  }
}

}  // namespace

kvm::CpuidEntries build_cpuid(const kvm::CpuidEntries& supported, uint32_t index, uint32_t count,
                              CpuidHostFeatures host) {
  kvm::CpuidEntries entries = supported;
  uint32_t max_basic = 0;
  for (const kvm::CpuidEntry& entry : entries) {
    if (entry.function == 0) max_basic = entry.eax;
  }
  for (kvm::CpuidEntry& entry : entries) {
    switch (entry.function) {
      case 0x1:
        entry.ebx = (entry.ebx & 0xffff) | (std::min<uint32_t>(count, 255) << 16) | (index << 24);
        entry.ecx |= 1u << 31;  // running under a hypervisor
        if (count > 1) entry.edx |= 1u << 28;  // HTT: EBX[23:16] is valid
        // Without TSC-deadline the guest programs the LAPIC timer in one-shot
        // mode, which it must first calibrate.
        if (host.tsc_deadline_timer) entry.ecx |= 1u << 24;
        break;
      case 0x4: {
        // Deterministic cache parameters; a null cache type ends the list.
        if ((entry.eax & 0x1f) == 0) break;
        uint32_t level = (entry.eax >> 5) & 0x7;
        // The fields are 12 and 6 bits wide: saturate rather than wrap.
        uint32_t sharing = level >= 3 ? std::min(count - 1, 0xfffu) : 0;  // L3: the package
        uint32_t cores = std::min(count - 1, 63u);
        entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | (cores << 26);
        break;
      }
      case 0x80000008:
        // AMD: NC = cores - 1, ApicIdCoreIdSize.
        entry.ecx = (entry.ecx & ~0xf0ffu) | (count - 1) | (ceil_log2(count) << 12);
        break;
      case 0x8000001e:
        entry.eax = index;  // extended APIC ID
        entry.ebx = index;  // core ID, one thread per core
        entry.ecx = 0;      // node 0
        break;
      case 0x80000002:
      case 0x80000003:
      case 0x80000004: {
        // Only fill leaves KVM left empty: a brand KVM does report wins.
        if (entry.eax != 0 || entry.ebx != 0 || entry.ecx != 0 || entry.edx != 0) break;
        const size_t base = 4 * (entry.function - 0x80000002);
        entry.eax = host.brand[base];
        entry.ebx = host.brand[base + 1];
        entry.ecx = host.brand[base + 2];
        entry.edx = host.brand[base + 3];
        break;
      }
      default: break;
    }
  }
  if (max_basic >= 0xb) add_extended_topology(entries, 0xb, index, count);
  if (max_basic >= 0x1f) add_extended_topology(entries, 0x1f, index, count);
  return entries;
}

std::array<uint32_t, 12> host_cpu_brand() {
  std::array<uint32_t, 12> brand{};
  if (__get_cpuid_max(0x80000000, nullptr) < 0x80000004) return brand;
  for (uint32_t leaf = 0; leaf < 3; ++leaf) {
    __get_cpuid(0x80000002 + leaf, &brand[4 * leaf], &brand[4 * leaf + 1], &brand[4 * leaf + 2],
                &brand[4 * leaf + 3]);
  }
  return brand;
}

Result<void> configure_vcpu(kvm::Vcpu& vcpu, const kvm::CpuidEntries& cpuid) {
  TRY_CONTEXT(vcpu.set_cpuid(cpuid), "CPUID");

  const kvm::MsrEntry boot_msrs[] = {
      {kMsrSysenterCs, 0},  {kMsrSysenterEsp, 0}, {kMsrSysenterEip, 0},
      {kMsrStar, 0},        {kMsrLstar, 0},       {kMsrCstar, 0},
      {kMsrSyscallMask, 0}, {kMsrKernelGsBase, 0},
      {kMsrMiscEnable, kMiscEnableFastStrings},
      {kMsrMtrrDefType, kMtrrEnable | kMtrrTypeWriteBack},
  };
  // IA32_TSC is left alone: KVM starts every vCPU's TSC in sync, while
  // writing it from each vCPU's setup, moments apart, makes the guest see
  // unsynchronized TSCs and drop the TSC clocksource.
  for (const kvm::MsrEntry& msr : boot_msrs) {
    // A host may refuse an optional MSR (MISC_ENABLE on some AMD setups); the
    // guest then sees the architectural reset value, which Linux copes with.
    if (Result<void> result = vcpu.set_msrs({&msr, 1}); !result) {
      LOG_DEBUG("vcpu {}: {}", vcpu.index(), result.error().message());
    }
  }

  kvm::Lapic lapic = TRY(vcpu.lapic());
  auto set_lvt = [&lapic](size_t offset, uint32_t mode) {
    uint32_t value;
    std::memcpy(&value, lapic.regs + offset, sizeof(value));
    value = (value & ~0x700u) | mode;
    std::memcpy(lapic.regs + offset, &value, sizeof(value));
  };
  set_lvt(kLapicLvtLint0, kDeliveryModeExtInt);  // the PIC's output
  set_lvt(kLapicLvtLint1, kDeliveryModeNmi);
  TRY(vcpu.set_lapic(lapic));

  kvm::Fpu fpu{};
  fpu.fcw = 0x37f;
  fpu.mxcsr = 0x1f80;
  return vcpu.set_fpu(fpu);
}

Result<void> set_boot_entry_state(kvm::Vcpu& vcpu, const boot::EntryPoint& entry) {
  kvm::Sregs sregs = TRY(vcpu.sregs());
  using kvm::FlatSegment;
  using kvm::flat_segment;
  kvm::Regs regs{};
  regs.rflags = 0x2;
  regs.rip = entry.rip;
  constexpr uint64_t kCr0Pe = 1, kCr0Et = 1 << 4, kCr0Pg = 1ull << 31;
  if (entry.format == boot::KernelFormat::BzImage) {
    // boot.rst, 64-bit boot protocol: long mode, identity-mapped paging,
    // __BOOT_CS = 0x10 and __BOOT_DS = 0x18, rsi = boot_params.
    sregs.gdt.base = layout::kGdtStart;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.cs = flat_segment(0x10, FlatSegment::Code64);
    kvm::Segment data = flat_segment(0x18, FlatSegment::Data);
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.cr3 = layout::kPageTablesStart;
    sregs.cr4 = 1 << 5;  // PAE
    sregs.cr0 = kCr0Pe | kCr0Et | kCr0Pg;
    sregs.efer = (1 << 10) | (1 << 8);  // LMA | LME
    regs.rsi = entry.boot_info_address;
  } else {
    // PVH: 32-bit flat protected mode, paging off, ebx = hvm_start_info.
    sregs.cs = flat_segment(0x08, FlatSegment::Code32);
    kvm::Segment data = flat_segment(0x10, FlatSegment::Data);
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.cr0 = kCr0Pe | kCr0Et;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    regs.rbx = entry.boot_info_address;
  }
  TRY(vcpu.set_sregs(sregs));
  return vcpu.set_regs(regs);
}

}  // namespace keel::machine
