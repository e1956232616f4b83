#include "api/vm_status.h"

#include "base/check.h"

namespace keel::api {

void VmStatus::publish(nlohmann::json vm, std::optional<Clock::time_point> running_since) {
  CHECK(vm.is_object() && !vm.empty() && !vm.contains("uptime_seconds"),
        "VmStatus: publish an object without uptime_seconds");
  // Strings such as a path may hold bytes that are not UTF-8.
  std::string text = vm.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  text.pop_back();  // the closing brace: current() appends uptime_seconds first
  auto shared = std::make_shared<const std::string>(std::move(text));
  std::lock_guard lock(mutex_);
  text_ = std::move(shared);
  running_since_ = running_since;
}

std::optional<std::string> VmStatus::current() const {
  std::shared_ptr<const std::string> text;
  std::optional<Clock::time_point> since;
  {
    std::lock_guard lock(mutex_);
    text = text_;
    since = running_since_;
  }
  if (text == nullptr) return std::nullopt;
  double uptime = since ? std::chrono::duration<double>(Clock::now() - *since).count() : 0.0;
  std::string reply;
  reply.reserve(text->size() + 48);
  reply += *text;
  reply += ",\"uptime_seconds\":";
  reply += nlohmann::json(uptime).dump();
  reply += "}\n";
  return reply;
}

}  // namespace keel::api
