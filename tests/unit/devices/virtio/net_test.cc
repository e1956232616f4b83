// virtio-net tests. Spec: virtio 1.2 §5.1 (§5.1.4 config, §5.1.6 packets).
// The backend is a SOCK_SEQPACKET socketpair standing in for the tap (one
// frame per message, the 12-byte header first), so every case runs
// anywhere; NetOnTapTest repeats the data paths on a real tap inside a
// private network namespace. Covered: features, config space, offloads
// handed to the backend, TX (header copied and checked, batching, the
// per-wakeup bound, backpressure), RX (one buffer, merged buffers and
// num_buffers, no buffers then buffers, a frame too big for the buffer,
// the per-wakeup bound), link loss, reset and re-activation, and hostile
// chains (each dropped and counted, or needs_reset, never a crash).
#include "devices/virtio/net.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <map>
#include <cstring>
#include <optional>

#include <gtest/gtest.h>

#include "base/event_loop.h"
#include "fake_interrupt.h"
#include "fake_virtqueue.h"
#include "net/net_namespace.h"
#include "net/tap.h"

namespace keel::devices::virtio {
namespace {

using testing::ChainBuilder;
using testing::FakeInterrupt;
using testing::FakeVirtqueue;
using testing::make_test_memory;
using testing::pattern;

constexpr uint64_t kHdr = net::kVnetHeaderBytes;
constexpr uint64_t kAllNetFeatures =
    kNetFeatureCsum | kNetFeatureGuestCsum | kNetFeatureMtu | kNetFeatureMac |
    kNetFeatureGuestTso4 | kNetFeatureGuestTso6 | kNetFeatureGuestEcn | kNetFeatureHostTso4 |
    kNetFeatureHostTso6 | kNetFeatureHostEcn | kNetFeatureMrgRxbuf | kNetFeatureStatus;
// What a driver that does not merge buffers accepts.
constexpr uint64_t kNoMerge = kAllNetFeatures & ~kNetFeatureMrgRxbuf;
constexpr uint16_t kEtherType = 0x88b5;

// A backend over one end of a socketpair; the test holds the other end.
class SocketBackend : public net::NetBackend {
 public:
  explicit SocketBackend(Fd end) : end_(std::move(end)) {}
  int fd() const override { return end_.get(); }
  Result<void> set_offloads(const net::Offloads& offloads) override {
    offloads_ = offloads;
    ++offload_calls_;
    return ok();
  }
  std::string_view name() const override { return "socketpair"; }
  net::Offloads offloads_;
  int offload_calls_ = 0;

