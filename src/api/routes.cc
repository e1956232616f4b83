#include "api/routes.h"

#include <algorithm>
#include <array>
#include <charconv>

#include <fmt/format.h>

namespace keel::api {
namespace {

constexpr std::string_view kEventsParameters[] = {"after", "follow"};
constexpr std::string_view kBalloonFields[] = {"target_mib"};
constexpr std::string_view kSnapshotFields[] = {"path"};
constexpr std::string_view kAddDiskFields[] = {"id", "path", "format", "readonly", "slot"};
constexpr std::string_view kResizeDiskFields[] = {"id", "size_bytes"};
constexpr std::string_view kAddNetFields[] = {"id", "tap", "mac", "slot"};
constexpr std::string_view kRemoveFields[] = {"id", "timeout_ms"};
// The top-level keys of the VM config (docs/vm-config.md); a unit test holds
// them equal to machine::json_keys().
constexpr std::string_view kConfigFields[] = {
    "kernel",  "initrd", "cmdline", "cpus", "memory_mib", "memory_backend",
    "serial",  "reboot", "debug_exit", "acpi", "disks",   "nets",
    "rng",     "virtio_console", "balloon", "vsock", "slots"};
constexpr std::string_view kRestoreFields[] = {"path", "paused", "serial"};
constexpr std::string_view kReceiveFields[] = {"source"};
constexpr std::string_view kMigrateFields[] = {"destination", "downtime_ms", "bandwidth_mib",
                                               "compress", "migrate_disks", "auto_converge",
                                               "postcopy"};

const std::array kRoutes = {
    Route{"GET", "/api/v1/version", RouteId::Version, std::nullopt, {}, {}},
    Route{"GET", "/api/v1/vm", RouteId::GetVm, CommandKind::GetVm, {}, {}},
    Route{"GET", "/api/v1/vm/devices", RouteId::GetDevices, CommandKind::GetDevices, {}, {}},
    Route{"GET", "/api/v1/vm/metrics", RouteId::GetMetrics, CommandKind::GetMetrics, {}, {}},
    Route{"GET", "/metrics", RouteId::PrometheusMetrics, CommandKind::GetMetrics, {}, {}},
    Route{"PUT", "/api/v1/vm/pause", RouteId::Pause, CommandKind::Pause, {}, {}},
    Route{"PUT", "/api/v1/vm/resume", RouteId::Resume, CommandKind::Resume, {}, {}},
    Route{"PUT", "/api/v1/vm/reset", RouteId::Reset, CommandKind::Reset, {}, {}},
    Route{"PUT", "/api/v1/vm/stop", RouteId::Stop, CommandKind::Stop, {}, {}},
    Route{"PUT", "/api/v1/vm/power-button", RouteId::PowerButton, CommandKind::PowerButton, {},
          {}},
    Route{"PUT", "/api/v1/vm/balloon", RouteId::Balloon, CommandKind::SetBalloon, {},
          kBalloonFields},
    Route{"PUT", "/api/v1/vm/snapshot", RouteId::Snapshot, CommandKind::Snapshot, {},
          kSnapshotFields},
    Route{"PUT", "/api/v1/vm/disks", RouteId::AddDisk, CommandKind::AddDisk, {}, kAddDiskFields},
    Route{"PUT", "/api/v1/vm/disks/remove", RouteId::RemoveDisk, CommandKind::RemoveDisk, {},
          kRemoveFields},
    Route{"PUT", "/api/v1/vm/disks/resize", RouteId::ResizeDisk, CommandKind::ResizeDisk, {},
          kResizeDiskFields},
    Route{"PUT", "/api/v1/vm/nets", RouteId::AddNet, CommandKind::AddNet, {}, kAddNetFields},
    Route{"PUT", "/api/v1/vm/nets/remove", RouteId::RemoveNet, CommandKind::RemoveNet, {},
          kRemoveFields},
    Route{"PUT", "/api/v1/vm/migrate", RouteId::Migrate, CommandKind::Migrate, {},
          kMigrateFields},
    Route{"GET", "/api/v1/vm/migrate", RouteId::GetMigration, CommandKind::GetMigration, {}, {}},
    Route{"DELETE", "/api/v1/vm/migrate", RouteId::CancelMigration,
          CommandKind::CancelMigration, {}, {}},
    Route{"GET", "/api/v1/events", RouteId::Events, std::nullopt, kEventsParameters, {}},
    Route{"GET", "/api/v1/vm/config", RouteId::GetConfig, CommandKind::GetConfig, {}, {}},
    Route{"PUT", "/api/v1/vm/config", RouteId::PutConfig, CommandKind::Configure, {},
          kConfigFields},
    Route{"PUT", "/api/v1/vm/start", RouteId::Start, CommandKind::Start, {}, {}},
    Route{"PUT", "/api/v1/vm/restore", RouteId::Restore, CommandKind::Restore, {},
          kRestoreFields},
    Route{"PUT", "/api/v1/vm/receive", RouteId::Receive, CommandKind::Receive, {},
          kReceiveFields},
};

// Query values here are numbers and words; anything needing escapes is
// refused rather than decoded.
bool plain(std::string_view text) {
  for (char c : text) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.';
    if (!ok) return false;
  }
  return true;
}

}  // namespace

