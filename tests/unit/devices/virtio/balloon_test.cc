// virtio-balloon tests. Spec: virtio 1.2 §5.5 (§5.5.2 queues, §5.5.4
// config, §5.5.6.1 inflate/deflate, §5.5.6.3 statistics, §5.5.6.7 free
// page reporting).
// Covered: features and queues per configuration, the config space and
// writes to `actual`, inflation discarding guest RAM (bytes read back as
// zero, the memfd shrinks), deflation bookkeeping, PFNs outside RAM, the
// statistics buffer (parsing, unknown tags, truncated records, the timer on
// a real EventLoop, request_stats), free page reporting, queue numbering
// by the accepted features, the run-time target, reset, and hostile chains
// (each returned used untouched or needs_reset, never a crash).
// FakeVirtqueue's ring layout is fixed, so every queue's rings live in a
// small memory of their own, except the one given ram_index: that queue
// lives in ram_, the device's guest RAM, so reported ranges are RAM the
// device discards.
#include "devices/virtio/balloon.h"

#include <sys/stat.h>

#include <array>
#include <atomic>
#include <chrono>
#include <thread>

#include <gtest/gtest.h>

#include "base/event_loop.h"
#include "base/records.h"
#include "fake_interrupt.h"
#include "fake_virtqueue.h"

namespace keel::devices::virtio {
namespace {

using testing::ChainBuilder;
using testing::FakeInterrupt;
using testing::FakeVirtqueue;
using testing::make_test_memory;

// Guest RAM: 1 MiB below a hole, 2 MiB from 4 MiB up (two regions).
constexpr uint64_t kHoleStart = 0x100000;
constexpr uint64_t kHoleEnd = 0x400000;
constexpr uint64_t kRamBytes = 0x300000;
constexpr uint32_t kHighPfn = kHoleEnd / 4096;  // first page of the high region

constexpr uint64_t kAllFeatures =
    kBalloonFeatureStatsVq | kBalloonFeatureDeflateOnOom | kBalloonFeaturePageReporting;

std::vector<std::byte> pfn_bytes(std::vector<uint32_t> pfns) {
  auto bytes = std::as_bytes(std::span(pfns));
  return {bytes.begin(), bytes.end()};
}

std::vector<std::byte> stat_bytes(std::vector<std::pair<uint16_t, uint64_t>> records) {
  std::vector<std::byte> out(records.size() * kBalloonStatRecordBytes);
  for (size_t i = 0; i < records.size(); ++i) {
    std::memcpy(out.data() + i * 10, &records[i].first, 2);
    std::memcpy(out.data() + i * 10 + 2, &records[i].second, 8);
  }
  return out;
}

// Bytes of RAM that hold pages, on either backend.
uint64_t allocated_bytes(const GuestMemory& memory) {
  const std::vector<memory::ByteRange> ranges = memory.populated_ranges().value();
  uint64_t bytes = 0;
  for (const memory::ByteRange& range : ranges) bytes += range.end - range.begin;
  return bytes;
}

class BalloonTest : public ::testing::Test {
 protected:
  explicit BalloonTest(memory::MemoryBackend backend = memory::MemoryBackend::Anonymous)
      : ram_(std::move(*GuestMemory::create(kRamBytes, kHoleStart, kHoleEnd, backend))) {}
  void SetUp() override { loop_ = std::move(*EventLoop::create()); }
  void TearDown() override {
    if (balloon_) balloon_->reset();
  }

  void create(BalloonOptions options = {}) {
    options.guest_memory_bytes = kRamBytes;
    auto balloon = Balloon::create(options);
    ASSERT_TRUE(balloon.has_value()) << balloon.error().message();
    balloon_ = std::move(*balloon);
  }

  // Activates with the driver having enabled the queues in enabled (by
  // transport index; default: all declared).
  Result<void> activate(uint64_t features, std::vector<int> enabled = {}, int ram_index = -1) {
    const size_t declared = balloon_->queue_max_sizes().size();
    if (enabled.empty()) {
      for (size_t i = 0; i < declared; ++i) enabled.push_back(static_cast<int>(i));
    }
    if (ram_index < 0) ram_index = enabled.back();
    ActivateContext context;
    context.memory = &ram_;
    context.features = features;
    context.interrupt = interrupt_;
    context.event_loop = loop_.get();
    context.queues.resize(declared);
    for (int index : enabled) {
      const GuestMemory& memory = index == ram_index ? ram_ : ring_memory_[index];
      fakes_[index].emplace(memory, Balloon::kQueueSize);
      auto queue = Virtqueue::create(memory, fakes_[index]->config());
      EXPECT_TRUE(queue.has_value());
      context.queues[index].emplace(std::move(*queue));
    }
    return balloon_->activate(std::move(context));
  }
  void start(BalloonOptions options = {}, uint64_t features = kAllFeatures) {
    create(options);
    ASSERT_TRUE(activate(features).has_value());
  }

