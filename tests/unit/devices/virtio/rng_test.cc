// virtio-rng tests. Spec: virtio 1.2 §5.4 (entropy device).
// Covered: features, queues and the empty config space, filling direct and
// indirect chains from the real getrandom(), an injected source's short
// reads, EINTR and failures, the per-chain cap and the per-round budget
// resuming through the event loop, reset and re-activation, and hostile
// chains (device-readable buffers, out-of-range addresses, zero lengths).
#include "devices/virtio/rng.h"

#include <cerrno>
#include <cstring>

#include <gtest/gtest.h>

#include "base/event_loop.h"
#include "fake_interrupt.h"
#include "fake_virtqueue.h"
#include "loop_helpers.h"

namespace keel::devices::virtio {
namespace {

using testing::ChainBuilder;
using testing::FakeInterrupt;
using testing::FakeVirtqueue;
using testing::make_test_memory;
using testing::pattern;

class RngTest : public ::testing::Test {
 protected:
  void SetUp() override { loop_ = std::move(*EventLoop::create()); }
  void TearDown() override {
    if (rng_) rng_->reset();
  }

  void start(Rng::Source source = {}, uint64_t queue_features = 0) {
    auto rng = Rng::create(std::move(source));
    ASSERT_TRUE(rng.has_value()) << rng.error().message();
    rng_ = std::move(*rng);
    fake_.emplace(memory_, Rng::kQueueSize, queue_features);
    activate();
  }
  void activate() {
    auto queue = Virtqueue::create(memory_, fake_->config());
    ASSERT_TRUE(queue.has_value());
    ActivateContext context;
    context.memory = &memory_;
    context.queues.emplace_back(std::move(*queue));
    context.interrupt = interrupt_;
    context.event_loop = loop_.get();
    ASSERT_TRUE(rng_->activate(std::move(context)).has_value());
  }
  // Runs the loop until no callback is ready.
  void run_loop() { testing::run_until_idle(*loop_); }