std::span<const Route> routes() { return kRoutes; }

std::string_view status_code_name(unsigned status) {
  switch (status) {
    case 400: return "BadRequest";
    case 403: return "Forbidden";
    case 404: return "NotFound";
    case 405: return "MethodNotAllowed";
    case 408: return "RequestTimeout";
    case 409: return "Conflict";
    case 413: return "PayloadTooLarge";
    case 431: return "HeaderTooLarge";
    case 500: return "Internal";
    case 501: return "NotImplemented";
    case 503: return "Unavailable";
    case 504: return "GatewayTimeout";
  }
  return "Error";
}

nlohmann::json ApiError::to_json() const {
  nlohmann::json error = {
      {"status", status}, {"code", status_code_name(status)}, {"message", message}};
  if (!field.empty()) error["field"] = field;
  return {{"error", error}};
}

ApiError error_from(const Error& error) {
  return ApiError{http_status_for(error.code()), error.context(), ""};
}

Routed route_request(std::string_view method, std::string_view target) {
  Routed routed;
  size_t question = target.find('?');
  std::string_view path = target.substr(0, question);
  std::string_view query_text =
      question == std::string_view::npos ? std::string_view() : target.substr(question + 1);
  std::string allow;
  const Route* match = nullptr;
  for (const Route& route : kRoutes) {
    if (route.path != path) continue;
    if (route.method == method) {
      match = &route;
    } else {
      if (!allow.empty()) allow += ", ";
      allow += route.method;
    }
  }
  if (match == nullptr) {
    if (!allow.empty()) {
      routed.allow = allow;
      routed.error = ApiError{405, fmt::format("{} takes {}, not {}", path, allow, method), ""};
    } else {
      routed.error = ApiError{404, fmt::format("no route {}", path), ""};
    }
    return routed;
  }
  while (!query_text.empty()) {
    size_t amp = query_text.find('&');
    std::string_view pair = query_text.substr(0, amp);
    query_text = amp == std::string_view::npos ? std::string_view() : query_text.substr(amp + 1);
    if (pair.empty()) continue;
    size_t equals = pair.find('=');
    std::string_view key = pair.substr(0, equals);
    std::string_view value =
        equals == std::string_view::npos ? std::string_view() : pair.substr(equals + 1);
    if (!plain(key) || !plain(value)) {
      routed.error = ApiError{400, "query parameters must be plain words or numbers",
                              plain(key) ? std::string(key) : std::string("query")};
      return routed;
    }
    bool known = false;
    for (std::string_view name : match->query_parameters) known = known || name == key;
    if (!known) {
      routed.error = ApiError{400, fmt::format("{} takes no query parameter '{}'", path, key),
                              std::string(key)};
      return routed;
    }
    routed.query.emplace_back(key, value);
  }
  routed.route = match;
  return routed;
}

