// keelctl: the command line for Keel. `keelctl vm ...` drives one
// keel-vmm through its control API socket (--api-socket): human tables by
// default, the API's JSON with --json.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "api/client.h"
#include "base/check.h"

namespace keel::keelctl {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitRefused = 1;
constexpr int kExitUsage = 2;
constexpr int kExitUnreachable = 3;

constexpr const char* kFooter = R"(
Exit status:
  0  done
  1  keel-vmm refused the request (the message says why, e.g. resume of a running VM)
  2  bad usage
  3  keel-vmm could not be reached on the socket (not running, or no --api-socket)

The socket defaults to $KEEL_API_SOCKET. The API is described in docs/api/openapi.json.)";

using Json = nlohmann::json;
using Table = std::vector<std::vector<std::string>>;

void print_table(const Table& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(widths[i] - row[i].size() + 2, ' ');
    }
    std::printf("%s\n", line.c_str());
  }
}

std::string text(const Json& value) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_null()) return "-";
  return value.dump();
}

std::string time_text(int64_t timestamp_ms) {
  std::time_t seconds = static_cast<std::time_t>(timestamp_ms / 1000);
  std::tm utc{};
  ::gmtime_r(&seconds, &utc);
  char buffer[32];
  std::strftime(buffer, sizeof(buffer), "%H:%M:%S", &utc);
  return fmt::format("{}.{:03}", buffer, timestamp_ms % 1000);
}

void print_info(const Json& vm) {
  const Json config = vm.value("config", Json::object());
  Table rows = {
      {"state", text(vm.value("state", Json()))},
      {"boot", text(vm.value("boot", Json()))},
      {"uptime", fmt::format("{:.1f} s", vm.value("uptime_seconds", 0.0))},
      {"cpus", text(config.value("cpus", Json()))},
      {"memory", fmt::format("{} MiB", text(config.value("memory_mib", Json())))},
      {"kernel", text(config.value("kernel", Json()))},
      {"initrd", text(config.value("initrd", Json()))},
      {"cmdline", text(config.value("cmdline", Json()))},
  };
  print_table(rows);
}

// "key=value key=value" for the object at field of item.
std::string key_values(const Json& item, const char* field) {
  std::string joined;
  // items() refers to its object: keep it alive for the loop.
  const Json fields = item.value(field, Json::object());
  for (const auto& [key, value] : fields.items()) {
    if (!joined.empty()) joined += ' ';
    joined += key + "=" + text(value);
  }
  return joined;
}

void print_devices(const Json& reply) {
  Table rows = {{"TYPE", "BUS", "ADDRESS", "PROPERTIES"}};
  const Json devices = reply.value("devices", Json::array());
  for (const Json& device : devices) {
    rows.push_back({text(device.value("type", Json())), text(device.value("bus", Json())),
                    text(device.value("address", Json())), key_values(device, "properties")});
  }
  print_table(rows);
}

// A device's counters, with each latency histogram's buckets folded into
// its summary: "requests=4 ... request_latency_us=p50:12.5,p99:80,n:4".
std::string device_counters(const Json& device) {
  const Json latency = device.value("latency", Json::object());
  const Json counters = device.value("counters", Json::object());
  std::string joined;
  auto add = [&joined](const std::string& item) {
    if (!joined.empty()) joined += ' ';
    joined += item;
  };
  for (const auto& [key, value] : counters.items()) {
    bool in_histogram = false;
    for (const auto& [name, summary] : latency.items()) {
      in_histogram = in_histogram || key.starts_with(name + "_bucket_le_") ||
                     key == name + "_sum_us" || key == name + "_count";
    }
    if (!in_histogram) add(key + "=" + text(value));
  }
  for (const auto& [name, summary] : latency.items()) {
    add(fmt::format("{}=p50:{:.0f},p99:{:.0f},n:{}", name, summary.value("p50_us", 0.0),
                    summary.value("p99_us", 0.0), text(summary.value("count", Json()))));
  }
  return joined;
}

