#include "kvm/kvm.h"

#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>

namespace keel::kvm {
namespace {

// <linux/kvm.h> declares the variable-length tails of these structs with
// __DECLARE_FLEX_ARRAY, whose empty struct takes one byte in C++ but none in
// C: sizeof, the tail's offset and the ioctl numbers derived from sizeof all
// come out wrong in C++ (KVM then answers EINVAL, or reads misplaced data).
// So Keel lays out the fixed headers itself and derives the numbers from them;
// the static_asserts pin them to the values a C compiler computes.
struct CpuidHeader {
  uint32_t nent;
  uint32_t padding;
};
struct MsrListHeader {
  uint32_t nmsrs;
};
struct MsrsHeader {
  uint32_t nmsrs;
  uint32_t pad;
};
struct IrqRoutingHeader {
  uint32_t nr;
  uint32_t flags;
};
constexpr unsigned long kGetMsrIndexList = _IOWR(KVMIO, 0x02, MsrListHeader);
constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, CpuidHeader);
constexpr unsigned long kSetGsiRouting = _IOW(KVMIO, 0x6a, IrqRoutingHeader);
constexpr unsigned long kGetMsrs = _IOWR(KVMIO, 0x88, MsrsHeader);
constexpr unsigned long kSetMsrs = _IOW(KVMIO, 0x89, MsrsHeader);
constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, CpuidHeader);
constexpr unsigned long kGetCpuid2 = _IOWR(KVMIO, 0x91, CpuidHeader);
// struct kvm_xsave is 4096 bytes of region then a flex-array tail.
using XsaveRegion = std::array<uint32_t, kXsaveLegacyBytes / sizeof(uint32_t)>;
constexpr unsigned long kGetXsave = _IOR(KVMIO, 0xa4, XsaveRegion);
constexpr unsigned long kSetXsave = _IOW(KVMIO, 0xa5, XsaveRegion);
constexpr unsigned long kGetXsave2 = _IOR(KVMIO, 0xcf, XsaveRegion);
static_assert(kGetMsrIndexList == 0xc004ae02);
static_assert(kGetSupportedCpuid == 0xc008ae05);
static_assert(kSetGsiRouting == 0x4008ae6a);
static_assert(kGetMsrs == 0xc008ae88);
static_assert(kSetMsrs == 0x4008ae89);
static_assert(kSetCpuid2 == 0x4008ae90);
static_assert(kGetCpuid2 == 0xc008ae91);
static_assert(kGetXsave == 0x9000aea4);
static_assert(kSetXsave == 0x5000aea5);
static_assert(kGetXsave2 == 0x9000aecf);

// A header followed by count entries, laid out as the kernel expects.
template <typename Header, typename Entry>
class TailBuffer {
 public:
  explicit TailBuffer(size_t count)
      : storage_((sizeof(Header) + count * sizeof(Entry) + sizeof(uint64_t) - 1) /
                 sizeof(uint64_t)) {
    static_assert(sizeof(Header) % alignof(Entry) == 0, "tail would be misaligned");
  }
  Header* header() { return reinterpret_cast<Header*>(storage_.data()); }
  Entry* entries() {
    return reinterpret_cast<Entry*>(reinterpret_cast<std::byte*>(storage_.data()) +
                                    sizeof(Header));
  }
  void* get() { return storage_.data(); }

 private:
  std::vector<uint64_t> storage_;  // uint64_t for the alignment of every KVM entry type
};

// The capabilities without which no Keel VM can run, with the reason.
constexpr std::array kRequiredCapabilities = {
    Capability::UserMemory, Capability::Irqchip,   Capability::Hlt,
    Capability::SetTssAddr, Capability::ExtCpuid,  Capability::Pit2,
    Capability::Irqfd,      Capability::Ioeventfd, Capability::IrqRouting,
    Capability::ImmediateExit,
};

template <typename T>
Result<void> ioctl_set(int fd, unsigned long request, const T& value, std::string_view what) {
  if (::ioctl(fd, request, &value) < 0) return fail_errno(std::string(what));
  return ok();
}

template <typename T>
Result<T> ioctl_get(int fd, unsigned long request, std::string_view what) {
  T value{};
  if (::ioctl(fd, request, &value) < 0) return fail_errno(std::string(what));
  return value;
}

// KVM_GET_SUPPORTED_CPUID and KVM_GET_CPUID2: grow the buffer until KVM
// stops saying E2BIG.
Result<CpuidEntries> get_cpuid(int fd, unsigned long request, std::string_view what) {
  for (uint32_t capacity = 128; capacity <= 4096; capacity *= 2) {
    TailBuffer<CpuidHeader, kvm_cpuid_entry2> buffer(capacity);
    buffer.header()->nent = capacity;
    if (::ioctl(fd, request, buffer.get()) == 0) {
      return CpuidEntries(buffer.entries(), buffer.entries() + buffer.header()->nent);
    }
    if (errno != E2BIG) return fail_errno(std::string(what));
  }
  return fail(Errc::OutOfRange, fmt::format("{}: more than 4096 leaves", what));
}

