// Machine::set_throttle on the host's /dev/kvm: a real Machine runs
// zero_pages_check.elf, a ring-3 guest that prints one letter per pass over
// its memory, so letters per second measure how much it runs. Throttled to
// 80% it must print clearly fewer in the same wall time (compared loosely:
// the machine running the tests is loaded), while the machine still counts
// as running; a pause or stop of a vCPU asleep in a throttle's slice must
// not wait for the slice to end.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "machine/machine.h"
#include "tiny_guest.h"

namespace keel::machine {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

class MachineThrottleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (auto reason = testing::tiny_guest_unavailable_reason()) {
      GTEST_SKIP() << "needs a usable /dev/kvm: " << *reason;
    }
    testing::install_kick_handler();
    Result<kvm::Kvm> kvm = kvm::Kvm::open();
    ASSERT_TRUE(kvm) << kvm.error().message();
    kvm_.emplace(std::move(*kvm));
    VmConfig config;
    config.kernel = std::string(KEEL_VMM_GUEST_DIR) + "/zero_pages_check.elf";
    config.cpus = 1;
    config.memory_mib = 64;
    config.acpi = false;
    config.debug_exit = true;
    Result<std::unique_ptr<Machine>> machine =
        Machine::create(config, *kvm_, [this](std::span<const std::byte> bytes) {
          letters_.fetch_add(bytes.size());
          last_letter_ns_.store(Clock::now().time_since_epoch().count());
        });
    ASSERT_TRUE(machine) << machine.error().message();
    machine_ = std::move(*machine);
    runner_ = std::thread([this] { status_ = machine_->run(); });
    // Past the boot: the guest prints steadily.
    for (Clock::time_point deadline = Clock::now() + 10s;
         letters_.load() < 10 && Clock::now() < deadline;) {
      std::this_thread::sleep_for(10ms);
    }
    ASSERT_GE(letters_.load(), 10u) << "the guest did not get going";
  }

  void TearDown() override {
    if (machine_ == nullptr) return;
    machine_->stop(StopReason::Stopped);
    if (runner_.joinable()) runner_.join();
    EXPECT_EQ(status_.reason, StopReason::Stopped) << status_.detail;
  }

  // Letters the guest prints in window.
  uint64_t letters_in(std::chrono::milliseconds window) {
    const uint64_t before = letters_.load();
    std::this_thread::sleep_for(window);
    return letters_.load() - before;
  }

  // Waits until no letter came for quiet (a pass takes a few ms at full
  // speed): the vCPU is in a throttle's sleep by then.
  bool wait_for_quiet(std::chrono::milliseconds quiet) {
    for (Clock::time_point deadline = Clock::now() + 10s; Clock::now() < deadline;) {
      const Clock::time_point last{Clock::duration(last_letter_ns_.load())};
      if (Clock::now() - last >= quiet) return true;
      std::this_thread::sleep_for(5ms);
    }
    return false;
  }

  std::optional<kvm::Kvm> kvm_;
  std::unique_ptr<Machine> machine_;
  std::thread runner_;
  StopStatus status_{StopReason::Error, 0, ""};
  std::atomic<uint64_t> letters_{0};
  std::atomic<Clock::rep> last_letter_ns_{0};
};

TEST_F(MachineThrottleTest, EightyPercentSlowsTheGuestAndIsNoPause) {
  const uint64_t full = letters_in(1000ms);
  machine_->set_throttle(80);
  EXPECT_EQ(machine_->throttle_percent(), 80u);
  EXPECT_FALSE(machine_->paused()) << "a throttled machine still runs";
  std::this_thread::sleep_for(100ms);  // the first ticks
  const uint64_t throttled = letters_in(1000ms);
  machine_->set_throttle(0);
  EXPECT_EQ(machine_->throttle_percent(), 0u);
  const uint64_t after = letters_in(1000ms);
  // At 80% the guest runs a fifth of the time; a loaded host steals time
  // from both windows alike, so only a loose ratio is asserted.
  EXPECT_GE(full, 20u) << "too few passes to compare";
  EXPECT_LE(static_cast<double>(throttled), 0.6 * static_cast<double>(full))
      << "full speed " << full << " letters/s, throttled to 80% " << throttled;
  EXPECT_GT(throttled, 0u) << "80% throttled still runs a fifth of the time";
  // Lifted, it runs at full speed again.
  EXPECT_GT(static_cast<double>(after), 1.5 * static_cast<double>(throttled))
      << "throttled " << throttled << " letters/s, lifted " << after;
}

TEST_F(MachineThrottleTest, PauseOfASleepingVcpuIsPrompt) {
  // At 99% the vCPU runs 10 ms and sleeps 990 ms of each second.
  machine_->set_throttle(99);
  ASSERT_TRUE(wait_for_quiet(100ms)) << "the guest never stopped printing";
  const Clock::time_point begin = Clock::now();
  Result<void> paused = machine_->pause();
  const auto took = Clock::now() - begin;
  ASSERT_TRUE(paused) << paused.error().message();
  EXPECT_LT(took, 400ms) << "pause waited for the throttle's sleep: "
                         << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                         << " ms";
  EXPECT_TRUE(machine_->paused());
  // Resumed, it goes on, still throttled.
  ASSERT_TRUE(machine_->resume());
  EXPECT_EQ(machine_->throttle_percent(), 99u);
  machine_->set_throttle(0);
  EXPECT_GT(letters_in(500ms), 0u) << "the guest runs again";
}

TEST_F(MachineThrottleTest, StopOfASleepingVcpuIsPrompt) {
  machine_->set_throttle(99);
  ASSERT_TRUE(wait_for_quiet(100ms)) << "the guest never stopped printing";
  const Clock::time_point begin = Clock::now();
  machine_->stop(StopReason::Stopped);
  runner_.join();
  const auto took = Clock::now() - begin;
  EXPECT_LT(took, 400ms) << "stop waited for the throttle's sleep: "
                         << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                         << " ms";
  EXPECT_EQ(machine_->throttle_percent(), 0u) << "a stopped machine is not throttled";
}

}  // namespace
}  // namespace keel::machine
