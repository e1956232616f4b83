// Kvm -> Vm -> Vcpu: owners of the /dev/kvm, VM and vCPU descriptors, with
// calls named for intent. This folder is the only user of <linux/kvm.h>;
// the register structs are re-exported under Keel names in types.h.
// Spec: Documentation/virt/kvm/api.rst.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/event_fd.h"
#include "base/fd.h"
#include "base/mmap.h"
#include "base/result.h"
#include "kvm/dirty_ring.h"
#include "kvm/types.h"

namespace keel::kvm {

class Vm;
class Vcpu;

// Entries of each vCPU's dirty ring by default: 4096 x 16 bytes = 64 KiB of
// kernel memory per vCPU, for every VM on a host with the ring. KVM asks
// userspace to harvest once the ring is nearly full (less a reserve, 512
// entries more with Intel's PML), so this bounds how many pages a vCPU
// dirties between two exits. A power of two from kMinDirtyRingEntries
// (KVM's reserve must fit, and a page) to kMaxDirtyRingEntries (KVM's own
// limit, KVM_DIRTY_RING_MAX_ENTRIES).
inline constexpr uint32_t kDirtyRingEntries = 4096;
inline constexpr uint32_t kMinDirtyRingEntries = 1024;
inline constexpr uint32_t kMaxDirtyRingEntries = 65536;
// Whether entries is a dirty ring size Keel asks KVM for (see above).
constexpr bool valid_dirty_ring_entries(uint32_t entries) {
  return entries >= kMinDirtyRingEntries && entries <= kMaxDirtyRingEntries &&
         (entries & (entries - 1)) == 0;
}

class Kvm {
 public:
  // Opens /dev/kvm (or path) and checks the API version and the capabilities
  // every Keel VM needs; the error says which one is missing and what to do.
  static Result<Kvm> open(const std::string& path = "/dev/kvm");

  Result<int> check_extension(Capability cap) const;
  // The CPUID leaves this host's KVM can offer a guest.
  Result<CpuidEntries> supported_cpuid() const;
  // The MSR indices KVM saves and restores (KVM_GET_MSR_INDEX_LIST).
  Result<std::vector<uint32_t>> msr_index_list() const;
  // A new VM. Unless the dirty log mode is Bitmap, its dirty ring is turned
  // on here, the one moment KVM allows (before any vCPU): Auto falls back
  // to the bitmap where KVM has no ring, Ring fails (Unsupported).
  Result<Vm> create_vm() const;
  void set_dirty_log_mode(DirtyLogMode mode) { dirty_log_mode_ = mode; }
  DirtyLogMode dirty_log_mode() const { return dirty_log_mode_; }
  // Each vCPU's ring in entries (valid_dirty_ring_entries; the caller
  // checks): a larger ring means fewer full-ring exits of a guest that
  // dirties fast, at 16 bytes of kernel memory per entry and vCPU.
  void set_dirty_ring_entries(uint32_t entries) { dirty_ring_entries_ = entries; }
  uint32_t dirty_ring_entries() const { return dirty_ring_entries_; }
  // The kvm module in charge, e.g. "kvm_intel", "kvm_amd", "kvm_pvm", or "" if unknown.
  static std::string vendor_module();

 private:
  Kvm(Fd fd, size_t vcpu_mmap_size) : fd_(std::move(fd)), vcpu_mmap_size_(vcpu_mmap_size) {}

