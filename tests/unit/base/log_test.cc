#include "base/log.h"

#include <thread>

#include <gtest/gtest.h>

namespace keel::log {
namespace {

TEST(LogTest, ParsesLevels) {
  EXPECT_EQ(*parse_level("debug"), Level::Debug);
  EXPECT_EQ(*parse_level("off"), Level::Off);
  Result<Level> bad = parse_level("loud");
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().context().find("'loud'"), std::string::npos);
}

TEST(LogTest, InitTwiceIsSafe) {
  init(Level::Warn, "keel-test");
  init(Level::Warn, "keel-test");
  LOG_INFO("not shown at warn level");
}

TEST(RateLimiterTest, AllowsBurstThenCountsDrops) {
  RateLimiter limiter(3, std::chrono::hours(1));
  EXPECT_TRUE(limiter.allow());
  EXPECT_TRUE(limiter.allow());
  EXPECT_TRUE(limiter.allow());
  for (int i = 0; i < 5; ++i) EXPECT_FALSE(limiter.allow());
  EXPECT_EQ(limiter.take_suppressed(), 5u);
  EXPECT_EQ(limiter.take_suppressed(), 0u);
}

TEST(RateLimiterTest, NewWindowAllowsAgain) {
  RateLimiter limiter(1, std::chrono::milliseconds(20));
  EXPECT_TRUE(limiter.allow());
  EXPECT_FALSE(limiter.allow());
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_TRUE(limiter.allow());
}

TEST(RateLimiterTest, MacroCompilesAndLimits) {
  init(Level::Off, "keel-test");
  for (int i = 0; i < 100; ++i) LOG_RATELIMITED(warn, "guest did a bad thing {}", i);
}

}  // namespace
}  // namespace keel::log
