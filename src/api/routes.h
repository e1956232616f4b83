// The control API's route table, the one list of what the server serves
// (the OpenAPI test checks docs/api/openapi.json against it), and the
// request checks that need no machine: target and query parsing, bodies,
// and the JSON error every 4xx/5xx carries.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "api/command.h"

namespace keel::api {

enum class RouteId {
  Version,
  GetVm,
  GetDevices,
  GetMetrics,
  PrometheusMetrics,
  Pause,
  Resume,
  Reset,
  Stop,
  Balloon,
  PowerButton,
  Snapshot,
  AddDisk,
  RemoveDisk,
  ResizeDisk,
  AddNet,
  RemoveNet,
  Migrate,
  GetMigration,
  CancelMigration,
  Events,
  GetConfig,
  PutConfig,
  Start,
  Restore,
  Receive,
};

struct Route {
  std::string_view method;  // "GET", "PUT"
  std::string_view path;    // exact, no parameters in the path
  RouteId id;
  // The command the machine side answers, if any (Version and Events are
  // served by the API thread alone).
  std::optional<CommandKind> command;
  // Query parameters the route accepts; any other is a 400 naming it.
  std::span<const std::string_view> query_parameters;
  // Fields of the JSON body the route takes (none: an empty body or {}).
  // A 400 from the machine side for a route with one field names it.
  std::span<const std::string_view> body_fields;
};

std::span<const Route> routes();

// {"error": {"status": 400, "code": "BadRequest", "message": ..., "field": ...}}
struct ApiError {
  unsigned status = 400;
  std::string message;
  std::string field;  // the request field at fault, if one is
  nlohmann::json to_json() const;
};

// "BadRequest", "NotFound", "MethodNotAllowed", "Conflict", ... for a status.
std::string_view status_code_name(unsigned status);
ApiError error_from(const Error& error);

using Query = std::vector<std::pair<std::string, std::string>>;

struct Routed {
  const Route* route = nullptr;  // set on success
  Query query;
  std::optional<ApiError> error;  // 400, 404 or 405 otherwise
  std::string allow;              // for a 405: the methods the path takes
};

// Matches the method and request target ("/api/v1/events?after=3").
Routed route_request(std::string_view method, std::string_view target);

// The action routes (PUT pause/resume/reset/stop/power-button) take no parameters: an
// empty body or an empty JSON object. Anything else is a 400 naming the
// first unexpected field.
std::optional<ApiError> check_empty_body(std::string_view body);

// PUT /api/v1/vm/balloon: {"target_mib": N}, N a whole number of MiB the
// balloon should hold (0 gives everything back). The bound by the guest's
// RAM is the machine side's to check. bad_field names the field at fault.
Result<uint64_t> parse_balloon_body(std::string_view body, std::string& bad_field);
// PUT /api/v1/vm/snapshot: {"path": "/abs/file"}, nothing else. The path
// must be absolute, at most 4096 bytes, without NUL or control characters,
// and not end in '/'; a 400 names the field at fault otherwise.
std::variant<std::string, ApiError> parse_snapshot_body(std::string_view body);
// {"destination": "unix:PATH" | "tcp:HOST:PORT", "downtime_ms": N,
//  "bandwidth_mib": N, "compress": bool, "migrate_disks": bool, "auto_converge": bool,
//  "postcopy": bool}:
//  destination required, the rest optional (auto_converge on unless false);
//  errors name the field.
std::variant<MigrateRequest, ApiError> parse_migrate_body(std::string_view body);
// PUT /api/v1/vm/restore: {"path": "/abs/file.snap", "paused": bool,
// "serial": "stdio" | "none" | "file:PATH" | "unix:PATH"}: path required (as
// parse_snapshot_body's), the rest optional; errors name the field.
std::variant<RestoreRequest, ApiError> parse_restore_body(std::string_view body);
// PUT /api/v1/vm/receive: {"source": "unix:PATH" | "tcp:HOST:PORT"}, required.
std::variant<std::string, ApiError> parse_receive_body(std::string_view body);

// The hotplug routes' bodies (PUT /api/v1/vm/disks, disks/remove,
// disks/resize, nets, nets/remove): a JSON object with only the route's
// body_fields. id: 1-32 of [A-Za-z0-9_-], required everywhere. disks: path
// (as parse_snapshot_body's), format (auto, raw, qcow2; default auto),
// readonly (bool). disks/resize: size_bytes, a positive multiple of 512.
// nets: tap (an interface name, 1-15 of [A-Za-z0-9_.-]), mac
// (xx:xx:xx:xx:xx:xx). remove: timeout_ms, 1 to 600000 (default 30000),
// how long the guest has to eject. A 400 names the field at fault.
inline constexpr uint64_t kDefaultEjectTimeoutMs = 30000;
std::variant<DeviceRequest, ApiError> parse_device_body(const Route& route, std::string_view body);
// PUT /api/v1/vm/config, on the API thread: the body must be a JSON object
// whose keys are all the route's body_fields (the config schema's keys); a
// 400 names the body or the unknown key. Values are the machine side's to check.
std::optional<ApiError> check_config_body(std::string_view body, std::span<const std::string_view> fields);

// The field a machine-side 400 names for a route with several body fields:
// the one its message starts with (followed by ':', '[' or ' '), or "".
std::string field_named_by(std::string_view message, std::span<const std::string_view> fields);

struct EventsQuery {
  uint64_t after = 0;  // send events with seq > after
  bool follow = true;  // keep the stream open for new events
};
// after: a decimal sequence number; follow: true or false.
Result<EventsQuery> parse_events_query(const Query& query, std::string& bad_field);

}  // namespace keel::api
