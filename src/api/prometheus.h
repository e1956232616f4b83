// The metrics reply (CommandKind::GetMetrics) in the Prometheus text
// exposition format 0.0.4, for GET /metrics.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace keel::api {

// metrics: {"state", "boot", "uptime_seconds", "vcpus": [{"index", "exits":
// {kind: n}}], "memory": {"guest_bytes", "resident_bytes"}}; missing parts
// are left out.
std::string prometheus_text(const nlohmann::json& metrics);

}  // namespace keel::api
