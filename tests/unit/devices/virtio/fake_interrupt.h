// Test support: an Interrupt (the device's way back to the transport) that
// counts what a device raises, per queue. Thread-safe, since devices may
// raise interrupts from the event loop thread while a test reads counts.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>

#include "devices/virtio/device.h"

namespace keel::devices::virtio::testing {

class FakeInterrupt : public Interrupt {
 public:
  void notify_queue(uint16_t queue) override {
    std::lock_guard lock(mutex_);
    ++queue_notifications_[queue];
  }
  void notify_config() override {
    std::lock_guard lock(mutex_);
    ++config_notifications_;
  }
  void needs_reset() override {
    std::lock_guard lock(mutex_);
    ++resets_;
  }

  // Used buffer notifications for one queue.
  int queue_notifications(uint16_t queue) const {
    std::lock_guard lock(mutex_);
    auto it = queue_notifications_.find(queue);
    return it == queue_notifications_.end() ? 0 : it->second;
  }
  // Used buffer notifications over every queue.
  int all_queue_notifications() const {
    std::lock_guard lock(mutex_);
    int total = 0;
    for (const auto& [queue, count] : queue_notifications_) total += count;
    return total;
  }
  int config_notifications() const {
    std::lock_guard lock(mutex_);
    return config_notifications_;
  }
  // needs_reset() calls.
  int resets() const {
    std::lock_guard lock(mutex_);
    return resets_;
  }

 private:
  mutable std::mutex mutex_;
  std::map<uint16_t, int> queue_notifications_;
  int config_notifications_ = 0;
  int resets_ = 0;
};

}  // namespace keel::devices::virtio::testing
