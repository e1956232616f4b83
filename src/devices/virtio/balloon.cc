// virtio-balloon: see balloon.h for the status card.
#include "devices/virtio/balloon.h"

#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "base/log.h"
#include "base/records.h"

namespace keel::devices::virtio {
namespace {

constexpr const char* kRoleNames[] = {"inflateq", "deflateq", "statsq", "reporting_vq"};
// PFNs read, sorted and coalesced at a time.
constexpr size_t kPfnChunk = 1024;
constexpr uint32_t kMaxTargetPages = std::numeric_limits<uint32_t>::max();

Result<uint32_t> target_pages(uint64_t target_mib, uint64_t guest_memory_bytes) {
  if (guest_memory_bytes != 0 && target_mib > guest_memory_bytes >> 20) {
    return fail(Errc::OutOfRange,
                fmt::format("virtio-balloon: a target of {} MiB is more than the guest's {} MiB",
                            target_mib, guest_memory_bytes >> 20));
  }
  if (target_mib > kMaxTargetPages / kBalloonPagesPerMib) {
    return fail(Errc::OutOfRange,
                fmt::format("virtio-balloon: a target of {} MiB does not fit num_pages",
                            target_mib));
  }
  return static_cast<uint32_t>(target_mib * kBalloonPagesPerMib);
}

}  // namespace

Result<std::unique_ptr<Balloon>> Balloon::create(const BalloonOptions& options) {
  TRY(target_pages(options.target_mib, options.guest_memory_bytes));
  return std::unique_ptr<Balloon>(new Balloon(options));
}

Balloon::Balloon(const BalloonOptions& options)
    : options_(options),
      num_pages_(static_cast<uint32_t>(options.target_mib * kBalloonPagesPerMib)) {
  chain_.segments.reserve(kQueueSize);
  pfns_.reserve(kPfnChunk);
  stats_bytes_.reserve(kMaxStatsBytes);
}

Balloon::~Balloon() { reset(); }

uint64_t Balloon::features() const {
  uint64_t features = kBalloonFeatureStatsVq;
  if (options_.deflate_on_oom) features |= kBalloonFeatureDeflateOnOom;
  if (options_.free_page_reporting) features |= kBalloonFeaturePageReporting;
  return features;
}

std::vector<uint16_t> Balloon::queue_max_sizes() const {
  // inflateq, deflateq, statsq (STATS_VQ is always offered), and
  // reporting_vq when offered; see the status card for the numbering.
  std::vector<uint16_t> sizes(3, kQueueSize);
  if (options_.free_page_reporting) sizes.push_back(kQueueSize);
  return sizes;
}

void Balloon::read_config(uint32_t offset, std::span<std::byte> data) {
  BalloonConfigSpace config{};
  {
    std::lock_guard lock(mutex_);
    config.num_pages = num_pages_;
    config.actual = actual_;
  }
  // The transport checked the range.
  std::memcpy(data.data(), reinterpret_cast<const std::byte*>(&config) + offset, data.size());
}

void Balloon::write_config(uint32_t offset, std::span<const std::byte> data) {
  if (offset != offsetof(BalloonConfigSpace, actual) || data.size() != sizeof(uint32_t)) {
    LOG_RATELIMITED(warn,
                    "virtio-balloon: config write of {} bytes at offset {} ignored (only actual, "
                    "4 bytes at offset 4, is writable)",
                    data.size(), offset);
    return;
  }
  uint32_t actual = 0;
  std::memcpy(&actual, data.data(), sizeof(actual));
  std::lock_guard lock(mutex_);
  actual_ = actual;
}

Result<void> Balloon::set_target_mib(uint64_t target_mib) {
  const uint32_t pages = TRY(target_pages(target_mib, options_.guest_memory_bytes));
  std::lock_guard lock(mutex_);
  if (pages == num_pages_) return ok();
  num_pages_ = pages;
  // §5.5.6.1: the driver learns of a new target through a configuration
  // change notification; before DRIVER_OK it reads num_pages anyway.
  if (active_ && !broken_) interrupt_->notify_config();
  return ok();
}

uint64_t Balloon::target_mib() const {
  std::lock_guard lock(mutex_);
  return num_pages_ / kBalloonPagesPerMib;
}

uint32_t Balloon::actual_pages() const {
  std::lock_guard lock(mutex_);
  return actual_;
}

uint64_t Balloon::ballooned_pages() const {
  std::lock_guard lock(mutex_);
  return ballooned_pages_;
}

uint64_t Balloon::discarded_ranges() const {
  std::lock_guard lock(mutex_);
  return discarded_ranges_;
}

BalloonStats Balloon::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

Result<void> Balloon::activate(ActivateContext context) {
  std::lock_guard lock(mutex_);
  return activate_locked(context);
}

Result<void> Balloon::activate_locked(ActivateContext& context) {
  if (active_) return fail(Errc::Busy, "virtio-balloon: activated twice without a reset");
  if (context.memory == nullptr || !context.interrupt ||
      context.queues.size() != queue_max_sizes().size()) {
    return fail(Errc::InvalidArgument,
                "virtio-balloon: activate needs memory, an interrupt and the declared queues");
  }
  features_ = context.features;
  TRY(map_queues(context.queues));
  memory_ = context.memory;
  interrupt_ = std::move(context.interrupt);
  event_loop_ = context.event_loop;
  ballooned_bits_.clear();
  for (const memory::MemoryRegion& region : memory_->regions()) {
    const uint64_t pages = region.size_bytes / kBalloonPageBytes;
    ballooned_bits_.emplace_back((pages + 63) / 64, 0);
  }
  ballooned_pages_ = 0;
  stats_head_.reset();
  pushed_ = {};
  broken_ = false;
  if (Result<void> timer = start_stats_timer(); !timer) {
    for (auto& queue : queues_) queue.reset();
    idle_queues_.clear();
    return timer;
  }
  active_ = true;
  return ok();
}

Result<void> Balloon::map_queues(std::vector<std::optional<Virtqueue>>& queues) {
  for (auto& queue : queues_) queue.reset();
  role_of_index_.assign(queues.size(), std::nullopt);
  auto take = [&](Role role, size_t index) -> Result<void> {
    if (index >= queues.size() || !queues[index]) {
      return fail(Errc::InvalidArgument,
                  fmt::format("virtio-balloon: the driver did not enable {} (queue {})",
                              kRoleNames[static_cast<size_t>(role)], index));
    }
    queues_[static_cast<size_t>(role)] = std::move(queues[index]);
    queue_index_[static_cast<size_t>(role)] = static_cast<uint16_t>(index);
    role_of_index_[index] = role;
    return ok();
  };
  TRY(take(Role::Inflate, 0));
  TRY(take(Role::Deflate, 1));
  size_t next = 2;
  if (features_ & kBalloonFeatureStatsVq) TRY(take(Role::Stats, next++));
  if (features_ & kBalloonFeaturePageReporting) {
    // Linux compacts the indices (reporting_vq is queue 2 without
    // STATS_VQ); a driver numbering them as the device declared them
    // enables queue 3 instead and leaves 2 disabled.
    if (next == 2 && !queues[2] && queues.size() > 3 && queues[3]) next = 3;
    TRY(take(Role::Reporting, next));
  }
  idle_queues_.assign(queues.size(), std::nullopt);
  for (size_t index = 0; index < queues.size(); ++index) {
    if (queues[index] && !role_of_index_[index]) {
      LOG_RATELIMITED(info,
                      "virtio-balloon: queue {} is enabled but no accepted feature uses it; "
                      "it is ignored",
                      index);
      idle_queues_[index] = std::move(queues[index]);
    }
  }
  return ok();
}

Result<void> Balloon::start_stats_timer() {
  if (options_.stats_period_s == 0 || !queues_[static_cast<size_t>(Role::Stats)] ||
      event_loop_ == nullptr) {
    return ok();
  }
  int raw = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (raw < 0) return fail_errno("virtio-balloon: timerfd_create");
  timer_ = Fd(raw);
  itimerspec period{};
  period.it_interval.tv_sec = options_.stats_period_s;
  period.it_value.tv_sec = options_.stats_period_s;
  if (::timerfd_settime(timer_.get(), 0, &period, nullptr) < 0) {
    timer_.reset();
    return fail_errno("virtio-balloon: timerfd_settime");
  }
  Result<EventLoop::WatchId> watch =
      event_loop_->add(timer_.get(), Ready::In, [this](uint32_t) { on_timer(); });
  if (!watch) {
    timer_.reset();
    return fail(std::move(watch).error().wrap("virtio-balloon: watch the statistics timer"));
  }
  timer_watch_ = *watch;
  return ok();
}

void Balloon::on_timer() {
  std::lock_guard lock(mutex_);
  if (!timer_.valid()) return;
  uint64_t expirations = 0;
  // Non-blocking: EAGAIN when another wakeup already took the count.
  if (::read(timer_.get(), &expirations, sizeof(expirations)) != sizeof(expirations)) return;
  if (!active_ || broken_) return;
  (void)request_stats_locked();
}

bool Balloon::request_stats() {
  std::lock_guard lock(mutex_);
  if (!active_ || broken_) return false;
  return request_stats_locked();
}

bool Balloon::request_stats_locked() {
  // §5.5.6.3: returning the buffer (nothing written) asks the driver for
  // fresh statistics; it makes the buffer available again when it has them.
  if (!stats_head_) return false;
  const uint16_t head = *std::exchange(stats_head_, std::nullopt);
  push_used(Role::Stats, head);
  signal_used(Role::Stats);
  return !broken_;
}

void Balloon::notify(uint16_t queue) {
  std::lock_guard lock(mutex_);
  if (!active_ || broken_ || queue >= role_of_index_.size() || !role_of_index_[queue]) return;
  const Role role = *role_of_index_[queue];
  process_queue(role);
  signal_used(role);
}

void Balloon::process_queue(Role role) {
  Virtqueue& queue = *queues_[static_cast<size_t>(role)];
  while (true) {
    if (!queue.disable_driver_notifications()) return mark_broken("disable notifications");
    while (true) {
      Result<bool> popped = queue.pop_into(chain_);
      if (!popped) return mark_broken(fmt::format("pop from {}", kRoleNames[static_cast<size_t>(role)]));
      if (!*popped) break;
      switch (role) {
        case Role::Inflate:
        case Role::Deflate:
          handle_pfns(role);
          break;
        case Role::Stats:
          handle_stats();
          break;
        case Role::Reporting:
          handle_report();
          break;
      }
      if (broken_) return;
    }
    Result<bool> more = queue.enable_driver_notifications();
    if (!more) return mark_broken("enable notifications");
    if (!*more) return;
  }
}

std::optional<Balloon::PageRef> Balloon::page_of(uint64_t address) const {
  const auto& regions = memory_->regions();
  for (size_t index = 0; index < regions.size(); ++index) {
    const memory::MemoryRegion& region = regions[index];
    if (address >= region.start.value && address - region.start.value < region.size_bytes) {
      return PageRef{index, (address - region.start.value) / kBalloonPageBytes};
    }
  }
  return std::nullopt;
}

void Balloon::handle_pfns(Role role) {
  const bool inflate = role == Role::Inflate;
  const char* queue_name = kRoleNames[static_cast<size_t>(role)];
  // §5.5.6: the PFN array is device-readable.
  if (chain_.writable_bytes != 0) {
    LOG_RATELIMITED(warn, "virtio-balloon: {} chain {} has device-writable descriptors",
                    queue_name, chain_.head);
    return mark_broken("device-writable PFN array");
  }
  const uint32_t bytes = chain_.readable_bytes;
  if (bytes % sizeof(uint32_t) != 0 || bytes > kMaxPfnBytes) {
    LOG_RATELIMITED(warn,
                    "virtio-balloon: {} chain {} of {} bytes is not an array of at most {} "
                    "le32 PFNs; returned untouched",
                    queue_name, chain_.head, bytes, kMaxPfnBytes / sizeof(uint32_t));
    return push_used(role, chain_.head);
  }
  uint64_t outside = 0;
  uint64_t not_ballooned = 0;
  for (uint32_t done = 0; done < bytes;) {
    const uint32_t count =
        static_cast<uint32_t>(std::min<uint64_t>(kPfnChunk, (bytes - done) / sizeof(uint32_t)));
    pfns_.resize(count);
    if (!queues_[static_cast<size_t>(role)]->read_from_chain(chain_, done,
                                                             std::as_writable_bytes(std::span(pfns_)))) {
      return mark_broken("unreadable PFN array");
    }
    done += count * static_cast<uint32_t>(sizeof(uint32_t));
    // Sorted, contiguous pages become one discard (Linux allocates balloon
    // pages in runs, often descending).
    std::sort(pfns_.begin(), pfns_.end());
    std::optional<PageRef> run_ref;
    uint64_t run_start = 0;
    uint64_t run_end = 0;
    auto flush = [&] {
      if (run_ref) discard_range(run_start, run_end - run_start);
      run_ref.reset();
    };
    for (size_t i = 0; i < pfns_.size(); ++i) {
      if (i > 0 && pfns_[i] == pfns_[i - 1]) continue;
      const uint64_t address = uint64_t{pfns_[i]} * kBalloonPageBytes;
      std::optional<PageRef> ref = page_of(address);
      if (!ref) {
        ++outside;
        continue;
      }
      uint64_t& word = ballooned_bits_[ref->region][ref->page / 64];
      const uint64_t bit = uint64_t{1} << (ref->page % 64);
      if (inflate) {
        if ((word & bit) == 0) {
          word |= bit;
          ++ballooned_pages_;
        }
        if (run_ref && run_ref->region == ref->region && address == run_end) {
          run_end += kBalloonPageBytes;
        } else {
          flush();
          run_ref = ref;
          run_start = address;
          run_end = address + kBalloonPageBytes;
        }
      } else if ((word & bit) != 0) {
        // Deflate: the guest takes the page back; it faults in as zeroes.
        word &= ~bit;
        --ballooned_pages_;
      } else {
        ++not_ballooned;
      }
    }
    flush();
  }
  if (outside != 0) {
    LOG_RATELIMITED(warn, "virtio-balloon: {} chain {}: {} PFNs outside RAM ignored", queue_name,
                    chain_.head, outside);
  }
  if (not_ballooned != 0) {
    LOG_RATELIMITED(debug, "virtio-balloon: deflateq chain {}: {} pages were not in the balloon",
                    chain_.head, not_ballooned);
  }
  push_used(role, chain_.head);
}

void Balloon::discard_range(uint64_t address, uint64_t size_bytes) {
  ++discarded_ranges_;
  if (Result<void> discarded = memory_->discard(memory::GuestAddr(address), size_bytes);
      !discarded) {
    LOG_RATELIMITED(warn, "virtio-balloon: {}", discarded.error().message());
  }
}

void Balloon::handle_stats() {
  // §5.5.6.3: the statistics buffer is device-readable.
  if (chain_.writable_bytes != 0) {
    LOG_RATELIMITED(warn, "virtio-balloon: statsq chain {} has device-writable descriptors",
                    chain_.head);
    return mark_broken("device-writable statistics buffer");
  }
  if (stats_head_) {
    // The driver must keep at most one buffer in statsq; give the older
    // back so it is not lost, and keep the newer.
    LOG_RATELIMITED(warn,
                    "virtio-balloon: the driver made a second statistics buffer available; "
                    "returning the older one");
    const uint16_t older = *std::exchange(stats_head_, std::nullopt);
    push_used(Role::Stats, older);
    if (broken_) return;
  }
  stats_head_ = chain_.head;
  const uint32_t bytes = chain_.readable_bytes;
  if (bytes % kBalloonStatRecordBytes != 0 || bytes > kMaxStatsBytes) {
    LOG_RATELIMITED(warn,
                    "virtio-balloon: statistics buffer of {} bytes is not whole 10-byte records "
                    "(or over {} bytes); ignored",
                    bytes, kMaxStatsBytes);
    return;
  }
  stats_bytes_.resize(bytes);
  if (!queues_[static_cast<size_t>(Role::Stats)]->read_from_chain(chain_, 0, stats_bytes_)) {
    return mark_broken("unreadable statistics buffer");
  }
  std::map<uint16_t, uint64_t> values;
  for (uint32_t offset = 0; offset < bytes; offset += kBalloonStatRecordBytes) {
    uint16_t tag = 0;
    uint64_t value = 0;
    std::memcpy(&tag, stats_bytes_.data() + offset, sizeof(tag));
    std::memcpy(&value, stats_bytes_.data() + offset + sizeof(tag), sizeof(value));
    values[tag] = value;  // a repeated tag: the last one wins
  }
  stats_.values = std::move(values);
  ++stats_.updates;
}

void Balloon::handle_report() {
  // Linux hands the free ranges over as device-writable buffers (the device
  // may change their contents: they read back as zero).
  if (chain_.readable_bytes != 0) {
    LOG_RATELIMITED(warn, "virtio-balloon: reporting_vq chain {} has device-readable descriptors",
                    chain_.head);
    return mark_broken("device-readable free page report");
  }
  for (const Segment& segment : chain_.segments) {
    // Whole pages only: a partial page may still hold the guest's data.
    const uint64_t start = (segment.addr.value + kBalloonPageBytes - 1) & ~(kBalloonPageBytes - 1);
    const uint64_t end = (segment.addr.value + segment.len) & ~(kBalloonPageBytes - 1);
    if (end > start) discard_range(start, end - start);
  }
  push_used(Role::Reporting, chain_.head);
}

void Balloon::push_used(Role role, uint16_t head) {
  // Nothing is ever written into a balloon buffer.
  if (!queues_[static_cast<size_t>(role)]->push_used(head, 0)) return mark_broken("push used");
  pushed_[static_cast<size_t>(role)] = true;
}

void Balloon::signal_used(Role role) {
  const size_t index = static_cast<size_t>(role);
  if (!pushed_[index] || broken_) return;
  pushed_[index] = false;
  if (queues_[index]->needs_notification()) interrupt_->notify_queue(queue_index_[index]);
}

void Balloon::mark_broken(std::string_view why) {
  if (broken_) return;
  broken_ = true;
  LOG_RATELIMITED(warn, "virtio-balloon: {}: the driver broke the spec; device needs reset", why);
  interrupt_->needs_reset();
}

void Balloon::reset() {
  std::optional<EventLoop::WatchId> watch;
  EventLoop* loop = nullptr;
  {
    std::lock_guard lock(mutex_);
    active_ = false;
    watch = std::exchange(timer_watch_, std::nullopt);
    loop = event_loop_;
  }
  // Outside the lock: remove() waits for a running callback, which may be
  // waiting for our lock.
  if (watch) loop->remove(*watch);
  std::lock_guard lock(mutex_);
  timer_.reset();
  for (auto& queue : queues_) queue.reset();
  role_of_index_.clear();
  idle_queues_.clear();
  pushed_ = {};
  interrupt_.reset();
  memory_ = nullptr;
  event_loop_ = nullptr;
  features_ = 0;
  broken_ = false;
  // §5.5.6: a reset driver starts with an empty balloon; the pages it held
  // are the guest's again. The target stays: it is the host's.
  actual_ = 0;
  ballooned_bits_.clear();
  ballooned_pages_ = 0;
  stats_head_.reset();
}

// ---- Snapshots (docs/snapshot-format.md, "virtio-balloon device bytes") ----

namespace {

enum class BalloonField : uint16_t {
  Config = 1,     // u32 num_pages, u32 actual
  Flags = 2,      // u32: bit 0 broken (needs_reset was sent)
  Ballooned = 3,  // n x (u32 first PFN, u32 pages), ascending, not overlapping
  Stats = 4,      // n x (u16 tag, 6 zero bytes, u64 value), each tag once
  StatsUpdates = 5,  // u64
};
constexpr uint16_t kLastBalloonField = 5;
constexpr uint32_t kBalloonFlagBroken = 1;

struct SavedConfig {
  uint32_t num_pages;
  uint32_t actual;
};
struct SavedRange {
  uint32_t first_pfn;
  uint32_t pages;
};
struct SavedStat {
  uint16_t tag;
  uint8_t reserved[6];
  uint64_t value;
};
static_assert(sizeof(SavedConfig) == 8 && sizeof(SavedRange) == 8 && sizeof(SavedStat) == 16);
// A statistics buffer holds at most kMaxStatsBytes / 10 records.
constexpr size_t kMaxSavedStats = Balloon::kMaxStatsBytes / kBalloonStatRecordBytes;

}  // namespace

Result<VirtioDeviceState> Balloon::save_state() const {
  std::lock_guard lock(mutex_);
  VirtioDeviceState state;
  state.queues.resize(role_of_index_.size());
  for (size_t index = 0; index < role_of_index_.size(); ++index) {
    if (role_of_index_[index]) {
      const size_t role = static_cast<size_t>(*role_of_index_[index]);
      state.queues[index] = saved_queue(queues_[role]);
    } else if (index < idle_queues_.size()) {
      state.queues[index] = saved_queue(idle_queues_[index]);
    }
  }
  // The statistics buffer the device holds is the last chain it popped
  // from statsq (an older one goes back used); it returns to the driver's
  // side of the ring, and the restored device pops and parses it again.
  if (stats_head_) {
    const size_t index = queue_index_[static_cast<size_t>(Role::Stats)];
    --state.queues[index]->last_avail_idx;
  }

  std::vector<SavedRange> ranges;
  const auto& regions = memory_->regions();
  for (size_t region = 0; region < ballooned_bits_.size(); ++region) {
    const uint64_t first_region_pfn = regions[region].start.value / kBalloonPageBytes;
    const uint64_t pages = regions[region].size_bytes / kBalloonPageBytes;
    for (uint64_t page = 0; page < pages;) {
      if ((ballooned_bits_[region][page / 64] & (uint64_t{1} << (page % 64))) == 0) {
        ++page;
        continue;
      }
      uint64_t end = page + 1;
      while (end < pages && (ballooned_bits_[region][end / 64] & (uint64_t{1} << (end % 64)))) {
        ++end;
      }
      if (ranges.size() == kMaxSavedRanges) {
        return fail(Errc::Unsupported,
                    fmt::format("virtio-balloon: the balloon is in more than {} separate ranges, "
                                "more than a snapshot holds",
                                kMaxSavedRanges));
      }
      // Balloon PFNs are 32-bit (§5.5.6), so every ballooned page has one.
      ranges.push_back({static_cast<uint32_t>(first_region_pfn + page),
                        static_cast<uint32_t>(end - page)});
      page = end;
    }
  }
  std::vector<SavedStat> stats;
  for (const auto& [tag, value] : stats_.values) stats.push_back({tag, {}, value});

  RecordWriter out;
  out.value(BalloonField::Config, SavedConfig{num_pages_, actual_});
  out.value(BalloonField::Flags, broken_ ? kBalloonFlagBroken : uint32_t{0});
  out.bytes(BalloonField::Ballooned, std::as_bytes(std::span(ranges)));
  out.bytes(BalloonField::Stats, std::as_bytes(std::span(stats)));
  out.value(BalloonField::StatsUpdates, stats_.updates);
  state.extra = out.take();
  return state;
}

Result<void> Balloon::restore_state(ActivateContext context, std::span<const std::byte> extra) {
  constexpr std::string_view kLabel = "virtio-balloon device bytes";
  auto corrupt = [kLabel](const std::string& what) {
    return fail(Errc::Corrupt, fmt::format("{}: {}", kLabel, what));
  };
  const auto records = TRY(Records::parse(extra, kLabel, kLastBalloonField));
  const auto config = TRY(records.required<SavedConfig>(BalloonField::Config, "config"));
  const auto flags = TRY(records.required<uint32_t>(BalloonField::Flags, "flags"));
  const auto ranges =
      TRY(records.array<SavedRange>(BalloonField::Ballooned, "ballooned ranges", kMaxSavedRanges));
  const auto stats = TRY(records.array<SavedStat>(BalloonField::Stats, "statistics", kMaxSavedStats));
  const auto updates = TRY(records.required<uint64_t>(BalloonField::StatsUpdates, "updates"));
  if (flags & ~kBalloonFlagBroken) return corrupt(fmt::format("flags {:#x}", flags));
  if (options_.guest_memory_bytes != 0 &&
      uint64_t{config.num_pages} * kBalloonPageBytes > options_.guest_memory_bytes) {
    return corrupt(fmt::format("a target of {} pages is more than the guest's RAM",
                               config.num_pages));
  }
  BalloonStats saved_stats{.values = {}, .updates = updates};
  for (const SavedStat& stat : stats) {
    if (std::any_of(std::begin(stat.reserved), std::end(stat.reserved),
                    [](uint8_t byte) { return byte != 0; }) ||
        !saved_stats.values.emplace(stat.tag, stat.value).second) {
      return corrupt(fmt::format("statistics tag {} is repeated or has reserved bits set", stat.tag));
    }
  }

  std::lock_guard lock(mutex_);
  TRY(activate_locked(context));
  // From here a failure must leave the device as reset() would; the
  // transport resets it.
  uint64_t next_pfn = 0;
  for (const SavedRange& range : ranges) {
    const uint64_t first = range.first_pfn;
    const uint64_t end = first + range.pages;
    const std::optional<PageRef> start = page_of(first * kBalloonPageBytes);
    const std::optional<PageRef> last = page_of((end - 1) * kBalloonPageBytes);
    if (range.pages == 0 || first < next_pfn || !start || !last ||
        start->region != last->region) {
      return corrupt(fmt::format("ballooned range of {} pages at PFN {:#x}: empty, out of order "
                                 "or not in one RAM region",
                                 range.pages, first));
    }
    next_pfn = end;
    for (uint64_t page = start->page; page <= last->page; ++page) {
      ballooned_bits_[start->region][page / 64] |= uint64_t{1} << (page % 64);
    }
    ballooned_pages_ += range.pages;
    // Whatever backs RAM now (a snapshot's file, a migration's fresh
    // memory) need not hold these pages: give them back again.
    discard_range(first * kBalloonPageBytes, uint64_t{range.pages} * kBalloonPageBytes);
  }
  num_pages_ = config.num_pages;
  actual_ = config.actual;
  stats_ = std::move(saved_stats);
  broken_ = (flags & kBalloonFlagBroken) != 0;
  return ok();
}

}  // namespace keel::devices::virtio
