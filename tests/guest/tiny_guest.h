// Runs a tiny flat-binary guest on /dev/kvm: one vCPU entered directly in
// 64-bit mode (identity-mapped, user-accessible 1 GiB), serial output on
// COM1 captured, and a test-exit port whose byte ends the run.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "base/fd.h"
#include "base/mmap.h"
#include "base/result.h"
#include "kvm/kvm.h"
#include "kvm/types.h"

namespace keel::testing {

inline constexpr uint64_t kTinyGuestLoadAddress = 0x10000;
inline constexpr uint16_t kTestExitPort = 0xf4;
inline constexpr uint16_t kSerialPort = 0x3f8;

enum class InKernelIrqchip { No, Yes };  // Yes: IOAPIC, PIC pair, LAPIC and PIT in KVM

struct TinyGuestOptions {
  uint64_t memory_bytes = 16 << 20;
  uint64_t max_exits = 1'000'000;
  std::chrono::milliseconds timeout{10'000};
  InKernelIrqchip irqchip = InKernelIrqchip::No;
  // Ends the run at the first OUT to this port (a checkpoint a test acts on).
  std::optional<uint16_t> stop_port;
  // The VM's dirty log (Kvm::create_vm): Auto turns the dirty ring on
  // where KVM has it, as keel-vmm does.
  kvm::DirtyLogMode dirty_log = kvm::DirtyLogMode::Auto;
};

struct TinyGuestResult {
  std::optional<uint8_t> exit_code;  // the byte written to the test-exit port
  std::string serial;                // bytes written to COM1's data register
  kvm::VcpuExit last_exit{};         // the exit that ended the run
  kvm::Regs regs{};                  // registers at the end
  kvm::Sregs sregs{};
  uint64_t exits = 0;
  bool timed_out = false;
  std::optional<uint8_t> stop_value;  // the byte written to options.stop_port
};

// Why tiny guests cannot run here, or nullopt if they can.
std::optional<std::string> tiny_guest_unavailable_reason();

// Machine and TinyVm kick vCPUs out of KVM_RUN with SIGUSR1: this installs
// a handler that does nothing, without SA_RESTART (as keel-vmm does).
void install_kick_handler();

Result<TinyGuestResult> run_tiny_guest(const std::string& binary_path,
                                       const TinyGuestOptions& options = {});

// The pieces of run_tiny_guest, for tests that stop a guest and go on with
// it elsewhere (snapshots): a 1-vCPU VM whose RAM is a memfd, mapped shared.
class TinyVm {
 public:
  // A VM with fresh RAM holding the page tables, and its vCPU.
  static Result<TinyVm> create(const TinyGuestOptions& options);
  // A VM on RAM mapped by the caller (e.g. from a snapshot file), and a vCPU
  // with KVM's reset state: the caller restores the rest.
  static Result<TinyVm> create_on(const TinyGuestOptions& options, Mmap memory);

  // Copies the binary to kTinyGuestLoadAddress, gives the vCPU this host's
  // CPUID and enters 64-bit mode there.
  Result<void> load(const std::string& binary_path);
  // Runs until the exit port, options.stop_port, a timeout or an exit the
  // test must judge.
  Result<TinyGuestResult> run(const TinyGuestOptions& options);

  kvm::Kvm& kvm() { return kvm_; }
  kvm::Vm& vm() { return vm_; }
  kvm::Vcpu& vcpu() { return vcpu_; }
  std::span<std::byte> memory() { return memory_.bytes(); }
  const Fd& memory_fd() const { return memory_fd_; }  // invalid for create_on

 private:
  static Result<TinyVm> assemble(const TinyGuestOptions& options, Fd memory_fd, Mmap memory);
  TinyVm(kvm::Kvm kvm, kvm::Vm vm, Fd memory_fd, Mmap memory, kvm::Vcpu vcpu)
      : kvm_(std::move(kvm)),
        vm_(std::move(vm)),
        memory_fd_(std::move(memory_fd)),
        memory_(std::move(memory)),
        vcpu_(std::move(vcpu)) {}

  kvm::Kvm kvm_;
  kvm::Vm vm_;
  Fd memory_fd_;
  Mmap memory_;
  kvm::Vcpu vcpu_;
};

}  // namespace keel::testing
