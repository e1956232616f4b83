// virtio-blk. Spec: virtio 1.2 §5.2 (block device): §5.2.3 feature bits,
// §5.2.4 configuration layout, §5.2.6 request format and status values,
// §5.2.6.1/§5.2.6.2 driver and device requirements.
// Implemented: one request queue (max size 256); SEG_MAX, BLK_SIZE, FLUSH,
// RO, DISCARD and WRITE_ZEROES (one segment per request, unmap flag),
// GET_ID; growing the disk at run time (resize(): capacity, then a
// configuration change notification, §5.2.4, §2.4.2); requests go to the backend's asynchronous face with their iovecs
// pointing straight into guest RAM, many in flight, completions taken on
// the event loop from backend->completion_fd(); counters (requests,
// errors, bytes, and a histogram of the backend's service time: submit to
// completion) for the control API's metrics.
// Missing: MQ, TOPOLOGY, CONFIG_WCE (the cache is always write-back, and a
// driver that does not accept FLUSH gets no write-through), SECURE_ERASE,
// GET_LIFETIME. Snapshots: quiesce() finishes every request the driver
// made available (submitted, completed, pushed used; bounded), so the
// state is the queue alone.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "block/block_backend.h"
#include "block/dirty_tracker.h"
#include "devices/virtio/device.h"
#include "devices/virtio/latency.h"

namespace keel::devices::virtio {

// Feature bits (§5.2.3).
inline constexpr uint64_t kBlkFeatureSegMax = 1ull << 2;
inline constexpr uint64_t kBlkFeatureRo = 1ull << 5;
inline constexpr uint64_t kBlkFeatureBlkSize = 1ull << 6;
inline constexpr uint64_t kBlkFeatureFlush = 1ull << 9;
inline constexpr uint64_t kBlkFeatureDiscard = 1ull << 13;
inline constexpr uint64_t kBlkFeatureWriteZeroes = 1ull << 14;

// Request types and status values (§5.2.6).
inline constexpr uint32_t kBlkTypeIn = 0;
inline constexpr uint32_t kBlkTypeOut = 1;
inline constexpr uint32_t kBlkTypeFlush = 4;
inline constexpr uint32_t kBlkTypeGetId = 8;
inline constexpr uint32_t kBlkTypeDiscard = 11;
inline constexpr uint32_t kBlkTypeWriteZeroes = 13;
inline constexpr uint8_t kBlkStatusOk = 0;
inline constexpr uint8_t kBlkStatusIoErr = 1;
inline constexpr uint8_t kBlkStatusUnsupp = 2;

inline constexpr uint32_t kBlkIdBytes = 20;  // VIRTIO_BLK_ID_BYTES
inline constexpr uint32_t kBlkDiscardFlagUnmap = 1;

// struct virtio_blk_req's header (§5.2.6).
struct BlkRequestHeader {
  uint32_t type;
  uint32_t reserved;
  uint64_t sector;
};
static_assert(sizeof(BlkRequestHeader) == 16);

// struct virtio_blk_discard_write_zeroes (§5.2.6).
struct BlkDiscardWriteZeroes {
  uint64_t sector;
  uint32_t num_sectors;
  uint32_t flags;
};
static_assert(sizeof(BlkDiscardWriteZeroes) == 16);

// struct virtio_blk_config (§5.2.4), through the virtio 1.2 secure-erase
// fields; fields of features we do not offer read as 0.
struct BlkConfigSpace {
  uint64_t capacity;  // in 512-byte sectors
  uint32_t size_max;
  uint32_t seg_max;
  uint16_t cylinders;
  uint8_t heads;
  uint8_t sectors;
  uint32_t blk_size;
  uint8_t physical_block_exp;
  uint8_t alignment_offset;
  uint16_t min_io_size;
  uint32_t opt_io_size;
  uint8_t writeback;
  uint8_t unused0;
  uint16_t num_queues;
  uint32_t max_discard_sectors;
  uint32_t max_discard_seg;
  uint32_t discard_sector_alignment;
  uint32_t max_write_zeroes_sectors;
  uint32_t max_write_zeroes_seg;
  uint8_t write_zeroes_may_unmap;
  uint8_t unused1[3];
  uint32_t max_secure_erase_sectors;
  uint32_t max_secure_erase_seg;
  uint32_t secure_erase_sector_alignment;
};
static_assert(sizeof(BlkConfigSpace) == 72);
static_assert(offsetof(BlkConfigSpace, blk_size) == 20);
static_assert(offsetof(BlkConfigSpace, max_discard_sectors) == 36);
static_assert(offsetof(BlkConfigSpace, write_zeroes_may_unmap) == 56);

struct BlkConfig {
  std::string serial;  // GET_ID answer; at most kBlkIdBytes bytes
  block::Access access = block::Access::ReadWrite;
};

class Blk final : public VirtioDevice {
 public:
  static constexpr uint16_t kQueueSize = 256;
  // seg_max: data segments per request, as QEMU (queue size - 2, leaving
  // room for the header and status descriptors).
  static constexpr uint32_t kSegMax = kQueueSize - 2;
  // Descriptors a chain may have at all; more is IOERR.
  static constexpr uint32_t kMaxChainSegments = kSegMax + 2;
  static constexpr uint32_t kMaxDiscardSectors = 1u << 22;  // 2 GiB per request
  static constexpr uint32_t kDiscardSectorAlignment = 8;    // 4 KiB

