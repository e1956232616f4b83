#include "tiny_guest.h"

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>


namespace keel::testing {
namespace {

constexpr uint64_t kPml4 = 0x1000;
constexpr uint64_t kPdpt = 0x2000;
constexpr uint64_t kPageDirectory = 0x3000;
constexpr uint64_t kGdt = 0x500;
constexpr uint64_t kStackTop = 0x8000;

// The kick signal only has to interrupt KVM_RUN; its handler does nothing.
void ignore_signal(int) {}


// 1 GiB identity map of 2 MiB pages, present|writable|user, so that ring-3
// code can touch everything without a fault (the ring-0 part stays tiny).
void build_page_tables(std::byte* memory, uint64_t memory_bytes) {
  auto* pml4 = reinterpret_cast<uint64_t*>(memory + kPml4);
  auto* pdpt = reinterpret_cast<uint64_t*>(memory + kPdpt);
  auto* page_directory = reinterpret_cast<uint64_t*>(memory + kPageDirectory);
  constexpr uint64_t kPresentWritableUser = 0x7;
  constexpr uint64_t kLargePage = 0x80;
  pml4[0] = kPdpt | kPresentWritableUser;
  pdpt[0] = kPageDirectory | kPresentWritableUser;
  for (uint64_t i = 0; i < 512 && (i << 21) < std::max<uint64_t>(memory_bytes, 1 << 21); ++i) {
    page_directory[i] = (i << 21) | kPresentWritableUser | kLargePage;
  }
  // A minimal GDT for the entry state; guests that enter ring 3 load their own.
  auto* gdt = reinterpret_cast<uint64_t*>(memory + kGdt);
  gdt[0] = 0;
  gdt[1] = 0x00af9b000000ffff;  // 64-bit code, DPL 0
  gdt[2] = 0x00cf93000000ffff;  // data, DPL 0
}

Result<void> enter_long_mode(kvm::Vcpu& vcpu) {
  kvm::Sregs sregs = TRY(vcpu.sregs());
  sregs.gdt.base = kGdt;
  sregs.gdt.limit = 3 * 8 - 1;
  sregs.cs = kvm::flat_segment(0x08, kvm::FlatSegment::Code64);
  kvm::Segment data = kvm::flat_segment(0x10, kvm::FlatSegment::Data);
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
  sregs.cr3 = kPml4;
  sregs.cr4 = 1 << 5;                     // PAE
  sregs.cr0 = (1u << 31) | (1 << 4) | 1;  // PG | ET | PE
  sregs.efer = (1 << 10) | (1 << 8);      // LMA | LME
  TRY(vcpu.set_sregs(sregs));
  kvm::Regs regs{};
  regs.rip = kTinyGuestLoadAddress;
  regs.rsp = kStackTop;
  regs.rflags = 0x2;
  return vcpu.set_regs(regs);
}

// Kicks the vCPU thread out of KVM_RUN when the deadline passes.
class Watchdog {
 public:
  Watchdog(kvm::Vcpu& vcpu, pthread_t target, std::chrono::milliseconds timeout)
      : thread_([this, &vcpu, target, timeout] {
          std::unique_lock lock(mutex_);
          if (!done_cv_.wait_for(lock, timeout, [this] { return done_; })) {
            fired_ = true;
            vcpu.set_immediate_exit(true);
            pthread_kill(target, SIGUSR1);
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    done_cv_.notify_one();
    thread_.join();
  }
  bool fired() {
    std::lock_guard lock(mutex_);
    return fired_;
  }

 private:
  std::mutex mutex_;  // guards done_ and fired_
  std::condition_variable done_cv_;
  bool done_ = false;
  bool fired_ = false;
  std::thread thread_;
};

}  // namespace

std::optional<std::string> tiny_guest_unavailable_reason() {
  if (::access("/dev/kvm", F_OK) != 0) return std::string("/dev/kvm does not exist on this host");
  Result<kvm::Kvm> kvm = kvm::Kvm::open();
  if (!kvm) return kvm.error().message();
  return std::nullopt;
}

void install_kick_handler() {
  struct sigaction action {};
  action.sa_handler = ignore_signal;
  sigaction(SIGUSR1, &action, nullptr);
}

Result<TinyVm> TinyVm::assemble(const TinyGuestOptions& options, Fd memory_fd, Mmap memory) {
  install_kick_handler();

  kvm::Kvm kvm = TRY(kvm::Kvm::open());
  kvm.set_dirty_log_mode(options.dirty_log);
  kvm::Vm vm = TRY(kvm.create_vm());
  TRY(vm.set_tss_address(0xfffbd000));
  if (options.irqchip == InKernelIrqchip::Yes) {
    TRY(vm.create_irqchip());
    TRY(vm.create_pit());
  }
  TRY(vm.set_memory_region(0, 0, memory.size_bytes(), memory.data()));
  kvm::Vcpu vcpu = TRY(vm.create_vcpu(0));
  return TinyVm(std::move(kvm), std::move(vm), std::move(memory_fd), std::move(memory),
                std::move(vcpu));
}

Result<TinyVm> TinyVm::create(const TinyGuestOptions& options) {
  Fd memory_fd(::memfd_create("tiny-guest-ram", MFD_CLOEXEC));
  if (!memory_fd.valid()) return fail_errno("memfd_create tiny guest RAM");
  if (::ftruncate(memory_fd.get(), static_cast<off_t>(options.memory_bytes)) < 0) {
    return fail_errno("ftruncate tiny guest RAM");
  }
  Mmap memory = TRY(Mmap::file(memory_fd, options.memory_bytes, 0, PROT_READ | PROT_WRITE,
                               MAP_SHARED));
  build_page_tables(memory.data(), options.memory_bytes);
  return assemble(options, std::move(memory_fd), std::move(memory));
}

Result<TinyVm> TinyVm::create_on(const TinyGuestOptions& options, Mmap memory) {
  return assemble(options, Fd(), std::move(memory));
}

Result<void> TinyVm::load(const std::string& binary_path) {
  std::ifstream file(binary_path, std::ios::binary);
  if (!file) return fail(Errc::NotFound, fmt::format("tiny guest {}: cannot open", binary_path));
  std::vector<char> image((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (image.empty() || kTinyGuestLoadAddress + image.size() > memory_.size_bytes()) {
    return fail(Errc::InvalidArgument,
                fmt::format("tiny guest {}: {} bytes does not fit", binary_path, image.size()));
  }
  std::memcpy(memory_.data() + kTinyGuestLoadAddress, image.data(), image.size());
  TRY(vcpu_.set_cpuid(TRY(kvm_.supported_cpuid())));
  return enter_long_mode(vcpu_);
}

Result<TinyGuestResult> TinyVm::run(const TinyGuestOptions& options) {
  TinyGuestResult result;
  {
    Watchdog watchdog(vcpu_, pthread_self(), options.timeout);
    while (result.exits < options.max_exits) {
      kvm::VcpuExit exit = TRY(vcpu_.run());
      ++result.exits;
      result.last_exit = exit;
      if (exit.kind == kvm::VcpuExit::Kind::Interrupted) {
        if (watchdog.fired()) {
          result.timed_out = true;
          break;
        }
        continue;
      }
      if (exit.kind == kvm::VcpuExit::Kind::IoOut && exit.address == kSerialPort) {
        for (std::byte b : vcpu_.io_data()) result.serial.push_back(static_cast<char>(b));
        continue;
      }
      if (exit.kind == kvm::VcpuExit::Kind::IoOut && exit.address == kTestExitPort) {
        result.exit_code = static_cast<uint8_t>(vcpu_.io_data()[0]);
        break;
      }
      if (exit.kind == kvm::VcpuExit::Kind::IoOut && options.stop_port &&
          exit.address == *options.stop_port) {
        result.stop_value = static_cast<uint8_t>(vcpu_.io_data()[0]);
        break;
      }
      if (exit.kind == kvm::VcpuExit::Kind::IoIn) {
        // Unclaimed ports read as all ones, as on a PC.
        std::memset(vcpu_.io_data().data(), 0xff, vcpu_.io_data().size());
        continue;
      }
      if (exit.kind == kvm::VcpuExit::Kind::IoOut) continue;  // unclaimed port
      break;  // hlt, shutdown, errors: the test decides what it expected
    }
  }
  result.regs = TRY(vcpu_.regs());
  result.sregs = TRY(vcpu_.sregs());
  return result;
}

Result<TinyGuestResult> run_tiny_guest(const std::string& binary_path,
                                       const TinyGuestOptions& options) {
  TinyVm vm = TRY(TinyVm::create(options));
  TRY(vm.load(binary_path));
  return vm.run(options);
}

}  // namespace keel::testing
