// Live migration of a Machine (docs/migration-protocol.md). The source
// runs a MigrationSender on its own thread: pre-copy of all RAM, dirty
// rounds until the remainder fits the downtime limit (the vCPUs throttled
// more each round the guest outpaces the link: auto-converge), then pause, the last
// pages, the machine state, and the destination's ack before the machine
// stops for good (StopReason::Migrated). Any failure before the ack leaves
// the source running as before. The destination calls receive_migration,
// which builds the machine while the pages arrive (Machine::prebuild) and
// lets it run only once the whole state has arrived and passed every check.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

#include "base/fd.h"
#include "base/result.h"
#include "machine/disk_mirror.h"
#include "machine/machine.h"
#include "machine/postcopy.h"
#include "migration/stream.h"
#include "migration/transport.h"

namespace keel::machine {

struct MigrationOptions {
  migration::StreamAddress destination;
  uint64_t downtime_ms = 300;  // the longest pause the final copy may take
  uint64_t bandwidth_mib = 0;  // MiB/s on the wire, 0 for no limit
  bool compress = false;       // zstd per pages frame
  // Throttle the vCPUs (Machine::set_throttle) while the guest dirties RAM
  // faster than the link carries it (machine/auto_converge.h), so the
  // remainder comes to fit the downtime limit.
  bool auto_converge = true;
  // Copy the writable disks' contents into the destination's own images
  // (machine/disk_mirror.h) instead of handing shared images over.
  bool migrate_disks = false;
  // Post-copy (docs/migration-protocol.md): after the first full pass, the
  // vCPUs stop here, the machine state and the list of pages not yet sent
  // go over and the destination runs at once; the rest follows, the pages
  // the destination asks for first. Not with migrate_disks.
  bool postcopy = false;
};

enum class MigrationPhase {
  Connecting,
  Copying,      // all RAM, then dirty rounds, vCPUs running
  StopAndCopy,  // vCPUs paused: the last pages and the machine state
  AwaitingAck,
  Postcopy,  // the destination runs; the pages it lacks still go over
  Completed,
  Failed,
  Cancelled,
};
std::string_view migration_phase_name(MigrationPhase phase);

// Where the stop-and-copy's time went, in microseconds, in order: the
// vCPUs paused, devices quiesced, state taken, the last dirty log fetched,
// the last pages sent, the state sent, the disks' locks let go and the end
// sent, then the destination's rebuild until its ack arrived.
struct DowntimeBreakdown {
  uint64_t pause_us = 0;
  uint64_t quiesce_us = 0;
  uint64_t save_state_us = 0;
  uint64_t dirty_log_us = 0;
  uint64_t last_pages_us = 0;
  uint64_t last_pages = 0;  // how many, zero ones included
  uint64_t send_state_us = 0;
  uint64_t release_disks_us = 0;
  uint64_t ack_us = 0;
};

struct PostcopyStats {
  // The destination acked that the machine runs there: the source can
  // never resume without losing its writes.
  bool running_on_destination = false;
  uint64_t pages_requested = 0;   // sent because the destination asked (a fault there)
  uint64_t background_pages = 0;  // sent in order behind them
  uint64_t ms = 0;                // from the switch-over to the last page sent
};

struct MigrationStats {
  MigrationPhase phase = MigrationPhase::Connecting;
  std::string destination;
  std::string dirty_log;                // "ring" or "bitmap": how KVM reports the guest's writes
  uint64_t rounds = 0;                  // dirty rounds after the first full pass
  uint64_t pages_sent = 0;              // with their data, counting resent pages each time
  uint64_t zero_pages = 0;              // found all zeros: skipped in the first pass, else a zero record
  uint64_t bytes_sent = 0;              // on the wire
  uint64_t remaining_pages = 0;         // dirty, not yet sent
  uint64_t dirty_pages_per_second = 0;  // in the last round
  uint64_t bandwidth_bytes_per_second = 0;
  // The vCPUs' throttle auto-converge set after the last round, 0 to 99
  // (once the migration is over: the last one in force).
  uint32_t throttle_percent = 0;
  uint64_t total_ms = 0;
  uint64_t downtime_ms = 0;  // from the pause to the ack
  uint64_t disk_bytes_copied = 0;     // migrate_disks: chunk bytes read and sent, resent ones too
  uint64_t disk_remaining_bytes = 0;  // migrate_disks: written since last sent
  DowntimeBreakdown downtime;  // filled in as the stop-and-copy goes
  PostcopyStats postcopy;      // options.postcopy
  std::string error;         // Failed, Cancelled
};

class MigrationSender {
 public:
  // Called on the sender thread: "migration-progress" after each round,
  // then "migration-completed" or "migration-failed" once.
  using Report = std::function<void(std::string_view event, const MigrationStats& stats)>;

