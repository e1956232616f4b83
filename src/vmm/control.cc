#include "vmm/control.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>

#include <fmt/format.h>

#include "api/prometheus.h"
#include "base/log.h"

namespace keel::vmm {
namespace {

std::string_view state_name(const machine::Machine& machine) {
  if (machine.stop_status()) return "stopping";
  return machine.paused() ? "paused" : "running";
}

uint64_t resident_bytes() {
  std::FILE* file = std::fopen("/proc/self/statm", "r");
  if (file == nullptr) return 0;
  unsigned long long size_pages = 0, resident_pages = 0;
  int fields = std::fscanf(file, "%llu %llu", &size_pages, &resident_pages);
  std::fclose(file);
  long page_size = ::sysconf(_SC_PAGESIZE);
  return fields == 2 && page_size > 0 ? resident_pages * static_cast<uint64_t>(page_size) : 0;
}

nlohmann::json config_json(const machine::VmConfig& config) {
  return nlohmann::json::parse(machine::to_json(config), nullptr, false);
}

nlohmann::json memory_json(uint64_t guest_bytes) {
  return {{"guest_bytes", guest_bytes}, {"resident_bytes", resident_bytes()}};
}

// The first line: a failure's detail carries a register dump after it.
std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

nlohmann::json migration_json(const machine::MigrationStats& stats) {
  nlohmann::json json = {
      {"phase", machine::migration_phase_name(stats.phase)},
      {"destination", stats.destination},
      {"dirty_log", stats.dirty_log},
      {"rounds", stats.rounds},
      {"pages_sent", stats.pages_sent},
      {"zero_pages", stats.zero_pages},
      {"bytes_sent", stats.bytes_sent},
      {"remaining_pages", stats.remaining_pages},
      {"dirty_pages_per_second", stats.dirty_pages_per_second},
      {"bandwidth_bytes_per_second", stats.bandwidth_bytes_per_second},
      {"throttle_percent", stats.throttle_percent},
      {"total_ms", stats.total_ms},
      {"downtime_ms", stats.downtime_ms},
      {"disk_bytes_copied", stats.disk_bytes_copied},
      {"disk_remaining_bytes", stats.disk_remaining_bytes},
      {"downtime_us",
       {{"pause", stats.downtime.pause_us},
        {"quiesce", stats.downtime.quiesce_us},
        {"save_state", stats.downtime.save_state_us},
        {"dirty_log", stats.downtime.dirty_log_us},
        {"last_pages", stats.downtime.last_pages_us},
        {"send_state", stats.downtime.send_state_us},
        {"release_disks", stats.downtime.release_disks_us},
        {"ack", stats.downtime.ack_us}}},
      {"last_pages", stats.downtime.last_pages},
      {"postcopy",
       {{"running_on_destination", stats.postcopy.running_on_destination},
        {"pages_requested", stats.postcopy.pages_requested},
        {"background_pages", stats.postcopy.background_pages},
        {"ms", stats.postcopy.ms}}},
  };
  if (!stats.error.empty()) json["error"] = stats.error;
  return json;
}

}  // namespace

void ApiControl::created(uint64_t boot) {
  boot_ = boot;
  events_.publish("created", {{"boot", boot}});
}

void ApiControl::running(const machine::Machine& machine) {
  started_ = std::chrono::steady_clock::now();
  published_state_ = "";
  publish(machine);
  events_.publish("running", {{"boot", boot_}});
}

void ApiControl::publish(const machine::Machine& machine) {
  std::string_view state = state_name(machine);
  if (state == published_state_ && boot_ == published_boot_) return;
  published_state_ = state;
  published_boot_ = boot_;
  status_.publish(
      {{"state", state}, {"boot", boot_}, {"config", config_json(machine.config())}}, started_);
}

void ApiControl::publish(const Setup& setup) {
  published_state_ = "";
  if (setup.started) {
    // The Machine runs as soon as this command is answered.
    status_.publish(
        {{"state", setup.started_state}, {"boot", 1}, {"config", config_json(*setup.config)}},
        std::chrono::steady_clock::now());
    return;
  }
  nlohmann::json vm = {{"state", setup.config ? "configured" : "not-configured"}, {"boot", 0}};
  if (setup.config) vm["config"] = config_json(*setup.config);
  status_.publish(std::move(vm), std::nullopt);
}

void ApiControl::stopping(const machine::Machine& machine) {
  publish(machine);
  std::optional<machine::StopStatus> status = machine.stop_status();
  nlohmann::json data = {{"boot", boot_}};
  if (status && status->reason == machine::StopReason::GuestPanic) {
    // Its own event, ahead of stopping: a consumer watching for panics
    // need not parse stop reasons.
    events_.publish("guest-panic", {{"boot", boot_}, {"detail", first_line(status->detail)}});
  }
  if (status && status->reason == machine::StopReason::Migrated) {
    events_.publish("migrated", {{"boot", boot_}, {"detail", status->detail}});
  }
  if (status) {
    data["reason"] = machine::stop_reason_name(status->reason);
    data["detail"] = first_line(status->detail);
  }
  events_.publish("stopping", data);
}

void ApiControl::stopped(const machine::StopStatus& status, bool rebooting) {
  events_.publish("stopped", {{"boot", boot_},
                              {"reason", machine::stop_reason_name(status.reason)},
                              {"detail", first_line(status.detail)}});
  if (rebooting) events_.publish("reset", {{"boot", boot_}, {"next_boot", boot_ + 1}});
}

double ApiControl::uptime_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
}

