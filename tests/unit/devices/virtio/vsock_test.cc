// virtio-vsock device tests. Spec: virtio 1.2 §5.10 (socket device).
// Covered: features and config space, guest -> host connections (RESPONSE
// and data both ways, RST when nothing listens), host -> guest through
// "CONNECT <port>" (OK line, data both ways, refusal), the guest's credit,
// rx starvation (host data waits, nothing spins, nothing is lost), close
// paths releasing every fd, malformed CONNECT lines and slow clients
// beside a good one, hostile packets and chains, reset with live
// connections. Real unix sockets in a temp directory, a real EventLoop.
//
// FakeVirtqueue lays its rings out at fixed addresses, so each queue lives
// in a GuestMemory of its own; the device reaches guest RAM only through
// its queues, which carry their memory with them.
#include "devices/virtio/vsock.h"

#include <dirent.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <string>

#include <gtest/gtest.h>

#include "fake_interrupt.h"
#include "fake_virtqueue.h"

namespace keel::devices::virtio {
namespace {

using testing::ChainBuilder;
using testing::FakeInterrupt;
using testing::FakeVirtqueue;
using testing::make_test_memory;

constexpr uint64_t kGuestCid = 3;
constexpr uint32_t kRxBufferBytes = 4096;

size_t open_fd_count() {
  size_t count = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    ++count;
  }
  return count;
}

Fd unix_listener(const std::string& path) {
  (void)::unlink(path.c_str());
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
  EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  EXPECT_EQ(::listen(fd.get(), 8), 0);
  return fd;
}

Fd unix_client(const std::string& path) {
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
  EXPECT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  return fd;
}

void send_text(const Fd& fd, const std::string& text) {
  ASSERT_EQ(::send(fd.get(), text.data(), text.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(text.size()));
}

struct RxPacket {
  VsockHeader header;
  std::string data;
};

class VsockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/keel-vsock-test-XXXXXX";
    ASSERT_NE(::mkdtemp(dir_template), nullptr);
    dir_ = dir_template;
    path_ = dir_ + "/v.sock";
    loop_ = std::move(*EventLoop::create());
    baseline_fds_ = open_fd_count();
  }
  void TearDown() override {
    vsock_.reset();
    std::filesystem::remove_all(dir_);
  }

  void start(uint32_t rx_buffers = 16, bool event_queue = true) {
    auto created = Vsock::create(device_config());
    ASSERT_TRUE(created.has_value()) << created.error().message();
    vsock_ = std::move(*created);
    activate(event_queue);
    post_rx(rx_buffers);
  }

  VsockDeviceConfig device_config() const {
    VsockDeviceConfig config;
    config.guest_cid = kGuestCid;
    config.socket_path = path_;
    config.connection.buf_alloc = buf_alloc_;
    config.connection.connect_timeout = std::chrono::milliseconds(300);
    config.connection.close_timeout = std::chrono::milliseconds(300);
    config.handshake_timeout = std::chrono::milliseconds(300);
    config.max_connections = max_connections_;
    config.tick = std::chrono::milliseconds(20);
    return config;
  }

  void activate(bool event_queue = true) {
    rx_.emplace(rx_memory_, Vsock::kQueueSize, kFeatureEventIdx);
    tx_.emplace(tx_memory_, Vsock::kQueueSize, kFeatureEventIdx);
    event_.emplace(event_memory_, Vsock::kQueueSize);
    rx_seen_ = 0;
    rx_buffers_.clear();
    ActivateContext context;
    context.memory = &rx_memory_;
    context.features = kFeatureVersion1 | kFeatureEventIdx;
    context.queues.emplace_back(std::move(*Virtqueue::create(rx_memory_, rx_->config())));
    context.queues.emplace_back(std::move(*Virtqueue::create(tx_memory_, tx_->config())));
    if (event_queue) {
      context.queues.emplace_back(std::move(*Virtqueue::create(event_memory_, event_->config())));
    } else {
      context.queues.emplace_back();
    }
    context.interrupt = interrupt_;
    context.event_loop = loop_.get();
    ASSERT_TRUE(vsock_->activate(std::move(context)).has_value());
  }