  // Refuses at once (before connecting) a machine whose state cannot be
  // saved (any virtio device, Unsupported) or one that is stopping.
  static Result<std::unique_ptr<MigrationSender>> start(Machine& machine, MigrationOptions options,
                                                        Report report);
  // Cancels a migration still running and joins the thread.
  ~MigrationSender();

  MigrationStats stats() const;
  bool finished() const { return finished_.load(); }
  // Asks the migration to give up (the source keeps running); Busy once
  // the end was sent (the destination's answer decides then) or it is over.
  Result<void> cancel();
  // Joins the migration thread (after a cancel, or once it finished).
  void wait();

 private:
  MigrationSender(Machine& machine, MigrationOptions options, Report report);
  void run();
  Result<void> migrate();
  // Everything after connecting: the copy rounds, the final state, the ack.
  Result<void> transfer(migration::StreamWriter& writer, migration::StreamReader& reader);
  // migrate_disks: every disk chunk dirty now, paced as RAM is.
  Result<void> send_disk_chunks(migration::StreamWriter& writer);
  // The first pass skips all-zero pages (the destination's fresh RAM is
  // zero); later passes send a page that became zero as a zero record.
  enum class Pass { First, Later };
  Result<void> send_dirty(migration::StreamWriter& writer, const migration::DirtyBitmap& dirty,
                          Pass pass);
  // Pages [first, first + count), at most kMaxPagesPerFrame, in frames of
  // pages alike (all zero, or all with data).
  Result<void> send_run(migration::StreamWriter& writer, uint64_t first, uint64_t count,
                        Pass pass);
  // Post-copy once the destination has the machine state and the list of
  // pages still to come (pending): serves its requests ahead of the rest.
  // paused_at: when the vCPUs stopped, for the downtime.
  Result<void> postcopy(migration::StreamWriter& writer, migration::StreamReader& reader,
                        const migration::DirtyBitmap& pending,
                        std::chrono::steady_clock::time_point paused_at);
  Result<void> check_cancelled() const;
  // After a failed handover: the disks' locks again (retried for a while).
  Result<void> retake_disk_locks();
  void set_phase(MigrationPhase phase);

  Machine& machine_;
  const MigrationOptions options_;
  const Report report_;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();

  mutable std::mutex mutex_;  // guards stats_ and connection_fd_
  MigrationStats stats_;
  int connection_fd_ = -1;  // shut down by cancel() to unblock a send

  std::atomic<bool> cancelled_{false};
  std::atomic<bool> committed_{false};  // the ack arrived: no way back
  std::atomic<bool> finished_{false};
  bool paused_by_us_ = false;
  // Held from the stop-and-copy to the end (released on failure, so the
  // source's devices go on).
  std::optional<Machine::QuiescedDevices> quiesced_;
  std::unique_ptr<DiskMirrorSource> disk_mirror_;  // migrate_disks, while it runs
  uint64_t zero_records_ = 0;  // pages sent as zero records (not the first pass's skipped ones)
  bool disks_released_ = false;  // the disks' locks were let go: take them back on failure
  std::thread thread_;
};

// The destination's half: reads the stream from connection (peer names it
// in messages) into fresh RAM of config's size. At the first frame after
// the hello it builds the machine on that RAM (Machine::prebuild, writable
// disks without their locks), unless a disk info frame says the disks are
// copied (then after the end, once the copies are complete). After the end
// it applies the state (Machine::Prebuilt::restore, which checks it first),
// takes the shared disks' locks and acks. Any failure is sent back as a
// negative ack (best effort) and returned; nothing has run then, and the
// prebuilt machine is let go of. A post-copy start in place of the end
// (machine/postcopy.h) hands the rest to *postcopy, which must outlive
// the machine's run and go before the machine; without postcopy it is
// refused.
Result<std::unique_ptr<Machine>> receive_migration(
    const Fd& connection, const std::string& peer, const VmConfig& config, const kvm::Kvm& kvm,
    devices::Serial::Output serial_output,
    std::unique_ptr<PostcopyIncoming>* postcopy = nullptr);

}  // namespace keel::machine
