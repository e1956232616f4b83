#include "machine/migration.h"

#include <fmt/format.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "base/log.h"
#include "machine/auto_converge.h"
#include "machine/layout.h"
#include "migration/stream.h"

namespace keel::machine {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kPageBytes = memory::GuestMemory::kPageBytes;
// Rounds after the first full pass before the final copy goes ahead even
// though the remainder does not fit the downtime limit: the last resort for
// a guest that dirties faster than the link even throttled to 99% (or with
// auto-converge off), which would never converge.
constexpr uint64_t kMaxDirtyRounds = 30;
constexpr int kAckTimeoutMs = 30'000;
// A destination waits this long for each part of the stream.
constexpr int kReceiveTimeoutMs = 60'000;

uint64_t elapsed_ms(Clock::time_point since) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - since).count());
}

// The first pass: every page of RAM that may hold data. The rest (never
// touched, or discarded) reads as zeros, which the destination's fresh RAM
// already is, so it is skipped without being read (reading it would
// allocate it). Dirty logging is on already, so a page the guest touches
// after this look is sent in a later round.
Result<void> mark_data_pages(const memory::GuestMemory& memory, migration::DirtyBitmap& pages) {
  std::vector<memory::ByteRange> populated =
      TRY_CONTEXT(memory.populated_ranges(), "migrate: the first pass");
  for (const memory::ByteRange& range : populated) {
    pages.set_range(range.begin / kPageBytes, (range.end - range.begin) / kPageBytes);
  }
  return ok();
}

}  // namespace

std::string_view migration_phase_name(MigrationPhase phase) {
  switch (phase) {
    case MigrationPhase::Connecting:
      return "connecting";
    case MigrationPhase::Copying:
      return "copying";
    case MigrationPhase::StopAndCopy:
      return "stop-and-copy";
    case MigrationPhase::AwaitingAck:
      return "awaiting-ack";
    case MigrationPhase::Postcopy:
      return "postcopy";
    case MigrationPhase::Completed:
      return "completed";
    case MigrationPhase::Failed:
      return "failed";
    case MigrationPhase::Cancelled:
      return "cancelled";
  }
  return "?";
}

MigrationSender::MigrationSender(Machine& machine, MigrationOptions options, Report report)
    : machine_(machine), options_(std::move(options)), report_(std::move(report)) {
  stats_.destination = options_.destination.text;
  stats_.dirty_log = std::string(kvm::dirty_log_mode_name(machine_.dirty_log_mode()));
}

Result<std::unique_ptr<MigrationSender>> MigrationSender::start(Machine& machine,
                                                                MigrationOptions options,
                                                                Report report) {
  TRY_CONTEXT(machine.check_state_saveable(), "migrate");
  if (!options.migrate_disks) TRY_CONTEXT(machine.check_disks_hand_over(), "migrate");
  if (options.postcopy && options.migrate_disks) {
    return fail(Errc::Unsupported, "migrate: postcopy does not copy disks (migrate_disks)");
  }
  if (machine.stop_status()) return fail(Errc::Busy, "migrate: the VM is stopping");
  std::unique_ptr<MigrationSender> sender(
      new MigrationSender(machine, std::move(options), std::move(report)));
  sender->thread_ = std::thread([raw = sender.get()] { raw->run(); });
  return sender;
}

MigrationSender::~MigrationSender() {
  (void)cancel();
  wait();
}

void MigrationSender::wait() {
  if (thread_.joinable()) thread_.join();
}

MigrationStats MigrationSender::stats() const {
  std::lock_guard lock(mutex_);
  MigrationStats copy = stats_;
  if (!finished_.load()) copy.total_ms = elapsed_ms(started_);
  return copy;
}

Result<void> MigrationSender::cancel() {
  if (finished_.load()) return fail(Errc::Busy, "the migration is over");
  std::lock_guard lock(mutex_);
  // Once the end is sent the destination may already be taking the machine
  // over; dropping the connection then could lose its ack and leave the
  // guest running twice. Its answer (or the ack timeout) decides instead.
  if (committed_.load() || stats_.phase == MigrationPhase::AwaitingAck ||
      stats_.phase == MigrationPhase::Postcopy) {
    return fail(Errc::Busy, "the destination is taking the machine over: too late to cancel");
  }
  cancelled_.store(true);
  // Unblocks a send; the sender thread sees the flag and resumes the
  // machine.
  if (connection_fd_ >= 0) ::shutdown(connection_fd_, SHUT_RDWR);
  return ok();
}

Result<void> MigrationSender::check_cancelled() const {
  if (cancelled_.load()) return fail(Errc::Busy, "cancelled");
  return ok();
}

