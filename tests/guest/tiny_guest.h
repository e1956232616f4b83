// Runs a tiny flat-binary guest on /dev/kvm: one vCPU entered directly in
// 64-bit mode (identity-mapped, user-accessible 1 GiB), serial output on
// COM1 captured, and a test-exit port whose byte ends the run.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "base/result.h"
#include "kvm/types.h"

namespace keel::testing {

inline constexpr uint64_t kTinyGuestLoadAddress = 0x10000;
inline constexpr uint16_t kTestExitPort = 0xf4;
inline constexpr uint16_t kSerialPort = 0x3f8;

struct TinyGuestOptions {
  uint64_t memory_bytes = 16 << 20;
  uint64_t max_exits = 1'000'000;
  std::chrono::milliseconds timeout{10'000};
};

struct TinyGuestResult {
  std::optional<uint8_t> exit_code;  // the byte written to the test-exit port
  std::string serial;                // bytes written to COM1's data register
  kvm::VcpuExit last_exit{};         // the exit that ended the run
  kvm::Regs regs{};                  // registers at the end
  kvm::Sregs sregs{};
  uint64_t exits = 0;
  bool timed_out = false;
};

// Why tiny guests cannot run here, or nullopt if they can.
std::optional<std::string> tiny_guest_unavailable_reason();

Result<TinyGuestResult> run_tiny_guest(const std::string& binary_path,
                                       const TinyGuestOptions& options = {});

}  // namespace keel::testing
