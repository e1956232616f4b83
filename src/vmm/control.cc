#include "vmm/control.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>

#include <fmt/format.h>

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

// The first line: a failure's detail carries a register dump after it.
std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

nlohmann::json migration_json(const machine::MigrationStats& stats) {
  nlohmann::json json = {
      {"phase", machine::migration_phase_name(stats.phase)},
      {"destination", stats.destination},
      {"rounds", stats.rounds},
      {"pages_sent", stats.pages_sent},
      {"bytes_sent", stats.bytes_sent},
      {"remaining_pages", stats.remaining_pages},
      {"dirty_pages_per_second", stats.dirty_pages_per_second},
      {"bandwidth_bytes_per_second", stats.bandwidth_bytes_per_second},
      {"total_ms", stats.total_ms},
      {"downtime_ms", stats.downtime_ms},
  };
  if (!stats.error.empty()) json["error"] = stats.error;
  return json;
}

}  // namespace

void ApiControl::created(uint64_t boot) {
  boot_ = boot;
  events_.publish("created", {{"boot", boot}});
}

void ApiControl::running() {
  started_ = std::chrono::steady_clock::now();
  events_.publish("running", {{"boot", boot_}});
}

void ApiControl::stopping(const machine::Machine& machine) {
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
  for (api::CommandQueue::Pending& pending : queue_.take()) {
    api::Reply reply = execute(pending.command, machine, host_stop);
    if (!reply) {
      LOG_INFO("api: {} refused: {}", api::command_name(pending.command.kind),
               reply.error().message());
    }
    pending.done(std::move(reply));
  }
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
  machine::MigrationOptions options;
  options.destination = TRY_CONTEXT(migration::parse_stream_address(request.destination),
                                    "destination");
  options.downtime_ms = request.downtime_ms;
  options.bandwidth_mib = request.bandwidth_mib;
  options.compress = request.compress;
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
    case CommandKind::GetVm: {
      nlohmann::json config =
          nlohmann::json::parse(machine::to_json(machine.config()), nullptr, false);
      return nlohmann::json{{"state", state_name(machine)},
                            {"boot", boot_},
                            {"uptime_seconds", uptime_seconds()},
                            {"config", config}};
    }
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
        devices.push_back(
            {{"type", device.type}, {"address", device.address}, {"counters", counters}});
      }
      return nlohmann::json{
          {"state", state_name(machine)},
          {"boot", boot_},
          {"uptime_seconds", uptime_seconds()},
          {"vcpus", vcpus},
          {"devices", devices},
          {"memory",
           {{"guest_bytes", machine.config().memory_mib << 20}, {"resident_bytes", resident_bytes()}}},
      };
    }
    case CommandKind::Pause:
      if (migrating()) return fail(Errc::Busy, "a migration is running (cancel it first)");
      TRY(machine.pause());
      events_.publish("paused", {{"boot", boot_}});
      return nlohmann::json{{"state", "paused"}};
    case CommandKind::Resume:
      if (migrating()) return fail(Errc::Busy, "a migration is running (cancel it first)");
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
      TRY(machine.save(command.path));
      struct stat info {};
      uint64_t bytes = ::stat(command.path.c_str(), &info) == 0 ? static_cast<uint64_t>(info.st_size) : 0;
      events_.publish("snapshot-saved", {{"boot", boot_}, {"path", command.path}, {"bytes", bytes}});
      return nlohmann::json{{"state", "paused"}, {"path", command.path}, {"bytes", bytes}};
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

}  // namespace keel::vmm
