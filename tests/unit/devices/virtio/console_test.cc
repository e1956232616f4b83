// virtio-console tests. Spec: virtio 1.2 §5.3 (console device).
// Covered: features, queues and the config space, emerg_wr, transmit
// chains to the output (direct, indirect, several segments), the per-chain
// cap and the per-round budget resuming on the event loop, host input
// buffered before the driver is ready and across resets, delivered across
// several receive buffers, the pending bound, input from another thread,
// reset, and hostile chains (wrong direction, out of range, zero lengths).
#include "devices/virtio/console.h"

#include <chrono>
#include <thread>

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

// FakeVirtqueue lays its rings at fixed offsets, so the two queues live in
// two RAMs: each Virtqueue reads its own, and the device's memory pointer
// (used for transmit buffers only) is the transmitq's.
constexpr uint64_t kBigBuffers = 1 << 20;  // raw transmit buffers in tx RAM

std::span<const std::byte> as_bytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

std::string as_text(const std::vector<std::byte>& bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

class ConsoleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    loop_ = std::move(*EventLoop::create());
    auto console = VirtioConsole::create([this](std::span<const std::byte> bytes) {
      output_.insert(output_.end(), bytes.begin(), bytes.end());
      ++output_calls_;
    });
    ASSERT_TRUE(console.has_value()) << console.error().message();
    console_ = std::move(*console);
  }
  void TearDown() override { console_->reset(); }

  void start(uint64_t queue_features = 0) {
    rx_.emplace(memory_, VirtioConsole::kQueueSize, queue_features);
    tx_.emplace(tx_memory_, VirtioConsole::kQueueSize, queue_features);
    activate();
  }
  void activate() {
    ActivateContext context;
    context.memory = &tx_memory_;
    context.queues.emplace_back(std::move(*Virtqueue::create(memory_, rx_->config())));
    context.queues.emplace_back(std::move(*Virtqueue::create(tx_memory_, tx_->config())));
    context.interrupt = interrupt_;
    context.event_loop = loop_.get();
    ASSERT_TRUE(console_->activate(std::move(context)).has_value());
  }
  void transmit_notify() { console_->notify(VirtioConsole::kTransmitQueue); }
  void run_loop() { testing::run_until_idle(*loop_); }

  GuestMemory memory_ = make_test_memory(1 << 20);
  GuestMemory tx_memory_ = make_test_memory(2 << 20);
  std::optional<FakeVirtqueue> rx_;
  std::optional<FakeVirtqueue> tx_;
  std::shared_ptr<FakeInterrupt> interrupt_ = std::make_shared<FakeInterrupt>();
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<VirtioConsole> console_;
  std::vector<std::byte> output_;
  int output_calls_ = 0;
};

TEST_F(ConsoleTest, FeaturesQueuesAndConfigSpace) {
  EXPECT_EQ(console_->type(), DeviceType::Console);
  EXPECT_EQ(console_->name(), "virtio-console");
  EXPECT_EQ(console_->features(), kConsoleFeatureEmergWrite);
  EXPECT_EQ(console_->queue_max_sizes(),
            (std::vector<uint16_t>{VirtioConsole::kQueueSize, VirtioConsole::kQueueSize}));
  ASSERT_EQ(console_->config_size_bytes(), sizeof(ConsoleConfigSpace));
  ConsoleConfigSpace config{};
  console_->read_config(0, std::as_writable_bytes(std::span(&config, 1)));
  EXPECT_EQ(config.cols, 0);
  EXPECT_EQ(config.rows, 0);
  EXPECT_EQ(config.max_nr_ports, 1u);
  EXPECT_EQ(config.emerg_wr, 0u);
}

TEST_F(ConsoleTest, CreateNeedsAnOutput) {
  EXPECT_FALSE(VirtioConsole::create({}).has_value());
}