  GuestMemory memory_ = make_test_memory(4 << 20);
  std::optional<FakeVirtqueue> fake_;
  std::shared_ptr<FakeInterrupt> interrupt_ = std::make_shared<FakeInterrupt>();
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Rng> rng_;
};

// A source that writes a running counter, at most max_chunk bytes a call,
// failing with EINTR every other call.
struct CountingSource {
  size_t max_chunk = 7;
  bool interrupt_calls = true;
  uint8_t next = 0;
  int calls = 0;
  ssize_t operator()(void* buffer, size_t length) {
    if (interrupt_calls && calls++ % 2 == 0) {
      errno = EINTR;
      return -1;
    }
    size_t n = std::min(length, max_chunk);
    auto* out = static_cast<uint8_t*>(buffer);
    for (size_t i = 0; i < n; ++i) out[i] = next++;
    return static_cast<ssize_t>(n);
  }
};

TEST_F(RngTest, FeaturesQueuesAndNoConfigSpace) {
  start();
  EXPECT_EQ(rng_->type(), DeviceType::Entropy);
  EXPECT_EQ(rng_->name(), "virtio-rng");
  EXPECT_EQ(rng_->features(), 0u);
  EXPECT_EQ(rng_->queue_max_sizes(), std::vector<uint16_t>{Rng::kQueueSize});
  EXPECT_EQ(rng_->config_size_bytes(), 0u);
}

TEST_F(RngTest, ActivateNeedsAnEventLoop) {
  auto rng = Rng::create();
  ASSERT_TRUE(rng.has_value());
  FakeVirtqueue fake(memory_, 16);
  ActivateContext context;
  context.memory = &memory_;
  context.queues.emplace_back(std::move(*Virtqueue::create(memory_, fake.config())));
  context.interrupt = interrupt_;
  EXPECT_FALSE((*rng)->activate(std::move(context)).has_value());
}

TEST_F(RngTest, FillsAChainFromGetrandom) {
  start();
  ChainBuilder chain(*fake_);
  auto built = chain.writable(64).build();
  rng_->notify(0);
  ASSERT_EQ(fake_->used_idx(), 1);
  EXPECT_EQ(fake_->used_elem(0).id, built.head);
  EXPECT_EQ(fake_->used_elem(0).len, 64u);
  EXPECT_EQ(interrupt_->queue_notifications(0), 1);
  EXPECT_EQ(interrupt_->resets(), 0);
  // 64 random bytes are all zero with probability 2^-512.
  auto bytes = fake_->bytes(built.buffers[0], 64);
  EXPECT_NE(bytes, std::vector<std::byte>(64));

  ChainBuilder second(*fake_);
  auto built2 = second.writable(64).build();
  rng_->notify(0);
  ASSERT_EQ(fake_->used_idx(), 2);
  EXPECT_NE(fake_->bytes(built2.buffers[0], 64), bytes);
}

TEST_F(RngTest, FillsEverySegmentOfDirectAndIndirectChains) {
  start(CountingSource{.max_chunk = 1000, .interrupt_calls = false}, kFeatureIndirectDesc);
  ChainBuilder direct(*fake_);
  auto a = direct.writable(16).writable(32).build();
  ChainBuilder indirect(*fake_);
  auto b = indirect.writable(8).writable(8).writable(8).build_indirect();
  rng_->notify(0);
  ASSERT_EQ(fake_->used_idx(), 2);
  EXPECT_EQ(fake_->used_elem(0).len, 48u);
  EXPECT_EQ(fake_->used_elem(1).id, b.head);
  EXPECT_EQ(fake_->used_elem(1).len, 24u);
  // The counter runs on across segments and chains.
  EXPECT_EQ(fake_->bytes(a.buffers[1], 1)[0], std::byte{16});
  EXPECT_EQ(fake_->bytes(b.buffers[2], 1)[0], std::byte{48 + 16});
}

TEST_F(RngTest, ShortReadsAndEintrAreRetried) {
  start(CountingSource{});
  ChainBuilder chain(*fake_);
  auto built = chain.writable(100).build();
  rng_->notify(0);
  ASSERT_EQ(fake_->used_idx(), 1);
  EXPECT_EQ(fake_->used_elem(0).len, 100u);
  auto bytes = fake_->bytes(built.buffers[0], 100);
  for (size_t i = 0; i < bytes.size(); ++i) ASSERT_EQ(bytes[i], std::byte(i)) << i;
}

TEST_F(RngTest, SourceFailureHandsOverWhatWasFilled) {
  int calls = 0;
  start([&calls](void* buffer, size_t length) -> ssize_t {
    if (calls++ == 0) {
      size_t n = std::min<size_t>(length, 10);
      std::memset(buffer, 0xab, n);
      return static_cast<ssize_t>(n);
    }
    errno = EIO;
    return -1;
  });
  ChainBuilder partial(*fake_);
  partial.writable(64).build();
  ChainBuilder empty(*fake_);
  empty.writable(64).build();
  rng_->notify(0);
  // The chains go back (the driver must not wait forever), with the bytes
  // that are really random; no reset, the driver did nothing wrong.
  ASSERT_EQ(fake_->used_idx(), 2);
  EXPECT_EQ(fake_->used_elem(0).len, 10u);
  EXPECT_EQ(fake_->used_elem(1).len, 0u);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(RngTest, CapsTheBytesOfOneChain) {
  start(CountingSource{.max_chunk = 1 << 20, .interrupt_calls = false});
  ChainBuilder chain(*fake_);
  chain.writable(Rng::kMaxBytesPerChain + 4096).build();
  rng_->notify(0);
  ASSERT_EQ(fake_->used_idx(), 1);
  // §5.4.6.2: the device MAY use less than the whole buffer.
  EXPECT_EQ(fake_->used_elem(0).len, Rng::kMaxBytesPerChain);
}

TEST_F(RngTest, BoundsTheBytesOfOneRoundAndResumesOnTheLoop) {
  start(CountingSource{.max_chunk = 1 << 20, .interrupt_calls = false});
  constexpr uint32_t kChains = 2 * Rng::kMaxBytesPerRound / Rng::kMaxBytesPerChain;
  for (uint32_t i = 0; i < kChains; ++i) ChainBuilder(*fake_).writable(Rng::kMaxBytesPerChain).build();
  rng_->notify(0);
  EXPECT_EQ(fake_->used_idx(), kChains / 2);
  EXPECT_TRUE(rng_->deferred());
  EXPECT_EQ(interrupt_->queue_notifications(0), 1);
  // While the round is owed, driver notifications stay off and a notify
  // does no work of its own.
  EXPECT_EQ(fake_->used_flags() & kUsedFlagNoNotify, kUsedFlagNoNotify);
  rng_->notify(0);
  EXPECT_EQ(fake_->used_idx(), kChains / 2);
  run_loop();
  EXPECT_EQ(fake_->used_idx(), kChains);
  EXPECT_FALSE(rng_->deferred());
  EXPECT_EQ(fake_->used_flags() & kUsedFlagNoNotify, 0);
  EXPECT_EQ(interrupt_->queue_notifications(0), 2);
  for (uint32_t i = 0; i < kChains; ++i) EXPECT_EQ(fake_->used_elem(static_cast<uint16_t>(i)).len, Rng::kMaxBytesPerChain);
}

TEST_F(RngTest, BoundsTheChainsOfOneRound) {
  start(CountingSource{.max_chunk = 1 << 20, .interrupt_calls = false});
  constexpr uint32_t kChains = Rng::kMaxChainsPerRound + 20;
  for (uint32_t i = 0; i < kChains; ++i) ChainBuilder(*fake_).writable(1).build();
  rng_->notify(0);
  EXPECT_EQ(fake_->used_idx(), Rng::kMaxChainsPerRound);
  EXPECT_TRUE(rng_->deferred());
  run_loop();
  EXPECT_EQ(fake_->used_idx(), kChains);
  EXPECT_FALSE(rng_->deferred());
}

TEST_F(RngTest, DeviceReadableBufferNeedsReset) {
  start();
  ChainBuilder bad(*fake_);
  bad.readable(pattern(8)).writable(8).build();
  rng_->notify(0);
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(fake_->used_idx(), 0);
  // Broken until reset: more chains are not served, and no interrupt.
  ChainBuilder(*fake_).writable(8).build();
  rng_->notify(0);
  EXPECT_EQ(fake_->used_idx(), 0);
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(interrupt_->queue_notifications(0), 0);
}

TEST_F(RngTest, ReadableOnlyChainNeedsReset) {
  start();
  ChainBuilder(*fake_).readable(pattern(16)).build();
  rng_->notify(0);
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(fake_->used_idx(), 0);
}

TEST_F(RngTest, OutOfRangeBufferNeedsReset) {
  start();
  ChainBuilder(*fake_).raw(memory_.size_bytes() - 8, 64, true).build();
  rng_->notify(0);
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(fake_->used_idx(), 0);
}

TEST_F(RngTest, ZeroLengthBuffersComeBackEmpty) {
  start();
  ChainBuilder(*fake_).raw(FakeVirtqueue::kDataStart, 0, true).build();
  ChainBuilder(*fake_).raw(FakeVirtqueue::kDataStart, 0, true).writable(4).build();
  rng_->notify(0);
  ASSERT_EQ(fake_->used_idx(), 2);
  EXPECT_EQ(fake_->used_elem(0).len, 0u);
  EXPECT_EQ(fake_->used_elem(1).len, 4u);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(RngTest, OtherQueueIndexIsIgnored) {
  start();
  ChainBuilder(*fake_).writable(8).build();
  rng_->notify(1);
  EXPECT_EQ(fake_->used_idx(), 0);
  rng_->notify(0);
  EXPECT_EQ(fake_->used_idx(), 1);
}

TEST_F(RngTest, ResetStopsWorkAndActivateStartsAgain) {
  start(CountingSource{.max_chunk = 1 << 20, .interrupt_calls = false});
  constexpr uint32_t kChains = Rng::kMaxChainsPerRound + 1;
  for (uint32_t i = 0; i < kChains; ++i) ChainBuilder(*fake_).writable(1).build();
  rng_->notify(0);
  ASSERT_TRUE(rng_->deferred());
  rng_->reset();
  EXPECT_FALSE(rng_->deferred());
  run_loop();  // the resume event is gone with the watch
  EXPECT_EQ(fake_->used_idx(), Rng::kMaxChainsPerRound);
  rng_->notify(0);
  EXPECT_EQ(fake_->used_idx(), Rng::kMaxChainsPerRound);

  // A fresh driver: new rings at the same place.
  fake_.emplace(memory_, Rng::kQueueSize);
  activate();
  ChainBuilder(*fake_).writable(32).build();
  rng_->notify(0);
  ASSERT_EQ(fake_->used_idx(), 1);
  EXPECT_EQ(fake_->used_elem(0).len, 32u);
  EXPECT_FALSE(rng_->activate(ActivateContext{}).has_value());
}

TEST_F(RngTest, ChainsPostedBeforeActivationAreServedFromTheLoop) {
  auto rng = Rng::create();
  ASSERT_TRUE(rng.has_value());
  rng_ = std::move(*rng);
  fake_.emplace(memory_, Rng::kQueueSize);
  // The driver kicked before DRIVER_OK and the kick went nowhere.
  ChainBuilder(*fake_).writable(16).build();
  activate();
  EXPECT_EQ(fake_->used_idx(), 0);
  run_loop();
  ASSERT_EQ(fake_->used_idx(), 1);
  EXPECT_EQ(fake_->used_elem(0).len, 16u);
}

TEST_F(RngTest, EventIdxSuppressesInterrupts) {
  start({}, kFeatureEventIdx);
  ChainBuilder(*fake_).writable(8).build();
  rng_->notify(0);
  EXPECT_EQ(interrupt_->queue_notifications(0), 1);
  fake_->set_used_event(5);  // the driver wants an interrupt once used idx passes 5
  ChainBuilder(*fake_).writable(8).build();
  rng_->notify(0);
  EXPECT_EQ(fake_->used_idx(), 2);
  EXPECT_EQ(interrupt_->queue_notifications(0), 1);
  for (int i = 0; i < 4; ++i) {
    ChainBuilder(*fake_).writable(8).build();
    rng_->notify(0);
  }
  EXPECT_EQ(fake_->used_idx(), 6);
  EXPECT_EQ(interrupt_->queue_notifications(0), 2);
}

// Snapshots (the shared shape): save, mutate, save differs; a device
// restored from the first save saves the same and serves the next chain.
TEST_F(RngTest, SaveMutateRestoreRoundTrip) {
  start();
  ChainBuilder(*fake_).writable(16).build();
  rng_->notify(0);
  Result<VirtioDeviceState> first = rng_->save_state();
  ASSERT_TRUE(first) << first.error().message();
  ASSERT_EQ(first->queues.size(), 1u);
  EXPECT_EQ(first->queues[0]->used_idx, 1);
  ChainBuilder(*fake_).writable(16).build();
  rng_->notify(0);
  Result<VirtioDeviceState> mutated = rng_->save_state();
  ASSERT_TRUE(mutated);
  EXPECT_NE(*mutated, *first);
  rng_->reset();

  auto restored = Rng::create();
  ASSERT_TRUE(restored);
  ActivateContext context;
  context.memory = &memory_;
  context.queues.emplace_back(std::move(*Virtqueue::restore(memory_, *first->queues[0])));
  context.interrupt = interrupt_;
  context.event_loop = loop_.get();
  ASSERT_TRUE((*restored)->restore_state(std::move(context), {}));
  rng_ = std::move(*restored);
  EXPECT_EQ(*rng_->save_state(), *first);
  // The chain after the saved position is taken again.
  run_loop();
  EXPECT_EQ(fake_->used_idx(), 2);
}

}  // namespace
}  // namespace keel::devices::virtio