void print_metrics(const Json& metrics) {
  // Only the exit kinds some vCPU saw, in the order the API lists them.
  std::vector<std::string> kinds;
  const Json vcpus = metrics.value("vcpus", Json::array());
  for (const Json& vcpu : vcpus) {
    const Json exits = vcpu.value("exits", Json::object());
    for (const auto& [kind, count] : exits.items()) {
      if (count.is_number() && count.get<uint64_t>() > 0 &&
          std::find(kinds.begin(), kinds.end(), kind) == kinds.end()) {
        kinds.push_back(kind);
      }
    }
  }
  std::printf("state %s, boot %s, uptime %.1f s\n", text(metrics.value("state", Json())).c_str(),
              text(metrics.value("boot", Json())).c_str(), metrics.value("uptime_seconds", 0.0));
  const Json memory = metrics.value("memory", Json::object());
  std::printf("memory: guest %llu MiB, keel-vmm resident %llu MiB\n",
              static_cast<unsigned long long>(memory.value("guest_bytes", uint64_t{0}) >> 20),
              static_cast<unsigned long long>(memory.value("resident_bytes", uint64_t{0}) >> 20));
  const Json devices = metrics.value("devices", Json::array());
  if (!devices.empty()) {
    Table device_rows = {{"DEVICE", "ADDRESS", "COUNTERS"}};
    for (const Json& device : devices) {
      device_rows.push_back({text(device.value("type", Json())),
                             text(device.value("address", Json())), device_counters(device)});
    }
    print_table(device_rows);
  }
  Table rows = {{"VCPU"}};
  for (const std::string& kind : kinds) rows[0].push_back(kind);
  for (const Json& vcpu : vcpus) {
    std::vector<std::string> row = {text(vcpu.value("index", Json()))};
    const Json row_exits = vcpu.value("exits", Json::object());
    for (const std::string& kind : kinds) row.push_back(text(row_exits.value(kind, Json(0))));
    rows.push_back(row);
  }
  print_table(rows);
}

void print_event(const Json& event) {
  std::string type = text(event.value("type", Json()));
  if (type == "missed") {
    std::printf("-- %s --\n", text(event.value("message", Json())).c_str());
    return;
  }
  std::string details;
  for (const auto& [key, value] : event.items()) {
    if (key == "seq" || key == "type" || key == "timestamp_ms") continue;
    if (!details.empty()) details += ' ';
    details += key + "=" + text(value);
  }
  std::printf("%-6s %s  %-9s %s\n", text(event.value("seq", Json())).c_str(),
              time_text(event.value("timestamp_ms", int64_t{0})).c_str(), type.c_str(),
              details.c_str());
  std::fflush(stdout);
}

// The JSON error body's message, or the raw body.
std::string error_message(const api::HttpReply& reply) {
  Json body = Json::parse(reply.body, nullptr, false);
  if (body.is_object() && body.contains("error") && body["error"].is_object()) {
    const Json& error = body["error"];
    std::string message = text(error.value("message", Json()));
    if (error.contains("field")) message += fmt::format(" (field '{}')", text(error["field"]));
    return message;
  }
  return reply.body;
}

int unreachable(const api::Client& client, const Error& error) {
  std::fprintf(stderr, "keelctl: cannot reach keel-vmm on '%s': %s\n",
               client.socket_path().c_str(), error.message().c_str());
  if (error.code() == Errc::NotFound) {
    std::fprintf(stderr, "keelctl: is keel-vmm running with --api-socket %s?\n",
                 client.socket_path().c_str());
  }
  return kExitUnreachable;
}

int refused(const std::string& what, const api::HttpReply& reply) {
  std::fprintf(stderr, "keelctl: vm %s: refused (HTTP %u): %s\n", what.c_str(), reply.status,
               error_message(reply).c_str());
  return kExitRefused;
}

struct VmCommand {
  const char* name;
  const char* method;
  const char* path;
  const char* help;
  void (*print)(const Json&);
};

