// The route table and the request checks that need no server.
#include "api/routes.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "api/prometheus.h"

namespace keel::api {
namespace {

using ::testing::HasSubstr;

TEST(RoutesTest, MatchesEveryRouteByMethodAndPath) {
  for (const Route& route : routes()) {
    Routed routed = route_request(route.method, route.path);
    ASSERT_EQ(routed.route, &route) << route.method << " " << route.path;
    EXPECT_FALSE(routed.error);
  }
}

TEST(RoutesTest, UnknownPathIs404) {
  for (const char* path : {"/", "/api/v1", "/api/v1/vm/", "/api/v1/vm/pausex", "/API/V1/VM"}) {
    Routed routed = route_request("GET", path);
    ASSERT_TRUE(routed.error) << path;
    EXPECT_EQ(routed.error->status, 404u) << path;
    EXPECT_THAT(routed.error->message, HasSubstr(path));
  }
}

TEST(RoutesTest, WrongMethodIs405WithAllow) {
  Routed routed = route_request("GET", "/api/v1/vm/pause");
  ASSERT_TRUE(routed.error);
  EXPECT_EQ(routed.error->status, 405u);
  EXPECT_EQ(routed.allow, "PUT");
  routed = route_request("DELETE", "/api/v1/vm");
  ASSERT_TRUE(routed.error);
  EXPECT_EQ(routed.error->status, 405u);
  EXPECT_EQ(routed.allow, "GET");
}

TEST(RoutesTest, QueryParametersAreCheckedPerRoute) {
  Routed routed = route_request("GET", "/api/v1/events?after=5&follow=false");
  ASSERT_FALSE(routed.error);
  ASSERT_EQ(routed.query.size(), 2u);
  EXPECT_EQ(routed.query[0], (std::pair<std::string, std::string>{"after", "5"}));

  routed = route_request("GET", "/api/v1/events?since=5");
  ASSERT_TRUE(routed.error);
  EXPECT_EQ(routed.error->status, 400u);
  EXPECT_EQ(routed.error->field, "since");

  routed = route_request("GET", "/api/v1/vm?verbose=1");
  ASSERT_TRUE(routed.error);
  EXPECT_EQ(routed.error->field, "verbose");

  routed = route_request("GET", "/api/v1/events?after=%35");
  ASSERT_TRUE(routed.error);
  EXPECT_EQ(routed.error->status, 400u);
}

TEST(RoutesTest, BalloonBody) {
  std::string field;
  Result<uint64_t> target = parse_balloon_body(R"({"target_mib": 0})", field);
  ASSERT_TRUE(target);
  EXPECT_EQ(*target, 0u);
  target = parse_balloon_body(R"( {"target_mib": 18446744073709551615} )", field);
  ASSERT_TRUE(target);
  EXPECT_EQ(*target, UINT64_MAX);
  EXPECT_TRUE(field.empty());
  const std::pair<const char*, const char*> bad[] = {
      {"", "body"},
      {"{", "body"},
      {"256", "body"},
      {R"({"target_mib": 18446744073709551616})", "target_mib"},
      {R"({"target_mib": 1e3})", "target_mib"},
      {R"({"target_mib": true})", "target_mib"},
      {R"({"target_mib": [1]})", "target_mib"},
      {R"({"target_mib": -0})", "target_mib"},
      {R"({"target": 1})", "target"},
  };
  for (const auto& [body, name] : bad) {
    target = parse_balloon_body(body, field);
    EXPECT_FALSE(target) << body;
    EXPECT_EQ(field, name) << body;
  }
}

TEST(RoutesTest, EventsQueryValues) {
  std::string field;
  Result<EventsQuery> parsed = parse_events_query({}, field);
  ASSERT_TRUE(parsed);
  EXPECT_EQ(parsed->after, 0u);
  EXPECT_TRUE(parsed->follow);
  parsed = parse_events_query({{"after", "18446744073709551615"}, {"follow", "false"}}, field);
  ASSERT_TRUE(parsed);
  EXPECT_EQ(parsed->after, UINT64_MAX);
  EXPECT_FALSE(parsed->follow);
  for (const char* bad : {"", "-1", "1x", "18446744073709551616", "0x10"}) {
    parsed = parse_events_query({{"after", bad}}, field);
    EXPECT_FALSE(parsed) << bad;
    EXPECT_EQ(field, "after") << bad;
  }
  parsed = parse_events_query({{"follow", "yes"}}, field);
  EXPECT_FALSE(parsed);
  EXPECT_EQ(field, "follow");
}

TEST(RoutesTest, ActionBodiesMustBeEmpty) {
  EXPECT_FALSE(check_empty_body(""));
  EXPECT_FALSE(check_empty_body(" \r\n"));
  EXPECT_FALSE(check_empty_body("{}"));
  std::optional<ApiError> error = check_empty_body(R"({"force": true})");
  ASSERT_TRUE(error);
  EXPECT_EQ(error->status, 400u);
  EXPECT_EQ(error->field, "force");
  EXPECT_THAT(error->message, HasSubstr("'force'"));
  error = check_empty_body("{not json");
  ASSERT_TRUE(error);
  EXPECT_EQ(error->field, "body");
  error = check_empty_body("[1]");
  ASSERT_TRUE(error);
  EXPECT_EQ(error->field, "body");
}

TEST(RoutesTest, ErrorJsonShape) {
  nlohmann::json json = ApiError{409, "the VM is not paused", ""}.to_json();
  EXPECT_EQ(json["error"]["status"], 409);
  EXPECT_EQ(json["error"]["code"], "Conflict");
  EXPECT_EQ(json["error"]["message"], "the VM is not paused");
  EXPECT_FALSE(json["error"].contains("field"));
  json = ApiError{400, "bad", "after"}.to_json();
  EXPECT_EQ(json["error"]["field"], "after");
}

TEST(RoutesTest, MachineErrorsMapToStatuses) {
  EXPECT_EQ(error_from(Error(Errc::Busy, "paused")).status, 409u);
  EXPECT_EQ(error_from(Error(Errc::InvalidArgument, "x")).status, 400u);
  EXPECT_EQ(error_from(Error(Errc::NotFound, "x")).status, 404u);
  EXPECT_EQ(error_from(Error(Errc::Timeout, "x")).status, 503u);
  EXPECT_EQ(error_from(Error(Errc::Io, "x")).status, 500u);
  EXPECT_EQ(error_from(Error(Errc::Corrupt, "bad snapshot")).status, 422u);
  EXPECT_EQ(error_from(Error(Errc::Unsupported, "x")).status, 501u);
}

TEST(PrometheusTest, RendersExitsMemoryAndState) {
  nlohmann::json metrics = {
      {"state", "paused"},
      {"boot", 2},
      {"uptime_seconds", 1.5},
      {"vcpus", {{{"index", 0}, {"exits", {{"io-out", 7}, {"hlt", 0}}}},
                 {{"index", 1}, {"exits", {{"io-out", 3}}}}}},
      {"memory", {{"guest_bytes", 67108864}, {"resident_bytes", 4096}}},
  };
  std::string text = prometheus_text(metrics);
  EXPECT_THAT(text, HasSubstr("# TYPE keel_vcpu_exits_total counter\n"));
  EXPECT_THAT(text, HasSubstr("keel_vcpu_exits_total{vcpu=\"0\",reason=\"io-out\"} 7\n"));
  EXPECT_THAT(text, HasSubstr("keel_vcpu_exits_total{vcpu=\"0\",reason=\"hlt\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("keel_vcpu_exits_total{vcpu=\"1\",reason=\"io-out\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("keel_guest_memory_bytes 67108864\n"));
  EXPECT_THAT(text, HasSubstr("keel_process_resident_memory_bytes 4096\n"));
  EXPECT_THAT(text, HasSubstr("keel_vm_state{state=\"paused\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("keel_vm_state{state=\"running\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("keel_vm_boots_total 2\n"));
  // Every sample line belongs to a family announced before it.
  EXPECT_EQ(text.back(), '\n');
}

TEST(PrometheusTest, RendersDeviceCountersOneFamilyPerName) {
  nlohmann::json metrics = nlohmann::json::parse(R"({"devices": [
      {"type": "virtio-blk", "address": "0000:00:01.0",
       "counters": {"read_bytes": 4096, "queue_notifications": 3}},
      {"type": "virtio-net", "address": "0000:00:02.0",
       "counters": {"queue_notifications": 5, "Bad-Name": 1, "negative": -1}}]})");
  std::string text = prometheus_text(metrics);
  EXPECT_THAT(text, HasSubstr("# TYPE keel_virtio_read_bytes_total counter\n"
                              "keel_virtio_read_bytes_total{device=\"virtio-blk\","
                              "address=\"0000:00:01.0\"} 4096\n"));
  // Both devices' samples under one family header.
  EXPECT_THAT(text, HasSubstr("# TYPE keel_virtio_queue_notifications_total counter\n"
                              "keel_virtio_queue_notifications_total{device=\"virtio-blk\","
                              "address=\"0000:00:01.0\"} 3\n"
                              "keel_virtio_queue_notifications_total{device=\"virtio-net\","
                              "address=\"0000:00:02.0\"} 5\n"));
  EXPECT_EQ(text.find("Bad-Name"), std::string::npos) << "names that are no metric names are left out";
  EXPECT_EQ(text.find("negative"), std::string::npos);
}

}  // namespace
}  // namespace keel::api

namespace keel::api {
namespace {

std::string snapshot_field(std::string_view body) {
  auto parsed = parse_snapshot_body(body);
  const ApiError* error = std::get_if<ApiError>(&parsed);
  return error == nullptr ? "" : error->field;
}

// Counters as LatencyHistogram lays them out: 2 samples up to 10 us, 1 up
// to 100 us, 1 beyond 1 s.
nlohmann::json latency_counters() {
  return nlohmann::json::parse(R"({"requests": 4,
      "request_latency_us_bucket_le_10": 2, "request_latency_us_bucket_le_100": 3,
      "request_latency_us_bucket_le_1000000": 3, "request_latency_us_bucket_le_inf": 4,
      "request_latency_us_sum_us": 2000070, "request_latency_us_count": 4})");
}

TEST(PrometheusTest, LatencyCountersAreAHistogramInSeconds) {
  nlohmann::json metrics = {{"devices", {{{"type", "virtio-blk"},
                                          {"address", "0000:00:01.0"},
                                          {"counters", latency_counters()}}}}};
  std::string text = prometheus_text(metrics);
  const std::string labels = "device=\"virtio-blk\",address=\"0000:00:01.0\"";
  EXPECT_THAT(text, HasSubstr("# TYPE keel_virtio_request_latency_seconds histogram\n"));
  EXPECT_THAT(text, HasSubstr("keel_virtio_request_latency_seconds_bucket{" + labels +
                              ",le=\"1e-05\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("keel_virtio_request_latency_seconds_bucket{" + labels +
                              ",le=\"0.0001\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("keel_virtio_request_latency_seconds_bucket{" + labels +
                              ",le=\"+Inf\"} 4\n"));
  EXPECT_THAT(text, HasSubstr("keel_virtio_request_latency_seconds_sum{" + labels + "} 2.00007\n"));
  EXPECT_THAT(text, HasSubstr("keel_virtio_request_latency_seconds_count{" + labels + "} 4\n"));
  EXPECT_THAT(text, HasSubstr("keel_virtio_requests_total{" + labels + "} 4\n"));
  EXPECT_EQ(text.find("bucket_le"), std::string::npos) << "no bucket is a counter of its own";
  EXPECT_EQ(text.find("latency_us"), std::string::npos) << text;
}

TEST(PrometheusTest, LatencySummariesEstimateQuantilesFromBuckets) {
  nlohmann::json summaries = latency_summaries(latency_counters());
  ASSERT_TRUE(summaries.contains("request_latency_us")) << summaries.dump();
  const nlohmann::json& summary = summaries["request_latency_us"];
  EXPECT_EQ(summary["count"], 4);
  EXPECT_DOUBLE_EQ(summary["mean_us"].get<double>(), 500017.5);
  // Rank 2 of 4 is the last of the first bucket's 2: its upper bound.
  EXPECT_DOUBLE_EQ(summary["p50_us"].get<double>(), 10.0);
  // Rank 3.96 falls in +Inf: the last finite bound.
  EXPECT_DOUBLE_EQ(summary["p99_us"].get<double>(), 1e6);
  EXPECT_TRUE(latency_summaries(nlohmann::json{{"requests", 1}}).empty());
  nlohmann::json none = latency_summaries(nlohmann::json::parse(
      R"({"x_us_bucket_le_10": 0, "x_us_bucket_le_inf": 0, "x_us_sum_us": 0, "x_us_count": 0})"));
  EXPECT_EQ(none["x_us"]["p99_us"], 0.0);
  // Within a bucket, linearly: 4 samples in (10, 100] us, p50 at rank 2.
  nlohmann::json spread = latency_summaries(nlohmann::json::parse(
      R"({"y_bucket_le_10": 0, "y_bucket_le_100": 4, "y_bucket_le_inf": 4, "y_count": 4})"));
  EXPECT_DOUBLE_EQ(spread["y"]["p50_us"].get<double>(), 55.0);
}

TEST(RoutesTest, SnapshotBodyTakesOneAbsolutePath) {
  auto parsed = parse_snapshot_body(R"({"path": "/var/lib/keel/vm1.snap"})");
  ASSERT_TRUE(std::holds_alternative<std::string>(parsed));
  EXPECT_EQ(std::get<std::string>(parsed), "/var/lib/keel/vm1.snap");
}

TEST(RoutesTest, SnapshotBodyRefusalsNameTheField) {
  EXPECT_EQ(snapshot_field(""), "body");
  EXPECT_EQ(snapshot_field("[1]"), "body");
  EXPECT_EQ(snapshot_field("{"), "body");
  EXPECT_EQ(snapshot_field("{}"), "path");
  EXPECT_EQ(snapshot_field(R"({"path": null})"), "path");
  EXPECT_EQ(snapshot_field(R"({"path": ""})"), "path");
  EXPECT_EQ(snapshot_field(R"({"path": "vm.snap"})"), "path");
  EXPECT_EQ(snapshot_field(R"({"path": "/tmp/"})"), "path");
  EXPECT_EQ(snapshot_field(R"({"path": "/tmp/a\nb"})"), "path");
  EXPECT_EQ(snapshot_field(R"({"path": "/tmp/a", "zstd": 1})"), "zstd");
  EXPECT_EQ(snapshot_field(nlohmann::json{{"path", "/" + std::string(5000, 'a')}}.dump()), "path");
}

constexpr std::string_view kSomeConfigFields[] = {"kernel", "cpus", "disks"};

TEST(RoutesTest, ConfigBodyIsAnObjectOfKnownKeys) {
  EXPECT_FALSE(check_config_body(R"({"kernel": "/k", "cpus": "two"})", kSomeConfigFields))
      << "values are the machine side's to check";
  EXPECT_FALSE(check_config_body("{}", kSomeConfigFields));
  for (auto [body, field] : {std::pair{"", "body"}, std::pair{"{", "body"},
                             std::pair{"[]", "body"}, std::pair{"3", "body"},
                             std::pair{R"({"kernel": "/k", "memory": 64})", "memory"}}) {
    std::optional<ApiError> error = check_config_body(body, kSomeConfigFields);
    ASSERT_TRUE(error) << body;
    EXPECT_EQ(error->status, 400u);
    EXPECT_EQ(error->field, field) << body;
  }
}

TEST(RoutesTest, FieldNamedByAMachineSideMessage) {
  EXPECT_EQ(field_named_by("cpus: must be at least 1", kSomeConfigFields), "cpus");
  EXPECT_EQ(field_named_by("disks[0] (/d): cannot open", kSomeConfigFields), "disks");
  EXPECT_EQ(field_named_by("kernel \"x\" is bad", kSomeConfigFields), "kernel");
  EXPECT_EQ(field_named_by("cpusx: no", kSomeConfigFields), "");
  EXPECT_EQ(field_named_by("cpus", kSomeConfigFields), "");
  EXPECT_EQ(field_named_by("the VM is running", kSomeConfigFields), "");
}

}  // namespace
}  // namespace keel::api

namespace keel::api {
namespace {

const Route& route_for(std::string_view path) {
  Routed routed = route_request("PUT", path);
  EXPECT_NE(routed.route, nullptr) << path;
  return *routed.route;
}

// The field a hotplug body's 400 names, or "" if the body is accepted.
std::string device_field(std::string_view path, std::string_view body) {
  auto parsed = parse_device_body(route_for(path), body);
  const ApiError* error = std::get_if<ApiError>(&parsed);
  if (error != nullptr) {
    EXPECT_EQ(error->status, 400u) << body;
  }
  return error == nullptr ? "" : error->field;
}

TEST(RoutesTest, HotplugRoutesCarryTheirCommands) {
  EXPECT_EQ(route_for("/api/v1/vm/disks").command, CommandKind::AddDisk);
  EXPECT_EQ(route_for("/api/v1/vm/disks/remove").command, CommandKind::RemoveDisk);
  EXPECT_EQ(route_for("/api/v1/vm/disks/resize").command, CommandKind::ResizeDisk);
  EXPECT_EQ(route_for("/api/v1/vm/nets").command, CommandKind::AddNet);
  EXPECT_EQ(route_for("/api/v1/vm/nets/remove").command, CommandKind::RemoveNet);
  EXPECT_NE(route_request("GET", "/api/v1/vm/disks").error, std::nullopt);
}

TEST(RoutesTest, AddDiskBody) {
  auto parsed = parse_device_body(
      route_for("/api/v1/vm/disks"),
      R"({"id": "data-1", "path": "/var/lib/keel/d.qcow2", "format": "qcow2", "readonly": true})");
  ASSERT_TRUE(std::holds_alternative<DeviceRequest>(parsed));
  const auto& request = std::get<DeviceRequest>(parsed);
  EXPECT_EQ(request.id, "data-1");
  EXPECT_EQ(request.path, "/var/lib/keel/d.qcow2");
  EXPECT_EQ(request.format, "qcow2");
  EXPECT_TRUE(request.read_only);
  auto defaults = parse_device_body(route_for("/api/v1/vm/disks"), R"({"id": "d", "path": "/d"})");
  ASSERT_TRUE(std::holds_alternative<DeviceRequest>(defaults));
  EXPECT_EQ(std::get<DeviceRequest>(defaults).format, "auto");
  EXPECT_FALSE(std::get<DeviceRequest>(defaults).read_only);
}

TEST(RoutesTest, AddDiskRefusalsNameTheField) {
  const char* disks = "/api/v1/vm/disks";
  EXPECT_EQ(device_field(disks, ""), "body");
  EXPECT_EQ(device_field(disks, "[]"), "body");
  EXPECT_EQ(device_field(disks, R"({"path": "/d"})"), "id");
  EXPECT_EQ(device_field(disks, R"({"id": "", "path": "/d"})"), "id");
  EXPECT_EQ(device_field(disks, R"({"id": "a/b", "path": "/d"})"), "id");
  EXPECT_EQ(device_field(disks, R"({"id": 7, "path": "/d"})"), "id");
  EXPECT_EQ(device_field(disks, nlohmann::json{{"id", std::string(33, 'a')}, {"path", "/d"}}.dump()),
            "id");
  EXPECT_EQ(device_field(disks, R"({"id": "d"})"), "path");
  EXPECT_EQ(device_field(disks, R"({"id": "d", "path": "rel/d"})"), "path");
  EXPECT_EQ(device_field(disks, R"({"id": "d", "path": "/d", "format": "vmdk"})"), "format");
  EXPECT_EQ(device_field(disks, R"({"id": "d", "path": "/d", "readonly": "yes"})"), "readonly");
  EXPECT_EQ(device_field(disks, R"({"id": "d", "path": "/d", "tap": "t0"})"), "tap");
  EXPECT_EQ(device_field(disks, R"({"id": "d", "path": "/d", "slot": 0})"), "slot");
  EXPECT_EQ(device_field(disks, R"({"id": "d", "path": "/d", "slot": 32})"), "slot");
  EXPECT_EQ(device_field(disks, R"({"id": "d", "path": "/d", "slot": -1})"), "slot");
  EXPECT_EQ(device_field(disks, R"({"id": "d", "path": "/d", "slot": "3"})"), "slot");
  EXPECT_EQ(device_field("/api/v1/vm/nets", R"({"id": "n", "tap": "t0", "slot": 40})"), "slot");
  EXPECT_EQ(device_field("/api/v1/vm/disks/resize", R"({"id": "d", "size_bytes": 512, "slot": 3})"),
            "slot") << "only a plug takes a slot";
}

// A plug may name its PCI slot (1-31); without one, the lowest free slot.
TEST(RoutesTest, PlugBodiesTakeASlot) {
  auto disk = parse_device_body(route_for("/api/v1/vm/disks"),
                                R"({"id": "d", "path": "/d", "slot": 31})");
  ASSERT_TRUE(std::holds_alternative<DeviceRequest>(disk));
  EXPECT_EQ(std::get<DeviceRequest>(disk).slot, std::optional<uint8_t>(31));
  auto nic = parse_device_body(route_for("/api/v1/vm/nets"), R"({"id": "n", "tap": "t0", "slot": 1})");
  ASSERT_TRUE(std::holds_alternative<DeviceRequest>(nic));
  EXPECT_EQ(std::get<DeviceRequest>(nic).slot, std::optional<uint8_t>(1));
  auto unslotted = parse_device_body(route_for("/api/v1/vm/nets"), R"({"id": "n", "tap": "t0"})");
  ASSERT_TRUE(std::holds_alternative<DeviceRequest>(unslotted));
  EXPECT_FALSE(std::get<DeviceRequest>(unslotted).slot.has_value());
}

TEST(RoutesTest, ResizeAndRemoveBodies) {
  const char* resize = "/api/v1/vm/disks/resize";
  auto parsed = parse_device_body(route_for(resize), R"({"id": "d", "size_bytes": 1073741824})");
  ASSERT_TRUE(std::holds_alternative<DeviceRequest>(parsed));
  EXPECT_EQ(std::get<DeviceRequest>(parsed).size_bytes, 1073741824u);
  EXPECT_EQ(device_field(resize, R"({"id": "d"})"), "size_bytes");
  EXPECT_EQ(device_field(resize, R"({"id": "d", "size_bytes": 0})"), "size_bytes");
  EXPECT_EQ(device_field(resize, R"({"id": "d", "size_bytes": 1000})"), "size_bytes");
  EXPECT_EQ(device_field(resize, R"({"id": "d", "size_bytes": -512})"), "size_bytes");
  EXPECT_EQ(device_field(resize, R"({"id": "d", "size_bytes": 1.5e9})"), "size_bytes");

  for (const char* remove : {"/api/v1/vm/disks/remove", "/api/v1/vm/nets/remove"}) {
    auto removed = parse_device_body(route_for(remove), R"({"id": "d"})");
    ASSERT_TRUE(std::holds_alternative<DeviceRequest>(removed));
    EXPECT_EQ(std::get<DeviceRequest>(removed).timeout_ms, kDefaultEjectTimeoutMs);
    EXPECT_EQ(device_field(remove, R"({"id": "d", "timeout_ms": 5000})"), "");
    EXPECT_EQ(device_field(remove, R"({"id": "d", "timeout_ms": 0})"), "timeout_ms");
    EXPECT_EQ(device_field(remove, R"({"id": "d", "timeout_ms": 600001})"), "timeout_ms");
    EXPECT_EQ(device_field(remove, R"({"id": "d", "path": "/d"})"), "path");
    EXPECT_EQ(device_field(remove, R"({})"), "id");
  }
}

TEST(RoutesTest, AddNetBody) {
  const char* nets = "/api/v1/vm/nets";
  auto parsed =
      parse_device_body(route_for(nets), R"({"id": "n1", "tap": "tap-1", "mac": "52:54:00:ab:cd:EF"})");
  ASSERT_TRUE(std::holds_alternative<DeviceRequest>(parsed));
  EXPECT_EQ(std::get<DeviceRequest>(parsed).tap, "tap-1");
  EXPECT_EQ(std::get<DeviceRequest>(parsed).mac, "52:54:00:ab:cd:EF");
  EXPECT_EQ(device_field(nets, R"({"id": "n1", "tap": "t"})"), "");
  EXPECT_EQ(device_field(nets, R"({"id": "n1"})"), "tap");
  EXPECT_EQ(device_field(nets, R"({"id": "n1", "tap": "a-very-long-name0"})"), "tap");
  EXPECT_EQ(device_field(nets, R"({"id": "n1", "tap": "../x"})"), "tap");
  EXPECT_EQ(device_field(nets, R"({"id": "n1", "tap": "t", "mac": "52:54:00:ab:cd"})"), "mac");
  EXPECT_EQ(device_field(nets, R"({"id": "n1", "tap": "t", "mac": "52-54-00-ab-cd-ef"})"), "mac");
  EXPECT_EQ(device_field(nets, R"({"id": "n1", "tap": "t", "mac": "zz:54:00:ab:cd:ef"})"), "mac");
}

}  // namespace
}  // namespace keel::api

namespace keel::api {
namespace {

// The field a restore or receive body's 400 names, or "" if it is accepted.
template <typename Parse>
std::string refused_field(Parse parse, std::string_view body) {
  auto parsed = parse(body);
  const ApiError* error = std::get_if<ApiError>(&parsed);
  if (error != nullptr) {
    EXPECT_EQ(error->status, 400u) << body;
  }
  return error == nullptr ? "" : error->field;
}

TEST(RoutesTest, RestoreAndReceiveAreRoutesOfTheirOwn) {
  EXPECT_EQ(route_request("PUT", "/api/v1/vm/restore").route->command, CommandKind::Restore);
  EXPECT_EQ(route_request("PUT", "/api/v1/vm/receive").route->command, CommandKind::Receive);
  EXPECT_EQ(route_request("GET", "/api/v1/vm/restore").error->status, 405u);
}

TEST(RoutesTest, RestoreBody) {
  auto parsed = parse_restore_body(R"({"path": "/var/lib/keel/vm.snap"})");
  ASSERT_TRUE(std::holds_alternative<RestoreRequest>(parsed));
  EXPECT_EQ(std::get<RestoreRequest>(parsed).path, "/var/lib/keel/vm.snap");
  EXPECT_FALSE(std::get<RestoreRequest>(parsed).paused);
  EXPECT_EQ(std::get<RestoreRequest>(parsed).serial, "") << "the snapshot's own console";
  parsed = parse_restore_body(R"({"path": "/s", "paused": true, "serial": "file:/tmp/c"})");
  ASSERT_TRUE(std::holds_alternative<RestoreRequest>(parsed));
  EXPECT_TRUE(std::get<RestoreRequest>(parsed).paused);
  EXPECT_EQ(std::get<RestoreRequest>(parsed).serial, "file:/tmp/c");
}

TEST(RoutesTest, RestoreRefusalsNameTheField) {
  auto parse = [](std::string_view body) { return parse_restore_body(body); };
  EXPECT_EQ(refused_field(parse, "["), "body");
  EXPECT_EQ(refused_field(parse, "{}"), "path");
  EXPECT_EQ(refused_field(parse, R"({"path": "vm.snap"})"), "path");
  EXPECT_EQ(refused_field(parse, R"({"path": 3})"), "path");
  EXPECT_EQ(refused_field(parse, R"({"path": "/s", "paused": "yes"})"), "paused");
  EXPECT_EQ(refused_field(parse, R"({"path": "/s", "serial": ""})"), "serial");
  EXPECT_EQ(refused_field(parse, R"({"path": "/s", "serial": 1})"), "serial");
  EXPECT_EQ(refused_field(parse, R"({"path": "/s", "cpus": 2})"), "cpus");
}

TEST(RoutesTest, ReceiveBody) {
  auto parsed = parse_receive_body(R"({"source": "tcp:0.0.0.0:4444"})");
  ASSERT_TRUE(std::holds_alternative<std::string>(parsed));
  EXPECT_EQ(std::get<std::string>(parsed), "tcp:0.0.0.0:4444");
  auto parse = [](std::string_view body) { return parse_receive_body(body); };
  EXPECT_EQ(refused_field(parse, R"({"source": "unix:/run/keel/m.sock"})"), "");
  EXPECT_EQ(refused_field(parse, "{}"), "source");
  EXPECT_EQ(refused_field(parse, R"({"source": "/run/m.sock"})"), "source");
  EXPECT_EQ(refused_field(parse, R"({"source": ["unix:/x"]})"), "source");
  EXPECT_EQ(refused_field(parse, R"({"source": "unix:/x", "destination": "unix:/y"})"),
            "destination");
}

}  // namespace
}  // namespace keel::api