  // The driver posts rx buffers as Linux does: header and data descriptors.
  void post_rx(uint32_t count) {
    for (uint32_t i = 0; i < count; ++i) {
      ChainBuilder chain(*rx_);
      auto built = chain.writable(kVsockHeaderBytes).writable(kRxBufferBytes).build();
      rx_buffers_[built.head] = built.buffers;
    }
    vsock_->notify(Vsock::kRxQueue);
  }

  void send(VsockHeader header, const std::string& data = {}) {
    header.len = static_cast<uint32_t>(data.size());
    ChainBuilder chain(*tx_);
    chain.readable(std::as_bytes(std::span(&header, 1)));
    if (!data.empty()) chain.readable(std::as_bytes(std::span(data)));
    chain.build();
    vsock_->notify(Vsock::kTxQueue);
  }

  VsockHeader guest(uint16_t op, uint32_t src_port = 1234, uint32_t dst_port = 6000) {
    return VsockHeader{.src_cid = kGuestCid, .dst_cid = kVsockHostCid, .src_port = src_port,
                       .dst_port = dst_port, .len = 0, .type = kVsockTypeStream, .op = op,
                       .flags = 0, .buf_alloc = guest_buf_alloc_, .fwd_cnt = guest_fwd_cnt_};
  }

  // Packets the device has put in rx buffers since the last call.
  std::vector<RxPacket> take_rx() {
    std::vector<RxPacket> out;
    while (rx_seen_ != rx_->used_idx()) {
      VirtqUsedElem used = rx_->used_elem(rx_seen_++);
      const auto& buffers = rx_buffers_.at(static_cast<uint16_t>(used.id));
      RxPacket packet{};
      auto header_bytes = rx_->bytes(buffers[0], kVsockHeaderBytes);
      std::memcpy(&packet.header, header_bytes.data(), kVsockHeaderBytes);
      EXPECT_EQ(used.len, kVsockHeaderBytes + packet.header.len);
      if (packet.header.len > 0) {  // (GuestMemory::read of nothing would memcpy a null pointer)
        auto data = rx_->bytes(buffers[1], packet.header.len);
        packet.data.assign(reinterpret_cast<const char*>(data.data()), data.size());
      }
      out.push_back(std::move(packet));
    }
    return out;
  }