// KVM_GET_MSRS for indices, appending what KVM read to out. KVM stops at the
// first MSR it refuses; the count read comes back.
Result<size_t> get_msrs(int fd, std::span<const uint32_t> indices, std::vector<MsrEntry>& out,
                        uint32_t vcpu_index) {
  TailBuffer<MsrsHeader, kvm_msr_entry> buffer(indices.size());
  buffer.header()->nmsrs = static_cast<uint32_t>(indices.size());
  buffer.header()->pad = 0;
  for (size_t i = 0; i < indices.size(); ++i) {
    buffer.entries()[i] = kvm_msr_entry{.index = indices[i], .reserved = 0, .data = 0};
  }
  int done = ::ioctl(fd, kGetMsrs, buffer.get());
  if (done < 0) return fail_errno(fmt::format("KVM_GET_MSRS vcpu {}", vcpu_index));
  auto read = std::min(static_cast<size_t>(done), indices.size());
  for (size_t i = 0; i < read; ++i) {
    out.push_back({buffer.entries()[i].index, buffer.entries()[i].data});
  }
  return read;
}

}  // namespace

std::string_view capability_name(Capability cap) {
  switch (cap) {
    case Capability::Irqchip: return "KVM_CAP_IRQCHIP";
    case Capability::Hlt: return "KVM_CAP_HLT";
    case Capability::UserMemory: return "KVM_CAP_USER_MEMORY";
    case Capability::SetTssAddr: return "KVM_CAP_SET_TSS_ADDR";
    case Capability::ExtCpuid: return "KVM_CAP_EXT_CPUID";
    case Capability::Pit2: return "KVM_CAP_PIT2";
    case Capability::Irqfd: return "KVM_CAP_IRQFD";
    case Capability::Ioeventfd: return "KVM_CAP_IOEVENTFD";
    case Capability::IrqRouting: return "KVM_CAP_IRQ_ROUTING";
    case Capability::SignalMsi: return "KVM_CAP_SIGNAL_MSI";
    case Capability::ImmediateExit: return "KVM_CAP_IMMEDIATE_EXIT";
    case Capability::NrVcpus: return "KVM_CAP_NR_VCPUS";
    case Capability::MaxVcpus: return "KVM_CAP_MAX_VCPUS";
    case Capability::TscControl: return "KVM_CAP_TSC_CONTROL";
    case Capability::TscDeadlineTimer: return "KVM_CAP_TSC_DEADLINE_TIMER";
    case Capability::Xsave: return "KVM_CAP_XSAVE";
    case Capability::Xcrs: return "KVM_CAP_XCRS";
    case Capability::DirtyLogRing: return "KVM_CAP_DIRTY_LOG_RING";
    case Capability::DirtyLogRingAcqRel: return "KVM_CAP_DIRTY_LOG_RING_ACQ_REL";
    case Capability::ManualDirtyLogProtect2: return "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2";
    case Capability::SyncMmu: return "KVM_CAP_SYNC_MMU";
    case Capability::VcpuEvents: return "KVM_CAP_VCPU_EVENTS";
    case Capability::DebugRegs: return "KVM_CAP_DEBUGREGS";
    case Capability::Sregs2: return "KVM_CAP_SREGS2";
    case Capability::Xsave2: return "KVM_CAP_XSAVE2";
    case Capability::AdjustClock: return "KVM_CAP_ADJUST_CLOCK";
    case Capability::GetTscKhz: return "KVM_CAP_GET_TSC_KHZ";
  }
  return "KVM_CAP_?";
}

std::string_view exit_kind_name(VcpuExit::Kind kind) {
  switch (kind) {
    case VcpuExit::Kind::IoIn: return "io-in";
    case VcpuExit::Kind::IoOut: return "io-out";
    case VcpuExit::Kind::MmioRead: return "mmio-read";
    case VcpuExit::Kind::MmioWrite: return "mmio-write";
    case VcpuExit::Kind::Hlt: return "hlt";
    case VcpuExit::Kind::Shutdown: return "shutdown";
    case VcpuExit::Kind::InternalError: return "internal-error";
    case VcpuExit::Kind::FailEntry: return "fail-entry";
    case VcpuExit::Kind::SystemEvent: return "system-event";
    case VcpuExit::Kind::Interrupted: return "interrupted";
    case VcpuExit::Kind::DirtyRingFull: return "dirty-ring-full";
    case VcpuExit::Kind::Unknown: return "unknown";
  }
  return "?";
}

// ---- Kvm ----

Result<Kvm> Kvm::open(const std::string& path) {
  Result<Fd> fd = Fd::open(path, O_RDWR);
  if (!fd) {
    const Error& error = fd.error();
    if (error.code() == Errc::NotFound) {
      return fail(Errc::NotFound,
                  fmt::format("{} does not exist: this host has no KVM (enable VT-x/AMD-V in "
                              "firmware and load kvm_intel or kvm_amd)",
                              path));
    }
    if (error.code() == Errc::PermissionDenied) {
      return fail(Errc::PermissionDenied,
                  fmt::format("no permission to open {}: run as root or join the group that "
                              "owns it (usually 'kvm')",
                              path));
    }
    return fail(Error(error).wrap("open KVM"));
  }
  int version = ::ioctl(fd->get(), KVM_GET_API_VERSION, 0);
  if (version != KVM_API_VERSION) {
    return fail(Errc::Unsupported,
                fmt::format("{}: KVM API version {} (Keel needs {})", path, version,
                            KVM_API_VERSION));
  }
  for (Capability cap : kRequiredCapabilities) {
    int present = ::ioctl(fd->get(), KVM_CHECK_EXTENSION, static_cast<int>(cap));
    if (present <= 0) {
      return fail(Errc::Unsupported,
                  fmt::format("{}: this KVM lacks {}, which Keel needs", path,
                              capability_name(cap)));
    }
  }
  int mmap_size = ::ioctl(fd->get(), KVM_GET_VCPU_MMAP_SIZE, 0);
  if (mmap_size <= 0) return fail_errno("KVM_GET_VCPU_MMAP_SIZE");
  return Kvm(std::move(*fd), static_cast<size_t>(mmap_size));
}