  FakeVirtqueue& queue(int index) { return *fakes_[index]; }

  // Publishes a PFN array on queue index and notifies.
  ChainBuilder::Built send_pfns(int index, std::vector<uint32_t> pfns) {
    ChainBuilder chain(queue(index));
    chain.readable(pfn_bytes(std::move(pfns)));
    auto built = chain.build();
    balloon_->notify(static_cast<uint16_t>(index));
    return built;
  }
  ChainBuilder::Built send_stats(std::vector<std::byte> bytes, int index = 2) {
    ChainBuilder chain(queue(index));
    chain.readable(bytes);
    auto built = chain.build();
    balloon_->notify(static_cast<uint16_t>(index));
    return built;
  }

  void fill_page(uint32_t pfn, uint8_t value) {
    std::vector<std::byte> page(4096, std::byte{value});
    ASSERT_TRUE(ram_.write(GuestAddr(uint64_t{pfn} * 4096), page));
  }
  // Whether every byte of the page is value.
  bool page_is(uint32_t pfn, uint8_t value) {
    std::vector<std::byte> page(4096);
    EXPECT_TRUE(ram_.read(GuestAddr(uint64_t{pfn} * 4096), page));
    for (std::byte b : page) {
      if (b != std::byte{value}) return false;
    }
    return true;
  }

  BalloonConfigSpace config() {
    BalloonConfigSpace space{};
    balloon_->read_config(0, std::as_writable_bytes(std::span(&space, 1)));
    return space;
  }
  void write_u32(uint32_t offset, uint32_t value) {
    balloon_->write_config(offset, std::as_bytes(std::span(&value, 1)));
  }

