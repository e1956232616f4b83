// Logging through spdlog, always to stderr: stdout may carry the guest's
// serial console. Anything a guest can trigger repeatedly is logged through
// LOG_RATELIMITED so a hostile guest cannot flood the host's logs.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string_view>

#include <spdlog/spdlog.h>

#include "base/result.h"

namespace keel::log {

enum class Level { Trace, Debug, Info, Warn, Error, Off };

// Parses "trace", "debug", "info", "warn", "error", "off".
Result<Level> parse_level(std::string_view name);
// Sets up the process-wide stderr logger; safe to call more than once.
void init(Level level, std::string_view program_name);
void set_level(Level level);

// Lets through at most burst messages per interval, then counts what it
// drops and reports the count with the next message it lets through.
class RateLimiter {
 public:
  explicit RateLimiter(uint32_t burst = 10,
                       std::chrono::milliseconds interval = std::chrono::seconds(5))
      : burst_(burst), interval_ns_(std::chrono::nanoseconds(interval).count()) {}

  // True if a message may be logged now; suppressed() then gives how many
  // were dropped since the last allowed one (and resets that count).
  bool allow();
  uint64_t take_suppressed() { return suppressed_.exchange(0, std::memory_order_relaxed); }

 private:
  const uint32_t burst_;
  const int64_t interval_ns_;
  std::atomic<int64_t> window_start_ns_{0};
  std::atomic<uint32_t> in_window_{0};
  std::atomic<uint64_t> suppressed_{0};
};

}  // namespace keel::log

#define LOG_TRACE(...) SPDLOG_TRACE(__VA_ARGS__)
#define LOG_DEBUG(...) ::spdlog::debug(__VA_ARGS__)
#define LOG_INFO(...) ::spdlog::info(__VA_ARGS__)
#define LOG_WARN(...) ::spdlog::warn(__VA_ARGS__)
#define LOG_ERROR(...) ::spdlog::error(__VA_ARGS__)

// One limiter per call site. Use for every message a guest can cause.
#define LOG_RATELIMITED(level, ...)                                                   \
  do {                                                                                \
    static ::keel::log::RateLimiter keel_log_limiter_;                                \
    if (keel_log_limiter_.allow()) {                                                  \
      ::spdlog::level(__VA_ARGS__);                                                   \
      if (uint64_t keel_dropped_ = keel_log_limiter_.take_suppressed())               \
        ::spdlog::level("({} similar messages suppressed)", keel_dropped_);          \
    }                                                                                 \
  } while (0)