void ApiControl::serve(machine::Machine& machine, bool& host_stop) {
  serve_with([&](const api::Command& command) {
    api::Reply reply = execute(command, machine, host_stop);
    publish(machine);  // before the reply, so the client's next GET sees it
    return reply;
  });
}

void ApiControl::serve_setup(Setup& setup, bool& host_stop) {
  serve_with([&](const api::Command& command) {
    api::Reply reply = execute_setup(command, setup, host_stop);
    publish(setup);
    return reply;
  });
}

void ApiControl::serve_with(const std::function<api::Reply(const api::Command&)>& execute) {
  for (api::CommandQueue::Pending& pending : queue_.take()) {
    api::Reply reply = execute(pending.command);
    if (!reply) {
      LOG_INFO("api: {} refused: {}", api::command_name(pending.command.kind),
               reply.error().message());
    }
    pending.done(std::move(reply));
  }
}

Result<void> ApiControl::check_not_moved_by_postcopy() const {
  if (migration_ == nullptr || !migration_->finished()) return ok();
  const machine::MigrationStats stats = migration_->stats();
  if (stats.phase == machine::MigrationPhase::Failed && stats.postcopy.running_on_destination) {
    return fail(Errc::Busy,
                "post-copy had begun: the machine ran on the destination, so this paused copy "
                "is stale and can only be stopped");
  }
  return ok();
}

void ApiControl::machine_ended() {
  if (migration_ == nullptr) return;
  (void)migration_->cancel();
  migration_->wait();
  last_migration_ = migration_->stats();
  migration_.reset();
}

api::Reply ApiControl::start_migration(const api::MigrateRequest& request,
                                       machine::Machine& machine) {
  if (migrating()) return fail(Errc::Busy, "a migration is already running");
  TRY(check_not_moved_by_postcopy());
  machine::MigrationOptions options;
  options.destination = TRY_CONTEXT(migration::parse_stream_address(request.destination),
                                    "destination");
  options.downtime_ms = request.downtime_ms;
  options.bandwidth_mib = request.bandwidth_mib;
  options.compress = request.compress;
  options.migrate_disks = request.migrate_disks;
  options.auto_converge = request.auto_converge;
  options.postcopy = request.postcopy;
  migration_.reset();  // the last one, finished: join its thread
  uint64_t boot = boot_;
  // Runs on the migration thread; the EventLog has its own lock.
  auto report = [this, boot](std::string_view event, const machine::MigrationStats& stats) {
    nlohmann::json data = migration_json(stats);
    data["boot"] = boot;
    events_.publish(std::string(event), data);
  };
  migration_ = TRY(machine::MigrationSender::start(machine, std::move(options), report));
  events_.publish("migration-started", {{"boot", boot_}, {"destination", request.destination}});
  return migration_json(migration_->stats());
}