 private:
  Fd end_;
};

std::vector<std::byte> header_bytes(NetHeader header) {
  auto bytes = std::as_bytes(std::span(&header, 1));
  return {bytes.begin(), bytes.end()};
}

std::vector<std::byte> ethernet_frame(size_t payload_bytes, uint8_t seed = 1) {
  std::vector<std::byte> frame(14);
  for (size_t i = 0; i < 6; ++i) frame[i] = std::byte{0xff};
  const uint8_t source[6] = {0x52, 0x54, 0x00, 0x01, 0x02, seed};
  std::memcpy(frame.data() + 6, source, 6);
  frame[12] = std::byte{kEtherType >> 8};
  frame[13] = std::byte{kEtherType & 0xff};
  auto payload = pattern(payload_bytes, seed);
  frame.insert(frame.end(), payload.begin(), payload.end());
  return frame;
}

std::vector<std::byte> concat(std::vector<std::byte> a, const std::vector<std::byte>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

NetHeader header_at(const std::vector<std::byte>& bytes) {
  NetHeader header;
  std::memcpy(&header, bytes.data(), sizeof(header));
  return header;
}

class NetTest : public ::testing::Test {
 protected:
  void SetUp() override { loop_ = std::move(*EventLoop::create()); }
  void TearDown() override {
    if (net_) net_->reset();
  }

  void make_device(std::unique_ptr<net::NetBackend> backend) {
    NetDeviceConfig config;
    config.mac = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
    config.mtu = 9000;
    auto net = Net::create(std::move(backend), config);
    ASSERT_TRUE(net.has_value()) << net.error().message();
    net_ = std::move(*net);
  }

  void make_socket_device() {
    int fds[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds), 0);
    host_ = Fd(fds[0]);
    auto backend = std::make_unique<SocketBackend>(Fd(fds[1]));
    backend_ = backend.get();
    make_device(std::move(backend));
  }

  // FakeVirtqueue lays one queue out per memory, so rx and tx live in two;
  // the device reaches tx data through the context's memory, tx's.
  void activate(uint64_t features, uint64_t queue_features = 0) {
    // Fresh rings each time: a re-activated device must not see the last
    // driver's indices.
    std::vector<std::byte> zeros(FakeVirtqueue::kDataStart);
    ASSERT_TRUE(rx_memory_.write(GuestAddr(0), zeros).has_value());
    ASSERT_TRUE(tx_memory_.write(GuestAddr(0), zeros).has_value());
    rx_.emplace(rx_memory_, Net::kQueueSize, queue_features);
    tx_.emplace(tx_memory_, Net::kQueueSize, queue_features);
    auto rx = Virtqueue::create(rx_memory_, rx_->config());
    auto tx = Virtqueue::create(tx_memory_, tx_->config());
    ASSERT_TRUE(rx.has_value() && tx.has_value());
    ActivateContext context;
    context.memory = &tx_memory_;
    context.features = features;
    context.queues.emplace_back(std::move(*rx));
    context.queues.emplace_back(std::move(*tx));
    context.interrupt = interrupt_;
    context.event_loop = loop_.get();
    auto activated = net_->activate(std::move(context));
    ASSERT_TRUE(activated.has_value()) << activated.error().message();
  }

  void start(uint64_t features = kAllNetFeatures, uint64_t queue_features = 0) {
    make_socket_device();
    activate(features, queue_features);
  }

  // Runs ready callbacks until none is ready.
  void run_loop() {
    for (int i = 0; i < 1000; ++i) {
      auto ran = loop_->run_once(0);
      ASSERT_TRUE(ran.has_value());
      if (*ran == 0) return;
    }
    FAIL() << "the event loop never went idle";
  }

  void host_send(const std::vector<std::byte>& message) {
    ASSERT_EQ(::send(host_.get(), message.data(), message.size(), 0),
              static_cast<ssize_t>(message.size()))
        << std::strerror(errno);
  }
  // A frame as the tap hands it over: a plain header, then the frame.
  void host_send_frame(const std::vector<std::byte>& frame, NetHeader header = {}) {
    host_send(concat(header_bytes(header), frame));
  }
  std::optional<std::vector<std::byte>> host_recv() {
    std::vector<std::byte> buffer(70000);
    ssize_t got = ::recv(host_.get(), buffer.data(), buffer.size(), 0);
    if (got < 0) return std::nullopt;
    buffer.resize(static_cast<size_t>(got));
    return buffer;
  }

  ChainBuilder::Built post_rx(uint32_t len) {
    ChainBuilder chain(*rx_);
    chain.writable(len);
    return chain.build();
  }
  ChainBuilder::Built send_tx(const std::vector<std::byte>& frame, NetHeader header = {}) {
    ChainBuilder chain(*tx_);
    chain.readable(header_bytes(header)).readable(frame);
    return chain.build();
  }

  GuestMemory rx_memory_ = make_test_memory(4 << 20);
  GuestMemory tx_memory_ = make_test_memory(4 << 20);
  std::optional<FakeVirtqueue> rx_;
  std::optional<FakeVirtqueue> tx_;
  std::shared_ptr<FakeInterrupt> interrupt_ = std::make_shared<FakeInterrupt>();
  std::unique_ptr<EventLoop> loop_;
  Fd host_;
  SocketBackend* backend_ = nullptr;
  std::unique_ptr<Net> net_;
};

TEST_F(NetTest, FeaturesAndConfigSpace) {
  make_socket_device();
  EXPECT_EQ(net_->type(), DeviceType::Net);
  EXPECT_EQ(net_->name(), "virtio-net");
  EXPECT_EQ(net_->features(), kAllNetFeatures);
  EXPECT_EQ(net_->queue_max_sizes(), (std::vector<uint16_t>{256, 256}));
  ASSERT_EQ(net_->config_size_bytes(), sizeof(NetConfigSpace));
  NetConfigSpace config{};
  net_->read_config(0, std::as_writable_bytes(std::span(&config, 1)));
  EXPECT_EQ(std::vector<uint8_t>(config.mac, config.mac + 6),
            (std::vector<uint8_t>{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}));
  EXPECT_EQ(config.status, kNetStatusLinkUp);
  EXPECT_EQ(config.max_virtqueue_pairs, 1);
  EXPECT_EQ(config.mtu, 9000);
  EXPECT_EQ(config.speed, 0u);
  // A partial read at an offset, as a driver reading one field does.
  uint16_t mtu = 0;
  net_->read_config(offsetof(NetConfigSpace, mtu), std::as_writable_bytes(std::span(&mtu, 1)));
  EXPECT_EQ(mtu, 9000);
  // The MAC is read-only (§5.1.4): writes change nothing.
  std::array<std::byte, 6> other{};
  net_->write_config(0, other);
  net_->read_config(0, std::as_writable_bytes(std::span(&config, 1)));
  EXPECT_EQ(config.mac[5], 0x56);
}

TEST_F(NetTest, CreateRefusesABadMtuOrMulticastMac) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK, 0, fds), 0);
  auto small = Net::create(std::make_unique<SocketBackend>(Fd(fds[0])),
                           NetDeviceConfig{.mac = {0x52, 0, 0, 0, 0, 1}, .mtu = 67});
  EXPECT_FALSE(small.has_value());
  auto multicast = Net::create(std::make_unique<SocketBackend>(Fd(fds[1])),
                               NetDeviceConfig{.mac = {0x01, 0, 0x5e, 0, 0, 1}, .mtu = 1500});
  EXPECT_FALSE(multicast.has_value());
  EXPECT_FALSE(Net::create(nullptr, NetDeviceConfig{}).has_value());
}

TEST_F(NetTest, OffloadsFollowWhatTheDriverAcceptedAndResetClearsThem) {
  make_socket_device();
  activate(kNetFeatureGuestCsum | kNetFeatureGuestTso4 | kNetFeatureMrgRxbuf);
  EXPECT_EQ(backend_->offloads_, (net::Offloads{.csum = true, .tso4 = true}));
  net_->reset();
  EXPECT_EQ(backend_->offloads_, net::Offloads{});
  activate(kAllNetFeatures);
  EXPECT_EQ(backend_->offloads_,
            (net::Offloads{.csum = true, .tso4 = true, .tso6 = true, .tso_ecn = true}));
}

