// Per-vCPU architectural setup for booting Linux: CPUID with a consistent
// topology, the MSRs a clean boot expects, LAPIC LINT0/LINT1 wiring, the FPU,
// and the entry register state of the boot protocol (64-bit for bzImage,
// 32-bit flat protected mode for PVH).
// Spec: Intel SDM vol. 2A CPUID (leaves 01H, 04H, 0BH, 1FH), AMD APM vol. 3
// (8000_0008h, 8000_001Eh), Linux Documentation/arch/x86/boot.rst (64-bit
// boot protocol), Xen docs/misc/pvh.pandoc (PVH entry state).
#pragma once

#include <array>
#include <cstdint>

#include "base/result.h"
#include "boot/linux_loader.h"
#include "kvm/kvm.h"

namespace keel::machine {

// What the host's KVM can do beyond what KVM_GET_SUPPORTED_CPUID reports:
// KVM emulates the LAPIC's TSC-deadline mode (KVM_CAP_TSC_DEADLINE_TIMER)
// but leaves advertising it to the VMM. KVM also reports the processor
// brand string leaves (8000_0002h-8000_0004h) as zeroes, so guests would
// show "AMD 17/01" or an empty model name; the VMM passes the host's on.
struct CpuidHostFeatures {
  bool tsc_deadline_timer = false;
  // EAX, EBX, ECX, EDX of leaves 8000_0002h, 8000_0003h, 8000_0004h, as the
  // host CPU reports them (48 bytes of brand string); all zero: none.
  std::array<uint32_t, 12> brand{};
};

// The host CPU's brand string leaves, read with the CPUID instruction.
std::array<uint32_t, 12> host_cpu_brand();

// Adjusts KVM's supported CPUID for vCPU `index` of `count`: APIC IDs equal
// the vCPU index, one thread per core, all cores in one package.
kvm::CpuidEntries build_cpuid(const kvm::CpuidEntries& supported, uint32_t index, uint32_t count,
                              CpuidHostFeatures host = {});

// CPUID, MSRs, LAPIC and FPU for every vCPU.
Result<void> configure_vcpu(kvm::Vcpu& vcpu, const kvm::CpuidEntries& cpuid);

// Registers of the boot vCPU at the kernel's entry point.
Result<void> set_boot_entry_state(kvm::Vcpu& vcpu, const boot::EntryPoint& entry);

}  // namespace keel::machine
