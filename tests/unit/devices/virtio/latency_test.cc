// LatencyHistogram: samples land in the right fixed bucket, and the
// counters it hands to the API are cumulative, in the Prometheus shape.
#include "devices/virtio/latency.h"

#include <map>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace keel::devices::virtio {
namespace {

using namespace std::chrono_literals;

std::map<std::string, uint64_t, std::less<>> counters_of(const LatencyHistogram& histogram) {
  VirtioDevice::Counters counters;
  histogram.append_to(counters);
  std::map<std::string, uint64_t, std::less<>> by_name;
  for (const auto& [name, value] : counters) {
    EXPECT_FALSE(by_name.contains(name)) << name;
    by_name[std::string(name)] = value;
  }
  return by_name;
}

TEST(LatencyHistogramTest, EmptyHasEveryCounterAtZero) {
  LatencyHistogram histogram("tx_latency_us");
  auto counters = counters_of(histogram);
  EXPECT_EQ(counters.size(), LatencyHistogram::kBoundsUs.size() + 3);
  for (const auto& [name, value] : counters) {
    EXPECT_EQ(name.rfind("tx_latency_us_", 0), 0u) << name;
    EXPECT_EQ(value, 0u) << name;
  }
  EXPECT_TRUE(counters.contains("tx_latency_us_bucket_le_10"));
  EXPECT_TRUE(counters.contains("tx_latency_us_bucket_le_1000000"));
  EXPECT_TRUE(counters.contains("tx_latency_us_bucket_le_inf"));
  EXPECT_TRUE(counters.contains("tx_latency_us_sum_us"));
  EXPECT_TRUE(counters.contains("tx_latency_us_count"));
}

TEST(LatencyHistogramTest, BucketsAreCumulativeUpperBounds) {
  LatencyHistogram histogram("request_latency_us");
  histogram.record(0ns);
  histogram.record(10us);     // on a bound: that bucket (le)
  histogram.record(10'001ns);  // 10 us after truncation
  histogram.record(11us);
  histogram.record(750us);
  histogram.record(3s);       // beyond the last bound
  histogram.record(-5us);     // a clock step backwards counts as 0
  auto counters = counters_of(histogram);
  EXPECT_EQ(counters["request_latency_us_bucket_le_10"], 4u);
  EXPECT_EQ(counters["request_latency_us_bucket_le_20"], 5u);
  EXPECT_EQ(counters["request_latency_us_bucket_le_500"], 5u);
  EXPECT_EQ(counters["request_latency_us_bucket_le_1000"], 6u);
  EXPECT_EQ(counters["request_latency_us_bucket_le_1000000"], 6u);
  EXPECT_EQ(counters["request_latency_us_bucket_le_inf"], 7u);
  EXPECT_EQ(counters["request_latency_us_count"], 7u);
  EXPECT_EQ(counters["request_latency_us_sum_us"], 10u + 10u + 11u + 750u + 3'000'000u);
  EXPECT_EQ(histogram.count(), 7u);
}

TEST(LatencyHistogramTest, RecordsFromSeveralThreads) {
  LatencyHistogram histogram("x");
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&histogram] {
      for (int i = 0; i < 1000; ++i) histogram.record(std::chrono::microseconds(i));
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(counters_of(histogram)["x_count"], 4000u);
}

}  // namespace
}  // namespace keel::devices::virtio
