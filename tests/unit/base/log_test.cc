#include "base/log.h"

#include <algorithm>
#include <memory>
#include <sstream>
#include <thread>

#include <spdlog/sinks/ostream_sink.h>

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

TEST(RateLimiterTest, MacroLetsOnlyTheBurstThrough) {
  // Capture what the macro really logs through an in-memory sink.
  std::ostringstream captured;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(captured);
  auto logger = std::make_shared<spdlog::logger>("capture", sink);
  logger->set_pattern("%v");
  logger->set_level(spdlog::level::warn);
  spdlog::set_default_logger(logger);
  for (int i = 0; i < 100; ++i) LOG_RATELIMITED(warn, "guest did a bad thing {}", i);
  init(Level::Off, "keel-test");  // restore a stderr logger

  std::string text = captured.str();
  size_t lines = static_cast<size_t>(std::count(text.begin(), text.end(), '\n'));
  EXPECT_EQ(lines, 10u) << text;  // the default burst, all in one window
  EXPECT_NE(text.find("guest did a bad thing 0\n"), std::string::npos) << text;
  EXPECT_NE(text.find("guest did a bad thing 9\n"), std::string::npos) << text;
  EXPECT_EQ(text.find("guest did a bad thing 10\n"), std::string::npos) << text;
}

}  // namespace
}  // namespace keel::log