  // Runs the loop until done() or a 5 s deadline.
  void run_until(const std::function<bool()>& done) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!done() && std::chrono::steady_clock::now() < deadline) {
      ASSERT_TRUE(loop_->run_once(10).has_value());
    }
    ASSERT_TRUE(done());
  }

  // Runs the loop until an rx packet with op arrives; returns it (and keeps
  // the others in received_).
  RxPacket wait_rx(uint16_t op) {
    RxPacket found{};
    bool have = false;
    run_until([&] {
      for (RxPacket& packet : take_rx()) {
        if (!have && packet.header.op == op) {
          found = packet;
          have = true;
        } else {
          received_.push_back(packet);
        }
      }
      return have;
    });
    return found;
  }

  std::string read_all(const Fd& fd, size_t want) {
    std::string out;
    run_until([&] {
      char buffer[65536];
      pollfd pfd{fd.get(), POLLIN, 0};
      while (out.size() < want && ::poll(&pfd, 1, 0) > 0) {
        ssize_t n = ::recv(fd.get(), buffer, sizeof(buffer), MSG_DONTWAIT);
        if (n <= 0) break;
        out.append(buffer, static_cast<size_t>(n));
      }
      return out.size() >= want;
    });
    return out;
  }

  // One line, byte by byte as a client would read it, so no data after it is taken.
  std::string read_line(const Fd& fd) {
    std::string line;
    run_until([&] {
      char byte;
      while (line.empty() || line.back() != '\n') {
        if (::recv(fd.get(), &byte, 1, MSG_DONTWAIT) != 1) return false;
        line += byte;
      }
      return true;
    });
    return line;
  }

  // True once the peer of fd closed (end of file after any data).
  bool at_eof(const Fd& fd) {
    char byte;
    return ::recv(fd.get(), &byte, 1, MSG_DONTWAIT) == 0;
  }

  // A guest connection to host port 6000, accepted by a host listener.
  Fd connect_from_guest(Fd& listener) {
    listener = unix_listener(path_ + "_6000");
    send(guest(kVsockOpRequest));
    RxPacket response = wait_rx(kVsockOpResponse);
    EXPECT_EQ(response.header.src_cid, kVsockHostCid);
    EXPECT_EQ(response.header.dst_port, 1234u);
    EXPECT_EQ(response.header.src_port, 6000u);
    EXPECT_EQ(response.header.buf_alloc, buf_alloc_);
    Fd host(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    EXPECT_TRUE(host.valid());
    return host;
  }

  // A host client's connection to guest port 5000; returns the client and
  // the local port the guest sees.
  Fd connect_from_host(uint32_t& local_port) {
    Fd client = unix_client(path_);
    send_text(client, "CONNECT 5000\n");
    RxPacket request = wait_rx(kVsockOpRequest);
    EXPECT_EQ(request.header.dst_cid, kGuestCid);
    EXPECT_EQ(request.header.dst_port, 5000u);
    local_port = request.header.src_port;
    EXPECT_GE(local_port, Vsock::kFirstLocalPort);
    send(guest(kVsockOpResponse, 5000, local_port));
    EXPECT_EQ(read_line(client), "OK " + std::to_string(local_port) + "\n");
    return client;
  }

  std::string dir_, path_;
  uint32_t buf_alloc_ = 64 << 10;
  uint32_t max_connections_ = 1024;
  uint32_t guest_buf_alloc_ = 256 << 10;
  uint32_t guest_fwd_cnt_ = 0;
  GuestMemory rx_memory_ = make_test_memory(4 << 20);
  GuestMemory tx_memory_ = make_test_memory(4 << 20);
  GuestMemory event_memory_ = make_test_memory();
  std::optional<FakeVirtqueue> rx_, tx_, event_;
  std::map<uint16_t, std::vector<GuestAddr>> rx_buffers_;
  uint16_t rx_seen_ = 0;
  std::vector<RxPacket> received_;
  std::shared_ptr<FakeInterrupt> interrupt_ = std::make_shared<FakeInterrupt>();
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Vsock> vsock_;
  size_t baseline_fds_ = 0;
};

TEST_F(VsockTest, FeaturesAndConfigSpace) {
  start();
  EXPECT_EQ(vsock_->type(), DeviceType::Vsock);
  // Stream only: F_STREAM (which Linux 6.1 does not know; no bit means
  // stream too), never SEQPACKET.
  EXPECT_EQ(vsock_->features(), kVsockFeatureStream);
  EXPECT_EQ(vsock_->queue_max_sizes().size(), 3u);
  ASSERT_EQ(vsock_->config_size_bytes(), 8u);
  uint64_t cid = 0;
  vsock_->read_config(0, std::as_writable_bytes(std::span(&cid, 1)));
  EXPECT_EQ(cid, kGuestCid);
  uint32_t high = 1;
  vsock_->read_config(4, std::as_writable_bytes(std::span(&high, 1)));
  EXPECT_EQ(high, 0u);
  EXPECT_TRUE(std::filesystem::exists(path_));
}

TEST_F(VsockTest, RejectsBadConfigAndLiveSocket) {
  VsockDeviceConfig config;
  config.socket_path = path_;
  config.guest_cid = 2;
  EXPECT_FALSE(Vsock::create(config).has_value());
  config.guest_cid = 0xffffffff;
  EXPECT_FALSE(Vsock::create(config).has_value());
  config.guest_cid = 3;
  config.socket_path = dir_ + "/" + std::string(120, 'x');
  EXPECT_FALSE(Vsock::create(config).has_value());
  config.socket_path = path_;
  auto first = Vsock::create(config);
  ASSERT_TRUE(first.has_value());
  EXPECT_FALSE(Vsock::create(config).has_value());  // somebody listens there
  first->reset();
  first = Vsock::create(VsockDeviceConfig{});  // no path
  EXPECT_FALSE(first.has_value());
  // A stale socket file (its listener gone) is replaced.
  {
    Fd stale = unix_listener(dir_ + "/stale.sock");
  }
  config.socket_path = dir_ + "/stale.sock";
  EXPECT_TRUE(Vsock::create(config).has_value());
}

