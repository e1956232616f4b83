// virtio-balloon. Spec: virtio 1.2 §5.5 (traditional memory balloon):
// §5.5.2 virtqueues, §5.5.3 feature bits, §5.5.4 configuration layout,
// §5.5.6 device operation, §5.5.6.1 inflating and deflating, §5.5.6.3
// memory statistics, §5.5.6.7 free page reporting.
// Implemented: inflateq (each 4 KiB PFN in RAM is discarded, contiguous
// PFNs as one range), deflateq (bookkeeping only: the next touch faults in
// a zero page), statsq (STATS_VQ: the driver's buffer is parsed, kept, and
// returned every stats_period_s from a timerfd on the device loop, or on
// request_stats()), DEFLATE_ON_OOM (offered when configured; nothing to do
// on the host), reporting_vq (PAGE_REPORTING when configured: each
// device-writable range is discarded, then the chain goes back used), the
// target settable at run time (set_target_mib, a configuration change
// notification), the driver's `actual`.
// Queue indices (§5.5.2 lists inflateq 0, deflateq 1, statsq 2,
// free_page_vq 3, reporting_vq 4, each optional one "only if" its feature
// is set): Linux numbers only the queues of the features it accepted
// (vp_find_vqs skips absent ones), so the device declares inflateq,
// deflateq, statsq and, when configured, reporting_vq at 3, and activate()
// maps what the driver enabled by the features it accepted: reporting_vq
// is queue 2 when STATS_VQ was declined, or queue 3 if that is the one the
// driver enabled.
// Hostile chains: device-writable descriptors on inflateq, deflateq or
// statsq, or device-readable ones on reporting_vq, break the direction the
// spec fixes and get needs_reset(); a PFN array whose length is not a
// multiple of 4 or over kMaxPfnBytes is returned used untouched; PFNs
// outside RAM are skipped; a statistics buffer with a truncated record or
// over kMaxStatsBytes leaves the previous statistics in place.
// Missing: MUST_TELL_HOST (never offered, so the driver may reuse deflated
// pages at once, which costs us nothing), FREE_PAGE_HINT (§5.5.6.5),
// PAGE_POISON (§5.5.6.6: reported and ballooned pages read back as zero,
// so a guest with page poisoning or init_on_free declines reporting).
// Snapshots (docs/snapshot-format.md, "virtio-balloon device bytes"): the
// target, `actual`, the ballooned pages as PFN ranges and the last
// statistics; the statistics buffer the device holds is given back to the
// ring, so the restored device pops it again. A restore discards the
// ballooned ranges once more, so they cost the new process nothing.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string_view>
#include <vector>

#include "base/fd.h"
#include "devices/virtio/device.h"

namespace keel::devices::virtio {

// Feature bits (§5.5.3).
inline constexpr uint64_t kBalloonFeatureMustTellHost = 1ull << 0;
inline constexpr uint64_t kBalloonFeatureStatsVq = 1ull << 1;
inline constexpr uint64_t kBalloonFeatureDeflateOnOom = 1ull << 2;
inline constexpr uint64_t kBalloonFeatureFreePageHint = 1ull << 3;
inline constexpr uint64_t kBalloonFeaturePagePoison = 1ull << 4;
inline constexpr uint64_t kBalloonFeaturePageReporting = 1ull << 5;

// The balloon's page unit, whatever the host or guest page size (§5.5.6).
inline constexpr uint64_t kBalloonPageBytes = 4096;
inline constexpr uint64_t kBalloonPagesPerMib = (1 << 20) / kBalloonPageBytes;

// Statistics tags (§5.5.6.3).
inline constexpr uint16_t kBalloonStatSwapIn = 0;
inline constexpr uint16_t kBalloonStatSwapOut = 1;
inline constexpr uint16_t kBalloonStatMajorFaults = 2;
inline constexpr uint16_t kBalloonStatMinorFaults = 3;
inline constexpr uint16_t kBalloonStatFreeMemory = 4;
inline constexpr uint16_t kBalloonStatTotalMemory = 5;
inline constexpr uint16_t kBalloonStatAvailableMemory = 6;
inline constexpr uint16_t kBalloonStatDiskCaches = 7;
inline constexpr uint16_t kBalloonStatHugetlbAllocations = 8;
inline constexpr uint16_t kBalloonStatHugetlbFailures = 9;
// One record: le16 tag, le64 value, packed (struct virtio_balloon_stat).
inline constexpr uint32_t kBalloonStatRecordBytes = 10;

// struct virtio_balloon_config (§5.5.4).
struct BalloonConfigSpace {
  uint32_t num_pages;  // the target, in 4 KiB pages; set by the host
  uint32_t actual;     // pages in the balloon; written by the driver
  uint32_t free_page_hint_cmd_id;  // FREE_PAGE_HINT only: always 0 here
  uint32_t poison_val;             // PAGE_POISON only: always 0 here
};
static_assert(sizeof(BalloonConfigSpace) == 16);

// The driver's latest memory statistics (§5.5.6.3).
struct BalloonStats {
  // Tag to value, as in the last well-formed buffer; tags this file does
  // not name (newer drivers add some) are kept as they came.
  std::map<uint16_t, uint64_t> values;
  uint64_t updates = 0;  // well-formed buffers parsed since the device was created

