#include "api/event_log.h"

#include <chrono>

namespace keel::api {

nlohmann::ordered_json Event::to_json() const {
  nlohmann::ordered_json json = {{"seq", seq}, {"timestamp_ms", timestamp_ms}, {"type", type}};
  if (data.is_object()) {
    for (const auto& [key, value] : data.items()) json[key] = value;
  }
  return json;
}

uint64_t EventLog::publish(std::string type, nlohmann::json data) {
  std::function<void()> listener;
  uint64_t seq = 0;
  {
    std::lock_guard lock(mutex_);
    seq = ++last_seq_;
    auto now = std::chrono::system_clock::now().time_since_epoch();
    events_.push_back({seq, std::chrono::duration_cast<std::chrono::milliseconds>(now).count(),
                       std::move(type), std::move(data)});
    while (events_.size() > capacity_) events_.pop_front();
    listener = listener_;
  }
  if (listener) listener();
  return seq;
}

EventLog::Slice EventLog::after(uint64_t after, size_t max_count) const {
  std::lock_guard lock(mutex_);
  Slice slice;
  if (events_.empty()) return slice;
  uint64_t first = events_.front().seq;
  // Sequence numbers are contiguous, so the index is the difference.
  uint64_t start = after + 1;
  if (start < first) {
    slice.missed = true;
    start = first;
  }
  for (uint64_t seq = start; seq <= last_seq_ && slice.events.size() < max_count; ++seq) {
    slice.events.push_back(events_[seq - first]);
  }
  return slice;
}

uint64_t EventLog::last_seq() const {
  std::lock_guard lock(mutex_);
  return last_seq_;
}

uint64_t EventLog::first_seq() const {
  std::lock_guard lock(mutex_);
  return events_.empty() ? last_seq_ + 1 : events_.front().seq;
}

void EventLog::set_listener(std::function<void()> listener) {
  std::lock_guard lock(mutex_);
  listener_ = std::move(listener);
}

}  // namespace keel::api