Result<int> Kvm::check_extension(Capability cap) const {
  int value = ::ioctl(fd_.get(), KVM_CHECK_EXTENSION, static_cast<int>(cap));
  if (value < 0) return fail_errno(fmt::format("check {}", capability_name(cap)));
  return value;
}

Result<CpuidEntries> Kvm::supported_cpuid() const {
  return get_cpuid(fd_.get(), kGetSupportedCpuid, "KVM_GET_SUPPORTED_CPUID");
}

Result<std::vector<uint32_t>> Kvm::msr_index_list() const {
  MsrListHeader probe{};
  if (::ioctl(fd_.get(), kGetMsrIndexList, &probe) < 0 && errno != E2BIG) {
    return fail_errno("KVM_GET_MSR_INDEX_LIST");
  }
  TailBuffer<MsrListHeader, uint32_t> buffer(probe.nmsrs);
  buffer.header()->nmsrs = probe.nmsrs;
  if (::ioctl(fd_.get(), kGetMsrIndexList, buffer.get()) < 0) {
    return fail_errno("KVM_GET_MSR_INDEX_LIST");
  }
  return std::vector<uint32_t>(buffer.entries(), buffer.entries() + buffer.header()->nmsrs);
}

Result<Vm> Kvm::create_vm() const {
  int fd = -1;
  // KVM_CREATE_VM can fail with EINTR while the kernel sets up the VM.
  do {
    fd = ::ioctl(fd_.get(), KVM_CREATE_VM, 0);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return fail_errno("KVM_CREATE_VM");
  Fd owner(fd);
  auto msr_indices = std::make_shared<const std::vector<uint32_t>>(TRY(msr_index_list()));
  Vm vm(std::move(owner), vcpu_mmap_size_, std::move(msr_indices));
  if (dirty_log_mode_ != DirtyLogMode::Bitmap) {
    bool ring = TRY(vm.enable_dirty_ring(dirty_ring_entries_));
    if (!ring && dirty_log_mode_ == DirtyLogMode::Ring) {
      return fail(Errc::Unsupported,
                  fmt::format("dirty log mode ring: this host's KVM offers no dirty ring of {} "
                              "entries (KVM_CAP_DIRTY_LOG_RING: {} bytes at most); use a smaller "
                              "ring, bitmap or auto",
                              dirty_ring_entries_,
                              std::max(check_extension(Capability::DirtyLogRingAcqRel).value_or(0),
                                       check_extension(Capability::DirtyLogRing).value_or(0))));
    }
  }
  return vm;
}

std::string_view dirty_log_mode_name(DirtyLogMode mode) {
  switch (mode) {
    case DirtyLogMode::Auto: return "auto";
    case DirtyLogMode::Ring: return "ring";
    case DirtyLogMode::Bitmap: return "bitmap";
  }
  return "?";
}

std::string Kvm::vendor_module() {
  for (const char* name : {"kvm_intel", "kvm_amd", "kvm_pvm"}) {
    if (std::filesystem::exists(fmt::format("/sys/module/{}", name))) return name;
  }
  return "";
}

// ---- Vm ----

Result<void> Vm::set_memory_region(uint32_t slot, uint64_t gpa, uint64_t size_bytes,
                                   void* host_address, MemoryFlags flags) {
  kvm_userspace_memory_region region{
      .slot = slot,
      .flags = static_cast<uint32_t>(flags),
      .guest_phys_addr = gpa,
      .memory_size = size_bytes,
      .userspace_addr = reinterpret_cast<uint64_t>(host_address),
  };
  if (::ioctl(fd_.get(), KVM_SET_USER_MEMORY_REGION, &region) < 0) {
    return fail_errno(fmt::format("KVM_SET_USER_MEMORY_REGION slot {} gpa {:#x} size {:#x}", slot,
                                  gpa, size_bytes));
  }
  return ok();
}

Result<void> Vm::set_tss_address(uint64_t gpa) {
  if (::ioctl(fd_.get(), KVM_SET_TSS_ADDR, static_cast<unsigned long>(gpa)) < 0) {
    return fail_errno("KVM_SET_TSS_ADDR");
  }
  return ok();
}

Result<void> Vm::set_identity_map_address(uint64_t gpa) {
  return ioctl_set(fd_.get(), KVM_SET_IDENTITY_MAP_ADDR, gpa, "KVM_SET_IDENTITY_MAP_ADDR");
}

Result<void> Vm::create_irqchip() {
  if (::ioctl(fd_.get(), KVM_CREATE_IRQCHIP, 0) < 0) return fail_errno("KVM_CREATE_IRQCHIP");
  has_irqchip_ = true;
  return ok();
}

Result<void> Vm::create_pit() {
  kvm_pit_config config{};
  config.flags = KVM_PIT_SPEAKER_DUMMY;
  TRY(ioctl_set(fd_.get(), KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2"));
  has_pit_ = true;
  return ok();
}

Result<void> Vm::set_irq_line(uint32_t gsi, bool high) {
  kvm_irq_level level{};
  level.irq = gsi;
  level.level = high ? 1 : 0;
  return ioctl_set(fd_.get(), KVM_IRQ_LINE, level, "KVM_IRQ_LINE");
}

Result<void> Vm::register_irqfd(const EventFd& event, uint32_t gsi) {
  kvm_irqfd irqfd{};
  irqfd.fd = static_cast<uint32_t>(event.get());
  irqfd.gsi = gsi;
  return ioctl_set(fd_.get(), KVM_IRQFD, irqfd, fmt::format("KVM_IRQFD gsi {}", gsi));
}

Result<void> Vm::unregister_irqfd(const EventFd& event, uint32_t gsi) {
  kvm_irqfd irqfd{};
  irqfd.fd = static_cast<uint32_t>(event.get());
  irqfd.gsi = gsi;
  irqfd.flags = KVM_IRQFD_FLAG_DEASSIGN;
  return ioctl_set(fd_.get(), KVM_IRQFD, irqfd, fmt::format("KVM_IRQFD deassign gsi {}", gsi));
}

namespace {
kvm_ioeventfd make_ioeventfd(const EventFd& event, uint64_t address, uint32_t length,
                             IoSpace space) {
  kvm_ioeventfd io{};
  io.addr = address;
  io.len = length;
  io.fd = event.get();
  io.flags = space == IoSpace::Pio ? KVM_IOEVENTFD_FLAG_PIO : 0;
  return io;
}
}  // namespace

Result<void> Vm::register_ioeventfd(const EventFd& event, uint64_t address, uint32_t length,
                                    IoSpace space) {
  return ioctl_set(fd_.get(), KVM_IOEVENTFD, make_ioeventfd(event, address, length, space),
                   fmt::format("KVM_IOEVENTFD at {:#x}", address));
}

Result<void> Vm::unregister_ioeventfd(const EventFd& event, uint64_t address, uint32_t length,
                                      IoSpace space) {
  kvm_ioeventfd io = make_ioeventfd(event, address, length, space);
  io.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
  return ioctl_set(fd_.get(), KVM_IOEVENTFD, io,
                   fmt::format("KVM_IOEVENTFD deassign at {:#x}", address));
}

Result<void> Vm::set_gsi_routing(std::span<const IrqRoute> routes) {
  TailBuffer<IrqRoutingHeader, kvm_irq_routing_entry> buffer(routes.size());
  buffer.header()->nr = static_cast<uint32_t>(routes.size());
  buffer.header()->flags = 0;
  for (size_t i = 0; i < routes.size(); ++i) {
    kvm_irq_routing_entry& entry = buffer.entries()[i];
    entry = {};
    entry.gsi = routes[i].gsi;
    if (routes[i].kind == IrqRoute::Kind::IrqchipPin) {
      entry.type = KVM_IRQ_ROUTING_IRQCHIP;
      entry.u.irqchip.irqchip = routes[i].irqchip;
      entry.u.irqchip.pin = routes[i].pin;
    } else {
      entry.type = KVM_IRQ_ROUTING_MSI;
      entry.u.msi.address_lo = static_cast<uint32_t>(routes[i].msi_address);
      entry.u.msi.address_hi = static_cast<uint32_t>(routes[i].msi_address >> 32);
      entry.u.msi.data = routes[i].msi_data;
    }
  }
  if (::ioctl(fd_.get(), kSetGsiRouting, buffer.get()) < 0) {
    return fail_errno(fmt::format("KVM_SET_GSI_ROUTING ({} routes)", routes.size()));
  }
  return ok();
}

Result<void> Vm::signal_msi(uint64_t address, uint32_t data) {
  kvm_msi msi{};
  msi.address_lo = static_cast<uint32_t>(address);
  msi.address_hi = static_cast<uint32_t>(address >> 32);
  msi.data = data;
  if (::ioctl(fd_.get(), KVM_SIGNAL_MSI, &msi) < 0) return fail_errno("KVM_SIGNAL_MSI");
  return ok();
}

Result<Vcpu> Vm::create_vcpu(uint32_t index) {
  int fd = ::ioctl(fd_.get(), KVM_CREATE_VCPU, static_cast<unsigned long>(index));
  if (fd < 0) return fail_errno(fmt::format("KVM_CREATE_VCPU {}", index));
  Fd owner(fd);
  Mmap run = TRY(Mmap::file(owner, vcpu_mmap_size_, 0, PROT_READ | PROT_WRITE, MAP_SHARED));
  VcpuStateSupport support{.msr_indices = msr_indices_, .lapic = has_irqchip_};
  auto has = [this](Capability cap) { return check_extension(cap).value_or(0) > 0; };
  if (has(Capability::Xsave)) {
    // KVM_CAP_XSAVE2 answers the size KVM_GET_XSAVE2 writes (at least 4096).
    int xsave2_bytes = check_extension(Capability::Xsave2).value_or(0);
    support.xsave2 = xsave2_bytes > 0;
    support.xsave_bytes =
        std::max<size_t>(kXsaveLegacyBytes, static_cast<size_t>(std::max(xsave2_bytes, 0)));
  }
  support.xcrs = has(Capability::Xcrs);
  support.sregs2 = has(Capability::Sregs2);
  support.vcpu_events = has(Capability::VcpuEvents);
  support.debug_regs = has(Capability::DebugRegs);
  support.tsc_khz = has(Capability::GetTscKhz);
  Mmap ring;
  if (dirty_ring_bytes_ > 0) {
    // api.rst: the ring sits at page KVM_DIRTY_LOG_PAGE_OFFSET of the vCPU's mapping.
    const uint64_t offset = uint64_t{KVM_DIRTY_LOG_PAGE_OFFSET} * ::sysconf(_SC_PAGESIZE);
    ring = TRY_CONTEXT(Mmap::file(owner, dirty_ring_bytes_, offset, PROT_READ | PROT_WRITE,
                                  MAP_SHARED),
                       fmt::format("vcpu {}: dirty ring", index));
  }
  Vcpu vcpu(index, std::move(owner), std::move(run), std::move(support));
  if (ring.size_bytes() > 0) {
    vcpu.dirty_ring_ = DirtyRing(std::span(reinterpret_cast<DirtyGfn*>(ring.data()),
                                           ring.size_bytes() / sizeof(DirtyGfn)));
    vcpu.dirty_ring_map_ = std::move(ring);
  }
  return vcpu;
}

Result<int> Vm::check_extension(Capability cap) const {
  int value = ::ioctl(fd_.get(), KVM_CHECK_EXTENSION, static_cast<int>(cap));
  if (value < 0) return fail_errno(fmt::format("check {}", capability_name(cap)));
  return value;
}

Result<bool> Vm::enable_manual_dirty_protect() {
  int offered = TRY(check_extension(Capability::ManualDirtyLogProtect2));
  if (offered <= 0 || (offered & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) == 0) return false;
  kvm_enable_cap cap{};
  cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
  cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
  TRY(ioctl_set(fd_.get(), KVM_ENABLE_CAP, cap, "KVM_ENABLE_CAP MANUAL_DIRTY_LOG_PROTECT2"));
  manual_dirty_protect_ = true;
  return true;
}

Result<bool> Vm::enable_dirty_ring(uint32_t entries) {
  CHECK(entries > 0 && (entries & (entries - 1)) == 0, "dirty ring entries must be a power of two");
  // KVM answers the largest ring it takes, in bytes (0: none). ACQ_REL is
  // the ring with the ordering api.rst documents for every architecture;
  // the plain one is the same on x86, which offered it first.
  const size_t bytes = size_t{entries} * sizeof(DirtyGfn);
  for (Capability cap : {Capability::DirtyLogRingAcqRel, Capability::DirtyLogRing}) {
    int max_bytes = check_extension(cap).value_or(0);
    if (max_bytes <= 0) continue;
    if (static_cast<size_t>(max_bytes) < bytes) return false;
    kvm_enable_cap enable{};
    enable.cap = static_cast<uint32_t>(cap);
    enable.args[0] = bytes;
    TRY(ioctl_set(fd_.get(), KVM_ENABLE_CAP, enable,
                  fmt::format("KVM_ENABLE_CAP {} ({} bytes)", capability_name(cap), bytes)));
    dirty_ring_bytes_ = bytes;
    return true;
  }
  return false;
}

Result<uint64_t> Vm::reset_dirty_rings() {
  int reset = ::ioctl(fd_.get(), KVM_RESET_DIRTY_RINGS, 0);
  if (reset < 0) return fail_errno("KVM_RESET_DIRTY_RINGS");
  return static_cast<uint64_t>(reset);
}

Result<void> Vm::get_dirty_log(uint32_t slot, std::span<uint64_t> bitmap) {
  kvm_dirty_log log{};
  log.slot = slot;
  log.dirty_bitmap = bitmap.data();
  return ioctl_set(fd_.get(), KVM_GET_DIRTY_LOG, log,
                   fmt::format("KVM_GET_DIRTY_LOG slot {}", slot));
}

Result<void> Vm::clear_dirty_log(uint32_t slot, uint64_t first_page, uint32_t page_count,
                                 std::span<uint64_t> bitmap) {
  if (!manual_dirty_protect_) {
    return fail(Errc::InvalidArgument, "KVM_CLEAR_DIRTY_LOG without manual dirty protection");
  }
  if (first_page % 64 != 0 || (page_count + 63) / 64 > bitmap.size()) {
    return fail(Errc::InvalidArgument,
                fmt::format("KVM_CLEAR_DIRTY_LOG slot {}: {} pages from page {} with a bitmap of "
                            "{} words", slot, page_count, first_page, bitmap.size()));
  }
  kvm_clear_dirty_log clear{};
  clear.slot = slot;
  clear.num_pages = page_count;
  clear.first_page = first_page;
  clear.dirty_bitmap = bitmap.data();
  return ioctl_set(fd_.get(), KVM_CLEAR_DIRTY_LOG, clear,
                   fmt::format("KVM_CLEAR_DIRTY_LOG slot {} pages {}+{}", slot, first_page,
                               page_count));
}

namespace {
Result<IrqchipState> get_irqchip(int vm_fd, uint32_t chip, std::string_view name) {
  IrqchipState state{};
  state.chip_id = chip;
  if (::ioctl(vm_fd, KVM_GET_IRQCHIP, &state) < 0) {
    return fail_errno(fmt::format("KVM_GET_IRQCHIP {}", name));
  }
  return state;
}

Result<void> set_irqchip(int vm_fd, const std::optional<IrqchipState>& state, uint32_t chip,
                         std::string_view name) {
  if (!state) return ok();
  if (state->chip_id != chip) {
    return fail(Errc::InvalidArgument,
                fmt::format("{} state names chip {} (expected {})", name, state->chip_id, chip));
  }
  return ioctl_set(vm_fd, KVM_SET_IRQCHIP, *state, fmt::format("KVM_SET_IRQCHIP {}", name));
}
}  // namespace

Result<VmState> Vm::save_state() const {
  VmState state;
  if (has_irqchip_) {
    state.pic_master = TRY(get_irqchip(fd_.get(), KVM_IRQCHIP_PIC_MASTER, "PIC master"));
    state.pic_slave = TRY(get_irqchip(fd_.get(), KVM_IRQCHIP_PIC_SLAVE, "PIC slave"));
    state.ioapic = TRY(get_irqchip(fd_.get(), KVM_IRQCHIP_IOAPIC, "IOAPIC"));
  }
  if (has_pit_) state.pit = TRY(ioctl_get<PitState>(fd_.get(), KVM_GET_PIT2, "KVM_GET_PIT2"));
  if (check_extension(Capability::AdjustClock).value_or(0) > 0) {
    state.clock = TRY(ioctl_get<ClockData>(fd_.get(), KVM_GET_CLOCK, "KVM_GET_CLOCK"));
  }
  return state;
}

Result<void> Vm::restore_state(const VmState& state) {
  bool has_chips = state.pic_master || state.pic_slave || state.ioapic;
  if (has_chips != has_irqchip_) {
    return fail(Errc::InvalidArgument,
                fmt::format("VM state {} an in-kernel irqchip but this VM {}",
                            has_chips ? "has" : "lacks", has_irqchip_ ? "has one" : "does not"));
  }
  if (state.pit.has_value() != has_pit_) {
    return fail(Errc::InvalidArgument,
                fmt::format("VM state {} a PIT but this VM {}", state.pit ? "has" : "lacks",
                            has_pit_ ? "has one" : "does not"));
  }
  TRY(set_irqchip(fd_.get(), state.pic_master, KVM_IRQCHIP_PIC_MASTER, "PIC master"));
  TRY(set_irqchip(fd_.get(), state.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "PIC slave"));
  TRY(set_irqchip(fd_.get(), state.ioapic, KVM_IRQCHIP_IOAPIC, "IOAPIC"));
  if (state.pit) TRY(ioctl_set(fd_.get(), KVM_SET_PIT2, *state.pit, "KVM_SET_PIT2"));
  if (state.clock) {
    // Only the clock value: the guest sees no time pass while it was saved
    // (the realtime and host-TSC fields describe the source host).
    ClockData clock{};
    clock.clock = state.clock->clock;
    TRY(ioctl_set(fd_.get(), KVM_SET_CLOCK, clock, "KVM_SET_CLOCK"));
  }
  return ok();
}

// ---- Vcpu ----

Result<VcpuExit> Vcpu::run() {
  auto* run = reinterpret_cast<kvm_run*>(run_.data());
  if (::ioctl(fd_.get(), KVM_RUN, 0) < 0) {
    if (errno == EINTR || errno == EAGAIN) return VcpuExit{.kind = VcpuExit::Kind::Interrupted};
    return fail_errno(fmt::format("KVM_RUN vcpu {}", index_));
  }
  VcpuExit exit{.kind = VcpuExit::Kind::Unknown, .code = run->exit_reason};
  switch (run->exit_reason) {
    case KVM_EXIT_IO:
      exit.kind = run->io.direction == KVM_EXIT_IO_IN ? VcpuExit::Kind::IoIn : VcpuExit::Kind::IoOut;
      exit.address = run->io.port;
      exit.size = run->io.size;
      exit.count = run->io.count;
      break;
    case KVM_EXIT_MMIO:
      exit.kind = run->mmio.is_write ? VcpuExit::Kind::MmioWrite : VcpuExit::Kind::MmioRead;
      exit.address = run->mmio.phys_addr;
      exit.size = run->mmio.len;
      exit.count = 1;
      break;
    case KVM_EXIT_HLT: exit.kind = VcpuExit::Kind::Hlt; break;
    case KVM_EXIT_SHUTDOWN: exit.kind = VcpuExit::Kind::Shutdown; break;
    case KVM_EXIT_INTR: exit.kind = VcpuExit::Kind::Interrupted; break;
    case KVM_EXIT_DIRTY_RING_FULL: exit.kind = VcpuExit::Kind::DirtyRingFull; break;
    case KVM_EXIT_FAIL_ENTRY:
      exit.kind = VcpuExit::Kind::FailEntry;
      exit.code = run->fail_entry.hardware_entry_failure_reason;
      break;
    case KVM_EXIT_INTERNAL_ERROR:
      exit.kind = VcpuExit::Kind::InternalError;
      exit.code = run->internal.suberror;
      for (uint32_t i = 0; i < run->internal.ndata && i < exit.data.size(); ++i) {
        exit.data[i] = run->internal.data[i];
      }
      break;
    case KVM_EXIT_SYSTEM_EVENT:
      exit.kind = VcpuExit::Kind::SystemEvent;
      exit.code = run->system_event.type;
      break;
    default: break;
  }
  return exit;
}

std::span<std::byte> Vcpu::io_data() {
  auto* run = reinterpret_cast<kvm_run*>(run_.data());
  size_t length = static_cast<size_t>(run->io.size) * run->io.count;
  // The kernel places the data inside the mapping; never trust it blindly.
  CHECK(run->io.data_offset + length <= run_.size_bytes(), "KVM io data outside kvm_run");
  return {run_.data() + run->io.data_offset, length};
}

std::span<std::byte> Vcpu::mmio_data() {
  auto* run = reinterpret_cast<kvm_run*>(run_.data());
  size_t length = std::min<size_t>(run->mmio.len, sizeof(run->mmio.data));
  return {reinterpret_cast<std::byte*>(run->mmio.data), length};
}

void Vcpu::set_immediate_exit(bool value) {
  reinterpret_cast<kvm_run*>(run_.data())->immediate_exit = value ? 1 : 0;
}

Result<Regs> Vcpu::regs() const { return ioctl_get<Regs>(fd_.get(), KVM_GET_REGS, "KVM_GET_REGS"); }
Result<void> Vcpu::set_regs(const Regs& regs) {
  return ioctl_set(fd_.get(), KVM_SET_REGS, regs, "KVM_SET_REGS");
}
Result<Sregs> Vcpu::sregs() const {
  return ioctl_get<Sregs>(fd_.get(), KVM_GET_SREGS, "KVM_GET_SREGS");
}
Result<void> Vcpu::set_sregs(const Sregs& sregs) {
  return ioctl_set(fd_.get(), KVM_SET_SREGS, sregs, "KVM_SET_SREGS");
}
Result<Fpu> Vcpu::fpu() const { return ioctl_get<Fpu>(fd_.get(), KVM_GET_FPU, "KVM_GET_FPU"); }
Result<void> Vcpu::set_fpu(const Fpu& fpu) {
  return ioctl_set(fd_.get(), KVM_SET_FPU, fpu, "KVM_SET_FPU");
}
Result<Lapic> Vcpu::lapic() const {
  return ioctl_get<Lapic>(fd_.get(), KVM_GET_LAPIC, "KVM_GET_LAPIC");
}
Result<void> Vcpu::set_lapic(const Lapic& lapic) {
  return ioctl_set(fd_.get(), KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC");
}

Result<MpState> Vcpu::mp_state() const {
  kvm_mp_state state = TRY(ioctl_get<kvm_mp_state>(fd_.get(), KVM_GET_MP_STATE, "KVM_GET_MP_STATE"));
  return static_cast<MpState>(state.mp_state);
}

Result<void> Vcpu::set_mp_state(MpState state) {
  kvm_mp_state value{.mp_state = static_cast<uint32_t>(state)};
  return ioctl_set(fd_.get(), KVM_SET_MP_STATE, value, "KVM_SET_MP_STATE");
}

Result<void> Vcpu::set_cpuid(const CpuidEntries& entries) {
  TailBuffer<CpuidHeader, kvm_cpuid_entry2> buffer(entries.size());
  buffer.header()->nent = static_cast<uint32_t>(entries.size());
  buffer.header()->padding = 0;
  std::copy(entries.begin(), entries.end(), buffer.entries());
  if (::ioctl(fd_.get(), kSetCpuid2, buffer.get()) < 0) {
    return fail_errno(fmt::format("KVM_SET_CPUID2 vcpu {}", index_));
  }
  return ok();
}

Result<void> Vcpu::set_msrs(std::span<const MsrEntry> entries) {
  TailBuffer<MsrsHeader, kvm_msr_entry> buffer(entries.size());
  buffer.header()->nmsrs = static_cast<uint32_t>(entries.size());
  buffer.header()->pad = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    buffer.entries()[i] = kvm_msr_entry{.index = entries[i].index, .reserved = 0,
                                        .data = entries[i].value};
  }
  int done = ::ioctl(fd_.get(), kSetMsrs, buffer.get());
  if (done < 0) return fail_errno(fmt::format("KVM_SET_MSRS vcpu {}", index_));
  // KVM stops at the first MSR it refuses and returns how many it set.
  if (static_cast<size_t>(done) != entries.size()) {
    return fail(Errc::Unsupported, fmt::format("KVM_SET_MSRS vcpu {}: MSR {:#x} refused", index_,
                                               entries[static_cast<size_t>(done)].index));
  }
  return ok();
}

Result<CpuidEntries> Vcpu::cpuid() const {
  return get_cpuid(fd_.get(), kGetCpuid2, fmt::format("KVM_GET_CPUID2 vcpu {}", index_));
}

Result<void> Vcpu::complete_pending_io() {
  set_immediate_exit(true);
  int result = ::ioctl(fd_.get(), KVM_RUN, 0);
  int saved_errno = errno;
  set_immediate_exit(false);
  if (result < 0 && (saved_errno == EINTR || saved_errno == EAGAIN)) return ok();
  if (result == 0) {
    // Completing the instruction needed userspace again (string I/O
    // spanning several exits): this exit is not handled, so no state may be
    // saved now. The caller lets the vCPU run on and tries again.
    return fail(Errc::Busy,
                fmt::format("vcpu {}: finishing the pending I/O made a new exit; retry later",
                            index_));
  }
  return fail_errno(fmt::format("KVM_RUN (immediate exit) vcpu {}", index_), saved_errno);
}

// KVM_GET_MSR_INDEX_LIST names every MSR KVM can save on this host, but a
// given vCPU may lack some (they depend on its CPUID). KVM_GET_MSRS stops
// at the first one it refuses: keep what it read, drop that MSR, go on.
Result<std::vector<MsrEntry>> Vcpu::save_msrs() const {
  std::span<const uint32_t> remaining(*support_.msr_indices);
  std::vector<MsrEntry> result;
  result.reserve(remaining.size());
  while (!remaining.empty()) {
    size_t read = TRY(get_msrs(fd_.get(), remaining, result, index_));
    remaining = remaining.subspan(std::min(read + 1, remaining.size()));
  }
  return result;
}

Result<VcpuState> Vcpu::save_state() const {
  // KVM_GET_MP_STATE first: it lets KVM accept pending INIT/SIPI events,
  // which changes registers and LAPIC state read afterwards.
  VcpuState state;
  state.mp_state = TRY(mp_state());
  state.cpuid = TRY(cpuid());
  state.regs = TRY(regs());
  state.sregs = TRY(sregs());
  if (support_.sregs2) {
    state.sregs2 = TRY(ioctl_get<SregsV2>(fd_.get(), KVM_GET_SREGS2, "KVM_GET_SREGS2"));
  }
  if (support_.xsave_bytes > 0) {
    // A uint32_t buffer for the struct's alignment; stored as bytes.
    std::vector<uint32_t> region(support_.xsave_bytes / sizeof(uint32_t));
    unsigned long request = support_.xsave2 ? kGetXsave2 : kGetXsave;
    if (::ioctl(fd_.get(), request, region.data()) < 0) {
      return fail_errno(fmt::format("KVM_GET_XSAVE{} vcpu {}", support_.xsave2 ? "2" : "", index_));
    }
    const auto* bytes = reinterpret_cast<const std::byte*>(region.data());
    state.xsave.assign(bytes, bytes + region.size() * sizeof(uint32_t));
  } else {
    state.fpu = TRY(fpu());
  }
  if (support_.xcrs) state.xcrs = TRY(ioctl_get<XcrList>(fd_.get(), KVM_GET_XCRS, "KVM_GET_XCRS"));
  if (support_.debug_regs) {
    state.debug_regs =
        TRY(ioctl_get<DebugRegisters>(fd_.get(), KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS"));
  }
  if (support_.lapic) state.lapic = TRY(lapic());
  if (support_.tsc_khz) {
    int khz = ::ioctl(fd_.get(), KVM_GET_TSC_KHZ, 0);
    state.tsc_khz = khz > 0 ? static_cast<uint32_t>(khz) : 0;
  }
  state.msrs = TRY(save_msrs());
  // Events last: the other reads above may still change what is pending.
  if (support_.vcpu_events) {
    state.events =
        TRY(ioctl_get<PendingEvents>(fd_.get(), KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS"));
  }
  return state;
}

Result<void> Vcpu::restore_state(const VcpuState& state) {
  auto context = [this](std::string_view what) {
    return fmt::format("restore vcpu {}: {}", index_, what);
  };
  auto wrap = [&](Result<void> result, std::string_view what) -> Result<void> {
    if (!result) return fail(Error(result.error()).wrap(context(what)));
    return ok();
  };
  // CPUID decides which MSRs and XSAVE features are valid: it goes first.
  TRY(wrap(set_cpuid(state.cpuid), "CPUID"));
  TRY(wrap(set_regs(state.regs), "registers"));
  if (state.sregs2 && support_.sregs2) {
    TRY(wrap(ioctl_set(fd_.get(), KVM_SET_SREGS2, *state.sregs2, "KVM_SET_SREGS2"),
             "special registers"));
  } else {
    TRY(wrap(set_sregs(state.sregs), "special registers"));
  }
  if (!state.xsave.empty()) {
    if (support_.xsave_bytes == 0) {
      return fail(Errc::Unsupported, context("the state has XSAVE data; this KVM lacks XSAVE"));
    }
    if (state.xsave.size() > support_.xsave_bytes || state.xsave.size() < kXsaveLegacyBytes) {
      return fail(
          Errc::Unsupported,
          context(fmt::format("XSAVE area of {} bytes; this host takes {} to {}",
                              state.xsave.size(), kXsaveLegacyBytes, support_.xsave_bytes)));
    }
    std::vector<uint32_t> region(support_.xsave_bytes / sizeof(uint32_t), 0);
    std::memcpy(region.data(), state.xsave.data(), state.xsave.size());
    if (::ioctl(fd_.get(), kSetXsave, region.data()) < 0) {
      return fail_errno(context("KVM_SET_XSAVE"));
    }
  } else if (state.fpu) {
    TRY(wrap(set_fpu(*state.fpu), "FPU"));
  }
  if (state.xcrs)
    TRY(wrap(ioctl_set(fd_.get(), KVM_SET_XCRS, *state.xcrs, "KVM_SET_XCRS"), "XCRs"));
  if (state.lapic) {
    if (!support_.lapic) {
      return fail(Errc::InvalidArgument, context("the state has a LAPIC; this VM has no irqchip"));
    }
    TRY(wrap(set_lapic(*state.lapic), "LAPIC"));
  }
  // After the LAPIC, whose restore would disarm the TSC deadline timer.
  TRY(wrap(set_msrs(state.msrs), "MSRs"));
  if (state.events) {
    TRY(wrap(ioctl_set(fd_.get(), KVM_SET_VCPU_EVENTS, *state.events, "KVM_SET_VCPU_EVENTS"),
             "pending events"));
  }
  // After the LAPIC: a halted or waiting-for-SIPI state needs it in place.
  TRY(wrap(set_mp_state(state.mp_state), "MP state"));
  if (state.debug_regs) {
    TRY(wrap(ioctl_set(fd_.get(), KVM_SET_DEBUGREGS, *state.debug_regs, "KVM_SET_DEBUGREGS"),
             "debug registers"));
  }
  return ok();
}

Result<std::vector<MsrEntry>> Vcpu::msrs(std::span<const uint32_t> indices) const {
  std::vector<MsrEntry> result;
  result.reserve(indices.size());
  size_t read = TRY(get_msrs(fd_.get(), indices, result, index_));
  if (read != indices.size()) {
    return fail(Errc::Unsupported,
                fmt::format("KVM_GET_MSRS vcpu {}: MSR {:#x} refused", index_, indices[read]));
  }
  return result;
}

}  // namespace keel::kvm
