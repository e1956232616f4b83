#include "devices/virtio/latency.h"

#include <algorithm>

#include <fmt/format.h>

namespace keel::devices::virtio {

LatencyHistogram::LatencyHistogram(std::string_view name) {
  for (uint64_t bound : kBoundsUs) names_.push_back(fmt::format("{}_bucket_le_{}", name, bound));
  names_.push_back(fmt::format("{}_bucket_le_inf", name));
  names_.push_back(fmt::format("{}_sum_us", name));
  names_.push_back(fmt::format("{}_count", name));
}

void LatencyHistogram::record(std::chrono::nanoseconds elapsed) {
  const auto micros = static_cast<uint64_t>(
      std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::microseconds>(elapsed).count()));
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(kBoundsUs.begin(), kBoundsUs.end(), micros) - kBoundsUs.begin());
  buckets_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_us_.fetch_add(micros, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
}

void LatencyHistogram::append_to(VirtioDevice::Counters& counters) const {
  // Read without a lock: a sample recorded meanwhile may be in count but
  // not yet in its bucket, so the total is the buckets' sum, not count_.
  uint64_t cumulative = 0;
  for (size_t i = 0; i < buckets_.size(); ++i) {
    cumulative += buckets_[i].load(std::memory_order_relaxed);
    counters.emplace_back(names_[i], cumulative);
  }
  counters.emplace_back(names_[buckets_.size()], sum_us_.load(std::memory_order_relaxed));
  counters.emplace_back(names_[buckets_.size() + 1], cumulative);
}

}  // namespace keel::devices::virtio