std::optional<ApiError> check_empty_body(std::string_view body) {
  if (body.find_first_not_of(" \t\r\n") == std::string_view::npos) return std::nullopt;
  nlohmann::json json = nlohmann::json::parse(body, nullptr, false);
  if (json.is_discarded()) return ApiError{400, "the body is not valid JSON", "body"};
  if (!json.is_object()) return ApiError{400, "the body must be a JSON object", "body"};
  if (!json.empty()) {
    std::string field = json.begin().key();
    return ApiError{400, fmt::format("unknown field '{}': this action takes none", field), field};
  }
  return std::nullopt;
}

Result<uint64_t> parse_balloon_body(std::string_view body, std::string& bad_field) {
  bad_field = "body";
  nlohmann::json json = nlohmann::json::parse(body, nullptr, false);
  if (json.is_discarded()) return fail(Errc::InvalidArgument, "the body is not valid JSON");
  if (!json.is_object()) {
    return fail(Errc::InvalidArgument, "the body must be a JSON object: {\"target_mib\": N}");
  }
  for (const auto& [key, value] : json.items()) {
    if (key != "target_mib") {
      bad_field = key;
      return fail(Errc::InvalidArgument,
                  fmt::format("unknown field '{}': the balloon takes only target_mib", key));
    }
  }
  bad_field = "target_mib";
  auto field = json.find("target_mib");
  if (field == json.end()) return fail(Errc::InvalidArgument, "target_mib is missing");
  // Integers only: nlohmann keeps 2^64 and beyond, fractions and exponents
  // as floating point, and negatives as signed.
  if (!field->is_number_unsigned()) {
    return fail(Errc::InvalidArgument,
                fmt::format("target_mib: {} is not a whole number of MiB (0 or more)",
                            field->dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)));
  }
  bad_field.clear();
  return field->get<uint64_t>();
}

namespace {

// An absolute file path: at most 4096 bytes, no control characters, not
// ending in '/'.
std::optional<ApiError> check_file_path(const std::string& path) {
  constexpr size_t kMaxPathBytes = 4096;
  if (path.empty() || path.front() != '/') {
    return ApiError{400, fmt::format("path: '{}' is not an absolute path", path), "path"};
  }
  if (path.size() > kMaxPathBytes) {
    return ApiError{400, fmt::format("path: {} bytes, more than {}", path.size(), kMaxPathBytes),
                    "path"};
  }
  for (char c : path) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return ApiError{400, "path: contains a control character", "path"};
    }
  }
  if (path.back() == '/') {
    return ApiError{400, fmt::format("path: '{}' names a directory, not a file", path), "path"};
  }
  return std::nullopt;
}

// The body as a JSON object holding only fields, or the 400 to send.
std::variant<nlohmann::json, ApiError> parse_object(std::string_view body,
                                                    std::span<const std::string_view> fields,
                                                    std::string_view what) {
  nlohmann::json json = nlohmann::json::parse(body, nullptr, false);
  if (json.is_discarded()) return ApiError{400, "the body is not valid JSON", "body"};
  if (!json.is_object()) return ApiError{400, "the body must be a JSON object", "body"};
  for (const auto& [key, value] : json.items()) {
    if (std::find(fields.begin(), fields.end(), key) == fields.end()) {
      std::string names;
      for (std::string_view field : fields) {
        names += names.empty() ? "" : ", ";
        names += fmt::format("'{}'", field);
      }
      return ApiError{400, fmt::format("unknown field '{}': {} takes only {}", key, what, names),
                      key};
    }
  }
  return json;
}

// A migration stream's address as the API takes it; the machine side parses
// it (migration::parse_stream_address).
std::optional<ApiError> check_stream_address(const std::string& text, std::string_view field) {
  bool known = text.starts_with("unix:") || text.starts_with("tcp:");
  if (!known || text.size() > 4096) {
    return ApiError{400, fmt::format("{}: must be unix:PATH or tcp:HOST:PORT", field),
                    std::string(field)};
  }
  return std::nullopt;
}

bool all_of_chars(std::string_view text, std::string_view extra) {
  for (char c : text) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              extra.find(c) != std::string_view::npos;
    if (!ok) return false;
  }
  return true;
}