TEST_F(NetTest, ActivateTwiceOrWithoutQueuesFails) {
  start();
  ActivateContext again;
  EXPECT_FALSE(net_->activate(std::move(again)).has_value());
  net_->reset();
  ActivateContext empty;
  empty.memory = &tx_memory_;
  empty.interrupt = interrupt_;
  empty.event_loop = loop_.get();
  EXPECT_FALSE(net_->activate(std::move(empty)).has_value());
}

// --- transmit -----------------------------------------------------------------

TEST_F(NetTest, TxSendsTheHeaderAndFrameAsOneMessage) {
  start();
  auto frame = ethernet_frame(1000);
  NetHeader header{.flags = kNetHdrFlagNeedsCsum, .csum_start = 34, .csum_offset = 16};
  auto built = send_tx(frame, header);
  net_->notify(Net::kTxQueue);
  auto sent = host_recv();
  ASSERT_TRUE(sent.has_value());
  EXPECT_EQ(*sent, concat(header_bytes(header), frame));
  ASSERT_EQ(tx_->used_idx(), 1);
  EXPECT_EQ(tx_->used_elem(0).id, built.head);
  EXPECT_EQ(tx_->used_elem(0).len, 0u);  // the device writes nothing into a tx chain
  EXPECT_EQ(interrupt_->queue_notifications(Net::kTxQueue), 1);
  EXPECT_EQ(net_->stats().tx_frames, 1u);
  EXPECT_EQ(net_->stats().tx_bytes, frame.size());
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(NetTest, TxHeaderSplitOverDescriptorsAndIndirect) {
  start(kAllNetFeatures, kFeatureIndirectDesc);
  auto frame = ethernet_frame(300);
  auto bytes = concat(header_bytes(NetHeader{}), frame);
  ChainBuilder chain(*tx_);
  // 5 + 10 + the rest: the header straddles two descriptors.
  chain.readable(std::span(bytes).first(5))
      .readable(std::span(bytes).subspan(5, 10))
      .readable(std::span(bytes).subspan(15));
  chain.build_indirect();
  net_->notify(Net::kTxQueue);
  auto sent = host_recv();
  ASSERT_TRUE(sent.has_value());
  EXPECT_EQ(*sent, bytes);
}

TEST_F(NetTest, TxCleansTheFlagsAndNumBuffersTheDriverMustNotSet) {
  start();
  auto frame = ethernet_frame(64);
  send_tx(frame, NetHeader{.flags = kNetHdrFlagDataValid | 4, .num_buffers = 7});
  net_->notify(Net::kTxQueue);
  auto sent = host_recv();
  ASSERT_TRUE(sent.has_value());
  EXPECT_EQ(header_at(*sent).flags, 0);
  EXPECT_EQ(header_at(*sent).num_buffers, 0);
}

TEST_F(NetTest, TxBatchesOneInterruptPerNotification) {
  start();
  for (int i = 0; i < 10; ++i) send_tx(ethernet_frame(100, static_cast<uint8_t>(i)));
  net_->notify(Net::kTxQueue);
  EXPECT_EQ(tx_->used_idx(), 10);
  EXPECT_EQ(interrupt_->queue_notifications(Net::kTxQueue), 1);
  for (int i = 0; i < 10; ++i) {
    auto sent = host_recv();
    ASSERT_TRUE(sent.has_value());
    EXPECT_EQ(*sent, concat(header_bytes({}), ethernet_frame(100, static_cast<uint8_t>(i))));
  }
}

TEST_F(NetTest, TxHandlesABoundedBatchPerWakeupAndComesBackForTheRest) {
  start();
  const int count = Net::kFramesPerWakeup + 20;
  for (int i = 0; i < count; ++i) send_tx(ethernet_frame(50, static_cast<uint8_t>(i)));
  net_->notify(Net::kTxQueue);
  EXPECT_EQ(tx_->used_idx(), Net::kFramesPerWakeup);
  run_loop();  // the device's own wakeup, without another notification
  EXPECT_EQ(tx_->used_idx(), count);
  EXPECT_EQ(net_->stats().tx_frames, static_cast<uint64_t>(count));
}

TEST_F(NetTest, TxWaitsForTheBackendWhenItIsFull) {
  start();
  // A small send buffer fills after a few frames.
  int small = 4096;
  ASSERT_EQ(::setsockopt(backend_->fd(), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)), 0);
  const int count = 40;
  for (int i = 0; i < count; ++i) send_tx(ethernet_frame(1400, static_cast<uint8_t>(i)));
  net_->notify(Net::kTxQueue);
  const uint16_t first = tx_->used_idx();
  EXPECT_GT(first, 0);
  EXPECT_LT(first, count);
  EXPECT_TRUE(net_->watching_output());
  // Another notification does not spin on the full backend.
  net_->notify(Net::kTxQueue);
  EXPECT_EQ(tx_->used_idx(), first);

  // The host drains; EPOLLOUT resumes, in order, nothing lost.
  int received = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (received < count && std::chrono::steady_clock::now() < deadline) {
    while (auto sent = host_recv()) {
      EXPECT_EQ(*sent, concat(header_bytes({}), ethernet_frame(1400, static_cast<uint8_t>(received))))
          << "frame " << received;
      ++received;
    }
    ASSERT_TRUE(loop_->run_once(10).has_value());
  }
  EXPECT_EQ(received, count);
  EXPECT_EQ(tx_->used_idx(), count);
  EXPECT_FALSE(net_->watching_output());
  EXPECT_EQ(net_->stats().tx_dropped, 0u);
}

