// Split virtqueue tests. Spec: virtio 1.2 §2.7 (§2.7.5 descriptors,
// §2.7.5.3 indirect, §2.7.6-2.7.8 rings, §2.7.7/§2.7.10 EVENT_IDX).
// Covered: chains in order, used ring, 16-bit wraparound, notification
// decisions, indirect tables, copy helpers, save/restore, and hostile
// drivers (each an error, never a crash or a hang).
#include "devices/virtio/queue.h"

#include <gtest/gtest.h>

#include "fake_virtqueue.h"

namespace keel::devices::virtio {
namespace {

using testing::ChainBuilder;
using testing::FakeVirtqueue;
using testing::make_test_memory;
using testing::pattern;

class VirtqueueTest : public ::testing::Test {
 protected:
  Virtqueue make_queue(uint16_t size = 16, uint64_t features = 0) {
    fake_.emplace(memory_, size, features);
    auto queue = Virtqueue::create(memory_, fake_->config());
    EXPECT_TRUE(queue.has_value()) << queue.error().message();
    return std::move(*queue);
  }
  FakeVirtqueue& fake() { return *fake_; }

  // Pops and expects an error of the given code.
  static void expect_pop_error(Virtqueue& queue, Errc code) {
    auto chain = queue.pop();
    ASSERT_FALSE(chain.has_value());
    EXPECT_EQ(chain.error().code(), code) << chain.error().message();
  }

