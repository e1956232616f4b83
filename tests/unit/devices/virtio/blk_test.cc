// virtio-blk tests. Spec: virtio 1.2 §5.2 (§5.2.4 config, §5.2.6 requests).
// Covered: config space and features, IN/OUT/FLUSH/GET_ID/DISCARD/
// WRITE_ZEROES on a real raw file through io_uring, completions through a
// real EventLoop, many requests in flight, a stalled queue resuming,
// reset with requests in flight, growing the disk at run time, and hostile requests (each an error
// status or needs_reset, never a crash or a hang).
#include "devices/virtio/blk.h"

#include <chrono>
#include <cstring>
#include <filesystem>

#include <gtest/gtest.h>

#include "base/event_loop.h"
#include "block/raw/raw_file.h"
#include "block/temp_image.h"
#include "fake_interrupt.h"
#include "fake_virtqueue.h"

namespace keel::devices::virtio {
namespace {

using block::Access;
using block::testing::TempImage;
using testing::ChainBuilder;
using testing::FakeInterrupt;
using testing::FakeVirtqueue;
using testing::make_test_memory;
using testing::pattern;

constexpr uint64_t kDiskBytes = 1 << 20;
constexpr uint64_t kAllBlkFeatures = kBlkFeatureSegMax | kBlkFeatureBlkSize | kBlkFeatureFlush |
                                     kBlkFeatureDiscard | kBlkFeatureWriteZeroes;

std::vector<std::byte> header_bytes(uint32_t type, uint64_t sector) {
  BlkRequestHeader header{type, 0, sector};
  auto bytes = std::as_bytes(std::span(&header, 1));
  return {bytes.begin(), bytes.end()};
}

std::vector<std::byte> range_bytes(uint64_t sector, uint32_t num_sectors, uint32_t flags) {
  BlkDiscardWriteZeroes range{sector, num_sectors, flags};
  auto bytes = std::as_bytes(std::span(&range, 1));
  return {bytes.begin(), bytes.end()};
}

class BlkTest : public ::testing::Test {
 protected:
  void SetUp() override { loop_ = std::move(*EventLoop::create()); }
  void TearDown() override {
    if (blk_) blk_->reset();
    // virtio-blk has one queue: every used buffer notification is for it.
    EXPECT_EQ(interrupt_->all_queue_notifications(), interrupt_->queue_notifications(0));
  }

  void start(Access access = Access::ReadWrite, uint64_t features = kAllBlkFeatures,
             uint64_t queue_features = 0) {
    auto backend = block::RawFile::open(image_.path(), access);
    ASSERT_TRUE(backend.has_value()) << backend.error().message();
    auto blk = Blk::create(std::move(*backend), BlkConfig{"keel-disk-0", access});
    ASSERT_TRUE(blk.has_value()) << blk.error().message();
    blk_ = std::move(*blk);
    fake_.emplace(memory_, Blk::kQueueSize, queue_features);
    auto queue = Virtqueue::create(memory_, fake_->config());
    ASSERT_TRUE(queue.has_value());
    ActivateContext context;
    context.memory = &memory_;
    context.features = features;
    context.queues.emplace_back(std::move(*queue));
    context.interrupt = interrupt_;
    context.event_loop = loop_.get();
    ASSERT_TRUE(blk_->activate(std::move(context)).has_value());
  }

  // Runs the event loop until the used ring reaches used_idx.
  void run_until_used(uint16_t used_idx) {
    // Completions trickle in (a few per wakeup), so bound by time, not rounds.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (fake_->used_idx() != used_idx && std::chrono::steady_clock::now() < deadline) {
      ASSERT_TRUE(loop_->run_once(50).has_value());
    }
    ASSERT_EQ(fake_->used_idx(), used_idx);
  }

  // Publishes a chain, notifies, waits for it, returns its status byte.
  uint8_t run_one(ChainBuilder& chain, uint32_t* written = nullptr) {
    uint16_t before = fake_->used_idx();
    auto built = chain.build();
    blk_->notify(0);
    run_until_used(static_cast<uint16_t>(before + 1));
    VirtqUsedElem used = fake_->used_elem(before);
    EXPECT_EQ(used.id, built.head);
    if (written) *written = used.len;
    return status_of(built);
  }
  uint8_t status_of(const ChainBuilder::Built& built) {
    return static_cast<uint8_t>(fake_->bytes(built.buffers.back(), 1)[0]);
  }

