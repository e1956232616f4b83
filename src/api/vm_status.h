// VmStatus: the reply to GET /api/v1/vm as the machine side last published
// it, so the API thread answers the most frequent request without a round
// trip through the main thread (bench/api.sh measures the difference). The
// machine side publishes whenever the state, the boot or the configuration
// changes, before it answers the command that changed it, so a client that
// saw a PUT's reply sees the new state in its next GET.
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace keel::api {

class VmStatus {
 public:
  using Clock = std::chrono::steady_clock;

  // vm: {state, boot, config?} without uptime_seconds; running_since: when
  // the current boot started running (uptime_seconds counts from it; 0 without).
  void publish(nlohmann::json vm, std::optional<Clock::time_point> running_since);
  // The reply's JSON text now, uptime_seconds included (serialized once per
  // publish, not per request); nullopt until the first publish.
  std::optional<std::string> current() const;

 private:
  mutable std::mutex mutex_;  // guards text_ and running_since_
  // The published object serialized without its closing brace.
  std::shared_ptr<const std::string> text_;
  std::optional<Clock::time_point> running_since_;
};

}  // namespace keel::api