  GuestMemory memory_ = make_test_memory();
  std::optional<FakeVirtqueue> fake_;
};

// ---- Setup validation ----

TEST_F(VirtqueueTest, AcceptsPowerOfTwoSizes) {
  for (uint32_t size : {1u, 2u, 128u, 256u}) {
    QueueConfig config{size, GuestAddr(0), GuestAddr(0x1000), GuestAddr(0x2000), 0};
    EXPECT_TRUE(Virtqueue::create(memory_, config).has_value()) << size;
  }
}

TEST_F(VirtqueueTest, RejectsBadSizes) {
  for (uint32_t size : {0u, 3u, 100u, 65536u, 65535u}) {
    QueueConfig config{size, GuestAddr(0), GuestAddr(0x1000), GuestAddr(0x2000), 0};
    auto queue = Virtqueue::create(memory_, config);
    ASSERT_FALSE(queue.has_value()) << size;
    EXPECT_EQ(queue.error().code(), Errc::InvalidArgument);
  }
}

TEST_F(VirtqueueTest, MaxSizeNeedsRingsInRam) {
  // 32768 is valid but its descriptor table (512 KiB) does not fit in 64 KiB.
  QueueConfig config{kMaxQueueSize, GuestAddr(0), GuestAddr(0x1000), GuestAddr(0x2000), 0};
  auto queue = Virtqueue::create(memory_, config);
  ASSERT_FALSE(queue.has_value());
  EXPECT_EQ(queue.error().code(), Errc::OutOfRange);
  GuestMemory big = make_test_memory(1 << 20);
  config = {kMaxQueueSize, GuestAddr(0), GuestAddr(0x80000), GuestAddr(0x90000), 0};
  EXPECT_TRUE(Virtqueue::create(big, config).has_value());
}

TEST_F(VirtqueueTest, RejectsMisalignedRings) {
  QueueConfig good{16, GuestAddr(0), GuestAddr(0x1000), GuestAddr(0x2000), 0};
  QueueConfig config = good;
  config.desc_table = GuestAddr(8);
  EXPECT_FALSE(Virtqueue::create(memory_, config).has_value());
  config = good;
  config.avail_ring = GuestAddr(0x1001);
  EXPECT_FALSE(Virtqueue::create(memory_, config).has_value());
  config = good;
  config.used_ring = GuestAddr(0x2002);
  EXPECT_FALSE(Virtqueue::create(memory_, config).has_value());
  config = good;
  config.avail_ring = GuestAddr(0x1002);  // 2-aligned is enough for avail
  config.used_ring = GuestAddr(0x2004);   // 4-aligned is enough for used
  EXPECT_TRUE(Virtqueue::create(memory_, config).has_value());
}

TEST_F(VirtqueueTest, RejectsRingsOutsideRam) {
  QueueConfig good{16, GuestAddr(0), GuestAddr(0x1000), GuestAddr(0x2000), 0};
  QueueConfig config = good;
  config.used_ring = GuestAddr((64 << 10) - 8);  // starts inside, ends outside
  auto queue = Virtqueue::create(memory_, config);
  ASSERT_FALSE(queue.has_value());
  EXPECT_EQ(queue.error().code(), Errc::OutOfRange);
  config = good;
  config.desc_table = GuestAddr(0xffff'ffff'ffff'fff0);  // would wrap
  EXPECT_FALSE(Virtqueue::create(memory_, config).has_value());
  config = good;
  config.avail_ring = GuestAddr(0xc000'0000);  // in the hole
  EXPECT_FALSE(Virtqueue::create(memory_, config).has_value());
}

// ---- Normal operation ----

TEST_F(VirtqueueTest, EmptyQueuePopsNothing) {
  Virtqueue queue = make_queue();
  auto chain = queue.pop();
  ASSERT_TRUE(chain.has_value());
  EXPECT_FALSE(chain->has_value());
  EXPECT_FALSE(*queue.has_available());
}

TEST_F(VirtqueueTest, SingleDescriptorChain) {
  Virtqueue queue = make_queue();
  auto data = pattern(100);
  auto built = ChainBuilder(fake()).readable(data).build();
  EXPECT_TRUE(*queue.has_available());
  auto chain = queue.pop();
  ASSERT_TRUE(chain.has_value() && chain->has_value());
  EXPECT_EQ((*chain)->head, built.head);
  ASSERT_EQ((*chain)->segments.size(), 1u);
  EXPECT_EQ((*chain)->segments[0].addr, built.buffers[0]);
  EXPECT_EQ((*chain)->segments[0].len, 100u);
  EXPECT_FALSE((*chain)->segments[0].device_writable);
  EXPECT_EQ((*chain)->readable_bytes, 100u);
  EXPECT_EQ((*chain)->writable_bytes, 0u);
  std::vector<std::byte> out(100);
  ASSERT_TRUE(queue.read_from_chain(**chain, 0, out).has_value());
  EXPECT_EQ(out, data);
  EXPECT_FALSE(queue.pop()->has_value());
}

TEST_F(VirtqueueTest, MultiDescriptorChainKeepsOrder) {
  Virtqueue queue = make_queue();
  auto built = ChainBuilder(fake()).readable(16).readable(32).writable(512).writable(1).build();
  auto chain = *queue.pop();
  ASSERT_TRUE(chain.has_value());
  ASSERT_EQ(chain->segments.size(), 4u);
  uint32_t lens[] = {16, 32, 512, 1};
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(chain->segments[i].addr, built.buffers[i]);
    EXPECT_EQ(chain->segments[i].len, lens[i]);
    EXPECT_EQ(chain->segments[i].device_writable, i >= 2);
  }
  EXPECT_EQ(chain->readable_bytes, 48u);
  EXPECT_EQ(chain->writable_bytes, 513u);
}

TEST_F(VirtqueueTest, SeveralChainsPopInOrderAndUsedRingRecordsThem) {
  Virtqueue queue = make_queue();
  std::vector<uint16_t> heads;
  for (int i = 0; i < 5; ++i) heads.push_back(ChainBuilder(fake()).readable(8).writable(8).build().head);
  for (int i = 0; i < 5; ++i) {
    auto chain = *queue.pop();
    ASSERT_TRUE(chain.has_value());
    EXPECT_EQ(chain->head, heads[i]);
  }
  EXPECT_FALSE(queue.pop()->has_value());
  // Complete out of order: the used ring records what we push, in push order.
  ASSERT_TRUE(queue.push_used(heads[3], 7).has_value());
  ASSERT_TRUE(queue.push_used(heads[0], 0).has_value());
  EXPECT_EQ(fake().used_idx(), 2);
  EXPECT_EQ(queue.used_idx(), 2);
  EXPECT_EQ(fake().used_elem(0).id, heads[3]);
  EXPECT_EQ(fake().used_elem(0).len, 7u);
  EXPECT_EQ(fake().used_elem(1).id, heads[0]);
  EXPECT_EQ(fake().used_elem(1).len, 0u);
}

TEST_F(VirtqueueTest, PopIntoReusesChain) {
  Virtqueue queue = make_queue();
  ChainBuilder(fake()).readable(8).readable(8).readable(8).build();
  ChainBuilder(fake()).writable(4).build();
  DescriptorChain chain;
  ASSERT_TRUE(*queue.pop_into(chain));
  EXPECT_EQ(chain.segments.size(), 3u);
  ASSERT_TRUE(*queue.pop_into(chain));
  EXPECT_EQ(chain.segments.size(), 1u);
  EXPECT_EQ(chain.readable_bytes, 0u);
  EXPECT_EQ(chain.writable_bytes, 4u);
  EXPECT_FALSE(*queue.pop_into(chain));
}

TEST_F(VirtqueueTest, ZeroLengthDescriptorsAreDropped) {
  Virtqueue queue = make_queue();
  // A zero-length buffer may even point outside RAM: nothing is accessed.
  ChainBuilder(fake()).readable(8).raw(0xdead'0000'0000, 0, false).writable(0).writable(4).build();
  auto chain = *queue.pop();
  ASSERT_TRUE(chain.has_value());
  ASSERT_EQ(chain->segments.size(), 2u);
  EXPECT_EQ(chain->readable_bytes, 8u);
  EXPECT_EQ(chain->writable_bytes, 4u);
}

TEST_F(VirtqueueTest, ChainAsLongAsTheQueueIsAllowed) {
  Virtqueue queue = make_queue(8);
  ChainBuilder builder(fake());
  for (int i = 0; i < 8; ++i) builder.readable(4);
  builder.build();
  auto chain = *queue.pop();
  ASSERT_TRUE(chain.has_value());
  EXPECT_EQ(chain->segments.size(), 8u);
}

TEST_F(VirtqueueTest, CopyHelpersSpanSegments) {
  Virtqueue queue = make_queue();
  auto data = pattern(40, 3);
  auto built = ChainBuilder(fake())
                   .readable(std::span(data).first(10))
                   .readable(std::span(data).subspan(10))
                   .writable(5)
                   .writable(20)
                   .build();
  auto chain = **queue.pop();
  std::vector<std::byte> out(25);
  ASSERT_TRUE(queue.read_from_chain(chain, 5, out).has_value());
  EXPECT_EQ(out, std::vector<std::byte>(data.begin() + 5, data.begin() + 30));

  auto payload = pattern(22, 9);
  ASSERT_TRUE(queue.write_to_chain(chain, 3, payload).has_value());
  auto first = fake().bytes(built.buffers[2], 5);
  auto second = fake().bytes(built.buffers[3], 20);
  EXPECT_EQ(std::vector<std::byte>(first.begin() + 3, first.end()),
            std::vector<std::byte>(payload.begin(), payload.begin() + 2));
  EXPECT_EQ(second, std::vector<std::byte>(payload.begin() + 2, payload.end()));

  // Past the end, in either direction, is an error and copies nothing odd.
  std::vector<std::byte> too_big(41);
  EXPECT_EQ(queue.read_from_chain(chain, 0, too_big).error().code(), Errc::OutOfRange);
  std::vector<std::byte> one(1);
  EXPECT_FALSE(queue.read_from_chain(chain, 40, one).has_value());
  EXPECT_FALSE(queue.read_from_chain(chain, ~uint64_t{0}, one).has_value());
  EXPECT_FALSE(queue.write_to_chain(chain, 25, one).has_value());
  EXPECT_FALSE(queue.write_to_chain(chain, 20, pattern(6)).has_value());
  EXPECT_TRUE(queue.write_to_chain(chain, 25, {}).has_value());
}

TEST_F(VirtqueueTest, PushUsedRejectsHeadOutsideQueue) {
  Virtqueue queue = make_queue(16);
  EXPECT_EQ(queue.push_used(16, 0).error().code(), Errc::InvalidArgument);
  EXPECT_EQ(fake().used_idx(), 0);
}

// ---- Wraparound of the free-running indices ----

TEST_F(VirtqueueTest, IndicesWrapPast65535) {
  make_queue(8);  // sets up the fake
  VirtqueueState state{.config = fake().config(), .last_avail_idx = 65533, .used_idx = 65533};
  Virtqueue queue = *Virtqueue::restore(memory_, state);
  fake().set_avail_idx(65533);
  fake().write(FakeVirtqueue::kUsedRing + 2, uint16_t{65533});
  std::vector<uint16_t> heads;
  for (int i = 0; i < 6; ++i) heads.push_back(ChainBuilder(fake()).writable(4).build().head);
  EXPECT_EQ(fake().avail_idx(), 3);  // 65533 + 6 wrapped
  for (int i = 0; i < 6; ++i) {
    auto chain = *queue.pop();
    ASSERT_TRUE(chain.has_value()) << i;
    EXPECT_EQ(chain->head, heads[i]);
    ASSERT_TRUE(queue.push_used(chain->head, static_cast<uint32_t>(i)).has_value());
  }
  EXPECT_FALSE(queue.pop()->has_value());
  EXPECT_EQ(queue.last_avail_idx(), 3);
  EXPECT_EQ(fake().used_idx(), 3);
  for (uint16_t i = 0; i < 6; ++i) {
    VirtqUsedElem elem = fake().used_elem(static_cast<uint16_t>(65533 + i));
    EXPECT_EQ(elem.id, heads[i]);
    EXPECT_EQ(elem.len, i);
  }
}

TEST_F(VirtqueueTest, FullRingAcrossWrapIsAccepted) {
  make_queue(4);
  VirtqueueState state{.config = fake().config(), .last_avail_idx = 65534};
  Virtqueue queue = *Virtqueue::restore(memory_, state);
  fake().set_avail_idx(65534);
  for (int i = 0; i < 4; ++i) ChainBuilder(fake()).readable(4).build();
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(queue.pop()->has_value()) << i;
  EXPECT_FALSE(queue.pop()->has_value());
}

// ---- Used buffer notifications ----

TEST_F(VirtqueueTest, NoInterruptFlagWithoutEventIdx) {
  Virtqueue queue = make_queue();
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_TRUE(queue.needs_notification());
  fake().set_avail_flags(kAvailFlagNoInterrupt);
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_FALSE(queue.needs_notification());
  fake().set_avail_flags(0);
  EXPECT_TRUE(queue.needs_notification());
}

TEST_F(VirtqueueTest, EventIdxIgnoresNoInterruptFlag) {
  Virtqueue queue = make_queue(16, kFeatureEventIdx);
  fake().set_avail_flags(kAvailFlagNoInterrupt);
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_TRUE(queue.needs_notification());  // first decision always notifies
  fake().set_used_event(1);                  // wants one when used idx passes 1
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_TRUE(queue.needs_notification());
}

TEST_F(VirtqueueTest, EventIdxNotifiesOnlyWhenCrossingUsedEvent) {
  Virtqueue queue = make_queue(16, kFeatureEventIdx);
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_TRUE(queue.needs_notification());  // used idx 1
  fake().set_used_event(3);                  // notify once idx goes past 3
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_FALSE(queue.needs_notification());  // idx 2
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_FALSE(queue.needs_notification());  // idx 3
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_TRUE(queue.needs_notification());  // idx 4: crossed 3
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_FALSE(queue.needs_notification());  // idx 5: already told
  // A batch that jumps over the event still notifies once.
  fake().set_used_event(6);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_TRUE(queue.needs_notification());  // 5 -> 8 crossed 6
  EXPECT_FALSE(queue.needs_notification());  // nothing new
}

TEST_F(VirtqueueTest, EventIdxAtTheWrapBoundary) {
  make_queue(16, kFeatureEventIdx);
  // Used idx 65534, already signalled there.
  VirtqueueState state{.config = fake().config(),
                       .used_idx = 65534,
                       .signalled_used = 65534,
                       .signalled_used_valid = true};
  Virtqueue queue = *Virtqueue::restore(memory_, state);
  fake().set_used_event(65535);  // notify when idx passes 65535, i.e. reaches 0
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_FALSE(queue.needs_notification());  // idx 65535
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_EQ(queue.used_idx(), 0);
  EXPECT_TRUE(queue.needs_notification());  // idx 0 (wrapped)

  // used_event 0 crossed by a batch 65535 -> 1.
  state = {.config = fake().config(),
           .used_idx = 65535,
           .signalled_used = 65535,
           .signalled_used_valid = true};
  queue = *Virtqueue::restore(memory_, state);
  fake().set_used_event(0);
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_TRUE(queue.needs_notification());

  // A used_event left far behind (driver stale) across the wrap: no notification.
  state = {.config = fake().config(),
           .used_idx = 10,
           .signalled_used = 10,
           .signalled_used_valid = true};
  queue = *Virtqueue::restore(memory_, state);
  fake().set_used_event(65500);
  ASSERT_TRUE(queue.push_used(0, 0).has_value());
  EXPECT_FALSE(queue.needs_notification());
}

// ---- Driver notification suppression ----

TEST_F(VirtqueueTest, DriverNotificationsWithoutEventIdxUseUsedFlags) {
  Virtqueue queue = make_queue();
  ASSERT_TRUE(queue.disable_driver_notifications().has_value());
  EXPECT_EQ(fake().used_flags(), kUsedFlagNoNotify);
  EXPECT_FALSE(*queue.enable_driver_notifications());
  EXPECT_EQ(fake().used_flags(), 0);
  ChainBuilder(fake()).readable(4).build();
  EXPECT_TRUE(*queue.enable_driver_notifications());  // one arrived: process it
}

TEST_F(VirtqueueTest, DriverNotificationsWithEventIdxUseAvailEvent) {
  Virtqueue queue = make_queue(16, kFeatureEventIdx);
  ChainBuilder(fake()).readable(4).build();
  ChainBuilder(fake()).readable(4).build();
  ASSERT_TRUE(queue.pop()->has_value());
  EXPECT_TRUE(*queue.enable_driver_notifications());
  EXPECT_EQ(fake().avail_event(), 1);
  ASSERT_TRUE(queue.pop()->has_value());
  EXPECT_FALSE(*queue.enable_driver_notifications());
  EXPECT_EQ(fake().avail_event(), 2);
  EXPECT_EQ(fake().used_flags(), 0);
}

// ---- Indirect descriptors ----

TEST_F(VirtqueueTest, IndirectChain) {
  Virtqueue queue = make_queue(16, kFeatureIndirectDesc);
  auto data = pattern(64);
  auto built = ChainBuilder(fake()).readable(data).readable(16).writable(32).build_indirect();
  auto chain = *queue.pop();
  ASSERT_TRUE(chain.has_value());
  EXPECT_EQ(chain->head, built.head);
  ASSERT_EQ(chain->segments.size(), 3u);
  EXPECT_EQ(chain->segments[0].addr, built.buffers[0]);
  EXPECT_EQ(chain->segments[2].addr, built.buffers[2]);
  EXPECT_TRUE(chain->segments[2].device_writable);
  EXPECT_EQ(chain->readable_bytes, 80u);
  EXPECT_EQ(chain->writable_bytes, 32u);
  std::vector<std::byte> out(64);
  ASSERT_TRUE(queue.read_from_chain(*chain, 0, out).has_value());
  EXPECT_EQ(out, data);
}

TEST_F(VirtqueueTest, IndirectTableLongerThanQueue) {
  // An indirect table is bounded by its own length, not the queue size.
  Virtqueue queue = make_queue(4, kFeatureIndirectDesc);
  ChainBuilder builder(fake());
  for (int i = 0; i < 12; ++i) builder.writable(4);
  builder.build_indirect();
  auto chain = *queue.pop();
  ASSERT_TRUE(chain.has_value());
  EXPECT_EQ(chain->segments.size(), 12u);
}

TEST_F(VirtqueueTest, DirectDescriptorsThenIndirect) {
  Virtqueue queue = make_queue(16, kFeatureIndirectDesc);
  GuestAddr table = fake().alloc(32);
  GuestAddr buffer = fake().alloc(64);
  fake().set_desc_at(table, 0, {buffer.value, 16, kDescFlagNext, 1});
  fake().set_desc_at(table, 1, {buffer.value + 16, 16, kDescFlagWrite, 0});
  fake().set_desc(5, {buffer.value + 32, 8, kDescFlagNext, 6});
  fake().set_desc(6, {table.value, 32, kDescFlagIndirect, 0});
  fake().publish(5);
  auto chain = *queue.pop();
  ASSERT_TRUE(chain.has_value());
  EXPECT_EQ(chain->segments.size(), 3u);
  EXPECT_EQ(chain->readable_bytes, 24u);
  EXPECT_EQ(chain->writable_bytes, 16u);
}

// ---- Hostile drivers: each is an error; nothing crashes or hangs ----

TEST_F(VirtqueueTest, HeadOutsideQueue) {
  Virtqueue queue = make_queue(16);
  fake().set_avail_slot(0, 16);
  fake().set_avail_idx(1);
  expect_pop_error(queue, Errc::Corrupt);
  fake().set_avail_slot(0, 0xffff);
  expect_pop_error(queue, Errc::Corrupt);
}

TEST_F(VirtqueueTest, NextOutsideQueue) {
  Virtqueue queue = make_queue(16);
  GuestAddr buffer = fake().alloc(16);
  fake().set_desc(0, {buffer.value, 16, kDescFlagNext, 16});
  fake().publish(0);
  expect_pop_error(queue, Errc::Corrupt);
}

TEST_F(VirtqueueTest, SelfLoopTerminates) {
  Virtqueue queue = make_queue(16);
  GuestAddr buffer = fake().alloc(16);
  fake().set_desc(3, {buffer.value, 16, kDescFlagNext, 3});
  fake().publish(3);
  expect_pop_error(queue, Errc::Corrupt);
}

TEST_F(VirtqueueTest, LongLoopTerminates) {
  Virtqueue queue = make_queue(256);
  GuestAddr buffer = fake().alloc(16);
  for (uint16_t i = 0; i < 256; ++i) {
    fake().set_desc(i, {buffer.value, 16, kDescFlagNext, static_cast<uint16_t>((i + 1) % 256)});
  }
  fake().publish(0);
  expect_pop_error(queue, Errc::Corrupt);
}

TEST_F(VirtqueueTest, ZeroLengthLoopTerminates) {
  Virtqueue queue = make_queue(16);
  fake().set_desc(0, {0, 0, kDescFlagNext, 1});
  fake().set_desc(1, {0, 0, kDescFlagNext, 0});
  fake().publish(0);
  expect_pop_error(queue, Errc::Corrupt);
}

TEST_F(VirtqueueTest, IndirectLoopTerminates) {
  Virtqueue queue = make_queue(16, kFeatureIndirectDesc);
  GuestAddr table = fake().alloc(64);
  GuestAddr buffer = fake().alloc(16);
  for (uint16_t i = 0; i < 4; ++i) {
    fake().set_desc_at(table, i, {buffer.value, 16, kDescFlagNext, static_cast<uint16_t>((i + 1) % 4)});
  }
  fake().set_desc(0, {table.value, 64, kDescFlagIndirect, 0});
  fake().publish(0);
  expect_pop_error(queue, Errc::Corrupt);
}

TEST_F(VirtqueueTest, HugeIndirectTableLoopTerminates) {
  // A table claiming 4 GiB would pass a bound by its entry count alone; it
  // must still fail (here: not RAM) rather than spin.
  Virtqueue queue = make_queue(16, kFeatureIndirectDesc);
  fake().set_desc(0, {0x4000, 0xffff'fff0, kDescFlagIndirect, 0});
  fake().publish(0);
  expect_pop_error(queue, Errc::OutOfRange);
}

TEST_F(VirtqueueTest, IndirectNextOutsideTable) {
  Virtqueue queue = make_queue(16, kFeatureIndirectDesc);
  GuestAddr table = fake().alloc(32);
  GuestAddr buffer = fake().alloc(16);
  fake().set_desc_at(table, 0, {buffer.value, 16, kDescFlagNext, 2});  // table has 2 entries
  fake().set_desc(0, {table.value, 32, kDescFlagIndirect, 0});
  fake().publish(0);
  expect_pop_error(queue, Errc::Corrupt);
}

TEST_F(VirtqueueTest, IndirectWithoutFeature) {
  Virtqueue queue = make_queue(16);
  ChainBuilder(fake()).readable(4).build_indirect();
  expect_pop_error(queue, Errc::Corrupt);
}

TEST_F(VirtqueueTest, NestedIndirect) {
  Virtqueue queue = make_queue(16, kFeatureIndirectDesc);
  GuestAddr inner = fake().alloc(16);
  GuestAddr outer = fake().alloc(16);
  GuestAddr buffer = fake().alloc(16);
  fake().set_desc_at(inner, 0, {buffer.value, 16, 0, 0});
  fake().set_desc_at(outer, 0, {inner.value, 16, kDescFlagIndirect, 0});
  fake().set_desc(0, {outer.value, 16, kDescFlagIndirect, 0});
  fake().publish(0);
  expect_pop_error(queue, Errc::Corrupt);
}

TEST_F(VirtqueueTest, IndirectWithNext) {
  Virtqueue queue = make_queue(16, kFeatureIndirectDesc);
  GuestAddr table = fake().alloc(16);
  fake().set_desc_at(table, 0, {fake().alloc(16).value, 16, 0, 0});
  fake().set_desc(0, {table.value, 16, kDescFlagIndirect | kDescFlagNext, 1});
  fake().publish(0);
  expect_pop_error(queue, Errc::Corrupt);
}

TEST_F(VirtqueueTest, IndirectTableBadLengthOrPlace) {
  make_queue(16, kFeatureIndirectDesc);  // sets up the fake
  GuestAddr table = fake().alloc(32);
  fake().set_desc_at(table, 0, {fake().alloc(16).value, 16, 0, 0});
  for (VirtqDesc bad : {VirtqDesc{table.value, 24, kDescFlagIndirect, 0},      // not 16*n
                        VirtqDesc{table.value, 0, kDescFlagIndirect, 0},       // empty
                        VirtqDesc{table.value + 8, 16, kDescFlagIndirect, 0},  // misaligned
                        VirtqDesc{(64 << 10) - 16, 32, kDescFlagIndirect, 0},  // past RAM
                        VirtqDesc{~uint64_t{0} - 15, 32, kDescFlagIndirect, 0}}) {
    Virtqueue fresh = make_queue(16, kFeatureIndirectDesc);  // avail idx back to 0
    fake().set_desc(0, bad);
    fake().publish(0);
    auto chain = fresh.pop();
    EXPECT_FALSE(chain.has_value()) << bad.addr << "+" << bad.len;
  }
}

TEST_F(VirtqueueTest, ReadableAfterWritable) {
  Virtqueue queue = make_queue();
  ChainBuilder(fake()).readable(4).writable(4).readable(4).build();
  expect_pop_error(queue, Errc::Corrupt);
}

TEST_F(VirtqueueTest, ReadableAfterWritableInsideIndirect) {
  Virtqueue queue = make_queue(16, kFeatureIndirectDesc);
  ChainBuilder(fake()).writable(4).readable(4).build_indirect();
  expect_pop_error(queue, Errc::Corrupt);
}

TEST_F(VirtqueueTest, TotalLengthOverflow) {
  // 5000 indirect entries each naming the same 928 KiB buffer: every one is
  // RAM, but together they pass 4 GiB.
  GuestMemory big = make_test_memory(1 << 20);
  FakeVirtqueue fake(big, 16, kFeatureIndirectDesc);
  Virtqueue queue = *Virtqueue::create(big, fake.config());
  constexpr uint32_t kEntries = 5000;
  GuestAddr table(0x4000);
  for (uint32_t i = 0; i < kEntries; ++i) {
    bool last = i + 1 == kEntries;
    fake.set_desc_at(table, i,
                     {0x18000, 0xe8000, static_cast<uint16_t>(last ? 0 : kDescFlagNext),
                      static_cast<uint16_t>(last ? 0 : i + 1)});
  }
  fake.set_desc(0, {table.value, kEntries * 16, kDescFlagIndirect, 0});
  fake.publish(0);
  auto chain = queue.pop();
  ASSERT_FALSE(chain.has_value());
  EXPECT_EQ(chain.error().code(), Errc::Corrupt);
  EXPECT_NE(chain.error().context().find("4 GiB"), std::string::npos) << chain.error().message();
}

TEST_F(VirtqueueTest, BufferOutsideRam) {
  Virtqueue queue = make_queue();
  ChainBuilder(fake()).readable(4).raw((64 << 10) - 4, 8, true).build();
  expect_pop_error(queue, Errc::OutOfRange);
  Virtqueue again = make_queue();
  ChainBuilder(fake()).raw(~uint64_t{0} - 3, 8, false).build();  // address wraps
  expect_pop_error(again, Errc::OutOfRange);
  Virtqueue hole = make_queue();
  ChainBuilder(fake()).raw(0xc000'1000, 8, false).build();
  expect_pop_error(hole, Errc::OutOfRange);
}

TEST_F(VirtqueueTest, AvailIdxTooFarAhead) {
  Virtqueue queue = make_queue(16);
  fake().set_avail_idx(17);
  expect_pop_error(queue, Errc::Corrupt);
  EXPECT_FALSE(queue.has_available().has_value());
  fake().set_avail_idx(0xffff);  // "behind" is also far ahead, modulo 2^16
  expect_pop_error(queue, Errc::Corrupt);
  fake().set_avail_idx(16);  // exactly a full ring is fine
  for (uint16_t i = 0; i < 16; ++i) fake().set_avail_slot(i, 0);
  fake().set_desc(0, {fake().alloc(4).value, 4, 0, 0});
  for (int i = 0; i < 16; ++i) ASSERT_TRUE(queue.pop().has_value()) << i;
}

TEST_F(VirtqueueTest, ErrorDoesNotAdvance) {
  Virtqueue queue = make_queue(16);
  fake().set_avail_slot(0, 99);
  fake().set_avail_idx(1);
  expect_pop_error(queue, Errc::Corrupt);
  EXPECT_EQ(queue.last_avail_idx(), 0);
}

// ---- Snapshots ----

TEST_F(VirtqueueTest, SaveRestoreRoundTrip) {
  Virtqueue queue = make_queue(16, kFeatureEventIdx | kFeatureIndirectDesc);
  VirtqueueState first = queue.save();
  ChainBuilder(fake()).readable(4).build();
  ASSERT_TRUE(queue.pop()->has_value());
  ASSERT_TRUE(queue.push_used(0, 4).has_value());
  (void)queue.needs_notification();
  VirtqueueState second = queue.save();
  EXPECT_FALSE(first == second);
  Virtqueue restored = *Virtqueue::restore(memory_, first);
  EXPECT_TRUE(restored.save() == first);
  Virtqueue restored_second = *Virtqueue::restore(memory_, second);
  EXPECT_TRUE(restored_second.save() == second);
  EXPECT_EQ(restored_second.last_avail_idx(), 1);
  EXPECT_EQ(restored_second.used_idx(), 1);
}

TEST_F(VirtqueueTest, RestoreValidatesConfig) {
  VirtqueueState state;
  state.config = {12, GuestAddr(0), GuestAddr(0x1000), GuestAddr(0x2000), 0};
  EXPECT_FALSE(Virtqueue::restore(memory_, state).has_value());
}

}  // namespace
}  // namespace keel::devices::virtio
