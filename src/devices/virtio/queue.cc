// The split virtqueue, device side. Spec: virtio 1.2 §2.7 (§2.7.5
// descriptor table, §2.7.5.3 indirect descriptors, §2.7.6 available ring,
// §2.7.7 and §2.7.10 notification suppression, §2.7.8 used ring).
// Implemented: see queue.h. Missing: packed virtqueues, VIRTIO_F_IN_ORDER.
#include "devices/virtio/queue.h"

#include <algorithm>
#include <atomic>
#include <limits>

#include <fmt/format.h>

#include "base/log.h"

namespace keel::devices::virtio {
namespace {

// Every guest mistake goes through here: one rate-limited line, one error.
Failure corrupt(Errc code, std::string what) {
  LOG_RATELIMITED(warn, "virtqueue: {}", what);
  return fail(code, "virtqueue: " + std::move(what));
}

Result<void> check_config(const GuestMemory& memory, const QueueConfig& config) {
  uint32_t size = config.size;
  if (size == 0 || size > kMaxQueueSize || (size & (size - 1)) != 0) {
    return corrupt(Errc::InvalidArgument,
                   fmt::format("queue size {} is not a power of 2 in 1..32768", size));
  }
  // Alignment per the table in §2.7.
  if (config.desc_table.value % 16 != 0 || config.avail_ring.value % 2 != 0 ||
      config.used_ring.value % 4 != 0) {
    return corrupt(Errc::InvalidArgument,
                   fmt::format("misaligned rings: desc {:#x} avail {:#x} used {:#x}",
                               config.desc_table.value, config.avail_ring.value,
                               config.used_ring.value));
  }
  if (!memory.contains(config.desc_table, desc_table_bytes(size)) ||
      !memory.contains(config.avail_ring, avail_ring_bytes(size)) ||
      !memory.contains(config.used_ring, used_ring_bytes(size))) {
    return corrupt(Errc::OutOfRange,
                   fmt::format("rings outside RAM: desc {:#x} avail {:#x} used {:#x} size {}",
                               config.desc_table.value, config.avail_ring.value,
                               config.used_ring.value, size));
  }
  return ok();
}

// §2.7.10: notify when new_idx has moved past event since old_idx, with all
// three free-running 16-bit indices wrapping.
bool need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx) {
  return static_cast<uint16_t>(new_idx - event - 1) < static_cast<uint16_t>(new_idx - old_idx);
}

}  // namespace

bool VirtqueueState::operator==(const VirtqueueState& other) const {
  return config.size == other.config.size && config.desc_table == other.config.desc_table &&
         config.avail_ring == other.config.avail_ring &&
         config.used_ring == other.config.used_ring && config.features == other.config.features &&
         last_avail_idx == other.last_avail_idx && used_idx == other.used_idx &&
         signalled_used == other.signalled_used &&
         signalled_used_valid == other.signalled_used_valid;
}

Result<Virtqueue> Virtqueue::create(const GuestMemory& memory, const QueueConfig& config) {
  TRY(check_config(memory, config));
  return Virtqueue(memory, config);
}

Result<Virtqueue> Virtqueue::restore(const GuestMemory& memory, const VirtqueueState& state) {
  Virtqueue queue = TRY_CONTEXT(create(memory, state.config), "restore virtqueue");
  queue.last_avail_idx_ = state.last_avail_idx;
  queue.used_idx_ = state.used_idx;
  queue.signalled_used_ = state.signalled_used;
  queue.signalled_used_valid_ = state.signalled_used_valid;
  return queue;
}

VirtqueueState Virtqueue::save() const {
  return VirtqueueState{.config = config_,
                        .last_avail_idx = last_avail_idx_,
                        .used_idx = used_idx_,
                        .signalled_used = signalled_used_,
                        .signalled_used_valid = signalled_used_valid_};
}

Result<uint16_t> Virtqueue::read_avail_idx() const {
  // One 16-bit load: the driver moves idx while we read it.
  uint16_t idx = TRY(memory_->load_atomic<uint16_t>(config_.avail_ring + 2));
  // Ring entries and descriptors are read after idx; pairs with the
  // driver's write barrier before it publishes idx (§2.7.13.3).
  std::atomic_thread_fence(std::memory_order_acquire);
  uint16_t pending = static_cast<uint16_t>(idx - last_avail_idx_);
  if (pending > config_.size) {
    return corrupt(Errc::Corrupt, fmt::format("avail idx {} is {} ahead of {} (queue size {})",
                                              idx, pending, last_avail_idx_, config_.size));
  }
  return idx;
}

