#include "api/vm_status.h"

namespace keel::api {

void VmStatus::publish(nlohmann::json vm, std::optional<Clock::time_point> running_since) {
  auto shared = std::make_shared<const nlohmann::json>(std::move(vm));
  std::lock_guard lock(mutex_);
  vm_ = std::move(shared);
  running_since_ = running_since;
}

std::optional<nlohmann::json> VmStatus::current() const {
  std::shared_ptr<const nlohmann::json> vm;
  std::optional<Clock::time_point> since;
  {
    std::lock_guard lock(mutex_);
    vm = vm_;
    since = running_since_;
  }
  if (vm == nullptr) return std::nullopt;
  nlohmann::json reply = *vm;
  reply["uptime_seconds"] =
      since ? std::chrono::duration<double>(Clock::now() - *since).count() : 0.0;
  return reply;
}

}  // namespace keel::api