std::string shown(const nlohmann::json& value) {
  return value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

bool is_mac(std::string_view text) {
  if (text.size() != 17) return false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    const bool hex = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
    if (i % 3 == 2 ? c != ':' : !hex) return false;
  }
  return true;
}

}  // namespace

namespace {

// The required "path" field of a body, checked by check_file_path.
std::variant<std::string, ApiError> required_path(const nlohmann::json& json) {
  if (!json.contains("path")) return ApiError{400, "path: required", "path"};
  if (!json["path"].is_string()) return ApiError{400, "path: must be a string", "path"};
  std::string path = json["path"].get<std::string>();
  if (auto bad = check_file_path(path)) return *bad;
  return path;
}

}  // namespace

std::variant<std::string, ApiError> parse_snapshot_body(std::string_view body) {
  auto parsed = parse_object(body, kSnapshotFields, "snapshot");
  if (auto* bad = std::get_if<ApiError>(&parsed)) return *bad;
  return required_path(std::get<nlohmann::json>(parsed));
}

std::variant<RestoreRequest, ApiError> parse_restore_body(std::string_view body) {
  auto parsed = parse_object(body, kRestoreFields, "restore");
  if (auto* bad = std::get_if<ApiError>(&parsed)) return *bad;
  const nlohmann::json& json = std::get<nlohmann::json>(parsed);
  RestoreRequest request;
  auto path = required_path(json);
  if (auto* bad = std::get_if<ApiError>(&path)) return *bad;
  request.path = std::get<std::string>(std::move(path));
  if (json.contains("paused")) {
    if (!json["paused"].is_boolean()) return ApiError{400, "paused: must be true or false", "paused"};
    request.paused = json["paused"].get<bool>();
  }
  if (json.contains("serial")) {
    // Its form is the machine side's to check (machine::parse_serial).
    if (!json["serial"].is_string() || json["serial"].get<std::string>().empty() ||
        json["serial"].get<std::string>().size() > 4096) {
      return ApiError{400, "serial: must be stdio, none, file:PATH or unix:PATH", "serial"};
    }
    request.serial = json["serial"].get<std::string>();
  }
  return request;
}

std::variant<std::string, ApiError> parse_receive_body(std::string_view body) {
  auto parsed = parse_object(body, kReceiveFields, "receive");
  if (auto* bad = std::get_if<ApiError>(&parsed)) return *bad;
  const nlohmann::json& json = std::get<nlohmann::json>(parsed);
  if (!json.contains("source")) return ApiError{400, "source: required", "source"};
  if (!json["source"].is_string()) return ApiError{400, "source: must be a string", "source"};
  std::string source = json["source"].get<std::string>();
  if (auto bad = check_stream_address(source, "source")) return *bad;
  return source;
}