void MigrationSender::set_phase(MigrationPhase phase) {
  std::lock_guard lock(mutex_);
  stats_.phase = phase;
}

void MigrationSender::run() {
  Result<void> result = migrate();
  // The throttle ends with the migration, whatever the end (the source's
  // guest runs on at full speed after a failure or cancel).
  machine_.set_throttle(0);
  // Tracking stops either way: the destination owns its copies now, or the
  // source goes on with its own disks, which it never let go of.
  disk_mirror_.reset();
  if (result) {
    {
      std::lock_guard lock(mutex_);
      stats_.phase = MigrationPhase::Completed;
      stats_.total_ms = elapsed_ms(started_);
    }
    MigrationStats done = stats();
    LOG_INFO("migration to {} completed: {} pages sent with data, {} zero pages ({} as zero "
             "records), {} bytes, {} rounds, throttle {}%, downtime {} ms",
             options_.destination.text, done.pages_sent, done.zero_pages, zero_records_,
             done.bytes_sent, done.rounds, done.throttle_percent, done.downtime_ms);
    const DowntimeBreakdown& times = done.downtime;
    LOG_INFO("migration downtime (us): pause {}, quiesce {}, save state {}, dirty log {}, last {} "
             "pages {}, send state {}, release disks and end {}, destination until ack {}",
             times.pause_us, times.quiesce_us, times.save_state_us, times.dirty_log_us,
             times.last_pages, times.last_pages_us, times.send_state_us, times.release_disks_us,
             times.ack_us);
    if (report_) report_("migration-completed", stats());
    finished_.store(true);
    machine_.stop(StopReason::Migrated, fmt::format("migrated to {}", options_.destination.text));
    // The destination owns the devices' work now.
    if (quiesced_) quiesced_->skip_kick();
    quiesced_.reset();
    return;
  }
  (void)machine_.stop_dirty_log();
  std::string message = cancelled_.load() ? "cancelled" : result.error().message();
  if (committed_.load()) {
    // Post-copy after the destination ran the machine: its writes live
    // only there, so resuming here would lose them (and its disk writes
    // would not match this RAM). QEMU's choice too: stay paused, say so.
    message += "; post-copy had begun: the VM stays paused here";
    {
      std::lock_guard lock(mutex_);
      stats_.phase = MigrationPhase::Failed;
      stats_.error = message;
      stats_.total_ms = elapsed_ms(started_);
    }
    LOG_ERROR("migration to {} failed in post-copy: {}", options_.destination.text, message);
    if (report_) report_("migration-failed", stats());
    finished_.store(true);
    return;
  }
  // The source stays the machine: logging off, its disks' locks back,
  // devices going on, then vCPUs running again if we held them.
  if (Result<void> locked = retake_disk_locks(); !locked) {
    // Never run on without the disk: another process may be writing it.
    message += fmt::format("; the VM stays paused: {}", locked.error().message());
    paused_by_us_ = false;
  }
  quiesced_.reset();
  if (paused_by_us_) {
    if (Result<void> resumed = machine_.resume(); !resumed) {
      LOG_WARN("migration failed and the VM could not be resumed: {}", resumed.error().message());
    }
  }
  {
    std::lock_guard lock(mutex_);
    stats_.phase = cancelled_.load() ? MigrationPhase::Cancelled : MigrationPhase::Failed;
    stats_.error = message;
    stats_.total_ms = elapsed_ms(started_);
  }
  LOG_WARN("migration to {} failed, the VM runs on here: {}", options_.destination.text, message);
  if (report_) report_("migration-failed", stats());
  finished_.store(true);
}

Result<void> MigrationSender::retake_disk_locks() {
  if (!disks_released_) return ok();
  // A destination that failed after taking a lock lets go as it exits.
  constexpr auto kRetry = std::chrono::milliseconds(100);
  constexpr int kAttempts = 50;
  Result<void> locked = machine_.set_disk_locks(true);
  for (int attempt = 1; !locked && attempt < kAttempts; ++attempt) {
    std::this_thread::sleep_for(kRetry);
    locked = machine_.set_disk_locks(true);
  }
  return locked;
}