api::Reply ApiControl::execute(const api::Command& command, machine::Machine& machine,
                               bool& host_stop) {
  using api::CommandKind;
  switch (command.kind) {
    case CommandKind::GetVm:
      return nlohmann::json{{"state", state_name(machine)},
                            {"boot", boot_},
                            {"uptime_seconds", uptime_seconds()},
                            {"config", config_json(machine.config())}};
    // The machine as it is now: hot-plugged devices in, each in its slot
    // (what a migration's destination is configured with).
    case CommandKind::GetConfig: return config_json(machine.current_config());
    case CommandKind::Configure:
      return fail(Errc::Busy, fmt::format("the VM is {}: its configuration can only be set "
                                          "before PUT /api/v1/vm/start",
                                          state_name(machine)));
    case CommandKind::Start:
    case CommandKind::Restore:
    case CommandKind::Receive:
      return fail(Errc::Busy, fmt::format("{}: the VM has started already (it is {})",
                                          api::command_name(command.kind), state_name(machine)));
    case CommandKind::GetDevices: {
      nlohmann::json devices = nlohmann::json::array();
      for (const machine::DeviceInfo& device : machine.devices()) {
        nlohmann::json properties = nlohmann::json::object();
        for (const auto& [key, value] : device.properties) properties[key] = value;
        devices.push_back({{"type", device.type},
                           {"bus", device.bus},
                           {"address", device.address},
                           {"properties", properties}});
      }
      return nlohmann::json{{"devices", devices}};
    }
    case CommandKind::GetMetrics: {
      nlohmann::json vcpus = nlohmann::json::array();
      auto counts = machine.exit_counts();
      for (size_t index = 0; index < counts.size(); ++index) {
        nlohmann::json exits = nlohmann::json::object();
        for (const auto& [kind, count] : counts[index]) exits[std::string(kind)] = count;
        vcpus.push_back({{"index", index}, {"exits", exits}});
      }
      nlohmann::json devices = nlohmann::json::array();
      for (const machine::DeviceCounters& device : machine.device_counters()) {
        nlohmann::json counters = nlohmann::json::object();
        for (const auto& [name, value] : device.counters) counters[std::string(name)] = value;
        nlohmann::json entry = {
            {"type", device.type}, {"address", device.address}, {"counters", counters}};
        if (nlohmann::json latency = api::latency_summaries(counters); !latency.empty()) {
          entry["latency"] = std::move(latency);
        }
        devices.push_back(std::move(entry));
      }
      return nlohmann::json{
          {"state", state_name(machine)},
          {"boot", boot_},
          {"uptime_seconds", uptime_seconds()},
          {"vcpus", vcpus},
          {"devices", devices},
          {"memory", memory_json(machine.config().memory_mib << 20)},
      };
    }
    case CommandKind::Pause:
      if (migrating()) return fail(Errc::Busy, "a migration is running (cancel it first)");
      TRY(machine.pause());
      events_.publish("paused", {{"boot", boot_}});
      return nlohmann::json{{"state", "paused"}};
    case CommandKind::Resume:
      if (migrating()) return fail(Errc::Busy, "a migration is running (cancel it first)");
      TRY(check_not_moved_by_postcopy());
      TRY(machine.resume());
      events_.publish("resumed", {{"boot", boot_}});
      return nlohmann::json{{"state", "running"}};
    case CommandKind::Reset:
      if (machine.stop_status()) return fail(Errc::Busy, "the VM is stopping");
      machine.stop(machine::StopReason::Reset, "reset through the API");
      return nlohmann::json{{"state", "stopping"}, {"reason", "reset"}};
    case CommandKind::SetBalloon: {
      devices::virtio::Balloon* balloon = machine.balloon();
      if (balloon == nullptr) {
        return fail(Errc::Busy, "the VM has no balloon device (start keel-vmm with --balloon)");
      }
      TRY(balloon->set_target_mib(command.balloon_target_mib));
      events_.publish("balloon", {{"boot", boot_}, {"target_mib", command.balloon_target_mib}});
      return nlohmann::json{
          {"target_mib", balloon->target_mib()},
          {"actual_mib", balloon->actual_pages() / devices::virtio::kBalloonPagesPerMib}};
    }
    case CommandKind::PowerButton:
      TRY(machine.press_power_button());
      events_.publish("power-button", {{"boot", boot_}});
      return nlohmann::json{{"state", state_name(machine)}, {"power_button", "pressed"}};
    case CommandKind::Stop:
      host_stop = true;
      machine.stop(machine::StopReason::Stopped, "stopped through the API");
      return nlohmann::json{{"state", "stopping"}, {"reason", "stopped"}};
    case CommandKind::Snapshot: {
      if (machine.stop_status()) return fail(Errc::Busy, "the VM is stopping");
      if (migrating()) return fail(Errc::Busy, "a migration is running");
      TRY(check_not_moved_by_postcopy());
      TRY(machine.save(command.path));
      struct stat info {};
      uint64_t bytes = ::stat(command.path.c_str(), &info) == 0 ? static_cast<uint64_t>(info.st_size) : 0;
      events_.publish("snapshot-saved", {{"boot", boot_}, {"path", command.path}, {"bytes", bytes}});
      return nlohmann::json{{"state", "paused"}, {"path", command.path}, {"bytes", bytes}};
    }
    case CommandKind::AddDisk:
    case CommandKind::AddNet: {
      const api::DeviceRequest& request = command.device;
      const bool disk = command.kind == CommandKind::AddDisk;
      std::string address =
          disk ? TRY(machine.add_disk({.id = request.id, .path = request.path,
                                       .format = request.format, .read_only = request.read_only,
                                       .slot = request.slot}))
               : TRY(machine.add_net({.id = request.id, .tap = request.tap, .mac = request.mac,
                                      .slot = request.slot}));
      const std::string_view kind = disk ? "disk" : "net";
      events_.publish("device-added",
                      {{"boot", boot_}, {"kind", kind}, {"id", request.id}, {"address", address}});
      return nlohmann::json{{"kind", kind}, {"id", request.id}, {"address", address}};
    }
    case CommandKind::RemoveDisk:
    case CommandKind::RemoveNet: {
      // A migration holds the disks it copies (migrate_disks) until it ends.
      if (command.kind == CommandKind::RemoveDisk && migrating()) {
        return fail(Errc::Busy, "a migration is running (cancel it first)");
      }
      const machine::HotplugKind kind = command.kind == CommandKind::RemoveDisk
                                            ? machine::HotplugKind::Disk
                                            : machine::HotplugKind::Net;
      // The end comes later, on a vCPU thread (the guest's eject) or the
      // device I/O thread (timeout); the EventLog takes events from any.
      auto done = [events = &events_, boot = boot_](const machine::UnplugOutcome& outcome) {
        events->publish(outcome.ejected ? "device-removed" : "eject-timeout",
                        {{"boot", boot},
                         {"kind", machine::hotplug_kind_name(outcome.kind)},
                         {"id", outcome.id},
                         {"address", outcome.address}});
      };
      std::string address =
          TRY(machine.request_unplug(kind, command.device.id,
                                     std::chrono::milliseconds(command.device.timeout_ms), done));
      return nlohmann::json{{"kind", machine::hotplug_kind_name(kind)},
                            {"id", command.device.id},
                            {"address", address},
                            {"state", "eject-requested"}};
    }
    case CommandKind::ResizeDisk: {
      // The destination opened the images when the migration began and
      // knows their sizes from then (Machine::prebuild).
      if (migrating()) return fail(Errc::Busy, "a migration is running (cancel it first)");
      uint64_t size = TRY(machine.resize_disk(command.device.id, command.device.size_bytes));
      events_.publish("disk-resized",
                      {{"boot", boot_}, {"id", command.device.id}, {"size_bytes", size}});
      return nlohmann::json{{"id", command.device.id}, {"size_bytes", size}};
    }
    case CommandKind::Migrate: return start_migration(command.migrate, machine);
    case CommandKind::GetMigration:
      if (migration_ != nullptr) return migration_json(migration_->stats());
      if (last_migration_) return migration_json(*last_migration_);
      return nlohmann::json{{"phase", "none"}};
    case CommandKind::CancelMigration:
      if (migration_ == nullptr) return fail(Errc::Busy, "no migration is running");
      TRY(migration_->cancel());
      return migration_json(migration_->stats());
  }
  return fail(Errc::Unsupported, "unknown command");
}