std::variant<DeviceRequest, ApiError> parse_device_body(const Route& route, std::string_view body) {
  auto parsed = parse_object(body, route.body_fields, route.path);
  if (auto* bad = std::get_if<ApiError>(&parsed)) return *bad;
  const nlohmann::json& json = std::get<nlohmann::json>(parsed);
  auto has = [&route](std::string_view field) {
    return std::find(route.body_fields.begin(), route.body_fields.end(), field) !=
           route.body_fields.end();
  };
  // A required string field's value, or the 400 naming it.
  auto text = [&json](const char* field, bool required) -> std::variant<std::string, ApiError> {
    if (!json.contains(field)) {
      if (required) return ApiError{400, fmt::format("{}: required", field), field};
      return std::string();
    }
    if (!json[field].is_string()) {
      return ApiError{400, fmt::format("{}: {} is not a string", field, shown(json[field])), field};
    }
    return json[field].get<std::string>();
  };
  auto number = [&json](const char* field) -> std::variant<std::optional<uint64_t>, ApiError> {
    if (!json.contains(field)) return std::optional<uint64_t>();
    if (!json[field].is_number_unsigned()) {
      return ApiError{400, fmt::format("{}: {} is not a whole number", field, shown(json[field])),
                      field};
    }
    return std::optional<uint64_t>(json[field].get<uint64_t>());
  };
#define KEEL_TAKE(variable, expression)                               \
  auto variable##_parsed = (expression);                              \
  if (auto* bad = std::get_if<ApiError>(&variable##_parsed)) return *bad; \
  auto variable = std::get<0>(std::move(variable##_parsed))

  DeviceRequest request;
  KEEL_TAKE(id, text("id", true));
  constexpr size_t kMaxIdBytes = 32;
  if (id.empty() || id.size() > kMaxIdBytes || !all_of_chars(id, "_-")) {
    return ApiError{400, fmt::format("id: '{}' is not 1-{} letters, digits, '_' or '-'", id,
                                     kMaxIdBytes), "id"};
  }
  request.id = std::move(id);
  if (has("path")) {
    KEEL_TAKE(path, text("path", true));
    if (auto bad = check_file_path(path)) return *bad;
    request.path = std::move(path);
  }
  if (has("format")) {
    KEEL_TAKE(format, text("format", false));
    if (!format.empty()) request.format = std::move(format);
    if (request.format != "auto" && request.format != "raw" && request.format != "qcow2") {
      return ApiError{400, fmt::format("format: '{}' is not auto, raw or qcow2", request.format),
                      "format"};
    }
  }
  if (has("readonly") && json.contains("readonly")) {
    if (!json["readonly"].is_boolean()) {
      return ApiError{400, fmt::format("readonly: {} is not true or false", shown(json["readonly"])),
                      "readonly"};
    }
    request.read_only = json["readonly"].get<bool>();
  }
  if (has("size_bytes")) {
    KEEL_TAKE(size, number("size_bytes"));
    if (!size) return ApiError{400, "size_bytes: required", "size_bytes"};
    if (*size == 0 || *size % 512 != 0) {
      return ApiError{400, fmt::format("size_bytes: {} is not a positive multiple of 512", *size),
                      "size_bytes"};
    }
    request.size_bytes = *size;
  }
  if (has("tap")) {
    KEEL_TAKE(tap, text("tap", true));
    constexpr size_t kMaxInterfaceName = 15;  // IFNAMSIZ - 1
    if (tap.empty() || tap.size() > kMaxInterfaceName || !all_of_chars(tap, "_.-")) {
      return ApiError{400, fmt::format("tap: '{}' is not an interface name (1-{} of letters, "
                                       "digits, '_', '.', '-')", tap, kMaxInterfaceName), "tap"};
    }
    request.tap = std::move(tap);
  }
  if (has("mac")) {
    KEEL_TAKE(mac, text("mac", false));
    if (json.contains("mac") && !is_mac(mac)) {
      return ApiError{400, fmt::format("mac: '{}' is not xx:xx:xx:xx:xx:xx", mac), "mac"};
    }
    request.mac = std::move(mac);
  }
  if (has("slot")) {
    KEEL_TAKE(slot, number("slot"));
    // 0 is the host bridge's; ACPI hotplug describes slots 1-31.
    constexpr uint64_t kFirstSlot = 1, kLastSlot = 31;
    if (slot && (*slot < kFirstSlot || *slot > kLastSlot)) {
      return ApiError{400, fmt::format("slot: {} is not {} to {}", *slot, kFirstSlot, kLastSlot),
                      "slot"};
    }
    if (slot) request.slot = static_cast<uint8_t>(*slot);
  }
  if (has("timeout_ms")) {
    KEEL_TAKE(timeout, number("timeout_ms"));
    constexpr uint64_t kMaxTimeoutMs = 600000;
    request.timeout_ms = timeout.value_or(kDefaultEjectTimeoutMs);
    if (request.timeout_ms == 0 || request.timeout_ms > kMaxTimeoutMs) {
      return ApiError{400, fmt::format("timeout_ms: {} is not 1 to {}", request.timeout_ms,
                                       kMaxTimeoutMs), "timeout_ms"};
    }
  }
#undef KEEL_TAKE
  return request;
}

std::optional<ApiError> check_config_body(std::string_view body,
                                          std::span<const std::string_view> fields) {
  nlohmann::json json = nlohmann::json::parse(body, nullptr, false);
  if (json.is_discarded()) return ApiError{400, "the body is not valid JSON", "body"};
  if (!json.is_object()) {
    return ApiError{400, "the body must be a JSON object: the VM config (docs/vm-config.md)",
                    "body"};
  }
  for (const auto& [key, value] : json.items()) {
    if (std::find(fields.begin(), fields.end(), key) == fields.end()) {
      return ApiError{400, fmt::format("unknown field '{}' (see docs/vm-config.md)", key), key};
    }
  }
  return std::nullopt;
}

std::string field_named_by(std::string_view message, std::span<const std::string_view> fields) {
  for (std::string_view field : fields) {
    if (message.size() > field.size() && message.starts_with(field) &&
        std::string_view(":[ ").find(message[field.size()]) != std::string_view::npos) {
      return std::string(field);
    }
  }
  return "";
}

std::variant<MigrateRequest, ApiError> parse_migrate_body(std::string_view body) {
  nlohmann::json json = nlohmann::json::parse(body, nullptr, false);
  if (json.is_discarded()) return ApiError{400, "the body is not valid JSON", "body"};
  if (!json.is_object()) return ApiError{400, "the body must be a JSON object", "body"};
  MigrateRequest request;
  for (const auto& [key, value] : json.items()) {
    if (key == "destination") {
      if (!value.is_string()) return ApiError{400, "destination: must be a string", key};
      request.destination = value.get<std::string>();
      if (auto bad = check_stream_address(request.destination, key)) return *bad;
    } else if (key == "downtime_ms" || key == "bandwidth_mib") {
      // Integers only, as for the balloon target.
      if (!value.is_number_unsigned()) {
        return ApiError{400, fmt::format("{}: must be a whole number, 0 or more", key), key};
      }
      uint64_t number = value.get<uint64_t>();
      if (key == "downtime_ms") {
        if (number < 1 || number > 60'000) {
          return ApiError{400, fmt::format("downtime_ms: {} is not from 1 to 60000", number), key};
        }
        request.downtime_ms = number;
      } else {
        if (number > (1u << 20)) {
          return ApiError{400, fmt::format("bandwidth_mib: {} is more than 1048576", number), key};
        }
        request.bandwidth_mib = number;
      }
    } else if (key == "compress") {
      if (!value.is_boolean()) return ApiError{400, "compress: must be true or false", key};
      request.compress = value.get<bool>();
    } else if (key == "migrate_disks") {
      if (!value.is_boolean()) return ApiError{400, "migrate_disks: must be true or false", key};
      request.migrate_disks = value.get<bool>();
    } else if (key == "auto_converge") {
      if (!value.is_boolean()) return ApiError{400, "auto_converge: must be true or false", key};
      request.auto_converge = value.get<bool>();
    } else if (key == "postcopy") {
      if (!value.is_boolean()) return ApiError{400, "postcopy: must be true or false", key};
      request.postcopy = value.get<bool>();
    } else {
      return ApiError{400,
                      fmt::format("unknown field '{}': migrate takes destination, downtime_ms, "
                                  "bandwidth_mib, compress, migrate_disks, auto_converge and postcopy",
                                  key),
                      key};
    }
  }
  if (request.destination.empty()) return ApiError{400, "destination: required", "destination"};
  return request;
}

Result<EventsQuery> parse_events_query(const Query& query, std::string& bad_field) {
  EventsQuery parsed;
  for (const auto& [key, value] : query) {
    bad_field = key;
    if (key == "after") {
      const char* end = value.data() + value.size();
      auto [pointer, error] = std::from_chars(value.data(), end, parsed.after);
      if (value.empty() || error != std::errc() || pointer != end) {
        return fail(Errc::InvalidArgument,
                    fmt::format("after: '{}' is not a sequence number (0 or more)", value));
      }
    } else if (key == "follow") {
      if (value != "true" && value != "false") {
        return fail(Errc::InvalidArgument, fmt::format("follow: '{}' is not true or false", value));
      }
      parsed.follow = value == "true";
    }
  }
  bad_field.clear();
  return parsed;
}

}  // namespace keel::api