Result<void> MigrationSender::send_run(migration::StreamWriter& writer, uint64_t first,
                                       uint64_t count, Pass pass) {
  std::span<const std::byte> ram = machine_.memory().ram();
  const migration::Compression compression =
      options_.compress ? migration::Compression::Zstd : migration::Compression::None;
  auto is_zero = [&](uint64_t page) {
    return migration::is_zero_page(ram.subspan(page * kPageBytes, kPageBytes));
  };
  // One frame for a sub-run of pages alike (all zero, or all with data).
  auto send_alike = [&](uint64_t start, uint64_t pages, bool zero) -> Result<void> {
    if (!zero) {
      std::vector<std::byte> frame = TRY(
          migration::encode_pages(ram, start, static_cast<uint32_t>(pages), compression));
      TRY(writer.send(migration::FrameType::Pages, frame));
    } else if (pass == Pass::Later) {
      TRY(writer.send(migration::FrameType::Pages,
                      migration::encode_zero_pages(start, static_cast<uint32_t>(pages))));
      zero_records_ += pages;
    }
    std::lock_guard lock(mutex_);
    (zero ? stats_.zero_pages : stats_.pages_sent) += pages;
    stats_.bytes_sent = writer.bytes_sent();
    stats_.remaining_pages -= std::min(stats_.remaining_pages, pages);
    return ok();
  };
  // Split the run where pages turn from zero to data and back.
  uint64_t start = first;
  bool zero = is_zero(first);
  for (uint64_t page = first + 1; page < first + count; ++page) {
    bool page_zero = is_zero(page);
    if (page_zero == zero) continue;
    TRY(send_alike(start, page - start, zero));
    start = page;
    zero = page_zero;
  }
  return send_alike(start, first + count - start, zero);
}

Result<void> MigrationSender::send_dirty(migration::StreamWriter& writer,
                                         const migration::DirtyBitmap& dirty, Pass pass) {
  const uint64_t limit_bytes_per_second = options_.bandwidth_mib << 20;
  const Clock::time_point begin = Clock::now();
  const uint64_t bytes_at_begin = writer.bytes_sent();
  Result<void> result = ok();
  dirty.for_each_run(migration::kMaxPagesPerFrame, [&](uint64_t first, uint64_t count) {
    if (!result) return;
    if (cancelled_.load()) {
      result = check_cancelled();
      return;
    }
    result = send_run(writer, first, count, pass);
    if (result && limit_bytes_per_second > 0) {
      // Hold the average since this pass began at the limit.
      auto due = begin + std::chrono::microseconds((writer.bytes_sent() - bytes_at_begin) *
                                                   1'000'000 / limit_bytes_per_second);
      std::this_thread::sleep_until(due);
    }
  });
  return result;
}

Result<void> MigrationSender::send_disk_chunks(migration::StreamWriter& writer) {
  if (!disk_mirror_) return ok();
  const uint64_t limit_bytes_per_second = options_.bandwidth_mib << 20;
  const Clock::time_point begin = Clock::now();
  uint64_t sent = 0;
  auto after_chunk = [&](uint64_t wire_bytes) -> Result<void> {
    sent += wire_bytes;
    {
      std::lock_guard lock(mutex_);
      stats_.bytes_sent = writer.bytes_sent();
      stats_.disk_bytes_copied = disk_mirror_->bytes_copied();
    }
    if (limit_bytes_per_second > 0) {
      std::this_thread::sleep_until(
          begin + std::chrono::microseconds(sent * 1'000'000 / limit_bytes_per_second));
    }
    return check_cancelled();
  };
  TRY(disk_mirror_->send_dirty(writer, after_chunk));
  std::lock_guard lock(mutex_);
  stats_.disk_remaining_bytes = disk_mirror_->dirty_bytes();
  return ok();
}

Result<void> MigrationSender::migrate() {
  const migration::StreamAddress& address = options_.destination;
  Fd connection = TRY(migration::connect_stream(address));
  {
    std::lock_guard lock(mutex_);
    connection_fd_ = connection.get();
  }
  // Clear the fd before connection closes, so cancel() never shuts down a
  // reused descriptor number.
  struct Forget {
    MigrationSender* self;
    ~Forget() {
      std::lock_guard lock(self->mutex_);
      self->connection_fd_ = -1;
    }
  } forget{this};
  TRY(check_cancelled());
  migration::StreamWriter writer(connection);
  migration::StreamReader reader(connection, address.text);
  Result<void> result = transfer(writer, reader);
  if (!result && !cancelled_.load()) {
    // A destination that refuses (another RAM size, a bad frame) says why
    // in an ack before it closes; that beats "broken pipe".
    Result<migration::Frame> answer = reader.next(500);
    if (answer && (answer->type == migration::FrameType::Ack ||
                   answer->type == migration::FrameType::Abort)) {
      Result<migration::Verdict> verdict = migration::decode_verdict(answer->payload);
      if (verdict && !verdict->ok) {
        return fail(Errc::Io, fmt::format("migrate: {} refused the machine: {}", address.text,
                                          verdict->message));
      }
    }
  }
  return result;
}