TEST_F(ConsoleTest, EmergencyWritePutsOneCharacterOut) {
  // Before activation too: that is what it is for.
  uint32_t value = 'K' | 0x1234'5600;
  console_->write_config(8, std::as_bytes(std::span(&value, 1)));
  EXPECT_EQ(as_text(output_), "K");
  uint8_t byte = '!';
  console_->write_config(8, std::as_bytes(std::span(&byte, 1)));
  EXPECT_EQ(as_text(output_), "K!");
  // Other fields are read-only; the upper bytes of emerg_wr are not a character.
  uint16_t cols = 80;
  console_->write_config(0, std::as_bytes(std::span(&cols, 1)));
  console_->write_config(9, std::as_bytes(std::span(&byte, 1)));
  EXPECT_EQ(as_text(output_), "K!");
  ConsoleConfigSpace config{};
  console_->read_config(0, std::as_writable_bytes(std::span(&config, 1)));
  EXPECT_EQ(config.cols, 0);
  EXPECT_EQ(config.emerg_wr, 0u);
}

TEST_F(ConsoleTest, ActivateNeedsTwoQueuesAndAnEventLoop) {
  rx_.emplace(memory_, 16);
  ActivateContext context;
  context.memory = &memory_;
  context.queues.emplace_back(std::move(*Virtqueue::create(memory_, rx_->config())));
  context.interrupt = interrupt_;
  context.event_loop = loop_.get();
  EXPECT_FALSE(console_->activate(std::move(context)).has_value());
}

