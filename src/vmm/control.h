// ApiControl: the machine side of the control API in keel-vmm. The API
// thread queues Commands (api::CommandQueue); keel-vmm's main thread, which
// owns the Machine, polls fd() and answers them here, and publishes the
// lifecycle events (configured, created, running, paused, resumed,
// power-button, balloon, guest-panic, migration-started/-progress/-completed/
// -failed, migrated, stopping, stopped, reset, device-added, device-removed,
// eject-timeout, disk-resized) to the EventLog the events stream reads; an
// unplug's end is published from the thread that saw it. It owns the
// machine's MigrationSender (its own thread). Before start (keel-vmm
// --api-socket without --kernel or --config) there is no Machine yet:
// serve_setup answers then, in the states not-configured and configured, and
// starts, restores or receives the first machine.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>

#include "api/command_queue.h"
#include "api/event_log.h"
#include "api/vm_status.h"
#include "machine/machine.h"
#include "machine/migration.h"

namespace keel::vmm {

class ApiControl {
 public:
  // status: where GET /api/v1/vm's answer is published for the API thread.
  ApiControl(api::CommandQueue& queue, api::EventLog& events, api::VmStatus& status)
      : queue_(queue), events_(events), status_(status) {}
  // Anything still queued is refused: no machine will answer it.
  ~ApiControl() { queue_.close("keel-vmm is exiting"); }

  int fd() const { return queue_.ready_event().get(); }

  void created(uint64_t boot);
  void running(const machine::Machine& machine);
  void stopping(const machine::Machine& machine);
  // rebooting: main builds the next Machine for a guest (or API) reset.
  void stopped(const machine::StopStatus& status, bool rebooting);

  // Answers every pending command for machine. host_stop is set when one
  // stopped the VM (so a reset racing with it does not reboot).
  void serve(machine::Machine& machine, bool& host_stop);
  // Before the machine goes away: a migration still running is cancelled
  // and its thread joined.
  void machine_ended();

  // Before start: the configuration PUT /api/v1/vm/config sets, checked
  // against this host, and the start that builds the first Machine from it.
  struct Setup {
    uint32_t max_vcpus = 1;
    uint64_t host_memory_bytes = 0;
    std::optional<machine::VmConfig> config;
    // Opens the consoles and builds the first Machine; on error nothing is
    // left behind and the VM stays configured.
    std::function<Result<void>(const machine::VmConfig&)> start;
    // PUT /api/v1/vm/restore: builds the first Machine from a snapshot,
    // whose configuration it returns (it replaces any set before); on error
    // nothing is left behind.
    std::function<Result<machine::VmConfig>(const api::RestoreRequest&)> restore;
    // PUT /api/v1/vm/receive: listens on the source address for the
    // configured VM; keel-vmm then waits there for a live migration (state
    // receiving) and runs the machine it receives.
    std::function<Result<void>(const std::string& source, const machine::VmConfig&)> receive;
    bool started = false;  // set once start, restore or receive succeeded
    std::string_view started_state = "running";  // the state then: running, paused, receiving
  };
  // Answers every pending command before start; PUT /api/v1/vm/stop sets
  // host_stop (keel-vmm exits without starting).
  void serve_setup(Setup& setup, bool& host_stop);

 private:
  api::Reply execute(const api::Command& command, machine::Machine& machine, bool& host_stop);
  api::Reply execute_setup(const api::Command& command, Setup& setup, bool& host_stop);
  // Answers every pending command with execute.
  void serve_with(const std::function<api::Reply(const api::Command&)>& execute);
  api::Reply start_migration(const api::MigrateRequest& request, machine::Machine& machine);
  bool migrating() const { return migration_ != nullptr && !migration_->finished(); }
  // A post-copy migration failed after the destination ran the machine:
  // this copy is stale (the guest's later writes lived only there), so it
  // must not run, be snapshotted or be migrated again; it can only stop.
  // Fails (Busy, naming why) in that case.
  Result<void> check_not_moved_by_postcopy() const;
  double uptime_seconds() const;
  // Publishes GET /api/v1/vm's answer if the state or boot changed since
  // the last time (the configuration changes only with the boot).
  void publish(const machine::Machine& machine);
  void publish(const Setup& setup);

  api::CommandQueue& queue_;
  api::EventLog& events_;
  api::VmStatus& status_;
  std::string_view published_state_;  // "" forces the next publish
  uint64_t published_boot_ = 0;
  uint64_t boot_ = 0;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  std::unique_ptr<machine::MigrationSender> migration_;
  // The last migration's statistics, kept after its machine is gone.
  std::optional<machine::MigrationStats> last_migration_;
};

}  // namespace keel::vmm