  GuestMemory ram_;
  std::array<GuestMemory, 4> ring_memory_{make_test_memory(), make_test_memory(),
                                          make_test_memory(), make_test_memory()};
  std::array<std::optional<FakeVirtqueue>, 4> fakes_;
  std::shared_ptr<FakeInterrupt> interrupt_ = std::make_shared<FakeInterrupt>();
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Balloon> balloon_;
};

TEST_F(BalloonTest, FeaturesAndQueuesFollowTheOptions) {
  create();
  EXPECT_EQ(balloon_->type(), DeviceType::Balloon);
  EXPECT_EQ(balloon_->features(), kAllFeatures);
  EXPECT_EQ(balloon_->queue_max_sizes(), std::vector<uint16_t>(4, Balloon::kQueueSize));
  EXPECT_EQ(balloon_->features() & (kBalloonFeatureMustTellHost | kBalloonFeatureFreePageHint |
                                    kBalloonFeaturePagePoison),
            0u);

  create(BalloonOptions{.deflate_on_oom = false, .free_page_reporting = false});
  EXPECT_EQ(balloon_->features(), kBalloonFeatureStatsVq);
  EXPECT_EQ(balloon_->queue_max_sizes(), std::vector<uint16_t>(3, Balloon::kQueueSize));
  // Linux's page reporting refuses a reporting_vq with fewer than 32 entries.
  EXPECT_GE(Balloon::kQueueSize, 32);
}

TEST_F(BalloonTest, ConfigSpace) {
  create(BalloonOptions{.target_mib = 2});
  ASSERT_EQ(balloon_->config_size_bytes(), 16u);
  BalloonConfigSpace space = config();
  EXPECT_EQ(space.num_pages, 512u);
  EXPECT_EQ(space.actual, 0u);
  EXPECT_EQ(space.free_page_hint_cmd_id, 0u);
  EXPECT_EQ(space.poison_val, 0u);
  EXPECT_EQ(balloon_->target_mib(), 2u);
  // A partial read: num_pages' high half.
  uint16_t high = 0xffff;
  balloon_->read_config(2, std::as_writable_bytes(std::span(&high, 1)));
  EXPECT_EQ(high, 0u);
}

TEST_F(BalloonTest, CreateRejectsTargetsBeyondRam) {
  EXPECT_FALSE(Balloon::create(BalloonOptions{.target_mib = 4, .guest_memory_bytes = kRamBytes}));
  EXPECT_TRUE(Balloon::create(BalloonOptions{.target_mib = 3, .guest_memory_bytes = kRamBytes}));
  // Without a RAM size only num_pages' 32 bits limit it (16 TiB).
  EXPECT_FALSE(Balloon::create(BalloonOptions{.target_mib = uint64_t{1} << 24}));
  EXPECT_TRUE(Balloon::create(BalloonOptions{.target_mib = (uint64_t{1} << 24) - 1}));
}

TEST_F(BalloonTest, OnlyActualIsWritable) {
  create(BalloonOptions{.target_mib = 1});
  write_u32(4, 77);
  EXPECT_EQ(balloon_->actual_pages(), 77u);
  EXPECT_EQ(config().actual, 77u);
  // num_pages, the hint id and poison_val are the host's; partial and
  // misaligned writes to actual are ignored too.
  write_u32(0, 1);
  write_u32(8, 1);
  write_u32(12, 1);
  uint16_t half = 5;
  balloon_->write_config(4, std::as_bytes(std::span(&half, 1)));
  balloon_->write_config(6, std::as_bytes(std::span(&half, 1)));
  uint8_t byte = 9;
  balloon_->write_config(5, std::as_bytes(std::span(&byte, 1)));
  uint64_t wide = ~uint64_t{0};
  balloon_->write_config(0, std::as_bytes(std::span(&wide, 1)));
  BalloonConfigSpace space = config();
  EXPECT_EQ(space.num_pages, 256u);
  EXPECT_EQ(space.actual, 77u);
  EXPECT_EQ(space.free_page_hint_cmd_id, 0u);
  EXPECT_EQ(space.poison_val, 0u);
}

// Giving pages back works on both fresh-machine backends (MADV_DONTNEED on
// anonymous RAM, a punched hole in a memfd).
class BalloonDiscardTest : public BalloonTest,
                           public ::testing::WithParamInterface<memory::MemoryBackend> {
 protected:
  BalloonDiscardTest() : BalloonTest(GetParam()) {}
};

INSTANTIATE_TEST_SUITE_P(Backends, BalloonDiscardTest,
                         ::testing::Values(memory::MemoryBackend::Anonymous,
                                           memory::MemoryBackend::Memfd),
                         [](const auto& test_info) {
                           return std::string(memory::memory_backend_name(test_info.param));
                         });

TEST_P(BalloonDiscardTest, InflateDiscardsGuestPages) {
  start();
  for (uint32_t pfn = 0x80; pfn < 0x90; ++pfn) fill_page(pfn, 0xa5);
  for (uint32_t pfn = kHighPfn; pfn < kHighPfn + 4; ++pfn) fill_page(pfn, 0xa5);
  const uint64_t before = allocated_bytes(ram_);
  // Out of order (as Linux often sends them), with a duplicate, in both regions.
  auto built = send_pfns(0, {0x86, 0x84, 0x85, 0x85, kHighPfn + 1, kHighPfn, 0x88});
  ASSERT_EQ(queue(0).used_idx(), 1);
  EXPECT_EQ(queue(0).used_elem(0).id, built.head);
  EXPECT_EQ(queue(0).used_elem(0).len, 0u);
  EXPECT_EQ(interrupt_->queue_notifications(0), 1);
  EXPECT_EQ(interrupt_->resets(), 0);
  EXPECT_EQ(balloon_->ballooned_pages(), 6u);
  // The host got the memory back (measured before reading the pages, which
  // faults them in again).
  EXPECT_LE(allocated_bytes(ram_), before - 6 * 4096);
  for (uint32_t pfn : {0x84u, 0x85u, 0x86u, 0x88u, kHighPfn, kHighPfn + 1}) {
    EXPECT_TRUE(page_is(pfn, 0)) << "pfn " << pfn;
  }
  for (uint32_t pfn : {0x83u, 0x87u, 0x89u, kHighPfn + 2}) {
    EXPECT_TRUE(page_is(pfn, 0xa5)) << "pfn " << pfn;
  }
  // Inflating a page twice counts it once.
  send_pfns(0, {0x84});
  EXPECT_EQ(balloon_->ballooned_pages(), 6u);
}

TEST_F(BalloonTest, LargeInflationIsCoalesced) {
  start();
  // 256 contiguous PFNs (1 MiB of the high region), as one Linux chain.
  std::vector<uint32_t> pfns;
  for (uint32_t i = 0; i < 256; ++i) pfns.push_back(kHighPfn + 255 - i);
  for (uint32_t pfn : pfns) fill_page(pfn, 0x11);
  const uint64_t ranges_before = balloon_->discarded_ranges();
  send_pfns(0, pfns);
  EXPECT_EQ(balloon_->ballooned_pages(), 256u);
  EXPECT_EQ(balloon_->discarded_ranges() - ranges_before, 1u)
      << "256 contiguous pages, sent in descending order, are one hole punch";
  for (uint32_t pfn : pfns) ASSERT_TRUE(page_is(pfn, 0)) << pfn;
  // Two runs with a gap between them are two.
  send_pfns(0, {0x10, 0x11, 0x12, 0x20, 0x21});
  EXPECT_EQ(balloon_->discarded_ranges() - ranges_before, 3u);
}

TEST_F(BalloonTest, DeflateKeepsTheCountConsistent) {
  start();
  send_pfns(0, {0x40, 0x41, 0x42});
  ASSERT_EQ(balloon_->ballooned_pages(), 3u);
  // One page back, one never inflated, one outside RAM: only the first counts.
  auto built = send_pfns(1, {0x41, 0x50, 0x100});
  ASSERT_EQ(queue(1).used_idx(), 1);
  EXPECT_EQ(queue(1).used_elem(0).id, built.head);
  EXPECT_EQ(interrupt_->queue_notifications(1), 1);
  EXPECT_EQ(balloon_->ballooned_pages(), 2u);
  // Deflating it again changes nothing.
  send_pfns(1, {0x41});
  EXPECT_EQ(balloon_->ballooned_pages(), 2u);
  // The guest may use the page again; it reads as zero, then keeps data.
  EXPECT_TRUE(page_is(0x41, 0));
  fill_page(0x41, 0x77);
  EXPECT_TRUE(page_is(0x41, 0x77));
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BalloonTest, PfnsOutsideRamAreIgnored) {
  start();
  fill_page(0xff, 0x33);
  // In the hole, past the end of RAM, the largest PFN; then a real page.
  send_pfns(0, {kHoleStart / 4096, kHighPfn + 0x300, 0xffffffff, 0xff});
  ASSERT_EQ(queue(0).used_idx(), 1);
  EXPECT_EQ(balloon_->ballooned_pages(), 1u);
  EXPECT_TRUE(page_is(0xff, 0));
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BalloonTest, MalformedPfnArraysAreReturnedUntouched) {
  start();
  fill_page(0x20, 0x44);
  // Six bytes: one PFN and half of another.
  ChainBuilder odd(queue(0));
  auto bytes = pfn_bytes({0x20, 0x21});
  bytes.resize(6);
  odd.readable(bytes);
  odd.build();
  balloon_->notify(0);
  ASSERT_EQ(queue(0).used_idx(), 1);
  EXPECT_TRUE(page_is(0x20, 0x44));
  EXPECT_EQ(balloon_->ballooned_pages(), 0u);
  // Only zero-length descriptors: an empty array, returned used.
  ChainBuilder empty(queue(0));
  empty.readable(0);
  empty.build();
  balloon_->notify(0);
  ASSERT_EQ(queue(0).used_idx(), 2);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BalloonTest, OversizedPfnArrayIsReturnedUntouched) {
  create();
  // inflateq in ram_, so a chain may name more than 1 MiB of it.
  ASSERT_TRUE(activate(kAllFeatures, {}, 0).has_value());
  fill_page(kHighPfn, 0x44);
  std::vector<std::byte> first = pfn_bytes({kHighPfn});
  ASSERT_TRUE(ram_.write(GuestAddr(kHoleEnd + 0x10000), first));
  ChainBuilder chain(queue(0));
  chain.raw(kHoleEnd + 0x10000, Balloon::kMaxPfnBytes, false).raw(kHoleEnd, 4, false);
  chain.build();
  balloon_->notify(0);
  ASSERT_EQ(queue(0).used_idx(), 1);
  EXPECT_TRUE(page_is(kHighPfn, 0x44));
  EXPECT_EQ(balloon_->ballooned_pages(), 0u);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BalloonTest, DeviceWritablePfnArrayNeedsReset) {
  start();
  ChainBuilder chain(queue(0));
  chain.readable(pfn_bytes({0x30})).writable(4);
  chain.build();
  balloon_->notify(0);
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(queue(0).used_idx(), 0);
  EXPECT_EQ(balloon_->ballooned_pages(), 0u);
  // A broken device touches no queue until reset.
  send_pfns(1, {0x30});
  EXPECT_EQ(queue(1).used_idx(), 0);
  EXPECT_FALSE(balloon_->request_stats());
  EXPECT_EQ(interrupt_->resets(), 1);
}

TEST_F(BalloonTest, DescriptorOutsideRamNeedsReset) {
  start();
  ChainBuilder chain(queue(1));
  chain.raw(queue(1).memory().size_bytes() - 2, 4, false);
  chain.build();
  balloon_->notify(1);
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(queue(1).used_idx(), 0);
}

TEST_F(BalloonTest, StatisticsAreParsedAndKept) {
  start();
  auto built = send_stats(stat_bytes({{kBalloonStatSwapIn, 1},
                                      {kBalloonStatFreeMemory, 100 << 20},
                                      {kBalloonStatTotalMemory, 512 << 20},
                                      {99, 7}}));
  BalloonStats stats = balloon_->stats();
  EXPECT_EQ(stats.updates, 1u);
  EXPECT_EQ(stats.get(kBalloonStatSwapIn), 1u);
  EXPECT_EQ(stats.get(kBalloonStatFreeMemory), uint64_t{100} << 20);
  EXPECT_EQ(stats.get(kBalloonStatTotalMemory), uint64_t{512} << 20);
  EXPECT_EQ(stats.get(99), 7u);  // unknown tags are kept
  EXPECT_FALSE(stats.get(kBalloonStatMajorFaults).has_value());
  // The device holds the buffer until it wants fresh statistics.
  EXPECT_EQ(queue(2).used_idx(), 0);
  EXPECT_EQ(interrupt_->queue_notifications(2), 0);
  ASSERT_TRUE(balloon_->request_stats());
  ASSERT_EQ(queue(2).used_idx(), 1);
  EXPECT_EQ(queue(2).used_elem(0).id, built.head);
  EXPECT_EQ(queue(2).used_elem(0).len, 0u);
  EXPECT_EQ(interrupt_->queue_notifications(2), 1);
  EXPECT_FALSE(balloon_->request_stats());  // nothing held now
  // The driver refills: the newest buffer replaces the statistics.
  send_stats(stat_bytes({{kBalloonStatFreeMemory, 50 << 20}}));
  stats = balloon_->stats();
  EXPECT_EQ(stats.updates, 2u);
  EXPECT_EQ(stats.get(kBalloonStatFreeMemory), uint64_t{50} << 20);
  EXPECT_FALSE(stats.get(kBalloonStatSwapIn).has_value());
}

TEST_F(BalloonTest, TruncatedStatisticsAreRejected) {
  start();
  send_stats(stat_bytes({{kBalloonStatFreeMemory, 5}}));
  auto bytes = stat_bytes({{kBalloonStatFreeMemory, 6}, {kBalloonStatSwapIn, 1}});
  bytes.resize(15);
  ASSERT_TRUE(balloon_->request_stats());
  send_stats(bytes);
  BalloonStats stats = balloon_->stats();
  EXPECT_EQ(stats.updates, 1u);
  EXPECT_EQ(stats.get(kBalloonStatFreeMemory), 5u);
  // The buffer is still held, so the driver can be asked again.
  EXPECT_TRUE(balloon_->request_stats());
  EXPECT_EQ(queue(2).used_idx(), 2);
  // Over kMaxStatsBytes, in whole records: rejected as well.
  send_stats(std::vector<std::byte>(Balloon::kMaxStatsBytes + 10));
  EXPECT_EQ(balloon_->stats().updates, 1u);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BalloonTest, SecondStatisticsBufferReturnsTheFirst) {
  start();
  auto first = send_stats(stat_bytes({{kBalloonStatFreeMemory, 1}}));
  send_stats(stat_bytes({{kBalloonStatFreeMemory, 2}}));
  ASSERT_EQ(queue(2).used_idx(), 1);
  EXPECT_EQ(queue(2).used_elem(0).id, first.head);
  EXPECT_EQ(balloon_->stats().get(kBalloonStatFreeMemory), 2u);
  EXPECT_TRUE(balloon_->request_stats());
  EXPECT_EQ(queue(2).used_idx(), 2);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BalloonTest, DeviceWritableStatisticsNeedReset) {
  start();
  ChainBuilder chain(queue(2));
  chain.readable(stat_bytes({{kBalloonStatFreeMemory, 1}})).writable(10);
  chain.build();
  balloon_->notify(2);
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(balloon_->stats().updates, 0u);
}

TEST_F(BalloonTest, StatisticsTimerReturnsTheBuffer) {
  start(BalloonOptions{.stats_period_s = 1});
  send_stats(stat_bytes({{kBalloonStatFreeMemory, 1}}));
  ASSERT_EQ(queue(2).used_idx(), 0);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (queue(2).used_idx() == 0 && std::chrono::steady_clock::now() < deadline) {
    ASSERT_TRUE(loop_->run_once(100).has_value());
  }
  ASSERT_EQ(queue(2).used_idx(), 1);
  EXPECT_EQ(interrupt_->queue_notifications(2), 1);
  // A tick with no buffer held does nothing; the refill is held again.
  send_stats(stat_bytes({{kBalloonStatFreeMemory, 2}}));
  deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (queue(2).used_idx() == 1 && std::chrono::steady_clock::now() < deadline) {
    ASSERT_TRUE(loop_->run_once(100).has_value());
  }
  EXPECT_EQ(queue(2).used_idx(), 2);
  EXPECT_EQ(balloon_->stats().get(kBalloonStatFreeMemory), 2u);
}

TEST_F(BalloonTest, NoTimerWithoutAPeriod) {
  start();
  send_stats(stat_bytes({{kBalloonStatFreeMemory, 1}}));
  auto ran = loop_->run_once(1200);
  ASSERT_TRUE(ran.has_value());
  EXPECT_EQ(*ran, 0);
  EXPECT_EQ(queue(2).used_idx(), 0);
}

TEST_P(BalloonDiscardTest, FreePageReportingDiscardsRanges) {
  start();  // reporting_vq is queue 3, in ram_
  for (uint32_t pfn = 0x80; pfn < 0x94; ++pfn) fill_page(pfn, 0x66);
  for (uint32_t pfn = kHighPfn + 0x10; pfn < kHighPfn + 0x14; ++pfn) fill_page(pfn, 0x66);
  ChainBuilder chain(queue(3));
  chain.raw(0x80000, 0x10000, true)                     // pfns 0x80-0x8f
      .raw(uint64_t{kHighPfn + 0x10} * 4096, 0x2000, true)  // two high pages
      .raw(0x90800, 0x2000, true);                       // only pfn 0x91 whole
  auto built = chain.build();
  balloon_->notify(3);
  ASSERT_EQ(queue(3).used_idx(), 1);
  EXPECT_EQ(queue(3).used_elem(0).id, built.head);
  EXPECT_EQ(interrupt_->queue_notifications(3), 1);
  for (uint32_t pfn = 0x80; pfn < 0x90; ++pfn) EXPECT_TRUE(page_is(pfn, 0)) << pfn;
  EXPECT_TRUE(page_is(kHighPfn + 0x10, 0));
  EXPECT_TRUE(page_is(kHighPfn + 0x11, 0));
  EXPECT_TRUE(page_is(kHighPfn + 0x12, 0x66));
  EXPECT_TRUE(page_is(0x90, 0x66));
  EXPECT_TRUE(page_is(0x91, 0));
  EXPECT_TRUE(page_is(0x92, 0x66));
  // Reported pages stay the guest's: they are not in the balloon.
  EXPECT_EQ(balloon_->ballooned_pages(), 0u);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BalloonTest, DeviceReadableReportNeedsReset) {
  start();
  fill_page(0x80, 0x66);
  ChainBuilder chain(queue(3));
  chain.raw(0x80000, 0x1000, false);
  chain.build();
  balloon_->notify(3);
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(queue(3).used_idx(), 0);
  EXPECT_TRUE(page_is(0x80, 0x66));
}

TEST_F(BalloonTest, ReportingWithoutStatsIsQueueTwo) {
  // Linux numbers only the queues it uses: declining STATS_VQ moves
  // reporting_vq to 2, and queue 3 stays disabled.
  create();
  ASSERT_TRUE(activate(kBalloonFeaturePageReporting, {0, 1, 2}).has_value());
  fill_page(0x80, 0x66);
  ChainBuilder chain(queue(2));
  chain.raw(0x80000, 0x1000, true);
  chain.build();
  balloon_->notify(2);
  ASSERT_EQ(queue(2).used_idx(), 1);
  EXPECT_EQ(interrupt_->queue_notifications(2), 1);
  EXPECT_TRUE(page_is(0x80, 0));
  // Without STATS_VQ there is no statistics buffer to hold.
  EXPECT_FALSE(balloon_->request_stats());
  // Inflation still works on queue 0.
  send_pfns(0, {0x90});
  EXPECT_EQ(balloon_->ballooned_pages(), 1u);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BalloonTest, ReportingWithoutStatsAtTheDeclaredIndex) {
  // A driver that numbers the queues as declared enables 3, not 2.
  create();
  ASSERT_TRUE(activate(kBalloonFeaturePageReporting, {0, 1, 3}).has_value());
  fill_page(0x80, 0x66);
  ChainBuilder chain(queue(3));
  chain.raw(0x80000, 0x1000, true);
  chain.build();
  balloon_->notify(3);
  ASSERT_EQ(queue(3).used_idx(), 1);
  EXPECT_EQ(interrupt_->queue_notifications(3), 1);
  EXPECT_TRUE(page_is(0x80, 0));
}

TEST_F(BalloonTest, StatsWithoutReporting) {
  create(BalloonOptions{.free_page_reporting = false});
  ASSERT_TRUE(activate(kBalloonFeatureStatsVq).has_value());
  send_stats(stat_bytes({{kBalloonStatFreeMemory, 3}}));
  EXPECT_EQ(balloon_->stats().get(kBalloonStatFreeMemory), 3u);
  balloon_->notify(3);  // no such queue: ignored
  balloon_->notify(1000);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BalloonTest, MissingQueuesFailActivation) {
  create();
  EXPECT_FALSE(activate(kAllFeatures, {1, 2, 3}).has_value());  // no inflateq
  balloon_->reset();
  EXPECT_FALSE(activate(kAllFeatures, {0, 2, 3}).has_value());  // no deflateq
  balloon_->reset();
  EXPECT_FALSE(activate(kAllFeatures, {0, 1, 3}).has_value());  // STATS_VQ accepted, no statsq
  balloon_->reset();
  EXPECT_FALSE(activate(kAllFeatures, {0, 1, 2}).has_value());  // no reporting_vq
  balloon_->reset();
  // A queue no accepted feature uses is ignored, not an error.
  ASSERT_TRUE(activate(0, {0, 1, 2, 3}).has_value());
  balloon_->notify(2);
  balloon_->notify(3);
  send_pfns(0, {0x10});
  EXPECT_EQ(balloon_->ballooned_pages(), 1u);
  EXPECT_FALSE(balloon_->request_stats());
}

TEST_F(BalloonTest, ActivateTwiceFails) {
  start();
  EXPECT_FALSE(activate(kAllFeatures).has_value());
}

TEST_F(BalloonTest, RuntimeTarget) {
  create();
  // Before the driver is up: stored, no notification.
  ASSERT_TRUE(balloon_->set_target_mib(1));
  EXPECT_EQ(config().num_pages, 256u);
  EXPECT_EQ(interrupt_->config_notifications(), 0);
  ASSERT_TRUE(activate(kAllFeatures).has_value());
  ASSERT_TRUE(balloon_->set_target_mib(2));
  EXPECT_EQ(config().num_pages, 512u);
  EXPECT_EQ(balloon_->target_mib(), 2u);
  EXPECT_EQ(interrupt_->config_notifications(), 1);
  // The same target again changes nothing.
  ASSERT_TRUE(balloon_->set_target_mib(2));
  EXPECT_EQ(interrupt_->config_notifications(), 1);
  Result<void> too_big = balloon_->set_target_mib(4);
  ASSERT_FALSE(too_big);
  EXPECT_EQ(too_big.error().code(), Errc::OutOfRange);
  EXPECT_EQ(config().num_pages, 512u);
  ASSERT_TRUE(balloon_->set_target_mib(0));
  EXPECT_EQ(config().num_pages, 0u);
  EXPECT_EQ(interrupt_->config_notifications(), 2);
}

TEST_F(BalloonTest, RuntimeTargetFromAnotherThread) {
  start();
  std::atomic<bool> done{false};
  std::thread setter([&] {
    for (uint64_t i = 0; i < 2000; ++i) (void)balloon_->set_target_mib(i % 3);
    done = true;
  });
  // Meanwhile the driver reads the config (a vCPU thread).
  while (!done) {
    uint32_t pages = config().num_pages;
    EXPECT_TRUE(pages == 0 || pages == 256 || pages == 512) << pages;
  }
  setter.join();
  ASSERT_TRUE(balloon_->set_target_mib(1));
  EXPECT_EQ(config().num_pages, 256u);
}

TEST_F(BalloonTest, ResetForgetsTheDriverState) {
  start(BalloonOptions{.target_mib = 1, .stats_period_s = 1});
  send_pfns(0, {0x10, 0x11});
  write_u32(4, 2);
  send_stats(stat_bytes({{kBalloonStatFreeMemory, 9}}));
  balloon_->reset();
  EXPECT_EQ(balloon_->ballooned_pages(), 0u);
  EXPECT_EQ(balloon_->actual_pages(), 0u);
  EXPECT_EQ(config().num_pages, 256u);  // the host's target stays
  EXPECT_EQ(balloon_->stats().get(kBalloonStatFreeMemory), 9u);  // last known
  EXPECT_FALSE(balloon_->request_stats());
  // No callbacks remain on the loop: the timer watch is gone.
  auto ran = loop_->run_once(1200);
  ASSERT_TRUE(ran.has_value());
  EXPECT_EQ(*ran, 0);
  const int notifications = interrupt_->all_queue_notifications();
  balloon_->notify(0);
  EXPECT_EQ(interrupt_->all_queue_notifications(), notifications);
  // A target set while the driver is gone is only stored.
  ASSERT_TRUE(balloon_->set_target_mib(2));
  EXPECT_EQ(interrupt_->config_notifications(), 0);
  balloon_->reset();  // twice is fine
  // A fresh activation starts over.
  ASSERT_TRUE(activate(kAllFeatures).has_value());
  send_pfns(0, {0x12});
  EXPECT_EQ(balloon_->ballooned_pages(), 1u);
  ASSERT_EQ(queue(0).used_idx(), 1);
}

// Snapshots: the target, `actual`, the ballooned pages, the statistics and
// the queues; the statistics buffer the device held goes back to the ring.
class BalloonSnapshotTest : public BalloonTest {
 protected:
  // A fresh device restored from saved on the same rings.
  Result<std::unique_ptr<Balloon>> restore(const VirtioDeviceState& saved,
                                           std::span<const std::byte> extra) {
    auto balloon = Balloon::create(BalloonOptions{.guest_memory_bytes = kRamBytes});
    if (!balloon) return fail(std::move(balloon).error());
    ActivateContext context;
    context.memory = &ram_;
    context.features = kAllFeatures;
    context.interrupt = interrupt_;
    context.event_loop = loop_.get();
    for (size_t index = 0; index < saved.queues.size(); ++index) {
      if (!saved.queues[index]) {
        context.queues.emplace_back();
        continue;
      }
      const GuestMemory& memory = index == 3 ? ram_ : ring_memory_[index];
      context.queues.emplace_back(std::move(*Virtqueue::restore(memory, *saved.queues[index])));
    }
    TRY((*balloon)->restore_state(std::move(context), extra));
    return std::move(*balloon);
  }
};

TEST_F(BalloonSnapshotTest, SaveRestoreKeepsTheBalloonAndItsAccounting) {
  start(BalloonOptions{.target_mib = 1});
  send_pfns(0, {0x10, 0x11, 0x12, 0x20, kHighPfn + 3});
  write_u32(4, 5);
  send_stats(stat_bytes({{kBalloonStatFreeMemory, 1234}, {kBalloonStatTotalMemory, 5678}}));
  ASSERT_EQ(balloon_->stats().updates, 1u);

  Result<VirtioDeviceState> saved = balloon_->save_state();
  ASSERT_TRUE(saved) << saved.error().message();
  ASSERT_EQ(saved->queues.size(), 4u);
  EXPECT_EQ(saved->queues[0]->last_avail_idx, 1);
  // The held statistics buffer is given back: the restored device pops it.
  EXPECT_EQ(saved->queues[2]->last_avail_idx, 0);
  EXPECT_FALSE(saved->extra.empty());

  // Save, mutate, save differs.
  send_pfns(1, {0x20});
  Result<VirtioDeviceState> mutated = balloon_->save_state();
  ASSERT_TRUE(mutated);
  EXPECT_NE(*mutated, *saved);
  balloon_->reset();

  // Whatever RAM the restored machine has, ballooned pages are given back
  // again: a page that came back nonzero reads as zero after the restore.
  fill_page(0x11, 0xaa);
  fill_page(0x30, 0xbb);  // not ballooned: untouched
  auto restored = restore(*saved, saved->extra);
  ASSERT_TRUE(restored) << restored.error().message();
  balloon_ = std::move(*restored);
  EXPECT_TRUE(page_is(0x11, 0));
  EXPECT_TRUE(page_is(0x30, 0xbb));
  EXPECT_EQ(balloon_->ballooned_pages(), 5u);
  EXPECT_EQ(balloon_->actual_pages(), 5u);
  EXPECT_EQ(config().num_pages, 256u);
  EXPECT_EQ(balloon_->stats().get(kBalloonStatFreeMemory), 1234u);
  EXPECT_EQ(balloon_->stats().updates, 1u);
  // Restore, state equals the first save.
  Result<VirtioDeviceState> again = balloon_->save_state();
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, *saved);

