// libFuzzer target for the split virtqueue (virtio 1.2 §2.7): arbitrary
// bytes become the queue configuration and the contents of 64 KiB of
// guest RAM, then the device side pops, copies and completes chains in a
// bounded loop. Sanitizers catch bad accesses; the checks below catch a
// chain that breaks the queue's own promises.
// Implemented: pop/push_used/notification paths. Missing: concurrent
// driver writes between pops.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "base/log.h"
#include "devices/virtio/queue.h"
#include "memory/guest_memory.h"

namespace {

using keel::devices::virtio::DescriptorChain;
using keel::devices::virtio::kFeatureEventIdx;
using keel::devices::virtio::kFeatureIndirectDesc;
using keel::devices::virtio::QueueConfig;
using keel::devices::virtio::Virtqueue;
using keel::devices::virtio::VirtqueueState;
using keel::memory::GuestAddr;
using keel::memory::GuestMemory;

constexpr uint64_t kRamBytes = 64 << 10;
constexpr size_t kHeaderBytes = 12;
constexpr int kMaxPops = 64;

uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

void check(bool condition) {
  if (!condition) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  keel::log::set_level(keel::log::Level::Off);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < kHeaderBytes) return 0;
  static GuestMemory* memory = [] {
    auto created = GuestMemory::create(kRamBytes, 0xc000'0000, 0x1'0000'0000);
    check(created.has_value());
    return new GuestMemory(std::move(*created));
  }();

  // Header: size exponent and flags, three ring addresses, two start indices.
  uint8_t shape = data[0];
  uint8_t flags = data[1];
  QueueConfig config;
  config.size = (flags & 0x80) ? le16(data + 2) : (1u << (shape % 10));  // mostly 1..512
  config.features = ((flags & 1) ? kFeatureIndirectDesc : 0) | ((flags & 2) ? kFeatureEventIdx : 0);
  // Mostly aligned and inside the first 4 KiB (libFuzzer's default input
  // size), so the rings hold fuzzer bytes; flag 0x40 keeps raw values.
  uint16_t desc = le16(data + 4), avail = le16(data + 6), used = le16(data + 8);
  if (!(flags & 0x40)) {
    desc &= 0x0ff0;
    avail &= 0x0ffe;
    used &= 0x0ffc;
  }
  config.desc_table = GuestAddr(desc);
  config.avail_ring = GuestAddr(avail);
  config.used_ring = GuestAddr(used);
  uint16_t start_idx = le16(data + 10);

  // RAM: the rest of the input, zero-filled beyond it.
  auto ram = *memory->host_span(GuestAddr(0), kRamBytes);
  size_t fill = std::min<size_t>(size - kHeaderBytes, kRamBytes);
  std::memset(ram.data(), 0, kRamBytes);
  std::memcpy(ram.data(), data + kHeaderBytes, fill);

  VirtqueueState state{.config = config,
                       .last_avail_idx = start_idx,
                       .used_idx = start_idx,
                       .signalled_used = start_idx,
                       .signalled_used_valid = (flags & 4) != 0};
  auto restored = Virtqueue::restore(*memory, state);
  if (!restored) return 0;
  Virtqueue& queue = *restored;

  DescriptorChain chain;
  std::vector<std::byte> buffer(256);
  for (int i = 0; i < kMaxPops; ++i) {
    auto popped = queue.pop_into(chain);
    if (!popped || !*popped) break;
    check(chain.head < queue.size());
    uint64_t readable = 0, writable = 0;
    bool seen_writable = false;
    for (const auto& segment : chain.segments) {
      check(segment.len != 0);
      check(memory->contains(segment.addr, segment.len));
      if (segment.device_writable) {
        seen_writable = true;
        writable += segment.len;
      } else {
        check(!seen_writable);
        readable += segment.len;
      }
    }
    check(readable == chain.readable_bytes && writable == chain.writable_bytes);
    check(readable + writable <= UINT32_MAX);

    size_t in = std::min<size_t>(chain.readable_bytes, buffer.size());
    check(queue.read_from_chain(chain, 0, std::span(buffer).first(in)).has_value());
    check(!queue.read_from_chain(chain, chain.readable_bytes, std::span(buffer).first(1)));
    size_t out = std::min<size_t>(chain.writable_bytes, buffer.size());
    check(queue.write_to_chain(chain, 0, std::span(buffer).first(out)).has_value());
    check(queue.push_used(chain.head, static_cast<uint32_t>(out)).has_value());
    (void)queue.needs_notification();
    if (i % 4 == 3) (void)queue.enable_driver_notifications();
  }
  (void)queue.disable_driver_notifications();
  (void)queue.needs_notification();
  return 0;
}