void print_state(const Json& reply) {
  std::string line = text(reply.value("state", Json()));
  if (reply.contains("reason")) line += " (" + text(reply["reason"]) + ")";
  std::printf("%s\n", line.c_str());
}

void print_balloon(const Json& reply) {
  std::printf("balloon target %s MiB (the driver reports %s MiB)\n",
              text(reply.value("target_mib", Json())).c_str(),
              text(reply.value("actual_mib", Json())).c_str());
}

void print_power_button(const Json& reply) {
  std::printf("power button pressed (the VM is %s; the guest decides what follows)\n",
              text(reply.value("state", Json())).c_str());
}

void print_hotplug(const Json& reply) {
  std::string line = fmt::format("{} {} at {}", text(reply.value("kind", Json())),
                                 text(reply.value("id", Json())),
                                 text(reply.value("address", Json())));
  if (reply.contains("state")) {
    line += ": eject requested (keelctl vm events shows device-removed or eject-timeout)";
  }
  std::printf("%s\n", line.c_str());
}

void print_resize(const Json& reply) {
  std::printf("disk %s is now %s bytes\n", text(reply.value("id", Json())).c_str(),
              text(reply.value("size_bytes", Json())).c_str());
}

void print_config(const Json& config) { std::printf("%s\n", config.dump(2).c_str()); }

void print_created(const Json& reply) {
  const Json config = reply.value("config", Json::object());
  std::printf("%s: kernel %s, %s vCPUs, %s MiB (start it with: keelctl vm start)\n",
              text(reply.value("state", Json())).c_str(),
              text(config.value("kernel", Json())).c_str(),
              text(config.value("cpus", Json())).c_str(),
              text(config.value("memory_mib", Json())).c_str());
}