TEST_F(VsockTest, GuestConnectsToHostAndDataFlowsBothWays) {
  start();
  Fd listener;
  Fd host = connect_from_guest(listener);
  EXPECT_EQ(vsock_->connection_count(), 1u);
  send(guest(kVsockOpRw), "hello host");
  EXPECT_EQ(read_all(host, 10), "hello host");
  send_text(host, "hello guest");
  RxPacket rw = wait_rx(kVsockOpRw);
  EXPECT_EQ(rw.data, "hello guest");
  EXPECT_EQ(rw.header.dst_port, 1234u);
  EXPECT_EQ(rw.header.fwd_cnt, 10u);
  EXPECT_GT(interrupt_->queue_notifications(Vsock::kRxQueue), 0);
  EXPECT_GT(interrupt_->queue_notifications(Vsock::kTxQueue), 0);
  EXPECT_EQ(tx_->used_idx(), 2);
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(VsockTest, GuestConnectWithoutListenerGetsRst) {
  start();
  send(guest(kVsockOpRequest, 1234, 6001));
  RxPacket rst = wait_rx(kVsockOpRst);
  EXPECT_EQ(rst.header.dst_port, 1234u);
  EXPECT_EQ(rst.header.src_port, 6001u);
  EXPECT_EQ(vsock_->connection_count(), 0u);
}

TEST_F(VsockTest, HostConnectsToGuestAndDataFlowsBothWays) {
  start();
  uint32_t local_port = 0;
  Fd client = connect_from_host(local_port);
  EXPECT_EQ(local_port, Vsock::kFirstLocalPort);
  send_text(client, "to the guest");
  RxPacket rw = wait_rx(kVsockOpRw);
  EXPECT_EQ(rw.data, "to the guest");
  EXPECT_EQ(rw.header.dst_port, 5000u);
  send(guest(kVsockOpRw, 5000, local_port), "to the host");
  EXPECT_EQ(read_all(client, 11), "to the host");
  // A second client gets another local port.
  uint32_t second_port = 0;
  Fd second = connect_from_host(second_port);
  EXPECT_NE(second_port, local_port);
  EXPECT_EQ(vsock_->connection_count(), 2u);
}

TEST_F(VsockTest, GuestRefusingAHostConnectClosesTheClient) {
  start();
  Fd client = unix_client(path_);
  send_text(client, "CONNECT 5001\n");
  RxPacket request = wait_rx(kVsockOpRequest);
  send(guest(kVsockOpRst, 5001, request.header.src_port));
  run_until([&] { return at_eof(client); });
  EXPECT_EQ(vsock_->connection_count(), 0u);
}

TEST_F(VsockTest, MalformedOrSlowConnectLinesCloseOnlyThatClient) {
  start();
  Fd bad_word = unix_client(path_);
  send_text(bad_word, "HELLO 5000\n");
  Fd bad_port = unix_client(path_);
  send_text(bad_port, "CONNECT 99999999999\n");
  Fd too_long = unix_client(path_);
  send_text(too_long, std::string(40, 'C'));
  Fd silent = unix_client(path_);
  Fd partial = unix_client(path_);
  send_text(partial, "CONN");
  run_until([&] { return at_eof(bad_word) && at_eof(bad_port) && at_eof(too_long); });
  // Meanwhile a good client connects (nobody blocks it).
  uint32_t local_port = 0;
  Fd good = connect_from_host(local_port);
  EXPECT_FALSE(at_eof(good));
  // The slow ones time out.
  run_until([&] { return at_eof(silent) && at_eof(partial); });
  EXPECT_EQ(vsock_->pending_client_count(), 0u);
  EXPECT_EQ(vsock_->connection_count(), 1u);
}

TEST_F(VsockTest, DataToTheGuestRespectsItsCredit) {
  guest_buf_alloc_ = 1000;
  start();
  Fd listener;
  Fd host = connect_from_guest(listener);
  send_text(host, std::string(5000, 'c'));
  RxPacket request = wait_rx(kVsockOpCreditRequest);  // credit ran out
  size_t delivered = 0;
  for (const RxPacket& packet : received_) {
    if (packet.header.op == kVsockOpRw) delivered += packet.data.size();
  }
  EXPECT_EQ(delivered, 1000u);
  // The guest's reader consumed everything: credit for 1000 more.
  guest_fwd_cnt_ = 1000;
  received_.clear();
  send(guest(kVsockOpCreditUpdate));
  run_until([&] {
    for (RxPacket& packet : take_rx()) received_.push_back(packet);
    size_t total = 0;
    for (const RxPacket& packet : received_) {
      if (packet.header.op == kVsockOpRw) total += packet.data.size();
    }
    return total >= 1000;
  });
  size_t total = 0;
  for (const RxPacket& packet : received_) {
    if (packet.header.op == kVsockOpRw) total += packet.data.size();
  }
  EXPECT_EQ(total, 1000u);
}

TEST_F(VsockTest, WithoutRxBuffersHostDataWaitsAndNothingSpins) {
  start(/*rx_buffers=*/0);
  uint32_t local_port = 0;
  // The REQUEST needs an rx buffer: post one, as a driver would.
  Fd client = unix_client(path_);
  send_text(client, "CONNECT 5000\n");
  run_until([&] { return vsock_->connection_count() == 1; });
  post_rx(1);
  RxPacket request = wait_rx(kVsockOpRequest);
  local_port = request.header.src_port;
  send(guest(kVsockOpResponse, 5000, local_port));
  EXPECT_EQ(read_line(client), "OK " + std::to_string(local_port) + "\n");
  std::string sent;
  for (int i = 0; i < 3000; ++i) sent += std::to_string(i) + ",";
  send_text(client, sent);
  // No buffers: the loop stays quiet (the 20 ms tick aside) instead of
  // spinning on a readable socket.
  int callbacks = 0;
  auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  while (std::chrono::steady_clock::now() < until) callbacks += *loop_->run_once(10);
  EXPECT_LT(callbacks, 40);
  EXPECT_TRUE(take_rx().empty());
  // Buffers arrive: every byte comes, in order.
  post_rx(16);
  std::string got;
  run_until([&] {
    for (RxPacket& packet : take_rx()) {
      if (packet.header.op == kVsockOpRw) got += packet.data;
    }
    if (rx_->used_idx() - rx_seen_ == 0 && got.size() < sent.size() &&
        rx_->avail_idx() == rx_->used_idx()) {
      post_rx(16);
    }
    return got.size() >= sent.size();
  });
  EXPECT_EQ(got, sent);
}

TEST_F(VsockTest, ClosePathsReleaseEveryFd) {
  start(64);
  {
    // Guest half-closes, host closes: SHUTDOWN both to the guest, whose RST ends it.
    Fd listener;
    Fd host = connect_from_guest(listener);
    VsockHeader shutdown = guest(kVsockOpShutdown);
    shutdown.flags = kVsockShutdownSend;
    send(shutdown);
    run_until([&] { return at_eof(host); });
    host.reset();
    RxPacket ours = wait_rx(kVsockOpShutdown);
    EXPECT_EQ(ours.header.flags, kVsockShutdownBoth);
    send(guest(kVsockOpRst));
    EXPECT_EQ(vsock_->connection_count(), 0u);
  }
  {
    // Host-initiated; the client half-closes, the guest then closes both ways.
    uint32_t local_port = 0;
    Fd client = connect_from_host(local_port);
    ASSERT_EQ(::shutdown(client.get(), SHUT_WR), 0);
    RxPacket ours = wait_rx(kVsockOpShutdown);
    EXPECT_EQ(ours.header.flags, kVsockShutdownSend);
    send(guest(kVsockOpRw, 5000, local_port), "bye");
    VsockHeader shutdown = guest(kVsockOpShutdown, 5000, local_port);
    shutdown.flags = kVsockShutdownBoth;
    send(shutdown);
    wait_rx(kVsockOpRst);
    EXPECT_EQ(read_all(client, 3), "bye");
    run_until([&] { return at_eof(client); });
    EXPECT_EQ(vsock_->connection_count(), 0u);
  }
  {
    // The guest resets an established connection.
    Fd listener;
    Fd host = connect_from_guest(listener);
    send(guest(kVsockOpRst));
    run_until([&] { return at_eof(host); });
    EXPECT_EQ(vsock_->connection_count(), 0u);
  }
  {
    // The host hangs up and the guest never answers our SHUTDOWN: timeout, RST.
    Fd listener;
    Fd host = connect_from_guest(listener);
    host.reset();
    wait_rx(kVsockOpShutdown);
    wait_rx(kVsockOpRst);
    EXPECT_EQ(vsock_->connection_count(), 0u);
  }
  EXPECT_EQ(open_fd_count(), baseline_fds_ + 2);  // the device's listener and timer
  EXPECT_EQ(interrupt_->resets(), 0);
}

TEST_F(VsockTest, HostilePacketsGetRstOrAreDropped) {
  start(64);
  // A header cut short: dropped, nothing to reply to.
  ChainBuilder short_chain(*tx_);
  short_chain.readable(20).build();
  vsock_->notify(Vsock::kTxQueue);
  EXPECT_EQ(tx_->used_idx(), 1);
  EXPECT_TRUE(take_rx().empty());

  // len larger than the chain.
  VsockHeader lying = guest(kVsockOpRw, 1, 6000);
  lying.len = 100;
  ChainBuilder lying_chain(*tx_);
  lying_chain.readable(std::as_bytes(std::span(&lying, 1))).readable(10).build();
  vsock_->notify(Vsock::kTxQueue);
  EXPECT_EQ(wait_rx(kVsockOpRst).header.dst_port, 1u);

  VsockHeader bad_op = guest(9, 2, 6000);
  send(bad_op);
  EXPECT_EQ(wait_rx(kVsockOpRst).header.dst_port, 2u);
  VsockHeader bad_type = guest(kVsockOpRequest, 3, 6000);
  bad_type.type = 2;
  send(bad_type);
  EXPECT_EQ(wait_rx(kVsockOpRst).header.dst_port, 3u);
  VsockHeader wrong_dst = guest(kVsockOpRequest, 4, 6000);
  wrong_dst.dst_cid = 5;
  send(wrong_dst);
  RxPacket wrong_dst_rst = wait_rx(kVsockOpRst);
  EXPECT_EQ(wrong_dst_rst.header.dst_port, 4u);
  EXPECT_EQ(wrong_dst_rst.header.src_cid, 5u);  // from whom the guest asked for
  // Packets for no connection.
  send(guest(kVsockOpRw, 5, 6000), "data");
  EXPECT_EQ(wait_rx(kVsockOpRst).header.dst_port, 5u);
  // No reply: a forged source, or an RST.
  VsockHeader forged = guest(kVsockOpRequest, 6, 6000);
  forged.src_cid = 42;
  send(forged);
  send(guest(kVsockOpRst, 7, 6000));
  for (int i = 0; i < 5; ++i) (void)loop_->run_once(5);
  EXPECT_TRUE(take_rx().empty());
  EXPECT_EQ(interrupt_->resets(), 0);
  EXPECT_EQ(vsock_->connection_count(), 0u);

  // A live connection's broken packet ends it on both sides.
  Fd listener;
  Fd host = connect_from_guest(listener);
  VsockHeader broken = guest(kVsockOpRw);
  broken.len = kVsockMaxPayloadBytes + 1;
  ChainBuilder broken_chain(*tx_);
  broken_chain.readable(std::as_bytes(std::span(&broken, 1))).build();
  vsock_->notify(Vsock::kTxQueue);
  wait_rx(kVsockOpRst);
  EXPECT_EQ(vsock_->connection_count(), 0u);
  run_until([&] { return at_eof(host); });
}

TEST_F(VsockTest, OutOfRangeDescriptorsNeedReset) {
  start();
  ChainBuilder chain(*tx_);
  chain.raw(64ull << 20, 44, false).build();  // far outside the queue's RAM
  vsock_->notify(Vsock::kTxQueue);
  EXPECT_EQ(interrupt_->resets(), 1);
  // Broken: nothing more happens until reset, and no host client is served.
  Fd client = unix_client(path_);
  send_text(client, "CONNECT 5000\n");
  for (int i = 0; i < 5; ++i) (void)loop_->run_once(5);
  EXPECT_EQ(vsock_->connection_count(), 0u);
  vsock_->reset();
  activate();
  post_rx(4);
  // The client waiting in the backlog is served now.
  wait_rx(kVsockOpRequest);
}

TEST_F(VsockTest, RxChainWithoutRoomForAHeaderNeedsReset) {
  start(0);
  ChainBuilder chain(*rx_);
  auto built = chain.writable(20).build();
  rx_buffers_[built.head] = built.buffers;
  vsock_->notify(Vsock::kRxQueue);
  EXPECT_EQ(interrupt_->resets(), 0);  // untouched while there is nothing to send
  send(guest(kVsockOpRequest, 1, 6001));  // its RST needs the buffer
  EXPECT_EQ(interrupt_->resets(), 1);
}

TEST_F(VsockTest, TooManyConnectionsAreRefused) {
  max_connections_ = 1;
  start();
  Fd listener;
  Fd host = connect_from_guest(listener);
  send(guest(kVsockOpRequest, 1235, 6000));
  EXPECT_EQ(wait_rx(kVsockOpRst).header.dst_port, 1235u);
  Fd client = unix_client(path_);
  run_until([&] { return at_eof(client); });
  EXPECT_EQ(vsock_->connection_count(), 1u);
}

TEST_F(VsockTest, ResetWithLiveConnectionsClosesThemAll) {
  start();
  Fd listener;
  Fd host = connect_from_guest(listener);
  uint32_t local_port = 0;
  Fd client = connect_from_host(local_port);
  Fd waiting = unix_client(path_);
  run_until([&] { return vsock_->pending_client_count() == 1; });
  vsock_->reset();
  EXPECT_EQ(vsock_->connection_count(), 0u);
  EXPECT_EQ(vsock_->pending_client_count(), 0u);
  EXPECT_TRUE(at_eof(host));
  EXPECT_TRUE(at_eof(client));
  EXPECT_TRUE(at_eof(waiting));
  host.reset();
  client.reset();
  waiting.reset();
  listener.reset();
  EXPECT_EQ(open_fd_count(), baseline_fds_ + 2);
  // And it works again after the driver comes back.
  activate();
  post_rx(4);
  Fd listener2;
  Fd again = connect_from_guest(listener2);
  EXPECT_TRUE(again.valid());
}

TEST_F(VsockTest, EventQueueBuffersAreKeptAndMayBeDisabled) {
  start();
  ChainBuilder chain(*event_);
  chain.writable(4).build();
  vsock_->notify(Vsock::kEventQueue);
  EXPECT_EQ(event_->used_idx(), 0);
  vsock_->reset();
  activate(/*event_queue=*/false);
  post_rx(2);
  send(guest(kVsockOpRequest, 1, 6001));
  wait_rx(kVsockOpRst);
}

// Snapshots: only the queues. Host connections stay with the process that
// saved; the restored device owes the driver a TRANSPORT_RESET, sent on the
// event queue from the first notification (the machine's kick after a
// restore), or once the driver adds an event buffer.
class VsockSnapshotTest : public VsockTest {
 protected:
  // The device a new process builds from the snapshot, on the same rings.
  void restore(const VirtioDeviceState& saved, std::span<const std::byte> extra = {}) {
    vsock_.reset();
    auto created = Vsock::create(device_config());
    ASSERT_TRUE(created.has_value()) << created.error().message();
    ActivateContext context;
    context.memory = &rx_memory_;
    context.features = kFeatureVersion1 | kFeatureEventIdx;
    const GuestMemory* memories[] = {&rx_memory_, &tx_memory_, &event_memory_};
    for (size_t index = 0; index < 3; ++index) {
      if (!saved.queues[index]) {
        context.queues.emplace_back();
        continue;
      }
      context.queues.emplace_back(
          std::move(*Virtqueue::restore(*memories[index], *saved.queues[index])));
    }
    context.interrupt = interrupt_;
    context.event_loop = loop_.get();
    Result<void> restored = (*created)->restore_state(std::move(context), extra);
    ASSERT_TRUE(restored) << restored.error().message();
    vsock_ = std::move(*created);
  }
  uint32_t event_id(uint16_t slot) {
    VirtqUsedElem used = event_->used_elem(slot);
    EXPECT_EQ(used.len, 4u);
    uint32_t id = 0xffffffff;
    auto bytes = event_->bytes(event_buffer_, 4);
    std::memcpy(&id, bytes.data(), 4);
    return id;
  }
  GuestAddr event_buffer_;
};

TEST_F(VsockSnapshotTest, RestoreResetsTheTransportAndNewConnectionsWork) {
  start();
  event_buffer_ = ChainBuilder(*event_).writable(4).build().buffers[0];
  vsock_->notify(Vsock::kEventQueue);
  Fd listener;
  Fd host = connect_from_guest(listener);
  ASSERT_EQ(vsock_->connection_count(), 1u);

  Result<VirtioDeviceState> saved = vsock_->save_state();
  ASSERT_TRUE(saved) << saved.error().message();
  ASSERT_EQ(saved->queues.size(), 3u);
  EXPECT_EQ(saved->queues[Vsock::kEventQueue]->last_avail_idx, 0);  // kept, not used
  EXPECT_EQ(saved->queues[Vsock::kTxQueue]->last_avail_idx, 1);
  EXPECT_TRUE(saved->extra.empty());
  // Save, mutate, save differs.
  send(guest(kVsockOpShutdown));
  Result<VirtioDeviceState> mutated = vsock_->save_state();
  ASSERT_TRUE(mutated);
  EXPECT_NE(*mutated, *saved);

  restore(*saved);
  // Restore, state equals the first save; nothing reaches the guest before
  // the device loop runs.
  Result<VirtioDeviceState> again = vsock_->save_state();
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, *saved);
  EXPECT_EQ(event_->used_idx(), 0);
  EXPECT_EQ(vsock_->connection_count(), 0u);
  const int before = interrupt_->queue_notifications(Vsock::kEventQueue);
  vsock_->notify(Vsock::kRxQueue);  // the kick after a restore
  ASSERT_EQ(event_->used_idx(), 1);
  EXPECT_EQ(event_id(0), kVsockEventTransportReset);
  EXPECT_EQ(interrupt_->queue_notifications(Vsock::kEventQueue), before + 1);
  // Sent once.
  vsock_->notify(Vsock::kTxQueue);
  EXPECT_EQ(event_->used_idx(), 1);

  // The guest reconnects (its old port free again after the reset).
  listener.reset();
  Fd listener2;
  Fd again_host = connect_from_guest(listener2);
  EXPECT_TRUE(again_host.valid());
  EXPECT_EQ(vsock_->connection_count(), 1u);
}

