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

#include <nlohmann/json.hpp>

namespace keel::api {

class VmStatus {
 public:
  using Clock = std::chrono::steady_clock;

  // vm: {state, boot, config?} without uptime_seconds; running_since: when
  // the current boot started running (uptime_seconds counts from it; 0 without).
  void publish(nlohmann::json vm, std::optional<Clock::time_point> running_since);
  // The reply now, uptime_seconds included; nullopt until the first publish.
  std::optional<nlohmann::json> current() const;

 private:
  mutable std::mutex mutex_;  // guards vm_ and running_since_
  std::shared_ptr<const nlohmann::json> vm_;
  std::optional<Clock::time_point> running_since_;
};

}  // namespace keel::api
