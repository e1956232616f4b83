// Test support: the driver's side of a split virtqueue (virtio 1.2 §2.7)
// in a small GuestMemory, so devices and the queue can be tested without a
// guest. FakeVirtqueue lays the rings out at fixed offsets and reads the
// used ring back; ChainBuilder writes descriptor chains (direct or through
// an indirect table, §2.7.5.3) and makes them available.
// Implemented: everything the queue tests need. Missing: packed rings.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include <gtest/gtest.h>

#include "devices/virtio/queue.h"
#include "memory/guest_memory.h"

namespace keel::devices::virtio::testing {

// 64 KiB of RAM, with the 32-bit hole (irrelevant here) far above it.
inline GuestMemory make_test_memory(uint64_t size_bytes = 64 << 10) {
  return std::move(*GuestMemory::create(size_bytes, 0xc000'0000, 0x1'0000'0000));
}

class FakeVirtqueue {
 public:
  // Fixed layout for sizes up to 256: descriptors at 0, avail ring at
  // 0x1000, used ring at 0x2000, buffers (and indirect tables) from 0x4000.
  static constexpr GuestAddr kDescTable{0x0000};
  static constexpr GuestAddr kAvailRing{0x1000};
  static constexpr GuestAddr kUsedRing{0x2000};
  static constexpr uint64_t kDataStart = 0x4000;

  FakeVirtqueue(const GuestMemory& memory, uint16_t size, uint64_t features = 0)
      : memory_(memory), size_(size), features_(features), next_data_(kDataStart) {}

  QueueConfig config() const {
    return QueueConfig{.size = size_,
                       .desc_table = kDescTable,
                       .avail_ring = kAvailRing,
                       .used_ring = kUsedRing,
                       .features = features_};
  }
  uint16_t size() const { return size_; }
  const GuestMemory& memory() const { return memory_; }

  void set_desc(uint32_t index, VirtqDesc desc) { write(kDescTable + 16ull * index, desc); }
  void set_desc_at(GuestAddr table, uint32_t index, VirtqDesc desc) {
    write(table + 16ull * index, desc);
  }

  // Puts head in the next avail slot and bumps avail idx.
  void publish(uint16_t head) {
    write(kAvailRing + 4 + 2ull * (avail_idx_ % size_), head);
    ++avail_idx_;
    write(kAvailRing + 2, avail_idx_);
  }
  // Writes avail idx directly (for wraparound and hostile cases).
  void set_avail_idx(uint16_t idx) {
    avail_idx_ = idx;
    write(kAvailRing + 2, idx);
  }
  void set_avail_slot(uint16_t slot, uint16_t head) { write(kAvailRing + 4 + 2ull * slot, head); }
  uint16_t avail_idx() const { return avail_idx_; }
  void set_avail_flags(uint16_t flags) { write(kAvailRing, flags); }
  void set_used_event(uint16_t event) { write(kAvailRing + 4 + 2ull * size_, event); }

  uint16_t used_idx() const { return read<uint16_t>(kUsedRing + 2); }
  uint16_t used_flags() const { return read<uint16_t>(kUsedRing); }
  uint16_t avail_event() const { return read<uint16_t>(kUsedRing + 4 + 8ull * size_); }
  VirtqUsedElem used_elem(uint16_t slot) const {
    return read<VirtqUsedElem>(kUsedRing + 4 + 8ull * (slot % size_));
  }

  // A fresh buffer of len bytes in the data area, 16-byte aligned.
  GuestAddr alloc(uint64_t len) {
    GuestAddr addr(next_data_);
    next_data_ += (len + 15) & ~uint64_t{15};
    EXPECT_LE(next_data_, memory_.size_bytes()) << "fake virtqueue data area exhausted";
    return addr;
  }
  // The next free descriptor index (descriptors are handed out round-robin).
  uint16_t take_desc() { return static_cast<uint16_t>(next_desc_++ % size_); }

  void fill(GuestAddr addr, std::span<const std::byte> data) {
    ASSERT_TRUE(memory_.write(addr, data).has_value());
  }
  std::vector<std::byte> bytes(GuestAddr addr, size_t len) const {
    std::vector<std::byte> out(len);
    EXPECT_TRUE(memory_.read(addr, out).has_value());
    return out;
  }

  template <typename T>
  void write(GuestAddr addr, const T& value) {
    ASSERT_TRUE(memory_.write_obj(addr, value).has_value());
  }
  template <typename T>
  T read(GuestAddr addr) const {
    return *memory_.read_obj<T>(addr);
  }

 private:
  const GuestMemory& memory_;
  uint16_t size_;
  uint64_t features_;
  uint64_t next_data_;
  uint16_t avail_idx_ = 0;
  uint32_t next_desc_ = 0;
};

// Builds one chain: readable(...) and writable(...) segments in call order
// (tests may break the spec's order on purpose), then build() or
// build_indirect() writes the descriptors and publishes the head.
class ChainBuilder {
 public:
  struct Built {
    uint16_t head;
    std::vector<GuestAddr> buffers;  // one per segment, in order
  };

  explicit ChainBuilder(FakeVirtqueue& queue) : queue_(queue) {}

  ChainBuilder& readable(std::span<const std::byte> data) {
    GuestAddr addr = queue_.alloc(data.size());
    queue_.fill(addr, data);
    segments_.push_back({addr, static_cast<uint32_t>(data.size()), false});
    return *this;
  }
  ChainBuilder& readable(uint32_t len) {
    segments_.push_back({queue_.alloc(len), len, false});
    return *this;
  }
  ChainBuilder& writable(uint32_t len) {
    segments_.push_back({queue_.alloc(len), len, true});
    return *this;
  }
  // A segment at an arbitrary address (hostile cases); allocates nothing.
  ChainBuilder& raw(uint64_t addr, uint32_t len, bool device_writable) {
    segments_.push_back({GuestAddr(addr), len, device_writable});
    return *this;
  }

  // Direct descriptors from the queue's table, then publish.
  Built build(bool publish = true) {
    std::vector<uint16_t> indices;
    for (size_t i = 0; i < segments_.size(); ++i) indices.push_back(queue_.take_desc());
    for (size_t i = 0; i < segments_.size(); ++i) {
      bool last = i + 1 == segments_.size();
      queue_.set_desc(indices[i], descriptor(i, last ? 0 : indices[i + 1], last));
    }
    if (publish) queue_.publish(indices[0]);
    return Built{indices[0], addresses()};
  }

  // One INDIRECT descriptor in the queue's table pointing at a table of
  // the segments in the data area, then publish.
  Built build_indirect(bool publish = true) {
    GuestAddr table = queue_.alloc(16 * segments_.size());
    for (size_t i = 0; i < segments_.size(); ++i) {
      bool last = i + 1 == segments_.size();
      queue_.set_desc_at(table, static_cast<uint32_t>(i),
                         descriptor(i, static_cast<uint16_t>(last ? 0 : i + 1), last));
    }
    uint16_t head = queue_.take_desc();
    queue_.set_desc(head, VirtqDesc{table.value, static_cast<uint32_t>(16 * segments_.size()),
                                    kDescFlagIndirect, 0});
    if (publish) queue_.publish(head);
    return Built{head, addresses()};
  }

 private:
  struct Pending {
    GuestAddr addr;
    uint32_t len;
    bool device_writable;
  };

  VirtqDesc descriptor(size_t i, uint16_t next, bool last) const {
    uint16_t flags = segments_[i].device_writable ? kDescFlagWrite : 0;
    if (!last) flags |= kDescFlagNext;
    return VirtqDesc{segments_[i].addr.value, segments_[i].len, flags, next};
  }
  std::vector<GuestAddr> addresses() const {
    std::vector<GuestAddr> out;
    for (const Pending& segment : segments_) out.push_back(segment.addr);
    return out;
  }

  FakeVirtqueue& queue_;
  std::vector<Pending> segments_;
};

inline std::vector<std::byte> pattern(size_t len, uint8_t seed = 1) {
  std::vector<std::byte> out(len);
  for (size_t i = 0; i < len; ++i) out[i] = std::byte(static_cast<uint8_t>(seed + i * 7));
  return out;
}

}  // namespace keel::devices::virtio::testing