  // The backend's access must allow config.access (a read-only backend
  // cannot serve a writable disk).
  static Result<std::unique_ptr<Blk>> create(std::unique_ptr<block::BlockBackend> backend,
                                             BlkConfig config);
  ~Blk() override;
  // The image, for the machine's migration handover (set_image_locked).
  block::BlockBackend& backend() { return *backend_; }

  DeviceType type() const override { return DeviceType::Block; }
  std::string_view name() const override { return "virtio-blk"; }
  uint64_t features() const override;
  std::vector<uint16_t> queue_max_sizes() const override { return {kQueueSize}; }
  size_t config_size_bytes() const override { return sizeof(BlkConfigSpace); }
  void read_config(uint32_t offset, std::span<std::byte> data) override;

  Result<void> activate(ActivateContext context) override;
  void notify(uint16_t queue) override;
  void reset() override;
  Result<void> quiesce(std::chrono::milliseconds timeout) override;
  Result<VirtioDeviceState> save_state() const override;
  Result<void> restore_state(ActivateContext context, std::span<const std::byte> extra) override;
  // requests, errors, read_bytes, write_bytes, and request_latency_us_*
  // (LatencyHistogram: submit to completion of the requests the backend served).
  VirtioDevice::Counters counters() const override;

  // Grows the backend to new_size_bytes (a multiple of 512) and the
  // capacity with it, then tells an active driver through a configuration
  // change notification. Shrinking is refused (InvalidArgument): the guest
  // would lose data it believes is there. Any thread: the device's lock
  // keeps requests (and completions) off the backend meanwhile.
  Result<void> resize(uint64_t new_size_bytes);
  uint64_t size_bytes() const;

  // Local disk copy in a live migration (docs/migration-protocol.md,
  // "Local disks"): while a tracker is set, every write, write-zeroes and
  // discard marks its range in it when it completes (failed ones too: part
  // may have been written), and resize is refused. nullptr stops it.
  void set_write_tracker(std::shared_ptr<block::DirtyTracker> tracker);
  // Reads one chunk of the tracker's for copying: clears the chunk, then
  // reads it from the backend, both under the device's lock, so a write
  // completing after the read marks it again. Any thread.
  Result<void> read_tracked_chunk(uint64_t chunk, std::span<std::byte> out);

  // For tests and the benchmark: take completions now, as the event-loop
  // watch on the backend's completion fd would.
  void process_completions();
  size_t in_flight() const;

 private:
  // One request handed to the backend; its index is the backend user_data.
  struct InFlight {
    uint16_t head = 0;
    std::byte* status = nullptr;  // host address of the status byte
    uint32_t data_bytes = 0;      // bytes the device writes into the chain on success (IN)
    std::vector<iovec> iov;       // capacity reserved once; points into guest RAM
    std::chrono::steady_clock::time_point submitted{};
    uint64_t written_offset = 0;  // the range a write changes, for write_tracker_
    uint64_t written_bytes = 0;   // 0 for reads and flushes
  };

  Blk(std::unique_ptr<block::BlockBackend> backend, BlkConfig config);

  // All below run with mutex_ held.
  void process_queue();
  // Parses the popped chain_ and submits it to the backend, or completes it
  // right away (GET_ID, errors), or marks the device broken when the chain
  // has no status byte to report an error in.
  void handle_chain();
  // Hands request to the backend under the next free slot; IOERR if it refuses.
  void submit(block::BlockRequest& request, std::byte* status, uint32_t data_bytes);
  void complete_now(uint16_t head, std::byte* status, uint8_t value, uint32_t written_len);
  // Reaps the backend; pushes used entries only while active and not broken.
  void take_completions();
  // One used buffer notification for everything pushed since the last one.
  void signal_used();
  void mark_broken(std::string_view why);
  // Waits for every backend request and takes its completion; with a
  // limit, returns false once it has passed.
  bool drain_backend(std::optional<std::chrono::milliseconds> limit = std::nullopt);

  // counters(): written under mutex_, read without it.
  struct Counters {
    std::atomic<uint64_t> requests{0};  // every used element, errors included
    std::atomic<uint64_t> errors{0};    // completed with a status other than OK
    std::atomic<uint64_t> read_bytes{0};   // data of read requests handed to the backend
    std::atomic<uint64_t> write_bytes{0};  // data of write requests handed to the backend
  };

  const std::unique_ptr<block::BlockBackend> backend_;
  const BlkConfig config_;
  Counters counters_;
  LatencyHistogram request_latency_{"request_latency_us"};
  BlkConfigSpace config_space_{};

  mutable std::mutex mutex_;  // guards everything below
  bool active_ = false;
  bool broken_ = false;   // needs_reset() sent; the queue is not touched again
  bool stalled_ = false;  // stopped popping because every slot was busy
  bool pushed_ = false;   // used entries pushed since the last notification check
  uint64_t features_ = 0;
  const memory::GuestMemory* memory_ = nullptr;
  std::optional<Virtqueue> queue_;
  std::shared_ptr<Interrupt> interrupt_;
  EventLoop* event_loop_ = nullptr;
  std::optional<EventLoop::WatchId> watch_;
  std::vector<InFlight> slots_;
  std::vector<uint32_t> free_slots_;
  DescriptorChain chain_;  // reused by every pop
  std::vector<block::BlockCompletion> completions_;  // reused by every reap
  std::shared_ptr<block::DirtyTracker> write_tracker_;
};

}  // namespace keel::devices::virtio
