// ApiControl: the machine side of the control API in keel-vmm. The API
// thread queues Commands (api::CommandQueue); keel-vmm's main thread, which
// owns the Machine, polls fd() and answers them here, and publishes the
// lifecycle events (created, running, paused, resumed, power-button,
// balloon, guest-panic, migration-started/-progress/-completed/-failed,
// migrated, stopping, stopped, reset) to the EventLog the events stream
// reads. It owns the machine's MigrationSender (its own thread).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>

#include "api/command_queue.h"
#include "api/event_log.h"
#include "machine/machine.h"
#include "machine/migration.h"

namespace keel::vmm {

class ApiControl {
 public:
  ApiControl(api::CommandQueue& queue, api::EventLog& events) : queue_(queue), events_(events) {}
  // Anything still queued is refused: no machine will answer it.
  ~ApiControl() { queue_.close("keel-vmm is exiting"); }

  int fd() const { return queue_.ready_event().get(); }

  void created(uint64_t boot);
  void running();
  void stopping(const machine::Machine& machine);
  // rebooting: main builds the next Machine for a guest (or API) reset.
  void stopped(const machine::StopStatus& status, bool rebooting);

  // Answers every pending command for machine. host_stop is set when one
  // stopped the VM (so a reset racing with it does not reboot).
  void serve(machine::Machine& machine, bool& host_stop);
  // Before the machine goes away: a migration still running is cancelled
  // and its thread joined.
  void machine_ended();

 private:
  api::Reply execute(const api::Command& command, machine::Machine& machine, bool& host_stop);
  api::Reply start_migration(const api::MigrateRequest& request, machine::Machine& machine);
  bool migrating() const { return migration_ != nullptr && !migration_->finished(); }
  double uptime_seconds() const;

  api::CommandQueue& queue_;
  api::EventLog& events_;
  uint64_t boot_ = 0;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  std::unique_ptr<machine::MigrationSender> migration_;
  // The last migration's statistics, kept after its machine is gone.
  std::optional<machine::MigrationStats> last_migration_;
};

}  // namespace keel::vmm
