// LatencyHistogram: how long a device takes to serve requests (virtio-blk:
// submit to completion; virtio-net: a tx frame from the queue to the
// backend), in fixed buckets. Recording is a few relaxed atomic adds, so a
// device records on its I/O thread while the API reads from another.
// append_to() lays it out as monotonic counters in the Prometheus histogram
// shape the API renders (api/prometheus.h): NAME_bucket_le_<us> (cumulative:
// samples of at most that many microseconds; le_inf counts them all),
// NAME_sum_us and NAME_count.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "devices/virtio/device.h"

namespace keel::devices::virtio {

class LatencyHistogram {
 public:
  // Upper bounds in microseconds, 10 us to 1 s; above them, +Inf.
  static constexpr std::array<uint64_t, 16> kBoundsUs = {
      10, 20, 50, 100, 200, 500, 1'000, 2'000, 5'000, 10'000, 20'000, 50'000, 100'000, 200'000,
      500'000, 1'000'000};

  // name: the counters' prefix ("request_latency_us").
  explicit LatencyHistogram(std::string_view name);
  LatencyHistogram(const LatencyHistogram&) = delete;
  LatencyHistogram& operator=(const LatencyHistogram&) = delete;

  void record(std::chrono::nanoseconds elapsed);
  // The counters, named into this object: valid while it lives.
  void append_to(VirtioDevice::Counters& counters) const;
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }

 private:
  std::array<std::atomic<uint64_t>, kBoundsUs.size() + 1> buckets_{};  // not cumulative
  std::atomic<uint64_t> count_{0};
  std::atomic<uint64_t> sum_us_{0};
  std::vector<std::string> names_;  // buckets, then le_inf, sum_us, count
};

}  // namespace keel::devices::virtio
