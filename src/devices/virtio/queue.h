// The split virtqueue, device side. Spec: virtio 1.2 §2.7 (split
// virtqueues): §2.7 queue size (a power of 2, at most 32768) and the
// alignment table (descriptor table 16, available ring 2, used ring 4),
// §2.7.5 descriptor table, §2.7.5.3 indirect descriptors, §2.7.6 available
// ring, §2.7.7 used buffer notification suppression, §2.7.8 used ring,
// §2.7.10 available buffer notification suppression; feature bits §6
// (VIRTIO_F_INDIRECT_DESC 28, VIRTIO_F_EVENT_IDX 29).
// Implemented: pop with full chain validation (indirect tables, loops,
// readable-before-writable order, length overflow, RAM bounds), push_used,
// used buffer notification decisions with and without EVENT_IDX, driver
// notification suppression (used->flags NO_NOTIFY / avail_event), copy
// helpers, save/restore. Missing: packed virtqueues (§2.8),
// VIRTIO_F_IN_ORDER, batching several used elements under one idx write.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "base/result.h"
#include "memory/guest_memory.h"

namespace keel::devices::virtio {

using memory::GuestAddr;
using memory::GuestMemory;

inline constexpr uint32_t kMaxQueueSize = 32768;

// Feature bits (virtio 1.2 §6) that change how a queue is walked.
inline constexpr uint64_t kFeatureIndirectDesc = 1ull << 28;
inline constexpr uint64_t kFeatureEventIdx = 1ull << 29;

// Descriptor flags (§2.7.5).
inline constexpr uint16_t kDescFlagNext = 1;
inline constexpr uint16_t kDescFlagWrite = 2;
inline constexpr uint16_t kDescFlagIndirect = 4;
// Available ring flags (§2.7.6) and used ring flags (§2.7.8).
inline constexpr uint16_t kAvailFlagNoInterrupt = 1;
inline constexpr uint16_t kUsedFlagNoNotify = 1;

// One descriptor as laid out in guest memory (little-endian; Keel runs on
// x86-64 only, so host order is the guest's).
struct VirtqDesc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(VirtqDesc) == 16);

struct VirtqUsedElem {
  uint32_t id;
  uint32_t len;
};
static_assert(sizeof(VirtqUsedElem) == 8);

// Byte sizes of the three parts for a queue of size entries (§2.7).
constexpr uint64_t desc_table_bytes(uint32_t size) { return 16ull * size; }
constexpr uint64_t avail_ring_bytes(uint32_t size) { return 6 + 2ull * size; }
constexpr uint64_t used_ring_bytes(uint32_t size) { return 6 + 8ull * size; }

// What the transport collected from the driver when it enabled the queue.
struct QueueConfig {
  uint32_t size = 0;
  GuestAddr desc_table;
  GuestAddr avail_ring;  // "driver area"
  GuestAddr used_ring;   // "device area"
  uint64_t features = 0;  // the negotiated feature bits; only 28 and 29 matter here
};

// One buffer of a chain, already checked to be inside RAM.
struct Segment {
  GuestAddr addr;
  uint32_t len = 0;
  bool device_writable = false;
};

// A popped chain: readable segments first, then writable ones (§2.7.4).
// Zero-length descriptors are dropped.
struct DescriptorChain {
  uint16_t head = 0;
  std::vector<Segment> segments;
  uint32_t readable_bytes = 0;
  uint32_t writable_bytes = 0;
};

// Everything needed to rebuild a queue on the same guest memory.
struct VirtqueueState {
  QueueConfig config;
  uint16_t last_avail_idx = 0;
  uint16_t used_idx = 0;
  uint16_t signalled_used = 0;
  bool signalled_used_valid = false;
  bool operator==(const VirtqueueState&) const;
};

// A queue the driver has enabled: it exists only while the queue is live
// (the transport keeps a std::optional<Virtqueue>). Owned by one thread.
// Every error from pop() means the driver broke the spec: the device
// should set DEVICE_NEEDS_RESET and stop using the queue.
class Virtqueue {
 public:
  // Checks size and alignment and that all three rings are RAM.
  static Result<Virtqueue> create(const GuestMemory& memory, const QueueConfig& config);
  static Result<Virtqueue> restore(const GuestMemory& memory, const VirtqueueState& state);
  VirtqueueState save() const;

  // The next available chain, or nullopt if the driver has not made one
  // available. Allocates the segment vector; pop_into() reuses one.
  Result<std::optional<DescriptorChain>> pop();
  // Fills chain and returns true, or returns false if none is available.
  Result<bool> pop_into(DescriptorChain& chain);
  // True if the driver has made chains available that pop() has not taken.
  Result<bool> has_available() const;

  // Returns a chain to the driver with the number of bytes written into it.
  Result<void> push_used(uint16_t head, uint32_t written_len);

  // Whether the driver wants a used buffer notification for what was
  // pushed since the last call (§2.7.7 / §2.7.10 EVENT_IDX arithmetic, or
  // VIRTQ_AVAIL_F_NO_INTERRUPT without it). Call once after a batch.
  bool needs_notification();

  // Driver notification suppression (§2.7.10): disable while draining the
  // queue, then enable; enable returns true if chains arrived meanwhile,
  // which the device must then process without waiting for a notification.
  Result<void> disable_driver_notifications();
  Result<bool> enable_driver_notifications();

  // Copy between a chain's readable/writable bytes (counted from the first
  // readable/writable segment) and host memory; OutOfRange if the chain is
  // too short.
  Result<void> read_from_chain(const DescriptorChain& chain, uint64_t offset,
                               std::span<std::byte> data) const;
  Result<void> write_to_chain(const DescriptorChain& chain, uint64_t offset,
                              std::span<const std::byte> data) const;

  uint32_t size() const { return config_.size; }
  uint16_t last_avail_idx() const { return last_avail_idx_; }
  uint16_t used_idx() const { return used_idx_; }
  bool event_idx() const { return (config_.features & kFeatureEventIdx) != 0; }
  bool indirect_desc() const { return (config_.features & kFeatureIndirectDesc) != 0; }

 private:
  Virtqueue(const GuestMemory& memory, const QueueConfig& config)
      : memory_(&memory), config_(config) {}

  Result<void> walk_chain(uint16_t head, DescriptorChain& chain) const;
  Result<uint16_t> read_avail_idx() const;
  GuestAddr used_event_addr() const { return config_.avail_ring + 4 + 2ull * config_.size; }
  GuestAddr avail_event_addr() const { return config_.used_ring + 4 + 8ull * config_.size; }

  const GuestMemory* memory_;  // outlives the queue; a pointer so queues can be moved
  QueueConfig config_;
  uint16_t last_avail_idx_ = 0;
  uint16_t used_idx_ = 0;
  // The used idx at the last needs_notification() (for the EVENT_IDX window).
  uint16_t signalled_used_ = 0;
  bool signalled_used_valid_ = false;
};

}  // namespace keel::devices::virtio