Result<void> MigrationSender::transfer(migration::StreamWriter& writer,
                                       migration::StreamReader& reader) {
  const migration::StreamAddress& address = options_.destination;
  TRY(writer.write_preamble());
  const memory::GuestMemory& memory = machine_.memory();
  TRY(writer.send(
      migration::FrameType::Hello,
      migration::encode_hello({memory.size_bytes(), migration::HostCpuSummary::of_this_host()})));

  set_phase(MigrationPhase::Copying);
  TRY_CONTEXT(machine_.start_dirty_log(), "migrate: start dirty logging");
  LOG_INFO("migration to {}: dirty log from KVM's {}", address.text,
           machine_.dirty_log_mode() == kvm::DirtyLogMode::Ring ? "dirty ring" : "dirty bitmap");
  if (options_.migrate_disks) {
    std::vector<DiskMirrorSource::Disk> disks;
    for (const Machine::WritableDisk& disk : machine_.writable_disks()) {
      disks.push_back({disk.index, disk.what, disk.blk});
    }
    if (!disks.empty()) {
      // Tracking starts before the bulk copy reads anything.
      disk_mirror_ = std::make_unique<DiskMirrorSource>(std::move(disks));
      TRY(writer.send(migration::FrameType::DiskInfo,
                      migration::encode_disk_info(disk_mirror_->info())));
      TRY(send_disk_chunks(writer));
      LOG_INFO("migration: disks copied once, {} bytes written since",
               disk_mirror_->dirty_bytes());
    }
  }
  migration::DirtyBitmap dirty(memory.page_count());
  migration::DirtyBitmap vmm_written(memory.page_count());
  TRY(mark_data_pages(memory, dirty));  // the first pass: all of RAM but what was never touched
  {
    std::lock_guard lock(mutex_);
    stats_.zero_pages = memory.page_count() - dirty.count();
  }
  uint64_t send_ms_total = 0;
  uint64_t pages_total = 0;
  AutoConvergeState converge;
  for (uint64_t round = 0;; ++round) {
    const Clock::time_point round_begin = Clock::now();
    const uint64_t round_bytes_before = writer.bytes_sent();
    {
      std::lock_guard lock(mutex_);
      stats_.remaining_pages = dirty.count();
    }
    const uint64_t pages = dirty.count();
    const uint64_t data_pages_before = stats().pages_sent;
    TRY(send_dirty(writer, dirty, round == 0 ? Pass::First : Pass::Later));
    if (round > 0) TRY(send_disk_chunks(writer));
    const uint64_t round_ms = std::max<uint64_t>(elapsed_ms(round_begin), 1);
    send_ms_total += round_ms;
    // The rate counts pages sent with their data, since zero pages cost
    // next to nothing: the remainder is assumed to be all data. Only if
    // nothing but zeros was ever sent does every page count.
    pages_total += stats().pages_sent - data_pages_before;
    const uint64_t rate_pages = pages_total > 0 ? pages_total : pages;
    dirty.clear();
    TRY(machine_.collect_dirty_pages(dirty, vmm_written));
    const uint64_t remaining = dirty.count();
    // Disk chunks written since they were sent take the link as pages do.
    const uint64_t disk_remaining_pages =
        disk_mirror_ ? disk_mirror_->dirty_bytes() / kPageBytes : 0;
    // Pages per millisecond over every pass so far: a small last round
    // says little about the link.
    const double pages_per_ms =
        static_cast<double>(rate_pages) / static_cast<double>(send_ms_total);
    const double estimate_ms =
        static_cast<double>(remaining + disk_remaining_pages) / std::max(pages_per_ms, 1e-3);
    const bool fits = estimate_ms <= static_cast<double>(options_.downtime_ms);
    if (!fits && options_.auto_converge) {
      // What the guest dirtied during this round against what the round
      // put on the wire (QEMU compares bytes too: zero records and
      // compression make the link look slower, which is what it is).
      const uint32_t before = converge.throttle_percent;
      converge = next_auto_converge(converge,
                                    (remaining + disk_remaining_pages) * kPageBytes,
                                    writer.bytes_sent() - round_bytes_before);
      if (converge.throttle_percent != before) {
        machine_.set_throttle(converge.throttle_percent);
        LOG_INFO("migration round {}: the guest dirties faster than the link; vCPUs throttled "
                 "to {}%", round, converge.throttle_percent);
      }
    }
    {
      std::lock_guard lock(mutex_);
      stats_.throttle_percent = converge.throttle_percent;
      stats_.rounds = round;
      stats_.remaining_pages = remaining;
      stats_.dirty_pages_per_second = remaining * 1000 / round_ms;
      stats_.bandwidth_bytes_per_second =
          writer.bytes_sent() * 1000 / std::max<uint64_t>(elapsed_ms(started_), 1);
    }
    if (report_) report_("migration-progress", stats());
    LOG_INFO("migration round {}: {} pages in {} ms, {} dirty (~{:.0f} ms to send)", round, pages,
             round_ms, remaining, estimate_ms);
    if (fits) break;
    if (options_.postcopy) {
      LOG_INFO("migration: {} pages still dirty after the first pass: switching to post-copy",
               remaining);
      break;
    }
    if (round >= kMaxDirtyRounds) {
      LOG_WARN("migration: {} pages still dirty after {} rounds; stopping the VM to finish",
               remaining, round);
      break;
    }
    TRY(check_cancelled());
  }

  // Stop and copy. Each step's time goes to the statistics as it ends.
  set_phase(MigrationPhase::StopAndCopy);
  const Clock::time_point pause_begin = Clock::now();
  Clock::time_point lap_begin = pause_begin;
  auto lap = [&](uint64_t DowntimeBreakdown::*field) {
    const Clock::time_point now = Clock::now();
    std::lock_guard lock(mutex_);
    stats_.downtime.*field = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::microseconds>(now - lap_begin).count());
    lap_begin = now;
  };
  if (!machine_.paused()) {
    TRY_CONTEXT(machine_.pause(), "migrate: pause");
    paused_by_us_ = true;
  }
  // Held now: if the handover fails they resume at full speed.
  machine_.set_throttle(0);
  lap(&DowntimeBreakdown::pause_us);
  // Devices quiesced after the vCPUs stop (their last completions write
  // RAM), then the state (completing a vCPU's half-done I/O may write RAM),
  // and only then the last dirty pages.
  quiesced_.emplace(TRY_CONTEXT(machine_.quiesce_devices(), "migrate"));
  lap(&DowntimeBreakdown::quiesce_us);
  migration::MachineState state = TRY_CONTEXT(machine_.save_state(*quiesced_), "migrate");
  lap(&DowntimeBreakdown::save_state_us);
  TRY(machine_.collect_dirty_pages(dirty, vmm_written));
  // A device may have written a page through a host_span after that page
  // was collected and sent: resend every page the VMM wrote at all.
  dirty.merge(vmm_written);
  {
    std::lock_guard lock(mutex_);
    stats_.remaining_pages = dirty.count();
    stats_.downtime.last_pages = dirty.count();
  }
  lap(&DowntimeBreakdown::dirty_log_us);
  if (options_.postcopy && !dirty.empty()) {
    // The destination runs as soon as it has the state; the dirty pages
    // follow (none is sent paused). The disks' locks go first, as before
    // an end.
    {
      std::lock_guard lock(mutex_);
      stats_.downtime.last_pages = 0;
    }
    TRY(writer.send(migration::FrameType::MachineState, migration::encode_machine_state(state)));
    lap(&DowntimeBreakdown::send_state_us);
    disks_released_ = true;
    TRY_CONTEXT(machine_.set_disk_locks(false), "migrate");
    TRY(writer.send(migration::FrameType::PostcopyStart, migration::encode_postcopy_start(dirty)));
    lap(&DowntimeBreakdown::release_disks_us);
    return postcopy(writer, reader, dirty, pause_begin);
  }
  TRY(send_dirty(writer, dirty, Pass::Later));
  // The devices are quiesced: no disk write is in flight or can start.
  TRY(send_disk_chunks(writer));
  lap(&DowntimeBreakdown::last_pages_us);
  TRY(writer.send(migration::FrameType::MachineState, migration::encode_machine_state(state)));
  lap(&DowntimeBreakdown::send_state_us);
  if (!options_.migrate_disks) {
    // The disks' locks go before the end, so the destination, which takes
    // them once the end arrived, finds them free; run() takes them back if
    // the handover fails. Copied disks are never let go of.
    disks_released_ = true;
    TRY_CONTEXT(machine_.set_disk_locks(false), "migrate");
  }
  uint64_t rounds = stats().rounds;
  TRY(writer.send(migration::FrameType::End, migration::encode_end({stats().pages_sent, rounds})));
  lap(&DowntimeBreakdown::release_disks_us);
  {
    std::lock_guard lock(mutex_);
    stats_.bytes_sent = writer.bytes_sent();
    stats_.phase = MigrationPhase::AwaitingAck;
  }
  migration::Frame answer = TRY(reader.next(kAckTimeoutMs));
  lap(&DowntimeBreakdown::ack_us);
  if (answer.type != migration::FrameType::Ack && answer.type != migration::FrameType::Abort) {
    return fail(Errc::Corrupt, fmt::format("migrate: {} answered with a {} frame", address.text,
                                           migration::frame_type_name(answer.type)));
  }
  migration::Verdict verdict = TRY(migration::decode_verdict(answer.payload));
  if (answer.type == migration::FrameType::Abort || !verdict.ok) {
    return fail(Errc::Io,
                fmt::format("migrate: {} refused the machine: {}", address.text, verdict.message));
  }
  committed_.store(true);
  std::lock_guard lock(mutex_);
  stats_.downtime_ms = elapsed_ms(pause_begin);
  return ok();
}