  Fd fd_;
  size_t vcpu_mmap_size_;
  DirtyLogMode dirty_log_mode_ = DirtyLogMode::Auto;
  uint32_t dirty_ring_entries_ = kDirtyRingEntries;
};

enum class MemoryFlags : uint32_t { None = 0, LogDirtyPages = 1, ReadOnly = 2 };

class Vm {
 public:
  Result<void> set_memory_region(uint32_t slot, uint64_t gpa, uint64_t size_bytes,
                                 void* host_address, MemoryFlags flags = MemoryFlags::None);
  Result<void> set_tss_address(uint64_t gpa);
  Result<void> set_identity_map_address(uint64_t gpa);
  // In-kernel IOAPIC + LAPIC + PIC, and the i8254 PIT.
  Result<void> create_irqchip();
  Result<void> create_pit();
  // Level of a legacy interrupt line (GSI) on the in-kernel irqchip.
  Result<void> set_irq_line(uint32_t gsi, bool high);
  // Signalling the eventfd raises the GSI; resample re-arms a level interrupt.
  Result<void> register_irqfd(const EventFd& event, uint32_t gsi);
  Result<void> unregister_irqfd(const EventFd& event, uint32_t gsi);
  // A guest write of length at address signals the eventfd without a vCPU exit.
  Result<void> register_ioeventfd(const EventFd& event, uint64_t address, uint32_t length,
                                  IoSpace space);
  Result<void> unregister_ioeventfd(const EventFd& event, uint64_t address, uint32_t length,
                                    IoSpace space);
  Result<void> set_gsi_routing(std::span<const IrqRoute> routes);
  // Injects an MSI directly (KVM_SIGNAL_MSI).
  Result<void> signal_msi(uint64_t address, uint32_t data);
  Result<Vcpu> create_vcpu(uint32_t index);
  Result<int> check_extension(Capability cap) const;
  int fd() const { return fd_.get(); }

  // Dirty logging for migration (api.rst: KVM_GET_DIRTY_LOG,
  // KVM_CLEAR_DIRTY_LOG, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2). A slot logs
  // once set_memory_region gives it MemoryFlags::LogDirtyPages.
  // Turns on manual protection when KVM offers it (false if not): then
  // get_dirty_log only reports, and clear_dirty_log write-protects again
  // the pages it names, so a large slot is not re-protected all at once.
  // Call before any slot logs.
  Result<bool> enable_manual_dirty_protect();
  bool manual_dirty_protect() const { return manual_dirty_protect_; }
  // The slot's dirty pages since the last call (or clear), one bit per page
  // from the slot's start; bitmap has room for every page of the slot,
  // rounded up to 64. Without manual protection KVM also clears the log
  // and write-protects the pages again.
  Result<void> get_dirty_log(uint32_t slot, std::span<uint64_t> bitmap);
  // Manual protection only: clears the bits of bitmap (first_page is the
  // page of bitmap's bit 0, a multiple of 64) and re-protects those pages.
  Result<void> clear_dirty_log(uint32_t slot, uint64_t first_page, uint32_t page_count,
                               std::span<uint64_t> bitmap);

  // The dirty ring instead (api.rst: KVM_CAP_DIRTY_LOG_RING_ACQ_REL, or
  // the plain KVM_CAP_DIRTY_LOG_RING on x86, whose stores are ordered
  // anyway): entries per vCPU (a power of two), each 16 bytes of memory
  // KVM allocates for every vCPU. False, and nothing changed, if KVM has
  // no ring this large. Only before the first create_vcpu (Kvm::create_vm
  // calls it); KVM_GET_DIRTY_LOG is refused from then on.
  Result<bool> enable_dirty_ring(uint32_t entries);
  bool dirty_ring() const { return dirty_ring_bytes_ > 0; }
  DirtyLogMode dirty_log_mode() const {
    return dirty_ring() ? DirtyLogMode::Ring : DirtyLogMode::Bitmap;
  }
  // Hands every entry the vCPUs' rings have marked RESET back to KVM,
  // which write-protects those pages again (KVM_RESET_DIRTY_RINGS).
  // Returns how many pages it re-protected.
  Result<uint64_t> reset_dirty_rings();

  // The irqchip (PIC master and slave, IOAPIC), PIT and KVM clock, for a
  // snapshot. Call with every vCPU out of KVM_RUN.
  Result<VmState> save_state() const;
  // Restores what save_state() returned into a fresh VM that has the same
  // in-kernel devices (create_irqchip/create_pit called as on the source),
  // before its vCPUs first run. The error names the part KVM refused.
  Result<void> restore_state(const VmState& state);

 private:
  friend class Kvm;
  Vm(Fd fd, size_t vcpu_mmap_size, std::shared_ptr<const std::vector<uint32_t>> msr_indices)
      : fd_(std::move(fd)), vcpu_mmap_size_(vcpu_mmap_size), msr_indices_(std::move(msr_indices)) {}