Result<bool> Virtqueue::has_available() const {
  uint16_t idx = TRY(read_avail_idx());
  return idx != last_avail_idx_;
}

Result<std::optional<DescriptorChain>> Virtqueue::pop() {
  DescriptorChain chain;
  if (!TRY(pop_into(chain))) return std::optional<DescriptorChain>();
  return std::optional<DescriptorChain>(std::move(chain));
}

Result<bool> Virtqueue::pop_into(DescriptorChain& chain) {
  uint16_t avail_idx = TRY(read_avail_idx());
  if (avail_idx == last_avail_idx_) return false;
  // size is a power of 2, so the modulo is consistent across the 16-bit wrap.
  uint64_t slot = last_avail_idx_ % config_.size;
  uint16_t head = TRY(memory_->read_obj<uint16_t>(config_.avail_ring + 4 + 2 * slot));
  TRY(walk_chain(head, chain));
  ++last_avail_idx_;
  return true;
}

Result<void> Virtqueue::walk_chain(uint16_t head, DescriptorChain& chain) const {
  chain.head = head;
  chain.segments.clear();
  chain.readable_bytes = 0;
  chain.writable_bytes = 0;
  if (head >= config_.size) {
    return corrupt(Errc::Corrupt,
                   fmt::format("head {} outside queue of size {}", head, config_.size));
  }

  GuestAddr table = config_.desc_table;
  uint32_t table_entries = config_.size;
  bool in_indirect = false;
  uint32_t index = head;
  uint64_t total_bytes = 0;
  bool seen_writable = false;
  // A chain visits each descriptor of its table at most once, so more
  // steps than entries means a loop (§2.7.5.3.1: no chain is longer than
  // the queue size; an indirect table bounds its own chain).
  uint32_t steps = 0;
  while (true) {
    if (steps++ == table_entries) {
      return corrupt(Errc::Corrupt,
                     fmt::format("chain from head {} loops or exceeds {} descriptors", head,
                                 table_entries));
    }
    VirtqDesc desc = TRY(memory_->read_obj<VirtqDesc>(table + 16ull * index));

    if (desc.flags & kDescFlagIndirect) {
      // §2.7.5.3.1: only with the feature, never nested, never with NEXT,
      // and a whole number of descriptors.
      if (!indirect_desc()) {
        return corrupt(Errc::Corrupt, "INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC");
      }
      if (in_indirect) return corrupt(Errc::Corrupt, "nested indirect descriptor table");
      if (desc.flags & kDescFlagNext) {
        return corrupt(Errc::Corrupt, "indirect descriptor with NEXT set");
      }
      if (desc.len == 0 || desc.len % 16 != 0) {
        return corrupt(Errc::Corrupt,
                       fmt::format("indirect table of {} bytes is not a multiple of 16", desc.len));
      }
      if (desc.addr % 16 != 0 || !memory_->contains(GuestAddr(desc.addr), desc.len)) {
        return corrupt(Errc::OutOfRange, fmt::format("indirect table {:#x}+{:#x} not aligned RAM",
                                                     desc.addr, desc.len));
      }
      table = GuestAddr(desc.addr);
      // next is 16 bits, so entries past 65536 are unreachable; capping the
      // bound keeps a huge table from stretching the loop check.
      table_entries = std::min<uint32_t>(desc.len / 16, 65536);
      in_indirect = true;
      index = 0;
      steps = 0;
      continue;
    }

    bool writable = (desc.flags & kDescFlagWrite) != 0;
    if (writable) {
      seen_writable = true;
    } else if (seen_writable) {
      return corrupt(Errc::Corrupt,
                     fmt::format("readable descriptor after a writable one in chain {}", head));
    }
    if (desc.len != 0) {
      total_bytes += desc.len;
      if (total_bytes > std::numeric_limits<uint32_t>::max()) {
        return corrupt(Errc::Corrupt, fmt::format("chain {} longer than 4 GiB", head));
      }
      if (!memory_->contains(GuestAddr(desc.addr), desc.len)) {
        return corrupt(Errc::OutOfRange,
                       fmt::format("buffer {:#x}+{:#x} is not RAM", desc.addr, desc.len));
      }
      chain.segments.push_back(Segment{GuestAddr(desc.addr), desc.len, writable});
      (writable ? chain.writable_bytes : chain.readable_bytes) += desc.len;
    }

    if (!(desc.flags & kDescFlagNext)) return ok();
    index = desc.next;
    if (index >= table_entries) {
      return corrupt(Errc::Corrupt, fmt::format("next {} outside table of {} descriptors", index,
                                                table_entries));
    }
  }
}