Result<void> MigrationSender::postcopy(migration::StreamWriter& writer,
                                       migration::StreamReader& reader,
                                       const migration::DirtyBitmap& pending,
                                       Clock::time_point paused_at) {
  const std::string& peer = options_.destination.text;
  const uint64_t ram_pages = machine_.memory().page_count();
  const Clock::time_point switched = Clock::now();
  migration::DirtyBitmap sent(ram_pages);
  {
    std::lock_guard lock(mutex_);
    stats_.phase = MigrationPhase::Postcopy;
    stats_.remaining_pages = pending.count();
  }
  LOG_INFO("migration to {}: post-copy of {} pages", peer, pending.count());
  auto wanted = [&](uint64_t page) { return pending.test(page) && !sent.test(page); };
  // Sends [first, end) (pages still wanted, at most a frame's worth).
  auto send_wanted = [&](uint64_t first, uint64_t end, uint64_t PostcopyStats::*counter)
      -> Result<void> {
    TRY(send_run(writer, first, end - first, Pass::Later));
    for (uint64_t page = first; page < end; ++page) sent.set(page);
    std::lock_guard lock(mutex_);
    stats_.postcopy.*counter += end - first;
    return ok();
  };
  bool running = false;  // the destination acked that the machine runs there
  bool ended = false;    // every page and the end are sent
  bool complete = false;  // the destination acked that it holds every page
  auto answer = [&](const migration::Frame& frame) -> Result<void> {
    switch (frame.type) {
      case migration::FrameType::PageRequest: {
        migration::PageRequest request = TRY_CONTEXT(
            migration::decode_page_request(frame.payload, ram_pages), "migrate: " + peer);
        // A page not pending is there already; a page sent is on its way.
        const uint64_t end = request.first_page + request.page_count;
        for (uint64_t page = request.first_page; page < end;) {
          if (!wanted(page)) {
            ++page;
            continue;
          }
          uint64_t run_end = page + 1;
          while (run_end < end && wanted(run_end)) ++run_end;
          TRY(send_wanted(page, run_end, &PostcopyStats::pages_requested));
          page = run_end;
        }
        return ok();
      }
      case migration::FrameType::Ack:
      case migration::FrameType::Abort: {
        migration::Verdict verdict = TRY(migration::decode_verdict(frame.payload));
        if (frame.type == migration::FrameType::Abort || !verdict.ok) {
          return fail(Errc::Io, fmt::format("migrate: {} {}: {}", peer,
                                            running ? "failed in post-copy" : "refused the machine",
                                            verdict.message));
        }
        if (!running) {
          // No way back from here: the guest writes its RAM there now.
          running = true;
          committed_.store(true);
          std::lock_guard lock(mutex_);
          stats_.postcopy.running_on_destination = true;
          stats_.downtime_ms = elapsed_ms(paused_at);
          LOG_INFO("migration to {}: the machine runs there after {} ms paused", peer,
                   stats_.downtime_ms);
          return ok();
        }
        if (!ended) {
          return fail(Errc::Corrupt,
                      fmt::format("migrate: {} acked every page before the end", peer));
        }
        complete = true;
        return ok();
      }
      default:
        return fail(Errc::Corrupt, fmt::format("migrate: {} answered with a {} frame in "
                                               "post-copy",
                                               peer, migration::frame_type_name(frame.type)));
    }
  };
  const uint64_t limit_bytes_per_second = options_.bandwidth_mib << 20;
  uint64_t background_bytes = 0;
  uint64_t cursor = 0;  // the background stream's next page
  while (!complete) {
    // The destination's requests go ahead of the background stream, which
    // waits for them as long as the bandwidth limit holds it back anyway.
    int timeout_ms = 0;
    if (ended) {
      timeout_ms = kAckTimeoutMs;
    } else if (limit_bytes_per_second > 0) {
      const auto due = switched + std::chrono::microseconds(background_bytes * 1'000'000 /
                                                            limit_bytes_per_second);
      timeout_ms = static_cast<int>(std::max<int64_t>(
          0, std::chrono::duration_cast<std::chrono::milliseconds>(due - Clock::now()).count()));
    }
    if (TRY(reader.readable(timeout_ms))) {
      TRY(answer(TRY(reader.next(kAckTimeoutMs))));
      continue;
    }
    if (ended) {
      return fail(Errc::Timeout, fmt::format("migrate: {} sent nothing for {} s in post-copy",
                                              peer, kAckTimeoutMs / 1000));
    }
    while (cursor < ram_pages && !wanted(cursor)) ++cursor;
    if (cursor == ram_pages) {
      TRY(writer.send(migration::FrameType::End,
                      migration::encode_end({stats().pages_sent, stats().rounds})));
      ended = true;
      std::lock_guard lock(mutex_);
      stats_.postcopy.ms = elapsed_ms(switched);
      stats_.bytes_sent = writer.bytes_sent();
      continue;
    }
    uint64_t run_end = cursor + 1;
    while (run_end < ram_pages && run_end - cursor < migration::kMaxPagesPerFrame &&
           wanted(run_end)) {
      ++run_end;
    }
    const uint64_t before = writer.bytes_sent();
    TRY(send_wanted(cursor, run_end, &PostcopyStats::background_pages));
    background_bytes += writer.bytes_sent() - before;
  }
  const MigrationStats done = stats();
  LOG_INFO("migration to {}: post-copy done in {} ms: {} pages requested, {} in the background",
           peer, done.postcopy.ms, done.postcopy.pages_requested, done.postcopy.background_pages);
  return ok();
}