  Fd fd_;
  size_t vcpu_mmap_size_;
  std::shared_ptr<const std::vector<uint32_t>> msr_indices_;  // KVM_GET_MSR_INDEX_LIST
  bool has_irqchip_ = false;
  bool has_pit_ = false;
  bool manual_dirty_protect_ = false;
  size_t dirty_ring_bytes_ = 0;  // per vCPU; 0 without the ring
};

// What a vCPU can save and restore on this KVM, decided once when it is made.
struct VcpuStateSupport {
  std::shared_ptr<const std::vector<uint32_t>> msr_indices;
  size_t xsave_bytes = 0;  // 0: no KVM_CAP_XSAVE, so KVM_GET_FPU
  bool xsave2 = false;
  bool xcrs = false;
  bool sregs2 = false;
  bool lapic = false;  // the VM has an in-kernel irqchip
  bool vcpu_events = false;
  bool debug_regs = false;
  bool tsc_khz = false;
};

class Vcpu {
 public:
  // Enters the guest until the next exit that userspace must handle. EINTR
  // (a signal kicked us out) comes back as VcpuExit::Kind::Interrupted.
  Result<VcpuExit> run();
  // The data buffer of the current port-I/O exit (inside the kvm_run page).
  std::span<std::byte> io_data();
  // For an MMIO read exit: where the value the guest reads goes.
  std::span<std::byte> mmio_data();
  // Ask the next run() to return at once (from a signal handler / other thread).
  void set_immediate_exit(bool value);

  Result<Regs> regs() const;
  Result<void> set_regs(const Regs& regs);
  Result<Sregs> sregs() const;
  Result<void> set_sregs(const Sregs& sregs);
  Result<Fpu> fpu() const;
  Result<void> set_fpu(const Fpu& fpu);
  Result<void> set_cpuid(const CpuidEntries& entries);
  // Sets each (index, value) pair; fails naming the first MSR KVM refused.
  Result<void> set_msrs(std::span<const MsrEntry> entries);
  Result<std::vector<MsrEntry>> msrs(std::span<const uint32_t> indices) const;
  Result<Lapic> lapic() const;
  Result<void> set_lapic(const Lapic& lapic);
  Result<MpState> mp_state() const;
  Result<void> set_mp_state(MpState state);
  Result<CpuidEntries> cpuid() const;

  // Finishes the instruction of the last I/O or MMIO exit without running
  // any further guest code (KVM_RUN with immediate_exit set). KVM keeps
  // such a half-done instruction where save_state() cannot see it, so call
  // this before saving a vCPU that stopped at an exit. Busy if finishing it
  // needs userspace again (string I/O over several exits): run on, retry.
  Result<void> complete_pending_io();
  // Everything KVM holds for this vCPU. Call it on a vCPU that is out of
  // KVM_RUN, after complete_pending_io(), while no other vCPU runs.
  Result<VcpuState> save_state() const;
  // Loads a saved state into a fresh vCPU of a VM restored with
  // Vm::restore_state, in the order KVM needs: CPUID before MSRs and XSAVE,
  // special registers before LAPIC and events, LAPIC before the MSRs (the
  // TSC deadline) and the MP state.
  // The error names the part, and for MSRs the index, that KVM refused.
  Result<void> restore_state(const VcpuState& state);

  uint32_t index() const { return index_; }
  int fd() const { return fd_.get(); }
  // This vCPU's dirty ring, if the VM has one (enabled() false if not).
  DirtyRing& dirty_ring() { return dirty_ring_; }

 private:
  friend class Vm;
  Vcpu(uint32_t index, Fd fd, Mmap run, VcpuStateSupport support)
      : index_(index), fd_(std::move(fd)), run_(std::move(run)), support_(std::move(support)) {}

  Result<std::vector<MsrEntry>> save_msrs() const;

  uint32_t index_;
  Fd fd_;
  Mmap run_;  // struct kvm_run, shared with the kernel.
  VcpuStateSupport support_;
  Mmap dirty_ring_map_;  // the ring's entries, shared with the kernel; empty without
  DirtyRing dirty_ring_;
};

}  // namespace keel::kvm