Result<void> Virtqueue::push_used(uint16_t head, uint32_t written_len) {
  if (head >= config_.size) {
    return fail(Errc::InvalidArgument,
                fmt::format("virtqueue: push_used head {} outside queue of size {}", head,
                            config_.size));
  }
  uint64_t slot = used_idx_ % config_.size;
  TRY(memory_->write_obj(config_.used_ring + 4 + 8 * slot, VirtqUsedElem{head, written_len}));
  // The element must be visible before the index that publishes it (§2.7.8).
  std::atomic_thread_fence(std::memory_order_release);
  uint16_t next = static_cast<uint16_t>(used_idx_ + 1);
  TRY(memory_->store_atomic(config_.used_ring + 2, next));
  used_idx_ = next;
  return ok();
}

bool Virtqueue::needs_notification() {
  // The used idx store must be ordered before the load of the driver's
  // flags or used_event, or a driver re-enabling interrupts could miss one.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (!event_idx()) {
    // The rings were checked at create(); a failed read cannot happen, and
    // notifying is the safe answer if it did.
    auto flags = memory_->load_atomic<uint16_t>(config_.avail_ring);
    return !flags || !(*flags & kAvailFlagNoInterrupt);
  }
  uint16_t old_idx = signalled_used_;
  bool valid = signalled_used_valid_;
  signalled_used_ = used_idx_;
  signalled_used_valid_ = true;
  if (!valid) return true;
  auto used_event = memory_->load_atomic<uint16_t>(used_event_addr());
  if (!used_event) return true;
  return need_event(*used_event, used_idx_, old_idx);
}

Result<void> Virtqueue::disable_driver_notifications() {
  // With EVENT_IDX the driver only notifies when avail idx passes
  // avail_event, which stays where we last enabled it: nothing to write.
  if (event_idx()) return ok();
  return memory_->store_atomic(config_.used_ring, kUsedFlagNoNotify);
}

Result<bool> Virtqueue::enable_driver_notifications() {
  if (event_idx()) {
    TRY(memory_->store_atomic(avail_event_addr(), last_avail_idx_));
  } else {
    TRY(memory_->store_atomic(config_.used_ring, uint16_t{0}));
  }
  // The store above must precede the re-read of avail idx, or a chain
  // made available in between would wait for a notification never sent.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return has_available();
}

Result<void> Virtqueue::read_from_chain(const DescriptorChain& chain, uint64_t offset,
                                        std::span<std::byte> data) const {
  if (offset > chain.readable_bytes || data.size() > chain.readable_bytes - offset) {
    return fail(Errc::OutOfRange,
                fmt::format("virtqueue: read {}+{} past {} readable bytes of chain {}", offset,
                            data.size(), chain.readable_bytes, chain.head));
  }
  for (const Segment& segment : chain.segments) {
    if (data.empty() || segment.device_writable) break;
    if (offset >= segment.len) {
      offset -= segment.len;
      continue;
    }
    size_t count = std::min<uint64_t>(segment.len - offset, data.size());
    TRY(memory_->read(segment.addr + offset, data.first(count)));
    data = data.subspan(count);
    offset = 0;
  }
  return ok();
}

Result<void> Virtqueue::write_to_chain(const DescriptorChain& chain, uint64_t offset,
                                       std::span<const std::byte> data) const {
  if (offset > chain.writable_bytes || data.size() > chain.writable_bytes - offset) {
    return fail(Errc::OutOfRange,
                fmt::format("virtqueue: write {}+{} past {} writable bytes of chain {}", offset,
                            data.size(), chain.writable_bytes, chain.head));
  }
  for (const Segment& segment : chain.segments) {
    if (data.empty()) break;
    if (!segment.device_writable) continue;
    if (offset >= segment.len) {
      offset -= segment.len;
      continue;
    }
    size_t count = std::min<uint64_t>(segment.len - offset, data.size());
    TRY(memory_->write(segment.addr + offset, data.first(count)));
    data = data.subspan(count);
    offset = 0;
  }
  return ok();
}

}  // namespace keel::devices::virtio