  std::optional<uint64_t> get(uint16_t tag) const {
    auto it = values.find(tag);
    if (it == values.end()) return std::nullopt;
    return it->second;
  }
};

struct BalloonOptions {
  uint64_t target_mib = 0;  // memory the guest should give back
  bool deflate_on_oom = true;
  bool free_page_reporting = true;
  uint32_t stats_period_s = 0;  // 0: statistics only on request_stats()
  // The guest's RAM; no target may exceed it. 0: only the config field's
  // 32-bit limit applies.
  uint64_t guest_memory_bytes = 0;
};

class Balloon final : public VirtioDevice {
 public:
  // Linux's page reporting needs room for 32 ranges in reporting_vq.
  static constexpr uint16_t kQueueSize = 128;
  // PFN bytes per inflate/deflate chain (Linux sends at most 256 PFNs,
  // 1 KiB); more is returned untouched so a guest cannot hold the device
  // loop for long.
  static constexpr uint32_t kMaxPfnBytes = 1 << 20;
  // Statistics bytes per buffer (Linux 6.1 sends 10 records, 100 bytes).
  static constexpr uint32_t kMaxStatsBytes = 4096;

  static Result<std::unique_ptr<Balloon>> create(const BalloonOptions& options);
  ~Balloon() override;

  DeviceType type() const override { return DeviceType::Balloon; }
  std::string_view name() const override { return "virtio-balloon"; }
  uint64_t features() const override;
  std::vector<uint16_t> queue_max_sizes() const override;
  size_t config_size_bytes() const override { return sizeof(BalloonConfigSpace); }
  void read_config(uint32_t offset, std::span<std::byte> data) override;
  // Only `actual`, as one aligned 4-byte write; anything else is ignored
  // and logged.
  void write_config(uint32_t offset, std::span<const std::byte> data) override;

  Result<void> activate(ActivateContext context) override;
  void notify(uint16_t queue) override;
  void reset() override;
  Result<VirtioDeviceState> save_state() const override;
  Result<void> restore_state(ActivateContext context, std::span<const std::byte> extra) override;
  // Ballooned ranges a snapshot holds at most (8 bytes each); a balloon
  // more fragmented than that cannot be saved (Unsupported, saying so).
  static constexpr size_t kMaxSavedRanges = 256 * 1024;

  // The control API's face; thread-safe. A new target is announced to an
  // active driver with a configuration change notification (§5.5.6.1).
  // OutOfRange if it exceeds the guest's RAM.
  Result<void> set_target_mib(uint64_t target_mib);
  uint64_t target_mib() const;
  // What the driver last wrote to `actual`.
  uint32_t actual_pages() const;
  // 4 KiB pages the driver inflated and has not deflated (RAM only).
  uint64_t ballooned_pages() const;
  // Ranges handed to GuestMemory::discard (one hole punch each) since
  // creation: contiguous PFNs must cost one, not one per page.
  uint64_t discarded_ranges() const;
  BalloonStats stats() const;
  // Gives the statistics buffer back so the driver refills it (what the
  // timer does every stats_period_s). False if the device holds none.
  bool request_stats();

 private:
  enum class Role : uint8_t { Inflate, Deflate, Stats, Reporting };
  static constexpr size_t kRoles = 4;

  explicit Balloon(const BalloonOptions& options);

  // All below run with mutex_ held.
  Result<void> activate_locked(ActivateContext& context);
  Result<void> map_queues(std::vector<std::optional<Virtqueue>>& queues);
  Result<void> start_stats_timer();
  void on_timer();
  // Pops and handles every available chain of one queue, with driver
  // notifications off while it drains (§2.7.10).
  void process_queue(Role role);
  void handle_pfns(Role role);
  void handle_stats();
  void handle_report();
  void discard_range(uint64_t address, uint64_t size_bytes);
  bool request_stats_locked();
  void push_used(Role role, uint16_t head);
  void signal_used(Role role);
  void mark_broken(std::string_view why);
  // The page's bit in the balloon bitmap, or nullopt outside RAM.
  struct PageRef {
    size_t region;
    uint64_t page;
  };
  std::optional<PageRef> page_of(uint64_t address) const;

  const BalloonOptions options_;

  mutable std::mutex mutex_;  // guards everything below
  uint32_t num_pages_ = 0;
  uint32_t actual_ = 0;
  bool active_ = false;
  bool broken_ = false;  // needs_reset() sent; no queue is touched again
  uint64_t features_ = 0;
  const memory::GuestMemory* memory_ = nullptr;
  std::shared_ptr<Interrupt> interrupt_;
  EventLoop* event_loop_ = nullptr;
  // By role: the queue and its transport index, if the driver has it.
  std::array<std::optional<Virtqueue>, kRoles> queues_;
  std::array<uint16_t, kRoles> queue_index_{};
  std::array<bool, kRoles> pushed_{};
  // By transport index: the role, for notify().
  std::vector<std::optional<Role>> role_of_index_;
  // By transport index: queues the driver enabled that no accepted
  // feature uses; never touched, kept for save_state().
  std::vector<std::optional<Virtqueue>> idle_queues_;
  // One bit per 4 KiB page of each RAM region: in the balloon.
  std::vector<std::vector<uint64_t>> ballooned_bits_;
  uint64_t ballooned_pages_ = 0;
  uint64_t discarded_ranges_ = 0;
  std::optional<uint16_t> stats_head_;  // the statistics buffer the device holds
  BalloonStats stats_;
  Fd timer_;
  std::optional<EventLoop::WatchId> timer_watch_;
  DescriptorChain chain_;            // reused by every pop
  std::vector<uint32_t> pfns_;       // reused by every inflate/deflate
  std::vector<std::byte> stats_bytes_;  // reused by every statistics buffer
};

}  // namespace keel::devices::virtio
