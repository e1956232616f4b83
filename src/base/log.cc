#include "base/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <fmt/format.h>

namespace keel::log {
namespace {

spdlog::level::level_enum to_spdlog(Level level) {
  switch (level) {
    case Level::Trace: return spdlog::level::trace;
    case Level::Debug: return spdlog::level::debug;
    case Level::Info: return spdlog::level::info;
    case Level::Warn: return spdlog::level::warn;
    case Level::Error: return spdlog::level::err;
    case Level::Off: return spdlog::level::off;
  }
  return spdlog::level::info;
}

int64_t monotonic_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

Result<Level> parse_level(std::string_view name) {
  if (name == "trace") return Level::Trace;
  if (name == "debug") return Level::Debug;
  if (name == "info") return Level::Info;
  if (name == "warn") return Level::Warn;
  if (name == "error") return Level::Error;
  if (name == "off") return Level::Off;
  return fail(Errc::InvalidArgument,
              fmt::format("log level '{}': expected trace, debug, info, warn, error or off", name));
}

void init(Level level, std::string_view program_name) {
  std::string name(program_name);
  spdlog::drop(name);
  auto logger = spdlog::stderr_color_mt(name);
  logger->set_pattern("%^%Y-%m-%dT%H:%M:%S.%e %n %l%$: %v");
  logger->set_level(to_spdlog(level));
  spdlog::set_default_logger(std::move(logger));
}

void set_level(Level level) { spdlog::set_level(to_spdlog(level)); }

bool RateLimiter::allow() {
  int64_t now = monotonic_ns();
  int64_t start = window_start_ns_.load(std::memory_order_relaxed);
  if (now - start >= interval_ns_) {
    // A new window; whichever thread wins the exchange resets the count.
    if (window_start_ns_.compare_exchange_strong(start, now, std::memory_order_relaxed)) {
      in_window_.store(0, std::memory_order_relaxed);
    }
  }
  if (in_window_.fetch_add(1, std::memory_order_relaxed) < burst_) return true;
  suppressed_.fetch_add(1, std::memory_order_relaxed);
  return false;
}

}  // namespace keel::log
