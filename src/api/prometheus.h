// The metrics reply (CommandKind::GetMetrics) in the Prometheus text
// exposition format 0.0.4, for GET /metrics.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace keel::api {

// metrics: {"state", "boot", "uptime_seconds", "vcpus": [{"index", "exits":
// {kind: n}}], "memory": {"guest_bytes", "resident_bytes"}}; missing parts
// are left out.
// A device's counters named NAME_bucket_le_<us> (cumulative, le_inf the
// last), NAME_sum_us and NAME_count form a latency histogram
// (devices/virtio/latency.h): rendered as the histogram family
// keel_virtio_<NAME less _us>_seconds, not as counters.
std::string prometheus_text(const nlohmann::json& metrics);

// Those histograms in a device's counters, summarised for the JSON metrics:
// {NAME: {"count", "mean_us", "p50_us", "p99_us"}}, quantiles estimated
// within the bucket as Prometheus's histogram_quantile does (linear; the
// last finite bound when the rank falls in +Inf; 0 without samples).
nlohmann::json latency_summaries(const nlohmann::json& counters);

}  // namespace keel::api