TEST_F(NetTest, TxDropsHostileChainsAndCarriesOn) {
  start(kNoMerge & ~(kNetFeatureHostTso4 | kNetFeatureCsum));
  auto frame = ethernet_frame(100);
  // Shorter than the header.
  ChainBuilder short_header(*tx_);
  short_header.readable(pattern(8));
  short_header.build();
  // A header and no Ethernet header.
  ChainBuilder header_only(*tx_);
  header_only.readable(header_bytes({}));
  header_only.build();
  // A device-writable descriptor in a tx chain.
  ChainBuilder writable(*tx_);
  writable.readable(header_bytes({})).readable(frame).writable(64);
  writable.build();
  // Longer than any frame.
  ChainBuilder too_long(*tx_);
  too_long.readable(header_bytes({})).readable(Net::kMaxFrameBytes + 1);
  too_long.build();
  // GSO the driver did not negotiate (HOST_TSO4 off), and NEEDS_CSUM without CSUM.
  send_tx(frame, NetHeader{.gso_type = kNetHdrGsoTcpv4, .gso_size = 1448});
  send_tx(frame, NetHeader{.flags = kNetHdrFlagNeedsCsum});
  // ECN without a GSO type, and UDP fragmentation, never offered.
  send_tx(frame, NetHeader{.gso_type = kNetHdrGsoEcn});
  send_tx(frame, NetHeader{.gso_type = kNetHdrGsoUdp});
  // Then a good one.
  send_tx(frame);
  net_->notify(Net::kTxQueue);
  ASSERT_EQ(tx_->used_idx(), 9);
  for (uint16_t i = 0; i < 9; ++i) EXPECT_EQ(tx_->used_elem(i).len, 0u);
  EXPECT_EQ(net_->stats().tx_dropped, 8u);
  EXPECT_EQ(net_->stats().tx_frames, 1u);
  auto sent = host_recv();
  ASSERT_TRUE(sent.has_value());
  EXPECT_EQ(*sent, concat(header_bytes({}), frame));
  EXPECT_FALSE(host_recv().has_value());
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(NetTest, TxZeroLengthDescriptorsAreSkipped) {
  start();
  auto frame = ethernet_frame(100);
  ChainBuilder chain(*tx_);
  chain.readable(header_bytes({})).raw(0x3000'0, 0, false).readable(frame);
  chain.build();
  ChainBuilder only_empty(*tx_);
  only_empty.raw(0x4000, 0, false);
  only_empty.build();
  net_->notify(Net::kTxQueue);
  ASSERT_EQ(tx_->used_idx(), 2);
  auto sent = host_recv();
  ASSERT_TRUE(sent.has_value());
  EXPECT_EQ(*sent, concat(header_bytes({}), frame));
  EXPECT_EQ(net_->stats().tx_dropped, 1u);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(NetTest, TxOutOfRangeDescriptorNeedsReset) {
  start();
  ChainBuilder chain(*tx_);
  chain.readable(header_bytes({})).raw(0x7000'0000, 100, false);
  chain.build();
  net_->notify(Net::kTxQueue);
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_FALSE(host_recv().has_value());
  // A broken device ignores further notifications until reset.
  send_tx(ethernet_frame(100));
  net_->notify(Net::kTxQueue);
  EXPECT_EQ(tx_->used_idx(), 0);
  EXPECT_EQ(interrupt_->resets(), 1);
}

// --- receive -------------------------------------------------------------------

TEST_F(NetTest, RxFrameIntoOneBuffer) {
  start(kNoMerge);
  auto built = post_rx(kHdr + 1514);
  net_->notify(Net::kRxQueue);
  auto frame = ethernet_frame(1000);
  host_send_frame(frame, NetHeader{.flags = kNetHdrFlagDataValid});
  run_loop();
  ASSERT_EQ(rx_->used_idx(), 1);
  EXPECT_EQ(rx_->used_elem(0).id, built.head);
  ASSERT_EQ(rx_->used_elem(0).len, kHdr + frame.size());
  auto bytes = rx_->bytes(built.buffers[0], kHdr + frame.size());
  EXPECT_EQ(header_at(bytes).num_buffers, 1);  // §5.1.6.4: 1 without MRG_RXBUF
  EXPECT_EQ(header_at(bytes).flags, kNetHdrFlagDataValid);
  EXPECT_EQ(std::vector<std::byte>(bytes.begin() + kHdr, bytes.end()), frame);
  EXPECT_EQ(interrupt_->queue_notifications(Net::kRxQueue), 1);
  EXPECT_EQ(net_->stats().rx_frames, 1u);
  EXPECT_EQ(net_->stats().rx_bytes, frame.size());
}

TEST_F(NetTest, RxMergesBuffersAndSetsNumBuffers) {
  start(kAllNetFeatures);
  std::vector<ChainBuilder::Built> posted;
  for (int i = 0; i < 4; ++i) posted.push_back(post_rx(1536));
  auto frame = ethernet_frame(4000);
  host_send_frame(frame);
  run_loop();
  const size_t total = kHdr + frame.size();  // 4026: three buffers
  ASSERT_EQ(rx_->used_idx(), 3);
  std::vector<std::byte> gathered;
  for (uint16_t i = 0; i < 3; ++i) {
    VirtqUsedElem used = rx_->used_elem(i);
    EXPECT_EQ(used.id, posted[i].head);
    uint32_t want = i < 2 ? 1536 : static_cast<uint32_t>(total - 2 * 1536);
    EXPECT_EQ(used.len, want);
    auto part = rx_->bytes(posted[i].buffers[0], used.len);
    gathered.insert(gathered.end(), part.begin(), part.end());
  }
  EXPECT_EQ(header_at(gathered).num_buffers, 3);
  EXPECT_EQ(std::vector<std::byte>(gathered.begin() + kHdr, gathered.end()), frame);
  EXPECT_EQ(interrupt_->queue_notifications(Net::kRxQueue), 1);

  // The fourth buffer takes the next frame alone.
  auto small = ethernet_frame(60, 3);
  host_send_frame(small);
  run_loop();
  ASSERT_EQ(rx_->used_idx(), 4);
  EXPECT_EQ(rx_->used_elem(3).id, posted[3].head);
  EXPECT_EQ(header_at(rx_->bytes(posted[3].buffers[0], kHdr)).num_buffers, 1);
}

TEST_F(NetTest, RxA64KiBTsoFrameOverMergedBuffers) {
  start(kAllNetFeatures);
  std::vector<ChainBuilder::Built> posted;
  for (int i = 0; i < 48; ++i) posted.push_back(post_rx(1536));
  auto frame = ethernet_frame(65535 - 14);
  host_send_frame(frame, NetHeader{.flags = kNetHdrFlagNeedsCsum,
                                   .gso_type = kNetHdrGsoTcpv4,
                                   .hdr_len = 54,
                                   .gso_size = 1448,
                                   .csum_start = 34,
                                   .csum_offset = 16});
  run_loop();
  const size_t total = kHdr + frame.size();
  const auto buffers = static_cast<uint16_t>((total + 1535) / 1536);
  ASSERT_EQ(rx_->used_idx(), buffers);
  std::vector<std::byte> whole;
  for (uint16_t i = 0; i < buffers; ++i) {
    VirtqUsedElem used = rx_->used_elem(i);
    ASSERT_EQ(used.id, posted[i].head);
    auto part = rx_->bytes(posted[i].buffers[0], used.len);
    whole.insert(whole.end(), part.begin(), part.end());
  }
  ASSERT_EQ(whole.size(), total);
  NetHeader header = header_at(whole);
  EXPECT_EQ(header.num_buffers, buffers);
  EXPECT_EQ(header.gso_type, kNetHdrGsoTcpv4);
  EXPECT_EQ(header.gso_size, 1448);
  EXPECT_EQ(header.flags, kNetHdrFlagNeedsCsum);
  EXPECT_EQ(std::vector<std::byte>(whole.begin() + kHdr, whole.end()), frame);
  EXPECT_EQ(net_->stats().rx_frames, 1u);
  EXPECT_EQ(net_->stats().rx_dropped, 0u);
}

TEST_F(NetTest, RxWithoutBuffersStopsWatchingAndResumesOnNotify) {
  start(kNoMerge);
  auto frame = ethernet_frame(500);
  host_send_frame(frame);
  run_loop();
  // No buffer: the frame stays in the backend and the device stops looking.
  EXPECT_EQ(rx_->used_idx(), 0);
  EXPECT_FALSE(net_->watching_input());
  EXPECT_EQ(rx_->used_flags(), 0);  // driver notifications on (§2.7.10)
  EXPECT_EQ(net_->stats().rx_dropped, 0u);
  // The loop does not spin on the readable backend.
  auto ran = loop_->run_once(0);
  ASSERT_TRUE(ran.has_value());
  EXPECT_EQ(*ran, 0);

  auto built = post_rx(2048);
  post_rx(2048);
  net_->notify(Net::kRxQueue);
  ASSERT_EQ(rx_->used_idx(), 1);
  EXPECT_EQ(rx_->bytes(built.buffers[0] + kHdr, frame.size()), frame);
  EXPECT_EQ(net_->stats().rx_dropped, 0u);
  // With a buffer left, the device watches the backend again and asks the
  // driver not to notify (§2.7.10).
  EXPECT_TRUE(net_->watching_input());
  EXPECT_EQ(rx_->used_flags(), kUsedFlagNoNotify);
  // That buffer used too, it waits for the driver once more.
  host_send_frame(ethernet_frame(100, 2));
  run_loop();
  EXPECT_EQ(rx_->used_idx(), 2);
  EXPECT_FALSE(net_->watching_input());
  EXPECT_EQ(rx_->used_flags(), 0);
}

TEST_F(NetTest, RxWithEventIdxAsksForTheNextBufferNotification) {
  start(kNoMerge, kFeatureEventIdx);
  post_rx(2048);
  host_send_frame(ethernet_frame(100));
  host_send_frame(ethernet_frame(100, 2));
  run_loop();
  ASSERT_EQ(rx_->used_idx(), 1);
  EXPECT_FALSE(net_->watching_input());
  EXPECT_EQ(rx_->avail_event(), rx_->avail_idx());  // notify when the next one comes
  post_rx(2048);
  net_->notify(Net::kRxQueue);
  EXPECT_EQ(rx_->used_idx(), 2);
}

TEST_F(NetTest, RxAMergedFrameWaitsForEnoughBuffers) {
  start(kAllNetFeatures);
  auto first = post_rx(1536);
  auto frame = ethernet_frame(4000);
  host_send_frame(frame);
  run_loop();
  // One buffer is not enough: it is held, nothing is used yet or dropped.
  EXPECT_EQ(rx_->used_idx(), 0);
  EXPECT_FALSE(net_->watching_input());
  auto second = post_rx(1536);
  auto third = post_rx(2048);
  net_->notify(Net::kRxQueue);
  ASSERT_EQ(rx_->used_idx(), 3);
  EXPECT_EQ(rx_->used_elem(0).id, first.head);
  EXPECT_EQ(rx_->used_elem(1).id, second.head);
  EXPECT_EQ(rx_->used_elem(2).id, third.head);
  EXPECT_EQ(header_at(rx_->bytes(first.buffers[0], kHdr)).num_buffers, 3);
  EXPECT_EQ(net_->stats().rx_dropped, 0u);
  EXPECT_EQ(net_->stats().rx_frames, 1u);
}

// Snapshots: chains the device popped but has not used (rx buffers held
// for a frame, a transmit the backend had no room for) are saved as still
// available, so a restored device pops them again.
TEST_F(NetTest, SavedStateGivesBackHeldChains) {
  start(kAllNetFeatures);
  post_rx(1536);
  host_send_frame(ethernet_frame(4000));
  run_loop();
  ASSERT_EQ(rx_->used_idx(), 0);  // the one buffer is held for the frame
  int small = 4096;
  ASSERT_EQ(::setsockopt(backend_->fd(), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)), 0);
  for (int i = 0; i < 40; ++i) send_tx(ethernet_frame(1400, static_cast<uint8_t>(i)));
  net_->notify(Net::kTxQueue);
  ASSERT_TRUE(net_->watching_output());  // one transmit waits for the backend
  const uint16_t sent = tx_->used_idx();

  Result<VirtioDeviceState> saved = net_->save_state();
  ASSERT_TRUE(saved) << saved.error().message();
  ASSERT_EQ(saved->queues.size(), 2u);
  ASSERT_TRUE(saved->queues[Net::kRxQueue] && saved->queues[Net::kTxQueue]);
  EXPECT_EQ(saved->queues[Net::kRxQueue]->last_avail_idx, 0);
  EXPECT_EQ(saved->queues[Net::kRxQueue]->used_idx, 0);
  EXPECT_EQ(saved->queues[Net::kTxQueue]->last_avail_idx, sent);
  EXPECT_EQ(saved->queues[Net::kTxQueue]->used_idx, sent);
  EXPECT_TRUE(saved->extra.empty());
  // Device bytes are refused: virtio-net keeps none.
  const std::byte stray{0};
  Result<void> refused = net_->restore_state(ActivateContext{}, std::span(&stray, 1));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code(), Errc::Corrupt);
}

// A driver that fills the whole ring with buffers too small for a frame
// even together: waiting for more would stall the NIC for good (none can
// come), so the frame is dropped and the buffers serve the next ones.
TEST_F(NetTest, RxAMergedFrameLargerThanTheWholeRingIsDropped) {
  start(kAllNetFeatures);
  std::vector<ChainBuilder::Built> posted;
  for (uint32_t i = 0; i < Net::kQueueSize; ++i) posted.push_back(post_rx(kHdr + 16));
  host_send_frame(ethernet_frame(60000));
  auto small = ethernet_frame(50);
  host_send_frame(small);
  run_loop();
  EXPECT_EQ(net_->stats().rx_dropped, 1u);
  EXPECT_EQ(net_->stats().rx_frames, 1u);
  // kHdr + 50 bytes over buffers of kHdr + 16: three of them, in order.
  ASSERT_EQ(rx_->used_idx(), 3);
  for (uint16_t i = 0; i < 3; ++i) EXPECT_EQ(rx_->used_elem(i).id, posted[i].head);
  EXPECT_EQ(header_at(rx_->bytes(posted[0].buffers[0], kHdr)).num_buffers, 3);
  EXPECT_EQ(net_->stats().rx_bad_buffers, 0u);
}

TEST_F(NetTest, RxFrameTooBigForAnUnmergedBufferIsDroppedAndCounted) {
  start(kNoMerge);
  auto built = post_rx(kHdr + 100);
  host_send_frame(ethernet_frame(1000));
  auto small = ethernet_frame(50);
  host_send_frame(small);
  run_loop();
  // The big frame is dropped; the buffer is kept for the small one.
  ASSERT_EQ(rx_->used_idx(), 1);
  EXPECT_EQ(rx_->used_elem(0).id, built.head);
  EXPECT_EQ(rx_->used_elem(0).len, kHdr + small.size());
  EXPECT_EQ(net_->stats().rx_dropped, 1u);
  EXPECT_EQ(net_->stats().rx_frames, 1u);
}

TEST_F(NetTest, RxDropsOffloadsTheDriverDidNotAccept) {
  start(kNoMerge & ~(kNetFeatureGuestTso4 | kNetFeatureGuestCsum));
  auto built = post_rx(2048);
  host_send_frame(ethernet_frame(100), NetHeader{.gso_type = kNetHdrGsoTcpv4, .gso_size = 1448});
  host_send_frame(ethernet_frame(100), NetHeader{.flags = kNetHdrFlagNeedsCsum});
  auto plain = ethernet_frame(100, 5);
  host_send_frame(plain, NetHeader{.flags = kNetHdrFlagDataValid});
  run_loop();
  ASSERT_EQ(rx_->used_idx(), 1);
  auto bytes = rx_->bytes(built.buffers[0], kHdr + plain.size());
  EXPECT_EQ(header_at(bytes).flags, 0);  // no GUEST_CSUM: flags are 0 (§5.1.6.4.1)
  EXPECT_EQ(std::vector<std::byte>(bytes.begin() + kHdr, bytes.end()), plain);
  EXPECT_EQ(net_->stats().rx_dropped, 2u);
}

TEST_F(NetTest, RxShortAndTruncatedFramesAreDroppedAndCounted) {
  start(kAllNetFeatures);
  for (int i = 0; i < 60; ++i) post_rx(1536);
  host_send(pattern(5));                        // not even a header
  host_send(concat(header_bytes({}), pattern(10)));  // no Ethernet header
  host_send(concat(header_bytes({}), ethernet_frame(Net::kMaxFrameBytes)));  // too long
  host_send_frame(ethernet_frame(60));
  run_loop();
  EXPECT_EQ(net_->stats().rx_dropped, 3u);
  EXPECT_EQ(net_->stats().rx_frames, 1u);
  EXPECT_EQ(rx_->used_idx(), 1);
}

TEST_F(NetTest, RxHandlesABoundedNumberOfFramesPerWakeup) {
  start(kNoMerge);
  const int count = Net::kFramesPerWakeup + 10;
  for (int i = 0; i < count; ++i) post_rx(256);
  for (int i = 0; i < count; ++i) host_send_frame(ethernet_frame(60, static_cast<uint8_t>(i)));
  auto ran = loop_->run_once(0);
  ASSERT_TRUE(ran.has_value());
  EXPECT_EQ(rx_->used_idx(), Net::kFramesPerWakeup);
  run_loop();
  EXPECT_EQ(rx_->used_idx(), count);
}

TEST_F(NetTest, RxReturnsChainsThatAreNotReceiveBuffers) {
  start(kAllNetFeatures);
  // Device-readable descriptors, and room for less than the header.
  ChainBuilder read_only(*rx_);
  read_only.readable(1536);
  auto bad1 = read_only.build();
  ChainBuilder mixed(*rx_);
  mixed.readable(16).writable(1536);
  auto bad2 = mixed.build();
  ChainBuilder tiny(*rx_);
  tiny.writable(8);
  auto bad3 = tiny.build();
  auto good = post_rx(1536);
  auto frame = ethernet_frame(200);
  host_send_frame(frame);
  run_loop();
  ASSERT_EQ(rx_->used_idx(), 4);
  EXPECT_EQ(rx_->used_elem(0).id, bad1.head);
  EXPECT_EQ(rx_->used_elem(0).len, 0u);
  EXPECT_EQ(rx_->used_elem(1).id, bad2.head);
  EXPECT_EQ(rx_->used_elem(1).len, 0u);
  EXPECT_EQ(rx_->used_elem(2).id, bad3.head);
  EXPECT_EQ(rx_->used_elem(2).len, 0u);
  EXPECT_EQ(rx_->used_elem(3).id, good.head);
  EXPECT_EQ(rx_->used_elem(3).len, kHdr + frame.size());
  EXPECT_EQ(net_->stats().rx_bad_buffers, 3u);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(NetTest, RxOutOfRangeBufferNeedsReset) {
  start(kAllNetFeatures);
  ChainBuilder chain(*rx_);
  chain.raw(0x7000'0000, 1536, true);
  chain.build();
  host_send_frame(ethernet_frame(100));
  run_loop();
  EXPECT_EQ(interrupt_->resets(), 1);
  EXPECT_EQ(rx_->used_idx(), 0);
}

// --- link, reset -----------------------------------------------------------------

TEST_F(NetTest, LosingTheBackendTakesTheLinkDown) {
  // Writing to the closed socketpair raises SIGPIPE (a tap never does).
  std::signal(SIGPIPE, SIG_IGN);
  start(kAllNetFeatures);
  host_.reset();  // the peer goes away: EPOLLHUP
  run_loop();
  NetConfigSpace config{};
  net_->read_config(0, std::as_writable_bytes(std::span(&config, 1)));
  EXPECT_EQ(config.status & kNetStatusLinkUp, 0);
  EXPECT_EQ(interrupt_->config_notifications(), 1);  // §5.1.4.2
  EXPECT_FALSE(net_->watching_input());
  auto ran = loop_->run_once(0);
  ASSERT_TRUE(ran.has_value());
  EXPECT_EQ(*ran, 0);  // no spinning on the hung-up fd
  // Transmits are dropped, not stuck.
  send_tx(ethernet_frame(100));
  net_->notify(Net::kTxQueue);
  EXPECT_EQ(tx_->used_idx(), 1);
  EXPECT_EQ(net_->stats().tx_dropped, 1u);
}

TEST_F(NetTest, ResetRemovesWatchesKeepsTheBackendAndReactivates) {
  start(kNoMerge);
  post_rx(2048);
  host_send_frame(ethernet_frame(100));
  run_loop();
  ASSERT_EQ(rx_->used_idx(), 1);
  net_->reset();
  EXPECT_FALSE(net_->watching_input());
  // Frames arriving now wait in the backend; nothing runs.
  host_send_frame(ethernet_frame(100, 2));
  auto ran = loop_->run_once(0);
  ASSERT_TRUE(ran.has_value());
  EXPECT_EQ(*ran, 0);
  net_->notify(Net::kRxQueue);  // not active: ignored

  // A new driver, fresh queues, the same backend.
  activate(kAllNetFeatures);
  auto built = post_rx(2048);
  net_->notify(Net::kRxQueue);
  run_loop();
  ASSERT_EQ(rx_->used_idx(), 1);
  EXPECT_EQ(rx_->bytes(built.buffers[0] + kHdr, 114), ethernet_frame(100, 2));
  send_tx(ethernet_frame(80));
  net_->notify(Net::kTxQueue);
  EXPECT_TRUE(host_recv().has_value());
}

TEST_F(NetTest, ResetWhileAFrameWaitsForBuffersOrTheBackend) {
  start(kAllNetFeatures);
  int small = 4096;
  ASSERT_EQ(::setsockopt(backend_->fd(), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)), 0);
  for (int i = 0; i < 40; ++i) send_tx(ethernet_frame(1400));
  net_->notify(Net::kTxQueue);
  ASSERT_TRUE(net_->watching_output());
  post_rx(1536);
  host_send_frame(ethernet_frame(4000));  // needs three buffers, has one
  run_loop();
  net_->reset();
  EXPECT_FALSE(net_->watching_output());
  EXPECT_EQ(net_->stats().rx_dropped, 1u);  // the held frame, counted
  activate(kAllNetFeatures);
  EXPECT_TRUE(net_->watching_input());
  EXPECT_FALSE(net_->watching_output());
}

// --- on a real tap -----------------------------------------------------------------

class NetOnTapTest : public NetTest {
 protected:
  void SetUp() override {
    NetTest::SetUp();
    std::string why = net::testing::enter_private_net_namespace();
    if (!why.empty()) GTEST_SKIP() << why;
    auto tap = net::Tap::open({.name = "keelnet0", .mtu = 9000, .bridge = ""});
    ASSERT_TRUE(tap.has_value()) << tap.error().message();
    make_device(std::move(*tap));
    // The far side of the link: a packet socket on the tap.
    far_ = Fd(::socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, htons(kEtherType)));
    ASSERT_TRUE(far_.valid());
    sockaddr_ll address{};
    address.sll_family = AF_PACKET;
    address.sll_protocol = htons(kEtherType);
    address.sll_ifindex = static_cast<int>(::if_nametoindex("keelnet0"));
    ASSERT_EQ(::bind(far_.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  }

  // Runs the loop until pred() or 5 s.
  template <typename Pred>
  bool run_until(Pred pred) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!pred() && std::chrono::steady_clock::now() < deadline) {
      if (!loop_->run_once(10).has_value()) return false;
    }
    return pred();
  }

  std::optional<std::vector<std::byte>> far_recv() {
    std::vector<std::byte> buffer(70000);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd pfd{far_.get(), POLLIN, 0};
      if (::poll(&pfd, 1, 50) <= 0) continue;
      ssize_t got = ::recv(far_.get(), buffer.data(), buffer.size(), 0);
      if (got <= 0) continue;
      buffer.resize(static_cast<size_t>(got));
      return buffer;
    }
    return std::nullopt;
  }

  Fd far_;
};

TEST_F(NetOnTapTest, FramesCrossTheTapBothWays) {
  activate(kAllNetFeatures);
  auto frame = ethernet_frame(1200);
  send_tx(frame);
  net_->notify(Net::kTxQueue);
  auto seen = far_recv();
  ASSERT_TRUE(seen.has_value());
  EXPECT_EQ(*seen, frame);
  EXPECT_EQ(net_->stats().tx_frames, 1u);

  // A jumbo frame from the host side lands in merged buffers. (The kernel
  // also sends IPv6 neighbour discovery out of the fresh link, so look for
  // ours.)
  std::map<uint16_t, GuestAddr> buffer_of;
  for (int i = 0; i < 64; ++i) {
    auto built = post_rx(1536);
    buffer_of[built.head] = built.buffers[0];
  }
  net_->notify(Net::kRxQueue);
  auto jumbo = ethernet_frame(8986, 4);
  ASSERT_EQ(::send(far_.get(), jumbo.data(), jumbo.size(), 0), static_cast<ssize_t>(jumbo.size()))
      << std::strerror(errno);
  ASSERT_TRUE(run_until([&] {
    // Walk the used ring frame by frame (num_buffers in each first buffer).
    uint16_t used = rx_->used_idx();
    for (uint16_t i = 0; i < used;) {
      VirtqUsedElem head = rx_->used_elem(i);
      uint16_t buffers = header_at(rx_->bytes(buffer_of[static_cast<uint16_t>(head.id)], kHdr)).num_buffers;
      if (buffers == 0 || i + buffers > used) return false;
      std::vector<std::byte> whole;
      for (uint16_t j = 0; j < buffers; ++j) {
        VirtqUsedElem elem = rx_->used_elem(static_cast<uint16_t>(i + j));
        auto part = rx_->bytes(buffer_of[static_cast<uint16_t>(elem.id)], elem.len);
        whole.insert(whole.end(), part.begin(), part.end());
      }
      if (whole.size() == kHdr + jumbo.size() &&
          std::equal(jumbo.begin(), jumbo.end(), whole.begin() + kHdr)) {
        return true;
      }
      i = static_cast<uint16_t>(i + buffers);
    }
    return false;
  }));
}

TEST_F(NetOnTapTest, AHeaderTheTapRefusesDropsThePacket) {
  activate(kAllNetFeatures);
  // NEEDS_CSUM with a checksum start past the frame: the tap says EINVAL.
  send_tx(ethernet_frame(100), NetHeader{.flags = kNetHdrFlagNeedsCsum, .csum_start = 60000});
  auto good = ethernet_frame(100, 9);
  send_tx(good);
  net_->notify(Net::kTxQueue);
  EXPECT_EQ(tx_->used_idx(), 2);
  EXPECT_EQ(net_->stats().tx_dropped, 1u);
  EXPECT_EQ(net_->stats().tx_frames, 1u);
  auto seen = far_recv();
  ASSERT_TRUE(seen.has_value());
  EXPECT_EQ(*seen, good);
  EXPECT_EQ(interrupt_->resets(), 0);
}

}  // namespace
}  // namespace keel::devices::virtio