  // The device works on: the statistics buffer is popped again (the first
  // kick after a restore), deflating keeps the count, inflating adds.
  balloon_->notify(2);
  EXPECT_EQ(balloon_->stats().updates, 2u);
  EXPECT_TRUE(balloon_->request_stats());
  send_pfns(1, {0x20, 0x10});
  EXPECT_EQ(balloon_->ballooned_pages(), 3u);
  send_pfns(0, {0x40});
  EXPECT_EQ(balloon_->ballooned_pages(), 4u);
}

TEST_F(BalloonSnapshotTest, CorruptOrTruncatedDeviceBytesAreRefused) {
  start();
  send_pfns(0, {0x10, 0x11});
  Result<VirtioDeviceState> saved = balloon_->save_state();
  ASSERT_TRUE(saved);
  balloon_->reset();

  auto refused = [&](std::span<const std::byte> extra, std::string_view why) {
    auto restored = restore(*saved, extra);
    ASSERT_FALSE(restored) << why;
    EXPECT_EQ(restored.error().code(), Errc::Corrupt) << why << ": " << restored.error().message();
  };
  std::vector<std::byte> truncated(saved->extra.begin(), saved->extra.end() - 1);
  refused(truncated, "truncated");
  refused({}, "empty");

  struct Range {
    uint32_t first_pfn;
    uint32_t pages;
  };
  auto with = [](std::vector<Range> ranges, uint32_t flags = 0, uint32_t num_pages = 0) {
    RecordWriter out;
    out.value(uint16_t{1}, std::array<uint32_t, 2>{num_pages, 0});
    out.value(uint16_t{2}, flags);
    out.bytes(uint16_t{3}, std::as_bytes(std::span(ranges)));
    out.bytes(uint16_t{4}, {});
    out.value(uint16_t{5}, uint64_t{0});
    return out.take();
  };
  ASSERT_TRUE(restore(*saved, with({{0x10, 2}})));  // the shape is right
  refused(with({{0x10, 2}}, /*flags=*/2), "unknown flag");
  refused(with({{0x10, 2}}, 0, /*num_pages=*/0x10000), "target beyond RAM");
  refused(with({{kHoleStart / 4096 - 1, 2}}), "range across the hole");
  refused(with({{kHoleStart / 4096, 1}}), "range in the hole");
  refused(with({{0x10, 4}, {0x12, 1}}), "overlapping ranges");
  refused(with({{0x20, 1}, {0x10, 1}}), "ranges out of order");
  refused(with({{0x10, 0}}), "empty range");
  refused(with({{0xffffffff, 2}}), "range past 2^32 pages");
  std::vector<std::byte> extra_field = with({});
  RecordWriter unknown;
  unknown.value(uint16_t{6}, uint32_t{0});
  std::vector<std::byte> tail = unknown.take();
  extra_field.insert(extra_field.end(), tail.begin(), tail.end());
  refused(extra_field, "unknown field");
}

}  // namespace
}  // namespace keel::devices::virtio