Result<std::unique_ptr<Machine>> receive_migration(const Fd& connection, const std::string& peer,
                                                   const VmConfig& config, const kvm::Kvm& kvm,
                                                   devices::Serial::Output serial_output,
                                                   std::unique_ptr<PostcopyIncoming>* postcopy) {
  migration::StreamWriter writer(connection);
  migration::StreamReader reader(connection, peer);
  const std::string label = fmt::format("incoming migration from {}", peer);
  std::unique_ptr<PostcopyIncoming> incoming;  // once a post-copy start arrived
  auto receive = [&]() -> Result<std::unique_ptr<Machine>> {
    TRY(reader.read_preamble(kReceiveTimeoutMs));
    migration::Frame hello_frame = TRY(reader.next(kReceiveTimeoutMs));
    if (hello_frame.type != migration::FrameType::Hello) {
      return fail(Errc::Corrupt, fmt::format("{}: a {} frame before the hello", label,
                                             migration::frame_type_name(hello_frame.type)));
    }
    migration::Hello hello = TRY(migration::decode_hello(hello_frame.payload));
    if (hello.ram_bytes != config.memory_mib << 20) {
      return fail(Errc::InvalidArgument,
                  fmt::format("{}: the source has {} bytes of RAM, this config {} MiB", label,
                              hello.ram_bytes, config.memory_mib));
    }
    std::optional<memory::GuestMemory> memory = TRY(memory::GuestMemory::create(
        config.memory_mib << 20, layout::kPciHoleStart, layout::kPciHoleEnd, config.memory_backend));
    // The machine is built while the pages arrive, so that after the end
    // only the saved state is applied (Machine::prebuild). Not with copied
    // disks: the copies are written here until the end and opened after.
    std::optional<Machine::Prebuilt> prebuilt;
    auto build = [&](block::Locking writable_disk_locking) -> Result<void> {
      const Clock::time_point begin = Clock::now();
      prebuilt.emplace(TRY_CONTEXT(
          Machine::prebuild(config, kvm, std::move(*memory), writable_disk_locking), label));
      memory.reset();
      LOG_INFO("{}: machine prebuilt in {} us", label,
               std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - begin)
                   .count());
      return ok();
    };
    std::optional<migration::MachineState> state;
    std::optional<DiskMirrorTarget> disk_copies;  // the source copies its disks
    uint64_t pages = 0;
    for (;;) {
      migration::Frame frame = TRY(reader.next(kReceiveTimeoutMs));
      // The first frame after the hello says whether disks are copied (a
      // disk info frame comes first then).
      if (!prebuilt && !disk_copies &&
          (frame.type == migration::FrameType::Pages ||
           frame.type == migration::FrameType::MachineState ||
           frame.type == migration::FrameType::End)) {
        // The source holds the shared disks until the end: no locks yet.
        TRY(build(block::Locking::ForceShare));
      }
      switch (frame.type) {
        case migration::FrameType::Pages:
          if (state) {
            return fail(Errc::Corrupt, fmt::format("{}: pages after the machine state", label));
          }
          pages += TRY_CONTEXT(
              migration::apply_pages(frame.payload, prebuilt ? prebuilt->ram() : memory->ram()),
              label);
          continue;
        case migration::FrameType::MachineState:
          if (state) return fail(Errc::Corrupt, fmt::format("{}: a second machine state", label));
          state = TRY(migration::decode_machine_state(frame.payload, label));
          continue;
        case migration::FrameType::End: {
          migration::EndSummary end = TRY(migration::decode_end(frame.payload));
          if (!state) return fail(Errc::Corrupt, fmt::format("{}: end before the state", label));
          LOG_INFO("{}: {} pages received ({} sent) in {} rounds", label, pages, end.pages_sent,
                   end.rounds);
          const Clock::time_point restore_begin = Clock::now();
          // Never run on a partial copy: finish() refuses a missing chunk.
          if (disk_copies) {
            TRY_CONTEXT(disk_copies->finish(), label);
            // Copied disks are this host's own files, locked as they open.
            TRY(build(block::Locking::Lock));
          }
          const DiskHandover handover = disk_copies ? DiskHandover::Copied : DiskHandover::Shared;
          std::unique_ptr<Machine> machine = TRY(std::move(*prebuilt).restore(
              label, *state, hello.host, std::move(serial_output), handover));
          const Clock::time_point restored = Clock::now();
          // The source let go of its disks before it sent the end.
          if (handover == DiskHandover::Shared) TRY_CONTEXT(machine->set_disk_locks(true), label);
          LOG_INFO("{}: machine rebuilt in {} us, disks locked in {} us", label,
                   std::chrono::duration_cast<std::chrono::microseconds>(restored - restore_begin)
                       .count(),
                   std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - restored)
                       .count());
          return machine;
        }
        case migration::FrameType::DiskInfo: {
          if (disk_copies || prebuilt) {
            return fail(Errc::Corrupt, fmt::format("{}: an unexpected disk info frame", label));
          }
          migration::DiskInfo info = TRY_CONTEXT(migration::decode_disk_info(frame.payload), label);
          disk_copies.emplace(TRY_CONTEXT(DiskMirrorTarget::open(info, config), label));
          continue;
        }
        case migration::FrameType::DiskChunk: {
          if (!disk_copies || state) {
            return fail(Errc::Corrupt, fmt::format("{}: an unexpected disk chunk frame", label));
          }
          migration::DiskChunk chunk =
              TRY_CONTEXT(migration::decode_disk_chunk(frame.payload), label);
          TRY_CONTEXT(disk_copies->apply(chunk), label);
          continue;
        }
        case migration::FrameType::Abort: {
          migration::Verdict verdict = TRY(migration::decode_verdict(frame.payload));
          return fail(Errc::Io, fmt::format("{}: the source gave up: {}", label, verdict.message));
        }
        case migration::FrameType::PostcopyStart: {
          if (postcopy == nullptr) {
            return fail(Errc::Unsupported, fmt::format("{}: post-copy is not supported here",
                                                       label));
          }
          if (!state || !prebuilt || disk_copies) {
            return fail(Errc::Corrupt,
                        fmt::format("{}: a post-copy start before the machine state", label));
          }
          migration::DirtyBitmap pending = TRY_CONTEXT(
              migration::decode_postcopy_start(frame.payload, prebuilt->memory().page_count()),
              label);
          LOG_INFO("{}: {} pages received, post-copy of {} more", label, pages, pending.count());
          // RAM registered with userfaultfd before anything can touch it:
          // restoring the devices may read it already.
          incoming = TRY(PostcopyIncoming::start(connection, label, prebuilt->memory(),
                                                 std::move(pending)));
          std::unique_ptr<Machine> machine = TRY(std::move(*prebuilt).restore(
              label, *state, hello.host, std::move(serial_output), DiskHandover::Shared));
          // The source let go of its disks before it sent the post-copy start.
          TRY_CONTEXT(machine->set_disk_locks(true), label);
          return machine;
        }
        case migration::FrameType::Hello:
        case migration::FrameType::Ack:
        case migration::FrameType::PageRequest:
          return fail(Errc::Corrupt, fmt::format("{}: an unexpected {} frame", label,
                                                 migration::frame_type_name(frame.type)));
      }
    }
  };
  Result<std::unique_ptr<Machine>> machine = receive();
  if (machine && incoming) {
    // The fault thread writes too: the ack goes through it.
    Result<void> acked = incoming->running(**machine);
    if (acked) {
      *postcopy = std::move(incoming);
      return machine;
    }
    machine = fail(Error(acked.error()).wrap(label));
  }
  if (!machine) {
    const std::vector<std::byte> refusal =
        migration::encode_verdict({false, machine.error().message()});
    if (incoming) {
      // Nothing ran. Its fault thread may be writing a request: refuse
      // through it, then end its threads.
      (void)incoming->send(migration::FrameType::Ack, refusal);
      incoming.reset();
    } else {
      (void)writer.send(migration::FrameType::Ack, refusal);
    }
    return fail(machine.error());
  }
  TRY_CONTEXT(writer.send(migration::FrameType::Ack, migration::encode_verdict({true, "running"})),
              label);
  return machine;
}

}  // namespace keel::machine