TEST_F(VsockSnapshotTest, TransportResetWaitsForAnEventBuffer) {
  start();
  Result<VirtioDeviceState> saved = vsock_->save_state();
  ASSERT_TRUE(saved);
  restore(*saved);
  vsock_->notify(Vsock::kRxQueue);
  EXPECT_EQ(event_->used_idx(), 0);
  event_buffer_ = ChainBuilder(*event_).writable(8).build().buffers[0];
  vsock_->notify(Vsock::kEventQueue);
  ASSERT_EQ(event_->used_idx(), 1);
  EXPECT_EQ(event_id(0), kVsockEventTransportReset);
}

TEST_F(VsockSnapshotTest, HostileEventBufferOrDeviceBytesAreRefused) {
  start();
  Result<VirtioDeviceState> saved = vsock_->save_state();
  ASSERT_TRUE(saved);
  vsock_.reset();
  auto created = Vsock::create(device_config());
  ASSERT_TRUE(created.has_value());
  ActivateContext context;
  context.memory = &rx_memory_;
  context.queues.resize(3);
  context.interrupt = interrupt_;
  context.event_loop = loop_.get();
  const std::byte one{1};
  Result<void> refused = (*created)->restore_state(std::move(context), std::span(&one, 1));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code(), Errc::Corrupt);
  created->reset();

  // An event buffer the device cannot write an event into needs a reset.
  restore(*saved);
  ChainBuilder(*event_).writable(2).build();
  vsock_->notify(Vsock::kEventQueue);
  EXPECT_EQ(event_->used_idx(), 0);
  EXPECT_EQ(interrupt_->resets(), 1);
}

}  // namespace
}  // namespace keel::devices::virtio