  ChainBuilder read_chain(uint64_t sector, uint32_t len) {
    ChainBuilder chain(*fake_);
    chain.readable(header_bytes(kBlkTypeIn, sector)).writable(len).writable(1);
    return chain;
  }
  ChainBuilder write_chain(uint64_t sector, std::span<const std::byte> data) {
    ChainBuilder chain(*fake_);
    chain.readable(header_bytes(kBlkTypeOut, sector)).readable(data).writable(1);
    return chain;
  }
  ChainBuilder range_chain(uint32_t type, uint64_t sector, uint32_t num_sectors, uint32_t flags) {
    ChainBuilder chain(*fake_);
    chain.readable(header_bytes(type, sector))
        .readable(range_bytes(sector, num_sectors, flags))
        .writable(1);
    return chain;
  }

  TempImage image_{kDiskBytes};
  GuestMemory memory_ = make_test_memory(4 << 20);
  std::optional<FakeVirtqueue> fake_;
  std::shared_ptr<FakeInterrupt> interrupt_ = std::make_shared<FakeInterrupt>();
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Blk> blk_;
};

TEST_F(BlkTest, FeaturesAndConfigSpace) {
  start();
  EXPECT_EQ(blk_->type(), DeviceType::Block);
  EXPECT_EQ(blk_->features(), kAllBlkFeatures);
  EXPECT_EQ(blk_->queue_max_sizes(), std::vector<uint16_t>{256});
  ASSERT_EQ(blk_->config_size_bytes(), sizeof(BlkConfigSpace));
  BlkConfigSpace config{};
  blk_->read_config(0, std::as_writable_bytes(std::span(&config, 1)));
  EXPECT_EQ(config.capacity, kDiskBytes / 512);
  EXPECT_EQ(config.seg_max, Blk::kSegMax);
  EXPECT_EQ(config.blk_size, 512u);
  EXPECT_EQ(config.max_discard_seg, 1u);
  EXPECT_EQ(config.max_write_zeroes_seg, 1u);
  EXPECT_EQ(config.max_discard_sectors, Blk::kMaxDiscardSectors);
  EXPECT_EQ(config.discard_sector_alignment, Blk::kDiscardSectorAlignment);
  EXPECT_EQ(config.write_zeroes_may_unmap, 1);
  // A partial read at an offset, as a driver reading capacity's high half.
  uint32_t high = 0xffffffff;
  blk_->read_config(4, std::as_writable_bytes(std::span(&high, 1)));
  EXPECT_EQ(high, 0u);
}

TEST_F(BlkTest, ResizeGrowsTheFileAndCapacityAndNotifiesTheDriver) {
  start();
  constexpr uint64_t kGrown = 3 * kDiskBytes;
  ASSERT_TRUE(blk_->resize(kGrown).has_value());
  EXPECT_EQ(blk_->size_bytes(), kGrown);
  EXPECT_EQ(std::filesystem::file_size(image_.path()), kGrown);
  uint64_t capacity = 0;
  blk_->read_config(0, std::as_writable_bytes(std::span(&capacity, 1)));
  EXPECT_EQ(capacity, kGrown / 512);
  EXPECT_EQ(interrupt_->config_notifications(), 1);
  // The new sectors are usable at once: write past the old end, read back.
  std::vector<std::byte> data = pattern(4096, 7);
  auto write = write_chain(kGrown / 512 - 8, data);
  EXPECT_EQ(run_one(write), kBlkStatusOk);
  auto read = read_chain(kGrown / 512 - 8, 4096);
  uint16_t before = fake_->used_idx();
  auto built = read.build();
  blk_->notify(0);
  run_until_used(static_cast<uint16_t>(before + 1));
  EXPECT_EQ(status_of(built), kBlkStatusOk);
  auto back = fake_->bytes(built.buffers[1], 4096);
  EXPECT_EQ(0, std::memcmp(back.data(), data.data(), 4096));
  // The same size again changes nothing and notifies nobody.
  ASSERT_TRUE(blk_->resize(kGrown).has_value());
  EXPECT_EQ(interrupt_->config_notifications(), 1);
}

TEST_F(BlkTest, ResizeRefusesShrinkingOddSizesAndReadOnlyDisks) {
  start();
  auto smaller = blk_->resize(kDiskBytes / 2);
  ASSERT_FALSE(smaller.has_value());
  EXPECT_EQ(smaller.error().code(), Errc::InvalidArgument);
  EXPECT_NE(smaller.error().message().find("smaller"), std::string::npos)
      << smaller.error().message();
  EXPECT_FALSE(blk_->resize(kDiskBytes + 100).has_value());
  EXPECT_EQ(blk_->size_bytes(), kDiskBytes);
  EXPECT_EQ(std::filesystem::file_size(image_.path()), kDiskBytes);
  EXPECT_EQ(interrupt_->config_notifications(), 0);
  blk_->reset();
  blk_.reset();  // releases the image's write lock
  start(Access::ReadOnly, kBlkFeatureFlush | kBlkFeatureRo);
  EXPECT_FALSE(blk_->resize(2 * kDiskBytes).has_value());
  EXPECT_EQ(std::filesystem::file_size(image_.path()), kDiskBytes);
}

TEST_F(BlkTest, CreateChecksItsArguments) {
  auto backend = block::RawFile::open(image_.path(), Access::ReadOnly);
  ASSERT_TRUE(backend.has_value());
  EXPECT_FALSE(Blk::create(std::move(*backend), BlkConfig{"", Access::ReadWrite}).has_value());
  backend = block::RawFile::open(image_.path(), Access::ReadOnly);
  EXPECT_FALSE(
      Blk::create(std::move(*backend), BlkConfig{std::string(21, 'x'), Access::ReadOnly}).has_value());
  EXPECT_FALSE(Blk::create(nullptr, BlkConfig{}).has_value());
}

TEST_F(BlkTest, Read) {
  start();
  auto chain = read_chain(8, 4096);
  uint16_t before = fake_->used_idx();
  auto built = chain.build();
  blk_->notify(0);
  run_until_used(static_cast<uint16_t>(before + 1));
  EXPECT_EQ(status_of(built), kBlkStatusOk);
  EXPECT_EQ(fake_->used_elem(0).len, 4096u + 1);
  auto data = fake_->bytes(built.buffers[1], 4096);
  EXPECT_EQ(0, std::memcmp(data.data(), image_.contents().data() + 8 * 512, 4096));
  EXPECT_EQ(interrupt_->queue_notifications(0), 1);
  EXPECT_EQ(interrupt_->resets(), 0);
  EXPECT_EQ(blk_->in_flight(), 0u);
}

TEST_F(BlkTest, ReadWithHeaderDataAndStatusSharingSegments) {
  start();
  // One readable descriptor for the header, one writable for data + status.
  ChainBuilder chain(*fake_);
  chain.readable(header_bytes(kBlkTypeIn, 1)).writable(512 + 1);
  auto built = chain.build();
  blk_->notify(0);
  run_until_used(1);
  EXPECT_EQ(fake_->bytes(built.buffers[1] + 512, 1)[0], std::byte{kBlkStatusOk});
  EXPECT_EQ(fake_->used_elem(0).len, 513u);
  auto data = fake_->bytes(built.buffers[1], 512);
  EXPECT_EQ(0, std::memcmp(data.data(), image_.contents().data() + 512, 512));
}

TEST_F(BlkTest, WriteThenReadBack) {
  start();
  auto data = pattern(8192, 9);
  auto write = write_chain(100, data);
  uint32_t written = 0;
  EXPECT_EQ(run_one(write, &written), kBlkStatusOk);
  EXPECT_EQ(written, 1u);
  EXPECT_EQ(image_.read_back(100 * 512, 8192), data);

  // Header and data in one readable descriptor.
  auto combined = header_bytes(kBlkTypeOut, 200);
  combined.insert(combined.end(), data.begin(), data.begin() + 512);
  ChainBuilder chain(*fake_);
  chain.readable(combined).writable(1);
  EXPECT_EQ(run_one(chain), kBlkStatusOk);
  EXPECT_EQ(image_.read_back(200 * 512, 512), std::vector<std::byte>(data.begin(), data.begin() + 512));

  auto read = read_chain(100, 8192);
  uint16_t before = fake_->used_idx();
  auto built = read.build();
  blk_->notify(0);
  run_until_used(static_cast<uint16_t>(before + 1));
  EXPECT_EQ(fake_->bytes(built.buffers[1], 8192), data);
}

TEST_F(BlkTest, CountersCountRequestsBytesAndErrors) {
  start();
  auto counter = [&](std::string_view name) {
    for (const auto& [key, value] : blk_->counters()) {
      if (key == name) return value;
    }
    ADD_FAILURE() << "no counter " << name;
    return uint64_t{0};
  };
  EXPECT_EQ(counter("requests"), 0u);
  auto data = pattern(4096, 3);
  auto write = write_chain(8, data);
  EXPECT_EQ(run_one(write), kBlkStatusOk);
  auto read = read_chain(8, 1024);
  EXPECT_EQ(run_one(read), kBlkStatusOk);
  auto past_end = read_chain(kDiskBytes / 512, 512);
  EXPECT_EQ(run_one(past_end), kBlkStatusIoErr);
  EXPECT_EQ(counter("requests"), 3u);
  EXPECT_EQ(counter("errors"), 1u);
  EXPECT_EQ(counter("write_bytes"), 4096u);
  EXPECT_EQ(counter("read_bytes"), 1024u) << "a refused request moves no data";
  // Service time of the two requests the backend served (the refused one
  // never reached it).
  EXPECT_EQ(counter("request_latency_us_count"), 2u);
  EXPECT_EQ(counter("request_latency_us_bucket_le_inf"), 2u);
  EXPECT_LE(counter("request_latency_us_bucket_le_10"), 2u);
}

TEST_F(BlkTest, Flush) {
  start();
  ChainBuilder chain(*fake_);
  chain.readable(header_bytes(kBlkTypeFlush, 0)).writable(1);
  uint32_t written = 0;
  EXPECT_EQ(run_one(chain, &written), kBlkStatusOk);
  EXPECT_EQ(written, 1u);
}

TEST_F(BlkTest, GetId) {
  start();
  ChainBuilder chain(*fake_);
  chain.readable(header_bytes(kBlkTypeGetId, 0)).writable(kBlkIdBytes).writable(1);
  uint16_t before = fake_->used_idx();
  auto built = chain.build();
  blk_->notify(0);
  ASSERT_EQ(fake_->used_idx(), before + 1);  // answered without the backend
  EXPECT_EQ(status_of(built), kBlkStatusOk);
  EXPECT_EQ(fake_->used_elem(before).len, kBlkIdBytes + 1);
  auto id = fake_->bytes(built.buffers[1], kBlkIdBytes);
  std::vector<std::byte> expected(kBlkIdBytes);
  std::memcpy(expected.data(), "keel-disk-0", 11);
  EXPECT_EQ(id, expected);

  // A short buffer gets what fits.
  ChainBuilder short_chain(*fake_);
  short_chain.readable(header_bytes(kBlkTypeGetId, 0)).writable(4).writable(1);
  uint32_t written = 0;
  EXPECT_EQ(run_one(short_chain, &written), kBlkStatusOk);
  EXPECT_EQ(written, 5u);
}

TEST_F(BlkTest, DiscardAndWriteZeroes) {
  start();
  auto discard = range_chain(kBlkTypeDiscard, 16, 8, 0);
  EXPECT_EQ(run_one(discard), kBlkStatusOk);
  auto zeroes = range_chain(kBlkTypeWriteZeroes, 64, 16, 0);
  EXPECT_EQ(run_one(zeroes), kBlkStatusOk);
  auto zeroes_unmap = range_chain(kBlkTypeWriteZeroes, 128, 16, kBlkDiscardFlagUnmap);
  EXPECT_EQ(run_one(zeroes_unmap), kBlkStatusOk);
  EXPECT_EQ(image_.read_back(64 * 512, 16 * 512), std::vector<std::byte>(16 * 512));
  EXPECT_EQ(image_.read_back(128 * 512, 16 * 512), std::vector<std::byte>(16 * 512));
  EXPECT_EQ(image_.read_back(80 * 512, 512)[0], image_.contents()[80 * 512]);
}

TEST_F(BlkTest, DiscardAndWriteZeroesNeedTheirFeatures) {
  start(Access::ReadWrite, kBlkFeatureFlush);
  auto discard = range_chain(kBlkTypeDiscard, 0, 8, 0);
  EXPECT_EQ(run_one(discard), kBlkStatusUnsupp);
  auto zeroes = range_chain(kBlkTypeWriteZeroes, 0, 8, 0);
  EXPECT_EQ(run_one(zeroes), kBlkStatusUnsupp);
}

TEST_F(BlkTest, ReadOnly) {
  start(Access::ReadOnly, kBlkFeatureFlush | kBlkFeatureRo);
  EXPECT_TRUE(blk_->features() & kBlkFeatureRo);
  EXPECT_FALSE(blk_->features() & kBlkFeatureDiscard);
  auto data = pattern(512);
  auto write = write_chain(0, data);
  EXPECT_EQ(run_one(write), kBlkStatusIoErr);
  EXPECT_EQ(image_.read_back(0, 512)[0], image_.contents()[0]);
  auto discard = range_chain(kBlkTypeDiscard, 0, 8, 0);
  EXPECT_EQ(run_one(discard), kBlkStatusUnsupp);
  auto read = read_chain(0, 512);
  EXPECT_EQ(run_one(read), kBlkStatusOk);
  ChainBuilder flush(*fake_);
  flush.readable(header_bytes(kBlkTypeFlush, 0)).writable(1);
  EXPECT_EQ(run_one(flush), kBlkStatusOk);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BlkTest, RequestsOutsideTheDisk) {
  start();
  const uint64_t capacity = kDiskBytes / 512;
  auto at_end = read_chain(capacity - 1, 512);
  EXPECT_EQ(run_one(at_end), kBlkStatusOk);
  auto past_end = read_chain(capacity - 1, 1024);
  EXPECT_EQ(run_one(past_end), kBlkStatusIoErr);
  auto after_end = read_chain(capacity, 512);
  EXPECT_EQ(run_one(after_end), kBlkStatusIoErr);
  // sector * 512 overflows 64 bits.
  auto overflow = read_chain(UINT64_MAX / 512 + 1, 512);
  EXPECT_EQ(run_one(overflow), kBlkStatusIoErr);
  auto data = pattern(512);
  auto write_overflow = write_chain(UINT64_MAX, data);
  EXPECT_EQ(run_one(write_overflow), kBlkStatusIoErr);
  auto discard_past = range_chain(kBlkTypeDiscard, capacity - 4, 8, 0);
  EXPECT_EQ(run_one(discard_past), kBlkStatusIoErr);
  auto zeroes_overflow = range_chain(kBlkTypeWriteZeroes, UINT64_MAX - 2, 8, 0);
  EXPECT_EQ(run_one(zeroes_overflow), kBlkStatusIoErr);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BlkTest, MalformedRequestsGetAnErrorStatus) {
  start();
  // Header shorter than 16 bytes.
  ChainBuilder short_header(*fake_);
  short_header.readable(pattern(8)).writable(1);
  EXPECT_EQ(run_one(short_header), kBlkStatusIoErr);
  // A partial sector.
  auto partial = read_chain(0, 100);
  EXPECT_EQ(run_one(partial), kBlkStatusIoErr);
  // A read carrying device-readable data after its header.
  ChainBuilder read_with_data(*fake_);
  read_with_data.readable(header_bytes(kBlkTypeIn, 0)).readable(512).writable(512).writable(1);
  EXPECT_EQ(run_one(read_with_data), kBlkStatusIoErr);
  // A write with device-writable data before its status.
  ChainBuilder write_into_guest(*fake_);
  write_into_guest.readable(header_bytes(kBlkTypeOut, 0)).writable(512).writable(1);
  EXPECT_EQ(run_one(write_into_guest), kBlkStatusIoErr);
  // Unknown request types, including GET_LIFETIME and SECURE_ERASE.
  for (uint32_t type : {2u, 10u, 14u, 0xffffffffu}) {
    ChainBuilder unknown(*fake_);
    unknown.readable(header_bytes(type, 0)).writable(1);
    EXPECT_EQ(run_one(unknown), kBlkStatusUnsupp) << type;
  }
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BlkTest, MalformedDiscardAndWriteZeroes) {
  start();
  // Unmap on a discard, and reserved flag bits, are UNSUPP (§5.2.6.2).
  auto discard_unmap = range_chain(kBlkTypeDiscard, 0, 8, kBlkDiscardFlagUnmap);
  EXPECT_EQ(run_one(discard_unmap), kBlkStatusUnsupp);
  auto reserved = range_chain(kBlkTypeWriteZeroes, 0, 8, 2);
  EXPECT_EQ(run_one(reserved), kBlkStatusUnsupp);
  // More sectors than max_discard_sectors.
  auto huge = range_chain(kBlkTypeDiscard, 0, Blk::kMaxDiscardSectors + 1, 0);
  EXPECT_EQ(run_one(huge), kBlkStatusIoErr);
  // Two segments where one is offered.
  ChainBuilder two(*fake_);
  auto segments = range_bytes(0, 8, 0);
  auto second = range_bytes(16, 8, 0);
  segments.insert(segments.end(), second.begin(), second.end());
  two.readable(header_bytes(kBlkTypeDiscard, 0)).readable(segments).writable(1);
  EXPECT_EQ(run_one(two), kBlkStatusIoErr);
  // No segment, and a partial one.
  ChainBuilder none(*fake_);
  none.readable(header_bytes(kBlkTypeWriteZeroes, 0)).writable(1);
  EXPECT_EQ(run_one(none), kBlkStatusIoErr);
  ChainBuilder partial(*fake_);
  partial.readable(header_bytes(kBlkTypeWriteZeroes, 0)).readable(pattern(8)).writable(1);
  EXPECT_EQ(run_one(partial), kBlkStatusIoErr);
  EXPECT_EQ(image_.read_back(0, 512)[0], image_.contents()[0]);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BlkTest, TooManySegments) {
  start(Access::ReadWrite, kAllBlkFeatures, kFeatureIndirectDesc);
  ChainBuilder chain(*fake_);
  chain.readable(header_bytes(kBlkTypeIn, 0));
  for (uint32_t i = 0; i < Blk::kMaxChainSegments; ++i) chain.writable(512);
  chain.writable(1);
  auto built = chain.build_indirect();
  blk_->notify(0);
  run_until_used(1);
  EXPECT_EQ(status_of(built), kBlkStatusIoErr);

  // seg_max data segments are fine.
  ChainBuilder fits(*fake_);
  fits.readable(header_bytes(kBlkTypeIn, 0));
  for (uint32_t i = 0; i < Blk::kSegMax; ++i) fits.writable(512);
  fits.writable(1);
  auto fits_built = fits.build_indirect();
  blk_->notify(0);
  run_until_used(2);
  EXPECT_EQ(status_of(fits_built), kBlkStatusOk);
  EXPECT_EQ(fake_->used_elem(1).len, Blk::kSegMax * 512 + 1);
  auto last = fake_->bytes(fits_built.buffers[Blk::kSegMax], 512);
  EXPECT_EQ(0, std::memcmp(last.data(), image_.contents().data() + (Blk::kSegMax - 1) * 512, 512));
}

TEST_F(BlkTest, NoStatusByteNeedsReset) {
  start();
  ChainBuilder chain(*fake_);
  chain.readable(header_bytes(kBlkTypeIn, 0)).readable(512);
  chain.build();
  blk_->notify(0);
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(fake_->used_idx(), 0);
  // The device ignores the queue until reset.
  auto read = read_chain(0, 512);
  read.build();
  blk_->notify(0);
  EXPECT_EQ(fake_->used_idx(), 0);
  EXPECT_EQ(interrupt_->resets(), 1);
}

TEST_F(BlkTest, BufferOutsideRamNeedsReset) {
  start();
  ChainBuilder chain(*fake_);
  chain.readable(header_bytes(kBlkTypeIn, 0)).raw(memory_.size_bytes() - 256, 512, true).writable(1);
  chain.build();
  blk_->notify(0);
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(fake_->used_idx(), 0);
}

TEST_F(BlkTest, SixtyFourInFlight) {
  start();
  constexpr int kRequests = 64;
  std::vector<ChainBuilder::Built> built;
  for (int i = 0; i < kRequests; ++i) built.push_back(read_chain(i * 8, 4096).build());
  blk_->notify(0);
  EXPECT_EQ(blk_->in_flight(), static_cast<size_t>(kRequests));
  run_until_used(kRequests);
  EXPECT_EQ(blk_->in_flight(), 0u);
  std::vector<bool> seen(fake_->size());
  for (int i = 0; i < kRequests; ++i) {
    VirtqUsedElem used = fake_->used_elem(static_cast<uint16_t>(i));
    EXPECT_EQ(used.len, 4096u + 1);
    EXPECT_FALSE(seen[used.id]);
    seen[used.id] = true;
  }
  for (int i = 0; i < kRequests; ++i) {
    EXPECT_EQ(status_of(built[i]), kBlkStatusOk);
    auto data = fake_->bytes(built[i].buffers[1], 4096);
    EXPECT_EQ(0, std::memcmp(data.data(), image_.contents().data() + i * 4096, 4096)) << i;
  }
  // One notification per batch of completions, not one per request.
  EXPECT_GE(interrupt_->queue_notifications(0), 1);
  EXPECT_LT(interrupt_->queue_notifications(0), kRequests);
}

// A driver that makes one chain available over and over fills every slot;
// the rest waits in the ring until completions free slots.
TEST_F(BlkTest, StallsWhenEverySlotIsBusyAndResumes) {
  start();
  ChainBuilder chain(*fake_);
  chain.readable(header_bytes(kBlkTypeFlush, 0)).writable(1);
  auto built = chain.build();
  for (int i = 1; i < Blk::kQueueSize; ++i) fake_->publish(built.head);
  blk_->notify(0);
  EXPECT_EQ(blk_->in_flight(), Blk::kQueueSize);
  for (int i = 0; i < 10; ++i) fake_->publish(built.head);
  blk_->notify(0);  // no free slot: nothing taken
  EXPECT_EQ(blk_->in_flight(), Blk::kQueueSize);
  run_until_used(static_cast<uint16_t>(Blk::kQueueSize + 10));
  EXPECT_EQ(blk_->in_flight(), 0u);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(BlkTest, ResetWaitsForInFlightRequests) {
  start();
  for (int i = 0; i < 32; ++i) read_chain(i, 512).build();
  blk_->notify(0);
  EXPECT_EQ(blk_->in_flight(), 32u);
  int notifications = interrupt_->queue_notifications(0);
  blk_->reset();
  EXPECT_EQ(blk_->in_flight(), 0u);
  EXPECT_EQ(fake_->used_idx(), 0);  // nothing pushed after reset
  EXPECT_EQ(interrupt_->queue_notifications(0), notifications);
  // The loop has no watch left for the device.
  EXPECT_EQ(*loop_->run_once(0), 0);

  // And it can be activated again.
  auto queue = Virtqueue::create(memory_, fake_->config());
  ASSERT_TRUE(queue.has_value());
  ActivateContext context;
  context.memory = &memory_;
  context.features = kAllBlkFeatures;
  context.queues.emplace_back(std::move(*queue));
  context.interrupt = interrupt_;
  context.event_loop = loop_.get();
  ASSERT_TRUE(blk_->activate(std::move(context)).has_value());
}

// Snapshots: quiesce finishes every request the driver made available
// (popped or not), so the saved state is the queue alone and a device
// restored from it goes on where the first left off.
TEST_F(BlkTest, QuiesceFinishesEverythingAvailableAndRestoreGoesOn) {
  start();
  for (int i = 0; i < 32; ++i) read_chain(i, 512).build();
  blk_->notify(0);
  ASSERT_EQ(blk_->in_flight(), 32u);
  Result<VirtioDeviceState> early = blk_->save_state();
  ASSERT_FALSE(early);
  EXPECT_EQ(early.error().code(), Errc::Busy);
  for (int i = 0; i < 10; ++i) read_chain(100 + i, 512).build();  // no notification
  ASSERT_TRUE(blk_->quiesce(std::chrono::seconds(10)));
  EXPECT_EQ(blk_->in_flight(), 0u);
  EXPECT_EQ(fake_->used_idx(), 42);
  EXPECT_GE(interrupt_->queue_notifications(0), 1);
  Result<VirtioDeviceState> saved = blk_->save_state();
  ASSERT_TRUE(saved) << saved.error().message();
  ASSERT_EQ(saved->queues.size(), 1u);
  ASSERT_TRUE(saved->queues[0].has_value());
  EXPECT_EQ(saved->queues[0]->last_avail_idx, 42);
  EXPECT_EQ(saved->queues[0]->used_idx, 42);
  EXPECT_TRUE(saved->extra.empty());
  blk_ = nullptr;  // the image's lock goes with it

  auto backend = block::RawFile::open(image_.path(), Access::ReadWrite);
  ASSERT_TRUE(backend);
  auto restored = Blk::create(std::move(*backend), BlkConfig{"keel-disk-0", Access::ReadWrite});
  ASSERT_TRUE(restored);
  auto context_for = [&](const VirtqueueState& state) {
    ActivateContext context;
    context.memory = &memory_;
    context.features = kAllBlkFeatures;
    context.queues.emplace_back(std::move(*Virtqueue::restore(memory_, state)));
    context.interrupt = interrupt_;
    context.event_loop = loop_.get();
    return context;
  };
  const std::byte stray{1};
  Result<void> with_extra = (*restored)->restore_state(context_for(*saved->queues[0]),
                                                       std::span(&stray, 1));
  ASSERT_FALSE(with_extra);
  EXPECT_EQ(with_extra.error().code(), Errc::Corrupt);
  ASSERT_TRUE((*restored)->restore_state(context_for(*saved->queues[0]), {}));
  blk_ = std::move(*restored);
  ChainBuilder next = read_chain(7, 512);
  EXPECT_EQ(run_one(next), kBlkStatusOk);
  EXPECT_EQ(fake_->used_idx(), 43);
}

TEST_F(BlkTest, DisabledQueueIsIgnored) {
  auto backend = block::RawFile::open(image_.path(), Access::ReadWrite);
  ASSERT_TRUE(backend.has_value());
  blk_ = std::move(*Blk::create(std::move(*backend), BlkConfig{}));
  ActivateContext context;
  context.memory = &memory_;
  context.queues.emplace_back(std::nullopt);
  context.interrupt = interrupt_;
  context.event_loop = loop_.get();
  ASSERT_TRUE(blk_->activate(std::move(context)).has_value());
  blk_->notify(0);
  blk_->notify(1);
  EXPECT_EQ(interrupt_->resets(), 0);
}

// Local disk copy in a migration (block/dirty_tracker.h): completed writes,
// write-zeroes and discards mark their chunks; reads do not; a chunk read
// for the copy is cleared and a later write marks it again; resize waits.
TEST_F(BlkTest, WriteTrackerMarksCompletedWritesAndReadTrackedChunkClears) {
  start();
  constexpr uint64_t kChunk = 64 * 1024;
  auto tracker = std::make_shared<block::DirtyTracker>(kDiskBytes, kChunk);
  blk_->set_write_tracker(tracker);
  auto read = read_chain(0, 4096);
  EXPECT_EQ(run_one(read), kBlkStatusOk);
  EXPECT_EQ(tracker->dirty_count(), 0u);

  // 8 KiB straddling the first chunk boundary: chunks 0 and 1.
  auto data = pattern(8192, 5);
  auto write = write_chain(kChunk / 512 - 8, data);
  EXPECT_EQ(run_one(write), kBlkStatusOk);
  EXPECT_EQ(tracker->dirty_chunks(), (std::vector<uint64_t>{0, 1}));
  auto zeroes = range_chain(kBlkTypeWriteZeroes, 3 * kChunk / 512, 8, 0);
  EXPECT_EQ(run_one(zeroes), kBlkStatusOk);
  auto discard = range_chain(kBlkTypeDiscard, 5 * kChunk / 512, 8, 0);
  EXPECT_EQ(run_one(discard), kBlkStatusOk);
  EXPECT_EQ(tracker->dirty_chunks(), (std::vector<uint64_t>{0, 1, 3, 5}));

  std::vector<std::byte> chunk(kChunk);
  ASSERT_TRUE(blk_->read_tracked_chunk(1, chunk).has_value());
  EXPECT_EQ(std::vector<std::byte>(chunk.begin(), chunk.begin() + 4096),
            std::vector<std::byte>(data.begin() + 4096, data.end()));
  EXPECT_EQ(tracker->dirty_chunks(), (std::vector<uint64_t>{0, 3, 5}));
  auto again = write_chain(kChunk / 512, std::span(data).first(512));
  EXPECT_EQ(run_one(again), kBlkStatusOk);
  EXPECT_EQ(tracker->dirty_chunks(), (std::vector<uint64_t>{0, 1, 3, 5}));

  // A buffer of the wrong size or a chunk past the end is refused, and
  // leaves the chunk marked.
  std::vector<std::byte> small(512);
  EXPECT_FALSE(blk_->read_tracked_chunk(1, small).has_value());
  EXPECT_FALSE(blk_->read_tracked_chunk(tracker->chunk_count(), chunk).has_value());
  EXPECT_EQ(tracker->dirty_count(), 4u);

  auto resized = blk_->resize(2 * kDiskBytes);
  ASSERT_FALSE(resized.has_value());
  EXPECT_EQ(resized.error().code(), Errc::Busy);
  blk_->set_write_tracker(nullptr);
  EXPECT_FALSE(blk_->read_tracked_chunk(1, chunk).has_value());
  auto untracked = write_chain(7 * kChunk / 512, std::span(data).first(512));
  EXPECT_EQ(run_one(untracked), kBlkStatusOk);
  EXPECT_EQ(tracker->dirty_count(), 4u);
}

}  // namespace
}  // namespace keel::devices::virtio
