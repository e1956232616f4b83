// Helpers for devices that do their queue work on the device I/O loop.
// drain_bounded: draining a virtqueue in bounded rounds, for devices whose
// work per chain is done at once on the loop thread (virtio-rng,
// virtio-console output). Spec: virtio 1.2 §2.7.10 (driver notifications are suppressed
// while the device drains, then re-enabled and the ring looked at again).
// A round stops when its budget (bytes of work, chains) is spent: the rest
// stays in the ring with driver notifications still off, and the device
// resumes later through its own eventfd on the loop, so one notification
// cannot hold the loop for long however large the guest's buffers are.
// stop_watching: the first half of a device's reset().
// Implemented: both. Missing: nothing known.
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string_view>
#include <utility>

#include "base/event_loop.h"
#include "devices/virtio/queue.h"

namespace keel::devices::virtio {

struct DrainBudget {
  uint64_t bytes = 0;
  uint32_t chains = 0;
};

// What the handler did with one chain.
struct ChainWork {
  uint32_t used_len = 0;     // pushed as the used length (bytes written into the chain)
  uint64_t cost_bytes = 0;   // charged to the round's byte budget
};

struct DrainResult {
  enum class Outcome {
    Idle,         // the ring is empty and driver notifications are on again
    BudgetSpent,  // chains may remain; driver notifications stay off
    Broken,       // the driver broke the spec: the device needs a reset
  };
  Outcome outcome = Outcome::Idle;
  bool pushed = false;  // used entries were pushed (check needs_notification)
  // For Broken: the queue operation that failed, or empty if the handler
  // itself found the chain broken (and has said so).
  std::string_view broken_why;
};

// Pops chains and calls handle(chain, bytes_left) for each, which returns
// the ChainWork, or nullopt when the chain broke the spec; then pushes the
// chain as used. bytes_left is more than 0 on every call.
template <typename Handler>
DrainResult drain_bounded(Virtqueue& queue, DescriptorChain& chain, DrainBudget budget,
                          Handler&& handle) {
  DrainResult result;
  auto broken = [&result](std::string_view why) {
    result.outcome = DrainResult::Outcome::Broken;
    result.broken_why = why;
    return result;
  };
  while (true) {
    if (!queue.disable_driver_notifications()) return broken("disable notifications");
    while (budget.bytes > 0 && budget.chains > 0) {
      Result<bool> popped = queue.pop_into(chain);
      if (!popped) return broken("pop");
      if (!*popped) break;
      --budget.chains;
      std::optional<ChainWork> work = handle(static_cast<const DescriptorChain&>(chain),
                                             budget.bytes);
      if (!work) return broken("");
      if (!queue.push_used(chain.head, work->used_len)) return broken("push used");
      budget.bytes -= std::min(budget.bytes, work->cost_bytes);
      result.pushed = true;
    }
    if (budget.bytes == 0 || budget.chains == 0) {
      result.outcome = DrainResult::Outcome::BudgetSpent;
      return result;
    }
    Result<bool> more = queue.enable_driver_notifications();
    if (!more) return broken("enable notifications");
    if (!*more) return result;
  }
}

// Marks the device inactive and removes its watch, under mutex for the
// first and outside it for the second: remove() waits for a running
// callback, which may be waiting for that lock. Call without mutex held.
inline void stop_watching(std::mutex& mutex, bool& active,
                          std::optional<EventLoop::WatchId>& watch, EventLoop* const& loop) {
  std::optional<EventLoop::WatchId> taken;
  EventLoop* taken_loop = nullptr;
  {
    std::lock_guard lock(mutex);
    active = false;
    taken = std::exchange(watch, std::nullopt);
    taken_loop = loop;
  }
  if (taken) taken_loop->remove(*taken);
}

}  // namespace keel::devices::virtio
