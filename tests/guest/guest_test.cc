// Tiny guests on the host's /dev/kvm: port I/O exits, serial output, the
// test-exit port, and ring-3 work the way the later migration and timing
// guests will do it.
#include <gtest/gtest.h>

#include "tiny_guest.h"

namespace keel::testing {
namespace {

std::string guest_path(const char* name) {
  return std::string(KEEL_TINY_GUEST_DIR) + "/" + name + ".bin";
}

class TinyGuestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (auto reason = tiny_guest_unavailable_reason()) {
      GTEST_SKIP() << "tiny guests need a usable /dev/kvm: " << *reason;
    }
  }
};

TEST_F(TinyGuestTest, ExitPortEndsTheRunWithItsCode) {
  Result<TinyGuestResult> result = run_tiny_guest(guest_path("exit_code"));
  ASSERT_TRUE(result) << result.error().message();
  ASSERT_TRUE(result->exit_code.has_value())
      << "last exit: " << kvm::exit_kind_name(result->last_exit.kind);
  EXPECT_EQ(*result->exit_code, 42);
  EXPECT_EQ(result->exits, 1u);
  EXPECT_EQ(result->last_exit.address, kTestExitPort);
}

TEST_F(TinyGuestTest, StringPortOutputReachesSerial) {
  Result<TinyGuestResult> result = run_tiny_guest(guest_path("serial_hello"));
  ASSERT_TRUE(result) << result.error().message();
  EXPECT_EQ(result->serial, "hello from a tiny guest\n");
  ASSERT_TRUE(result->exit_code.has_value());
  EXPECT_EQ(*result->exit_code, 0);
}

TEST_F(TinyGuestTest, RingThreeGuestWritesMemoryAndDoesPortIo) {
  Result<TinyGuestResult> result = run_tiny_guest(guest_path("ring3_memory"));
  ASSERT_TRUE(result) << result.error().message();
  ASSERT_TRUE(result->exit_code.has_value())
      << "last exit: " << kvm::exit_kind_name(result->last_exit.kind)
      << " code " << result->last_exit.code << " rip " << std::hex << result->regs.rip;
  EXPECT_EQ(*result->exit_code, 7);
  EXPECT_EQ(result->serial, "ring3 ok\n");
  constexpr uint64_t kQwords = (4 << 20) / 8;
  EXPECT_EQ(result->regs.rbx, 3 * kQwords * (kQwords - 1) / 2 + kQwords);
  EXPECT_EQ(result->sregs.cs.selector & 3, 3) << "the exit should come from ring 3";
}

TEST_F(TinyGuestTest, RunawayGuestIsStoppedByTheTimeout) {
  TinyGuestOptions options;
  options.timeout = std::chrono::milliseconds(300);
  options.max_exits = 10;
  Result<TinyGuestResult> result = run_tiny_guest(guest_path("spin"), options);
  ASSERT_TRUE(result) << result.error().message();
  EXPECT_TRUE(result->timed_out);
  EXPECT_FALSE(result->exit_code.has_value());
}

TEST(TinyGuestLoaderTest, MissingBinaryIsAnError) {
  Result<TinyGuestResult> result = run_tiny_guest("/nonexistent/guest.bin");
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code(), Errc::NotFound);
}

}  // namespace
}  // namespace keel::testing