TEST_F(ConsoleTest, TransmitChainsReachTheOutput) {
  start(kFeatureIndirectDesc);
  ChainBuilder(*tx_).readable(as_bytes("hello ")).build();
  ChainBuilder(*tx_).readable(as_bytes("over ")).readable(as_bytes("hvc0")).build();
  ChainBuilder(*tx_).readable(as_bytes("\r\n")).build_indirect();
  transmit_notify();
  EXPECT_EQ(as_text(output_), "hello over hvc0\r\n");
  ASSERT_EQ(tx_->used_idx(), 3);
  for (uint16_t i = 0; i < 3; ++i) EXPECT_EQ(tx_->used_elem(i).len, 0u);
  EXPECT_EQ(interrupt_->queue_notifications(VirtioConsole::kTransmitQueue), 1);
  EXPECT_EQ(interrupt_->queue_notifications(VirtioConsole::kReceiveQueue), 0);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(ConsoleTest, ZeroLengthTransmitChainsComeBack) {
  start();
  ChainBuilder(*tx_).raw(FakeVirtqueue::kDataStart, 0, false).build();
  transmit_notify();
  EXPECT_EQ(tx_->used_idx(), 1);
  EXPECT_TRUE(output_.empty());
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(ConsoleTest, CapsTheBytesOfOneTransmitChain) {
  start();
  uint32_t big = VirtioConsole::kMaxBytesPerChain + 100;
  ChainBuilder(*tx_).raw(kBigBuffers, big, false).build();
  transmit_notify();
  EXPECT_EQ(tx_->used_idx(), 1);
  EXPECT_EQ(output_.size(), VirtioConsole::kMaxBytesPerChain);
}

TEST_F(ConsoleTest, BoundsTheOutputOfOneRoundAndResumesOnTheLoop) {
  start();
  constexpr uint32_t kChains =
      2 * VirtioConsole::kMaxOutputBytesPerRound / VirtioConsole::kMaxBytesPerChain;
  for (uint32_t i = 0; i < kChains; ++i) {
    ChainBuilder(*tx_).raw(kBigBuffers + i * uint64_t{VirtioConsole::kMaxBytesPerChain},
                           VirtioConsole::kMaxBytesPerChain, false).build();
  }
  transmit_notify();
  EXPECT_EQ(tx_->used_idx(), kChains / 2);
  EXPECT_TRUE(console_->output_deferred());
  EXPECT_EQ(tx_->used_flags() & kUsedFlagNoNotify, kUsedFlagNoNotify);
  transmit_notify();  // owed to the loop: no work here
  EXPECT_EQ(tx_->used_idx(), kChains / 2);
  run_loop();
  EXPECT_EQ(tx_->used_idx(), kChains);
  EXPECT_FALSE(console_->output_deferred());
  EXPECT_EQ(tx_->used_flags() & kUsedFlagNoNotify, 0);
  EXPECT_EQ(output_.size(), uint64_t{kChains} * VirtioConsole::kMaxBytesPerChain);
}

TEST_F(ConsoleTest, InputBeforeTheDriverIsReadyIsDeliveredLater) {
  console_->enqueue_input(as_bytes("typed early\n"));
  EXPECT_EQ(console_->pending_input_bytes(), 12u);
  start();
  run_loop();  // no receive buffers yet: it waits
  EXPECT_EQ(console_->pending_input_bytes(), 12u);
  auto built = ChainBuilder(*rx_).writable(64).build();
  console_->notify(VirtioConsole::kReceiveQueue);
  ASSERT_EQ(rx_->used_idx(), 1);
  EXPECT_EQ(rx_->used_elem(0).id, built.head);
  EXPECT_EQ(rx_->used_elem(0).len, 12u);
  EXPECT_EQ(as_text(rx_->bytes(built.buffers[0], 12)), "typed early\n");
  EXPECT_EQ(console_->pending_input_bytes(), 0u);
  EXPECT_EQ(interrupt_->queue_notifications(VirtioConsole::kReceiveQueue), 1);
}

TEST_F(ConsoleTest, InputSpreadsOverSeveralReceiveBuffers) {
  start();
  auto a = ChainBuilder(*rx_).writable(4).build();
  auto b = ChainBuilder(*rx_).writable(2).writable(3).build();
  console_->enqueue_input(as_bytes("0123456789AB"));
  run_loop();
  ASSERT_EQ(rx_->used_idx(), 2);
  EXPECT_EQ(rx_->used_elem(0).len, 4u);
  EXPECT_EQ(rx_->used_elem(1).len, 5u);
  EXPECT_EQ(as_text(rx_->bytes(a.buffers[0], 4)), "0123");
  EXPECT_EQ(as_text(rx_->bytes(b.buffers[0], 2)), "45");
  EXPECT_EQ(as_text(rx_->bytes(b.buffers[1], 3)), "678");
  EXPECT_EQ(console_->pending_input_bytes(), 3u);
  auto c = ChainBuilder(*rx_).writable(16).build();
  console_->notify(VirtioConsole::kReceiveQueue);
  ASSERT_EQ(rx_->used_idx(), 3);
  EXPECT_EQ(rx_->used_elem(2).len, 3u);
  EXPECT_EQ(as_text(rx_->bytes(c.buffers[0], 3)), "9AB");
  // With nothing pending, a posted buffer stays with the device.
  ChainBuilder(*rx_).writable(16).build();
  console_->notify(VirtioConsole::kReceiveQueue);
  EXPECT_EQ(rx_->used_idx(), 3);
}

TEST_F(ConsoleTest, PendingInputIsBoundedAndTheExcessDropped) {
  std::vector<std::byte> flood(VirtioConsole::kMaxPendingInputBytes + 100, std::byte{'x'});
  console_->enqueue_input(flood);
  EXPECT_EQ(console_->pending_input_bytes(), VirtioConsole::kMaxPendingInputBytes);
  EXPECT_EQ(console_->dropped_input_bytes(), 100u);
  console_->enqueue_input(as_bytes("more"));
  EXPECT_EQ(console_->dropped_input_bytes(), 104u);
}

TEST_F(ConsoleTest, InputFromAnotherThreadArrivesInOrder) {
  start();
  // Enough buffers for one delivery per enqueue, however they interleave.
  for (int i = 0; i < VirtioConsole::kQueueSize; ++i) ChainBuilder(*rx_).writable(512).build();
  // The loop delivers while another thread types, as keel-vmm's main does.
  std::thread producer([this] {
    for (int i = 0; i < 100; ++i) console_->enqueue_input(as_bytes("abcdefghij"));
  });
  auto delivered = [this] {
    uint32_t total = 0;
    for (uint16_t i = 0; i < rx_->used_idx(); ++i) total += rx_->used_elem(i).len;
    return total;
  };
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (delivered() < 1000 && std::chrono::steady_clock::now() < deadline) {
    ASSERT_TRUE(loop_->run_once(10).has_value());
  }
  producer.join();
  EXPECT_EQ(delivered(), 1000u);
  EXPECT_EQ(console_->pending_input_bytes(), 0u);
  // In order, whatever the interleaving: the pattern runs on across buffers.
  std::string received;
  for (uint16_t i = 0; i < rx_->used_idx(); ++i) {
    received += as_text(rx_->bytes(GuestAddr(FakeVirtqueue::kDataStart + 512ull * i),
                                   rx_->used_elem(i).len));
  }
  std::string expected;
  for (int i = 0; i < 100; ++i) expected += "abcdefghij";
  EXPECT_EQ(received, expected);
}

TEST_F(ConsoleTest, PendingInputSurvivesAReset) {
  start();
  console_->enqueue_input(as_bytes("keep"));
  console_->reset();
  run_loop();
  EXPECT_EQ(console_->pending_input_bytes(), 4u);
  rx_.emplace(memory_, VirtioConsole::kQueueSize);
  tx_.emplace(tx_memory_, VirtioConsole::kQueueSize);
  auto built = ChainBuilder(*rx_).writable(8).build();
  activate();
  run_loop();  // activate() wakes the loop for the pending bytes
  ASSERT_EQ(rx_->used_idx(), 1);
  EXPECT_EQ(as_text(rx_->bytes(built.buffers[0], 4)), "keep");
}

// Snapshots: the queues and the input not yet delivered; a console
// restored from them delivers that input into the guest's next buffer.
TEST_F(ConsoleTest, SaveRestoreKeepsQueuesAndPendingInput) {
  start();
  ChainBuilder(*tx_).readable(as_bytes("out")).build();
  transmit_notify();
  console_->enqueue_input(as_bytes("typed"));
  run_loop();
  Result<VirtioDeviceState> saved = console_->save_state();
  ASSERT_TRUE(saved) << saved.error().message();
  ASSERT_EQ(saved->queues.size(), 2u);
  EXPECT_EQ(saved->queues[VirtioConsole::kTransmitQueue]->last_avail_idx, 1);
  EXPECT_EQ(saved->queues[VirtioConsole::kReceiveQueue]->last_avail_idx, 0);
  EXPECT_EQ(as_text(saved->extra), "typed");
  console_->reset();

  auto restored = VirtioConsole::create([](std::span<const std::byte>) {});
  ASSERT_TRUE(restored);
  auto context = [&] {
    ActivateContext c;
    c.memory = &tx_memory_;
    c.queues.emplace_back(std::move(
        *Virtqueue::restore(memory_, *saved->queues[VirtioConsole::kReceiveQueue])));
    c.queues.emplace_back(std::move(
        *Virtqueue::restore(tx_memory_, *saved->queues[VirtioConsole::kTransmitQueue])));
    c.interrupt = interrupt_;
    c.event_loop = loop_.get();
    return c;
  };
  std::vector<std::byte> flood(VirtioConsole::kMaxPendingInputBytes + 1);
  Result<void> too_much = (*restored)->restore_state(context(), flood);
  ASSERT_FALSE(too_much);
  EXPECT_EQ(too_much.error().code(), Errc::Corrupt);
  ASSERT_TRUE((*restored)->restore_state(context(), saved->extra));
  console_ = std::move(*restored);
  auto built = ChainBuilder(*rx_).writable(16).build();
  console_->notify(VirtioConsole::kReceiveQueue);
  run_loop();
  ASSERT_EQ(rx_->used_idx(), 1);
  EXPECT_EQ(as_text(rx_->bytes(built.buffers[0], 5)), "typed");
  Result<VirtioDeviceState> again = console_->save_state();
  ASSERT_TRUE(again);
  EXPECT_EQ(again->queues[VirtioConsole::kTransmitQueue],
            saved->queues[VirtioConsole::kTransmitQueue]);
}

TEST_F(ConsoleTest, ReadableReceiveBufferNeedsReset) {
  start();
  ChainBuilder(*rx_).readable(pattern(4)).writable(8).build();
  console_->enqueue_input(as_bytes("x"));
  run_loop();
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(rx_->used_idx(), 0);
  // Broken: the transmitq is not served either, until reset.
  ChainBuilder(*tx_).readable(as_bytes("lost")).build();
  transmit_notify();
  EXPECT_EQ(tx_->used_idx(), 0);
  EXPECT_TRUE(output_.empty());
}

TEST_F(ConsoleTest, WritableTransmitBufferNeedsReset) {
  start();
  ChainBuilder(*tx_).readable(as_bytes("ab")).writable(8).build();
  transmit_notify();
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(tx_->used_idx(), 0);
  EXPECT_TRUE(output_.empty());
}

TEST_F(ConsoleTest, OutOfRangeBuffersNeedReset) {
  start();
  ChainBuilder(*rx_).raw(memory_.size_bytes() - 4, 64, true).build();
  console_->enqueue_input(as_bytes("x"));
  run_loop();
  EXPECT_EQ(interrupt_->resets(), 1);
  console_->reset();
  start();
  ChainBuilder(*tx_).raw(tx_memory_.size_bytes() + 0x1000, 8, false).build();
  transmit_notify();
  EXPECT_EQ(interrupt_->resets(), 2);
  EXPECT_TRUE(output_.empty());
}

TEST_F(ConsoleTest, ZeroLengthReceiveBufferTakesNothing) {
  start();
  ChainBuilder(*rx_).raw(FakeVirtqueue::kDataStart, 0, true).build();
  auto built = ChainBuilder(*rx_).writable(8).build();
  console_->enqueue_input(as_bytes("hi"));
  run_loop();
  ASSERT_EQ(rx_->used_idx(), 2);
  EXPECT_EQ(rx_->used_elem(0).len, 0u);
  EXPECT_EQ(rx_->used_elem(1).len, 2u);
  EXPECT_EQ(as_text(rx_->bytes(built.buffers[0], 2)), "hi");
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(ConsoleTest, OutputPostedBeforeActivationIsServedFromTheLoop) {
  rx_.emplace(memory_, VirtioConsole::kQueueSize);
  tx_.emplace(tx_memory_, VirtioConsole::kQueueSize);
  // hvc's put_chars spins until its buffer comes back: a kick lost before
  // DRIVER_OK must not leave it there.
  ChainBuilder(*tx_).readable(as_bytes("early")).build();
  activate();
  run_loop();
  EXPECT_EQ(tx_->used_idx(), 1);
  EXPECT_EQ(as_text(output_), "early");
}

TEST_F(ConsoleTest, UnknownQueueIndexIsIgnored) {
  start();
  ChainBuilder(*tx_).readable(as_bytes("x")).build();
  console_->notify(2);
  EXPECT_EQ(tx_->used_idx(), 0);
  EXPECT_TRUE(output_.empty());
}

TEST_F(ConsoleTest, ResetStopsWorkAndActivateStartsAgain) {
  start();
  console_->reset();
  ChainBuilder(*tx_).readable(as_bytes("after reset")).build();
  transmit_notify();
  EXPECT_TRUE(output_.empty());
  rx_.emplace(memory_, VirtioConsole::kQueueSize);
  tx_.emplace(tx_memory_, VirtioConsole::kQueueSize);
  activate();
  ChainBuilder(*tx_).readable(as_bytes("again")).build();
  transmit_notify();
  EXPECT_EQ(as_text(output_), "again");
  EXPECT_FALSE(console_->activate(ActivateContext{}).has_value());
}

}  // namespace
}  // namespace keel::devices::virtio
