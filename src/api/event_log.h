// EventLog: the VM's lifecycle events (created, running, paused, resumed,
// stopping, stopped, reset), numbered from 1, in a bounded ring. The
// machine side publishes; the API thread reads what came after a client's
// last sequence number. A client that fell more than the capacity behind
// is told it missed events (Slice::missed) instead of silently skipping.
// Thread-safe.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace keel::api {

struct Event {
  uint64_t seq = 0;
  int64_t timestamp_ms = 0;  // Unix time
  std::string type;
  nlohmann::json data;  // the type's fields, a JSON object

  // {"seq": N, "timestamp_ms": T, "type": "...", ...data}, in that order.
  nlohmann::ordered_json to_json() const;
};

class EventLog {
 public:
  static constexpr size_t kDefaultCapacity = 1024;
  explicit EventLog(size_t capacity = kDefaultCapacity) : capacity_(capacity) {}

  // Appends an event (dropping the oldest when full), then calls the
  // listener outside the lock. Returns its sequence number.
  uint64_t publish(std::string type, nlohmann::json data = nlohmann::json::object());

  struct Slice {
    std::vector<Event> events;  // in order, at most max_count
    // Events after `after` were dropped before this read: the slice
    // starts at the oldest one kept instead.
    bool missed = false;
  };
  // Events with seq > after, oldest first.
  Slice after(uint64_t after, size_t max_count) const;
  uint64_t last_seq() const;
  // The oldest seq still kept (last_seq() + 1 when empty).
  uint64_t first_seq() const;
  size_t capacity() const { return capacity_; }

  // Called after every publish, on the publishing thread (one listener).
  void set_listener(std::function<void()> listener);

 private:
  const size_t capacity_;
  mutable std::mutex mutex_;  // guards everything below
  std::deque<Event> events_;
  uint64_t last_seq_ = 0;
  std::function<void()> listener_;
};

}  // namespace keel::api