api::Reply ApiControl::execute_setup(const api::Command& command, Setup& setup, bool& host_stop) {
  using api::CommandKind;
  const char* state = setup.config ? "configured" : "not-configured";
  switch (command.kind) {
    case CommandKind::GetVm: {
      nlohmann::json vm = {{"state", state}, {"boot", 0}, {"uptime_seconds", 0.0}};
      if (setup.config) vm["config"] = config_json(*setup.config);
      return vm;
    }
    case CommandKind::GetMetrics:
      return nlohmann::json{
          {"state", state},
          {"boot", 0},
          {"uptime_seconds", 0.0},
          {"vcpus", nlohmann::json::array()},
          {"devices", nlohmann::json::array()},
          {"memory", memory_json(0)},
      };
    case CommandKind::GetConfig:
      if (!setup.config) {
        return fail(Errc::Busy, "the VM is not configured yet (PUT /api/v1/vm/config)");
      }
      return config_json(*setup.config);
    case CommandKind::Configure: {
      bool replaced = setup.config.has_value();
      setup.config = TRY(machine::config_from_json(command.body, setup.max_vcpus,
                                                   setup.host_memory_bytes));
      events_.publish("configured", {{"replaced", replaced},
                                     {"kernel", setup.config->kernel},
                                     {"cpus", setup.config->cpus},
                                     {"memory_mib", setup.config->memory_mib}});
      return nlohmann::json{{"state", "configured"}, {"config", config_json(*setup.config)}};
    }
    case CommandKind::Start:
      if (!setup.config) {
        return fail(Errc::Busy, "the VM is not configured yet (PUT /api/v1/vm/config first)");
      }
      TRY_CONTEXT(setup.start(*setup.config), "start");
      setup.started = true;
      return nlohmann::json{{"state", "running"}, {"boot", 1}};
    case CommandKind::Restore: {
      machine::VmConfig config =
          TRY_CONTEXT(setup.restore(command.restore), fmt::format("restore '{}'", command.restore.path));
      events_.publish("configured", {{"replaced", setup.config.has_value()},
                                     {"kernel", config.kernel},
                                     {"cpus", config.cpus},
                                     {"memory_mib", config.memory_mib},
                                     {"snapshot", command.restore.path}});
      setup.config = std::move(config);
      setup.started = true;
      setup.started_state = command.restore.paused ? "paused" : "running";
      return nlohmann::json{{"state", setup.started_state},
                            {"boot", 1},
                            {"config", config_json(*setup.config)}};
    }
    case CommandKind::Receive:
      if (!setup.config) {
        return fail(Errc::Busy,
                    "receive: the VM is not configured yet (PUT /api/v1/vm/config first: the "
                    "same machine as the source's, with this host's disk paths)");
      }
      TRY_CONTEXT(setup.receive(command.source, *setup.config), fmt::format("receive on '{}'", command.source));
      setup.started = true;
      setup.started_state = "receiving";
      return nlohmann::json{{"state", "receiving"}, {"source", command.source}};
    case CommandKind::Stop:
      host_stop = true;
      return nlohmann::json{{"state", "stopping"}, {"reason", "stopped"}};
    default: break;  // everything else needs a Machine
  }
  return fail(Errc::Busy,
              fmt::format("{}: the VM is {}; configure it (PUT /api/v1/vm/config) and start it "
                          "(PUT /api/v1/vm/start) first",
                          api::command_name(command.kind), state));
}

}  // namespace keel::vmm
