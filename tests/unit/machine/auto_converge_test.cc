// Auto-converge's policy: rounds' dirtied and sent bytes in, the throttle
// percentage out.
#include "machine/auto_converge.h"

#include <gtest/gtest.h>

#include <vector>

namespace keel::machine {
namespace {

constexpr uint64_t kMiB = 1 << 20;

// The throttle after each of rounds, each {dirtied, sent}.
std::vector<uint32_t> percents_after(const std::vector<std::pair<uint64_t, uint64_t>>& rounds) {
  AutoConvergeState state;
  std::vector<uint32_t> percents;
  for (const auto& [dirtied, sent] : rounds) {
    state = next_auto_converge(state, dirtied, sent);
    percents.push_back(state.throttle_percent);
  }
  return percents;
}

TEST(AutoConvergeTest, ALinkThatKeepsUpNeverThrottles) {
  // Dirtied at most half of what was sent: the remainder shrinks.
  EXPECT_EQ(percents_after({{10 * kMiB, 100 * kMiB}, {5 * kMiB, 10 * kMiB}, {1 * kMiB, 5 * kMiB},
                            {0, 1 * kMiB}, {0, 0}}),
            (std::vector<uint32_t>{0, 0, 0, 0, 0}));
}

TEST(AutoConvergeTest, TwoHighRoundsStartAtTwentyThenTenMoreEachHighRound) {
  const std::pair<uint64_t, uint64_t> high{60 * kMiB, 100 * kMiB};  // 60% > 50%
  EXPECT_EQ(percents_after({high, high, high, high, high}),
            (std::vector<uint32_t>{0, 20, 30, 40, 50}));
}

TEST(AutoConvergeTest, ExactlyHalfIsNotHigh) {
  EXPECT_EQ(percents_after({{50, 100}, {50, 100}, {51, 100}, {51, 100}}),
            (std::vector<uint32_t>{0, 0, 0, 20}));
}

TEST(AutoConvergeTest, RoundsThatKeepUpHoldTheThrottleAndCountNoHighRound) {
  const std::pair<uint64_t, uint64_t> high{2 * kMiB, 1 * kMiB};
  const std::pair<uint64_t, uint64_t> low{1, 1 * kMiB};
  // QEMU's count is not reset by a low round either: the second high round
  // starts the throttle even with a low one between.
  EXPECT_EQ(percents_after({high, low, high, low, low, high}),
            (std::vector<uint32_t>{0, 0, 20, 20, 20, 30}));
}

TEST(AutoConvergeTest, StopsAtNinetyNine) {
  std::vector<std::pair<uint64_t, uint64_t>> rounds(20, {kMiB, 0});  // nothing got through
  std::vector<uint32_t> percents = percents_after(rounds);
  EXPECT_EQ(percents[1], 20u);
  EXPECT_EQ(percents[8], 90u);
  EXPECT_EQ(percents[9], 99u);
  EXPECT_EQ(percents.back(), 99u);
}

TEST(AutoConvergeTest, HugeFiguresDoNotOverflow) {
  const uint64_t huge = ~uint64_t{0};
  EXPECT_EQ(percents_after({{huge, huge}, {huge, huge}}), (std::vector<uint32_t>{0, 20}));
  EXPECT_EQ(percents_after({{huge / 2, huge}, {huge / 2, huge}}), (std::vector<uint32_t>{0, 0}));
}

TEST(AutoConvergeTest, APolicyOfItsOwn) {
  AutoConvergePolicy policy{.dirty_share_percent = 10, .high_rounds_to_start = 1,
                            .initial_percent = 50, .step_percent = 30, .max_percent = 90};
  AutoConvergeState state;
  state = next_auto_converge(state, 11, 100, policy);
  EXPECT_EQ(state.throttle_percent, 50u);
  state = next_auto_converge(state, 11, 100, policy);
  EXPECT_EQ(state.throttle_percent, 80u);
  state = next_auto_converge(state, 11, 100, policy);
  EXPECT_EQ(state.throttle_percent, 90u);
}

}  // namespace
}  // namespace keel::machine