void print_migration(const Json& stats) {
  std::string line = "migration " + text(stats.value("phase", Json()));
  if (stats.contains("destination")) line += " to " + text(stats["destination"]);
  if (stats.contains("dirty_log")) line += " (dirty " + text(stats["dirty_log"]) + ")";
  if (stats.contains("rounds")) {
    line += fmt::format(": round {}, {} MiB sent, {} pages left, {} ms",
                        text(stats["rounds"]),
                        stats.value("bytes_sent", uint64_t{0}) >> 20,
                        text(stats.value("remaining_pages", Json())),
                        text(stats.value("total_ms", Json())));
    if (stats.value("throttle_percent", uint64_t{0}) > 0) {
      line += fmt::format(", vCPUs throttled {}%", stats.value("throttle_percent", uint64_t{0}));
    }
    if (stats.contains("postcopy") && text(stats["phase"]) == "postcopy") {
      line += fmt::format(", post-copy: {} pages requested, {} sent behind",
                          stats["postcopy"].value("pages_requested", uint64_t{0}),
                          stats["postcopy"].value("background_pages", uint64_t{0}));
    }
    if (stats.value("disk_bytes_copied", uint64_t{0}) > 0) {
      line += fmt::format(", disks {} MiB copied, {} MiB left",
                          stats.value("disk_bytes_copied", uint64_t{0}) >> 20,
                          stats.value("disk_remaining_bytes", uint64_t{0}) >> 20);
    }
  }
  if (stats.contains("error")) line += " (" + text(stats["error"]) + ")";
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

// PUT /api/v1/vm/migrate, then the migration's events until it completes or
// fails: progress lines, or with --json the events themselves.
int migrate(const api::Client& client, bool json, const Json& request) {
  // Only events newer than the newest one now belong to this migration.
  uint64_t after = 0;
  Result<api::HttpReply> old = client.stream_lines(
      "/api/v1/events?follow=false", [&after](std::string_view line) {
        Json event = Json::parse(line, nullptr, false);
        if (event.is_object()) after = std::max(after, event.value("seq", uint64_t{0}));
        return true;
      });
  if (!old) return unreachable(client, old.error());
  Result<api::HttpReply> reply = client.request("PUT", "/api/v1/vm/migrate", request.dump());
  if (!reply) return unreachable(client, reply.error());
  if (reply->status != 200) return refused("migrate", *reply);
  int status = kExitUnreachable;  // unless an event says how it ended
  Result<api::HttpReply> followed = client.stream_lines(
      fmt::format("/api/v1/events?after={}&follow=true", after),
      [json, &status](std::string_view line) {
        Json event = Json::parse(line, nullptr, false);
        if (!event.is_object()) return true;
        std::string type = event.value("type", "");
        if (!type.starts_with("migration-")) return true;
        if (json) {
          std::printf("%.*s\n", static_cast<int>(line.size()), line.data());
          std::fflush(stdout);
        } else if (type == "migration-completed") {
          std::printf("migrated to %s in %s ms (paused %s ms)\n",
                      text(event.value("destination", Json())).c_str(),
                      text(event.value("total_ms", Json())).c_str(),
                      text(event.value("downtime_ms", Json())).c_str());
        } else if (type == "migration-failed") {
          const bool gone = event.contains("postcopy") &&
                            event["postcopy"].value("running_on_destination", false);
          std::fprintf(stderr, "keelctl: vm migrate: %s; %s\n",
                       text(event.value("error", Json())).c_str(),
                       gone ? "post-copy had begun: the VM stays paused here, the destination "
                              "cannot go on"
                            : "the VM runs on here");
        } else if (type == "migration-progress") {
          print_migration(event);
        }
        if (type == "migration-completed") status = kExitOk;
        if (type == "migration-failed") status = kExitRefused;
        return status == kExitUnreachable;
      });
  if (status == kExitUnreachable) {
    std::fprintf(stderr, "keelctl: vm migrate: keel-vmm went away before the migration ended\n");
    if (!followed) return unreachable(client, followed.error());
  }
  return status;
}

// path made absolute for keel-vmm, whose working directory is not ours; as
// given if that fails (the server then names what is wrong with it).
std::string absolute_path(const std::string& path) {
  std::error_code error;
  std::string absolute = std::filesystem::absolute(path, error).string();
  return error ? path : absolute;
}

// PUT /api/v1/vm/receive, then, unless no_wait, GET /api/v1/vm until the
// machine has arrived (keel-vmm runs it) or keel-vmm is gone (it failed).
int receive(const api::Client& client, bool json, const std::string& source, bool no_wait) {
  Result<api::HttpReply> reply =
      client.request("PUT", "/api/v1/vm/receive", Json{{"source", source}}.dump());
  if (!reply) return unreachable(client, reply.error());
  if (reply->status != 200) return refused("receive", *reply);
  if (!json) {
    std::printf("receiving on %s\n", source.c_str());
    std::fflush(stdout);
  }
  if (no_wait) {
    if (json) std::printf("%s\n", reply->body.c_str());
    return kExitOk;
  }
  for (;;) {
    Result<api::HttpReply> vm = client.request("GET", "/api/v1/vm");
    if (!vm) {
      std::fprintf(stderr,
                   "keelctl: vm receive: keel-vmm went away before the machine arrived: the "
                   "incoming migration failed (keel-vmm's own output says why)\n");
      return kExitRefused;
    }
    Json body = Json::parse(vm->body, nullptr, false);
    std::string state = body.is_object() ? body.value("state", "") : "";
    if (vm->status == 200 && state != "receiving") {
      if (json) {
        std::printf("%s\n", body.dump(2).c_str());
      } else {
        std::printf("received: the VM is %s\n", state.c_str());
      }
      return kExitOk;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

const VmCommand kVmCommands[] = {
    {"start", "PUT", "/api/v1/vm/start", "Start the VM configured with `vm create`", print_state},
    {"config", "GET", "/api/v1/vm/config", "Print the VM's configuration (JSON, docs/vm-config.md)",
     print_config},
    {"info", "GET", "/api/v1/vm", "Show the VM's state and configuration", print_info},
    {"devices", "GET", "/api/v1/vm/devices", "List every device with its bus address",
     print_devices},
    {"metrics", "GET", "/api/v1/vm/metrics", "Show exit counts per vCPU and memory",
     print_metrics},
    {"pause", "PUT", "/api/v1/vm/pause", "Pause the vCPUs", print_state},
    {"resume", "PUT", "/api/v1/vm/resume", "Resume a paused VM", print_state},
    {"reset", "PUT", "/api/v1/vm/reset", "Reset the VM (it reboots unless --no-reboot)",
     print_state},
    {"stop", "PUT", "/api/v1/vm/stop", "Stop the VM now (keel-vmm exits)", print_state},
    {"power-button", "PUT", "/api/v1/vm/power-button",
     "Press the ACPI power button: ask the guest to shut down", print_power_button},
    {"migrate-status", "GET", "/api/v1/vm/migrate", "Show the current or last migration",
     print_migration},
    {"migrate-cancel", "DELETE", "/api/v1/vm/migrate",
     "Cancel the running migration (the VM keeps running here)", print_migration},
};

int run(int argc, char** argv) {
  CLI::App app{"keelctl: drives Keel. `keelctl vm ...` talks to one keel-vmm's control API.",
               "keelctl"};
  app.footer(kFooter);
  app.require_subcommand(1);
  std::string socket;
  if (const char* from_env = std::getenv("KEEL_API_SOCKET")) socket = from_env;
  bool json = false;
  double timeout_seconds = 30;
  app.add_option("--socket", socket, "keel-vmm's --api-socket path (default $KEEL_API_SOCKET)");
  app.add_flag("--json", json, "Print the API's JSON instead of tables");
  app.add_option("--timeout", timeout_seconds, "Seconds to wait for keel-vmm (default 30)");
  CLI::App* vm = app.add_subcommand("vm", "Drive the VM behind --socket");
  vm->require_subcommand(1);
  const VmCommand* chosen = nullptr;
  for (const VmCommand& command : kVmCommands) {
    vm->add_subcommand(command.name, command.help)->callback([&chosen, &command] {
      chosen = &command;
    });
  }
  uint64_t target_mib = 0;
  CLI::App* balloon = vm->add_subcommand(
      "balloon", "Set the balloon's target: the memory the guest should give back");
  balloon->add_option("--target-mib", target_mib, "MiB the balloon should hold (0: none)")
      ->required();
  static const VmCommand kBalloon = {"balloon", "PUT", "/api/v1/vm/balloon", "", print_balloon};
  std::string request_body;
  balloon->callback([&chosen, &request_body, &target_mib] {
    chosen = &kBalloon;
    request_body = Json{{"target_mib", target_mib}}.dump();
  });
  // Hotplug: each sets chosen and the body when CLI11 picks it.
  static const VmCommand kDiskAdd = {"disk-add", "PUT", "/api/v1/vm/disks", "", print_hotplug};
  static const VmCommand kDiskRemove = {"disk-remove", "PUT", "/api/v1/vm/disks/remove", "",
                                        print_hotplug};
  static const VmCommand kDiskResize = {"disk-resize", "PUT", "/api/v1/vm/disks/resize", "",
                                        print_resize};
  static const VmCommand kNetAdd = {"net-add", "PUT", "/api/v1/vm/nets", "", print_hotplug};
  static const VmCommand kNetRemove = {"net-remove", "PUT", "/api/v1/vm/nets/remove", "",
                                       print_hotplug};
  std::string device_id, disk_path, disk_format = "auto", tap, mac;
  bool read_only = false;
  uint64_t size_bytes = 0, eject_timeout_ms = 30000;
  uint64_t slot = 0;  // disk-add, net-add: the PCI slot (1-31), sent when given
  CLI::App* disk_add = vm->add_subcommand(
      "disk-add", "Hot-plug a virtio-blk disk (the guest sees it without a rescan)");
  disk_add->add_option("id", device_id, "A name for the disk (letters, digits, _ and -)")->required();
  disk_add->add_option("path", disk_path, "The image (made absolute)")->required();
  disk_add->add_option("--format", disk_format, "auto, raw or qcow2 (default auto)");
  disk_add->add_flag("--readonly", read_only, "Plug it read-only");
  CLI::Option* disk_slot =
      disk_add->add_option("--slot", slot, "The PCI slot, 1-31 (default: the lowest free one)");
  disk_add->callback([&] {
    chosen = &kDiskAdd;
    std::error_code error;
    std::string absolute = std::filesystem::absolute(disk_path, error).string();
    Json body = {{"id", device_id},
                 {"path", error ? disk_path : absolute},
                 {"format", disk_format},
                 {"readonly", read_only}};
    if (disk_slot->count() > 0) body["slot"] = slot;
    request_body = body.dump();
  });
  CLI::App* disk_resize =
      vm->add_subcommand("disk-resize", "Grow a disk; the guest is told its new size");
  disk_resize->add_option("id", device_id, "The disk (disk0, ... for the config's)")->required();
  disk_resize->add_option("size_bytes", size_bytes, "The new size in bytes, a multiple of 512")
      ->required();
  disk_resize->callback([&] {
    chosen = &kDiskResize;
    request_body = Json{{"id", device_id}, {"size_bytes", size_bytes}}.dump();
  });
  CLI::App* net_add = vm->add_subcommand("net-add", "Hot-plug a virtio-net NIC on a tap device");
  net_add->add_option("id", device_id, "A name for the NIC (letters, digits, _ and -)")->required();
  net_add->add_option("tap", tap, "The tap device (created if missing)")->required();
  net_add->add_option("--mac", mac, "The guest's MAC (default: random)");
  CLI::Option* net_slot =
      net_add->add_option("--slot", slot, "The PCI slot, 1-31 (default: the lowest free one)");
  net_add->callback([&] {
    chosen = &kNetAdd;
    Json body = {{"id", device_id}, {"tap", tap}};
    if (!mac.empty()) body["mac"] = mac;
    if (net_slot->count() > 0) body["slot"] = slot;
    request_body = body.dump();
  });
  for (const VmCommand* command : {&kDiskRemove, &kNetRemove}) {
    const bool disk = command == &kDiskRemove;
    CLI::App* remove = vm->add_subcommand(
        command->name, disk ? "Ask the guest to eject a disk; it is closed once ejected"
                            : "Ask the guest to eject a NIC; its tap is closed once ejected");
    remove->add_option("id", device_id, disk ? "The disk" : "The NIC")->required();
    remove->add_option("--timeout-ms", eject_timeout_ms,
                       "How long the guest has to eject it (default 30000)");
    remove->callback([&, command] {
      chosen = command;
      request_body = Json{{"id", device_id}, {"timeout_ms", eject_timeout_ms}}.dump();
    });
  }
  uint64_t after = 0;
  bool follow = false;
  bool events_chosen = false;
  CLI::App* events = vm->add_subcommand(
      "events", "Print lifecycle events (seq, time, type, details), oldest first");
  events->add_option("--after", after, "Only events after this sequence number (default 0: all kept)");
  events->add_flag("--follow,-f", follow, "Keep printing new events until keel-vmm exits");
  events->callback([&events_chosen] { events_chosen = true; });
  std::string config_path;
  CLI::App* create = vm->add_subcommand(
      "create", "Configure a keel-vmm started with only --api-socket from a JSON config file "
                "(docs/vm-config.md); replaces an earlier one until `vm start`");
  create->add_option("config", config_path, "The VM's JSON configuration")->required();
  static const VmCommand kCreate = {"create", "PUT", "/api/v1/vm/config", "", print_created};
  create->callback([&chosen] { chosen = &kCreate; });
  std::string snapshot_path;
  bool snapshot_chosen = false;
  CLI::App* snapshot = vm->add_subcommand(
      "snapshot", "Write a snapshot of the paused VM to PATH (restore: `keelctl vm restore PATH` "
                  "on a keel-vmm started with only --api-socket, or keel-vmm --restore PATH)");
  snapshot->add_option("path", snapshot_path, "Snapshot file to write (made absolute)")->required();
  snapshot->callback([&snapshot_chosen] { snapshot_chosen = true; });
  std::string restore_path, restore_serial;
  bool restore_paused = false, restore_chosen = false;
  CLI::App* restore_command = vm->add_subcommand(
      "restore", "Restore the snapshot at PATH in a keel-vmm started with only --api-socket: "
                 "the machine, its configuration included, comes from the snapshot");
  restore_command->add_option("path", restore_path, "Snapshot file (made absolute)")->required();
  restore_command->add_flag("--paused", restore_paused,
                            "Hold the vCPUs until `keelctl vm resume` (default: run at once)");
  restore_command->add_option("--serial", restore_serial,
                              "Send the serial console elsewhere than the snapshot's: stdio, "
                              "none, file:PATH or unix:PATH (paths as keel-vmm sees them)");
  restore_command->callback([&restore_chosen] { restore_chosen = true; });
  std::string receive_source;
  bool receive_no_wait = false, receive_chosen = false;
  CLI::App* receive_command = vm->add_subcommand(
      "receive", "Make a keel-vmm started with only --api-socket and configured with `vm "
                 "create` (the source's machine, this host's disk paths) wait for a live "
                 "migration on SOURCE; waits until the machine has arrived and runs");
  receive_command->add_option("source", receive_source,
                              "unix:PATH or tcp:HOST:PORT to listen on (the source's `vm "
                              "migrate` destination)")
      ->required();
  receive_command->add_flag("--no-wait", receive_no_wait,
                            "Return once keel-vmm listens, without waiting for the machine");
  receive_command->callback([&receive_chosen] { receive_chosen = true; });
  std::string migrate_destination;
  uint64_t downtime_ms = 300, bandwidth_mib = 0;
  bool compress = false, migrate_disks = false, no_auto_converge = false, migrate_chosen = false;
  bool postcopy = false;
  CLI::App* migrate_command = vm->add_subcommand(
      "migrate", "Live-migrate the VM to DEST, a keel-vmm started with --incoming DEST (or told "
                 "`keelctl vm receive DEST`); prints "
                 "progress until it completes (exit 0) or fails (the VM runs on here, unless "
                 "post-copy had begun: see --postcopy)");
  migrate_command->add_option("destination", migrate_destination, "unix:PATH or tcp:HOST:PORT")
      ->required();
  migrate_command->add_option("--downtime-ms", downtime_ms,
                              "Longest pause for the final copy (default 300)");
  migrate_command->add_option("--bandwidth", bandwidth_mib, "Limit in MiB/s (default 0: none)");
  migrate_command->add_flag("--compress", compress, "zstd-compress the pages");
  migrate_command->add_flag("--with-disks", migrate_disks,
                            "Copy the writable disks into the destination's own images (its "
                            "--disk paths, of the same size) instead of sharing them");
  migrate_command->add_flag("--no-auto-converge", no_auto_converge,
                            "Never throttle the vCPUs; by default they are slowed down (20% "
                            "and up, 99% at most) while the guest dirties RAM faster than the "
                            "link carries it");
  migrate_command->add_flag(
      "--postcopy", postcopy,
      "Post-copy: after the first full pass, pause here and run the VM on the destination at "
      "once, its missing pages fetched as it touches them and the rest streamed after. Once "
      "it runs there, no way back: a broken connection leaves the VM paused here (resuming it "
      "would lose the destination's writes) and the destination exits with an error");
  migrate_command->callback([&migrate_chosen] { migrate_chosen = true; });
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    int code = app.exit(error);
    return code == 0 ? kExitOk : kExitUsage;
  }
  if (socket.empty()) {
    std::fprintf(stderr, "keelctl: no socket: give --socket PATH or set KEEL_API_SOCKET\n");
    return kExitUsage;
  }
  if (!(timeout_seconds > 0)) {
    std::fprintf(stderr, "keelctl: --timeout must be more than 0 seconds\n");
    return kExitUsage;
  }
  api::Client client(socket, std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)));

  if (events_chosen) {
    std::string target =
        fmt::format("/api/v1/events?after={}&follow={}", after, follow ? "true" : "false");
    Result<api::HttpReply> reply = client.stream_lines(target, [json](std::string_view line) {
      if (json) {
        std::printf("%.*s\n", static_cast<int>(line.size()), line.data());
        std::fflush(stdout);
        return true;
      }
      Json event = Json::parse(line, nullptr, false);
      if (event.is_object()) print_event(event);
      return true;
    });
    if (!reply) return unreachable(client, reply.error());
    if (reply->status != 200) return refused("events", *reply);
    return kExitOk;
  }
  if (migrate_chosen) {
    return migrate(client, json,
                   Json{{"destination", migrate_destination}, {"downtime_ms", downtime_ms},
                        {"bandwidth_mib", bandwidth_mib}, {"compress", compress},
                        {"migrate_disks", migrate_disks}, {"auto_converge", !no_auto_converge},
                        {"postcopy", postcopy}});
  }
  if (receive_chosen) return receive(client, json, receive_source, receive_no_wait);
  if (restore_chosen) {
    const std::string absolute = absolute_path(restore_path);
    Json request = {{"path", absolute}, {"paused", restore_paused}};
    if (!restore_serial.empty()) request["serial"] = restore_serial;
    Result<api::HttpReply> reply = client.request("PUT", "/api/v1/vm/restore", request.dump());
    if (!reply) return unreachable(client, reply.error());
    if (reply->status != 200) return refused("restore", *reply);
    Json body = Json::parse(reply->body, nullptr, false);
    if (json) {
      std::printf("%s\n", body.dump(2).c_str());
    } else {
      std::printf("%s: restored from %s\n", text(body.value("state", Json())).c_str(),
                  absolute.c_str());
    }
    return kExitOk;
  }
  if (snapshot_chosen) {
    const std::string absolute = absolute_path(snapshot_path);
    Result<api::HttpReply> reply = client.request(
        "PUT", "/api/v1/vm/snapshot", Json{{"path", absolute}}.dump());
    if (!reply) return unreachable(client, reply.error());
    if (reply->status != 200) return refused("snapshot", *reply);
    Json body = Json::parse(reply->body, nullptr, false);
    if (json) {
      std::printf("%s\n", body.dump(2).c_str());
    } else {
      std::printf("%s: %s bytes\n", text(body.value("path", Json())).c_str(),
                  text(body.value("bytes", Json())).c_str());
    }
    return kExitOk;
  }
  CHECK(chosen != nullptr, "CLI11 requires a vm subcommand");
  if (chosen == &kCreate) {
    std::ifstream file(config_path);
    if (!file) {
      std::fprintf(stderr, "keelctl: vm create: cannot read '%s'\n", config_path.c_str());
      return kExitUsage;
    }
    std::stringstream contents;
    contents << file.rdbuf();
    request_body = contents.str();
  }
  Result<api::HttpReply> reply = client.request(chosen->method, chosen->path, request_body);
  if (!reply) return unreachable(client, reply.error());
  if (reply->status != 200) return refused(chosen->name, *reply);
  Json body = Json::parse(reply->body, nullptr, false);
  if (body.is_discarded()) {
    std::fprintf(stderr, "keelctl: vm %s: the reply is not JSON\n", chosen->name);
    return kExitRefused;
  }
  if (json) {
    std::printf("%s\n", body.dump(2).c_str());
  } else {
    chosen->print(body);
  }
  return kExitOk;
}

}  // namespace
}  // namespace keel::keelctl

int main(int argc, char** argv) { return keel::keelctl::run(argc, argv); }
