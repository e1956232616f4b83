// virtio-vsock packet checks and one connection's state machine. Spec:
// virtio 1.2 §5.10.6 (header, ops), §5.10.6.3 (credit), §5.10.6.5 (stream
// sockets). Covered: CONNECT line parsing, header checks and RST policy,
// credit arithmetic with wrapping counters, both set-up directions, credit
// limits both ways (the guest's buf_alloc, our bounded buffering and
// CREDIT_UPDATE as it drains), half-close both ways, hang-ups, deadlines.
// The host side is a real socketpair; no virtqueue is involved.
#include "devices/virtio/vsock_connection.h"

#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace keel::devices::virtio {
namespace {

constexpr uint64_t kGuestCid = 7;
constexpr uint32_t kLocalPort = 1u << 30;

TEST(VsockPacket, ParsesConnectLines) {
  EXPECT_EQ(parse_connect_line("CONNECT 5000\n"), 5000u);
  EXPECT_EQ(parse_connect_line("CONNECT 0\n"), 0u);
  EXPECT_EQ(parse_connect_line("CONNECT 4294967295\n"), 4294967295u);
  EXPECT_EQ(parse_connect_line("CONNECT 4294967296\n"), std::nullopt);
  EXPECT_EQ(parse_connect_line("CONNECT 99999999999\n"), std::nullopt);
  EXPECT_EQ(parse_connect_line("CONNECT 5000"), std::nullopt);
  EXPECT_EQ(parse_connect_line("CONNECT \n"), std::nullopt);
  EXPECT_EQ(parse_connect_line("CONNECT -1\n"), std::nullopt);
  EXPECT_EQ(parse_connect_line("CONNECT 50 0\n"), std::nullopt);
  EXPECT_EQ(parse_connect_line("CONNECT 5000\r\n"), std::nullopt);
  EXPECT_EQ(parse_connect_line("connect 5000\n"), std::nullopt);
  EXPECT_EQ(parse_connect_line(std::string(40, 'C') + "\n"), std::nullopt);
}

VsockHeader guest_header(uint16_t op, uint32_t src_port = 1234, uint32_t dst_port = 6000) {
  return VsockHeader{.src_cid = kGuestCid, .dst_cid = kVsockHostCid, .src_port = src_port,
                     .dst_port = dst_port, .len = 0, .type = kVsockTypeStream, .op = op,
                     .flags = 0, .buf_alloc = 64 << 10, .fwd_cnt = 0};
}

TEST(VsockPacket, ChecksHeaders) {
  VsockHeader good = guest_header(kVsockOpRw);
  good.len = 100;
  EXPECT_EQ(check_tx_header(good, 100, kGuestCid), VsockPacketError::None);
  EXPECT_EQ(check_tx_header(good, 99, kGuestCid), VsockPacketError::PayloadPastChain);
  VsockHeader huge = good;
  huge.len = kVsockMaxPayloadBytes + 1;
  EXPECT_EQ(check_tx_header(huge, 1 << 20, kGuestCid), VsockPacketError::PayloadTooLong);
  VsockHeader wrong = good;
  wrong.src_cid = 8;
  EXPECT_EQ(check_tx_header(wrong, 100, kGuestCid), VsockPacketError::WrongSource);
  EXPECT_FALSE(error_wants_rst(wrong, VsockPacketError::WrongSource));
  wrong = good;
  wrong.dst_cid = 5;
  EXPECT_EQ(check_tx_header(wrong, 100, kGuestCid), VsockPacketError::WrongDestination);
  EXPECT_TRUE(error_wants_rst(wrong, VsockPacketError::WrongDestination));
  wrong = good;
  wrong.type = 2;  // SEQPACKET, never offered
  EXPECT_EQ(check_tx_header(wrong, 100, kGuestCid), VsockPacketError::BadType);
  EXPECT_TRUE(error_wants_rst(wrong, VsockPacketError::BadType));
  for (uint16_t op : {uint16_t{0}, uint16_t{8}, uint16_t{0xffff}}) {
    wrong = good;
    wrong.op = op;
    EXPECT_EQ(check_tx_header(wrong, 100, kGuestCid), VsockPacketError::BadOp) << op;
  }
  // Never an RST for an RST.
  VsockHeader rst = guest_header(kVsockOpRst);
  rst.type = 9;
  EXPECT_FALSE(error_wants_rst(rst, VsockPacketError::BadType));

  VsockHeader reply = reply_header(good, kVsockOpRst);
  EXPECT_EQ(reply.src_cid, kVsockHostCid);
  EXPECT_EQ(reply.dst_cid, kGuestCid);
  EXPECT_EQ(reply.src_port, 6000u);
  EXPECT_EQ(reply.dst_port, 1234u);
  EXPECT_EQ(reply.len, 0u);
}

TEST(VsockPacket, PeerFreeBytesWrapsAndNeverUnderflows) {
  EXPECT_EQ(peer_free_bytes(1000, 0, 0), 1000u);
  EXPECT_EQ(peer_free_bytes(1000, 0, 400), 600u);
  EXPECT_EQ(peer_free_bytes(1000, 0, 1000), 0u);
  // Counters wrap at 2^32.
  EXPECT_EQ(peer_free_bytes(1000, 0xffffff00u, 0x100u), 1000u - 0x200u);
  // A peer claiming to have consumed more than was sent, or a shrunk buffer.
  EXPECT_EQ(peer_free_bytes(1000, 500, 400), 0u);
  EXPECT_EQ(peer_free_bytes(100, 0, 400), 0u);
}

class VsockConnectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int fds[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds), 0);
    device_side_ = Fd(fds[0]);
    host_ = Fd(fds[1]);
    limits_.buf_alloc = 8192;
    limits_.connect_timeout = std::chrono::milliseconds(100);
    limits_.close_timeout = std::chrono::milliseconds(100);
  }

  VsockConnection from_guest(uint32_t guest_buf_alloc = 64 << 10) {
    VsockHeader request = guest_header(kVsockOpRequest);
    request.buf_alloc = guest_buf_alloc;
    return VsockConnection::from_guest(std::move(device_side_), request, limits_, now_);
  }

  // Takes the next packet the connection has for the guest.
  VsockHeader next(VsockConnection& connection, std::string* data = nullptr, size_t room = 4096) {
    EXPECT_TRUE(connection.has_rx_packet());
    std::vector<std::byte> buffer(room);
    VsockHeader header{};
    uint32_t length = connection.next_rx_packet(header, buffer);
    EXPECT_EQ(header.len, length);
    EXPECT_EQ(header.src_cid, kVsockHostCid);
    EXPECT_EQ(header.dst_cid, kGuestCid);
    EXPECT_EQ(header.buf_alloc, limits_.buf_alloc);
    if (data) data->assign(reinterpret_cast<const char*>(buffer.data()), length);
    return header;
  }

  void guest_sends(VsockConnection& connection, const std::string& text, uint32_t fwd_cnt = 0) {
    VsockHeader packet = guest_header(kVsockOpRw);
    packet.len = static_cast<uint32_t>(text.size());
    packet.fwd_cnt = fwd_cnt;
    connection.on_guest_packet(packet, std::as_bytes(std::span(text)));
  }

  std::string host_reads() {
    std::string out;
    char buffer[65536];
    ssize_t n;
    while ((n = ::read(host_.get(), buffer, sizeof(buffer))) > 0) out.append(buffer, static_cast<size_t>(n));
    return out;
  }
  void host_writes(const std::string& text) {
    ASSERT_EQ(::write(host_.get(), text.data(), text.size()), static_cast<ssize_t>(text.size()));
  }

  Fd device_side_;
  Fd host_;
  VsockConnectionLimits limits_;
  VsockClock::time_point now_ = VsockClock::now();
};

TEST_F(VsockConnectionTest, GuestInitiatedCarriesDataBothWays) {
  VsockConnection connection = from_guest();
  VsockHeader response = next(connection);
  EXPECT_EQ(response.op, kVsockOpResponse);
  EXPECT_EQ(response.src_port, 6000u);
  EXPECT_EQ(response.dst_port, 1234u);
  EXPECT_FALSE(connection.has_rx_packet());
  EXPECT_EQ(connection.host_interest(), Ready::In);

  guest_sends(connection, "hello");
  EXPECT_EQ(host_reads(), "hello");
  EXPECT_EQ(connection.to_host_bytes(), 0u);

  host_writes("world");
  connection.on_host_ready(EPOLLIN);
  std::string data;
  VsockHeader rw = next(connection, &data);
  EXPECT_EQ(rw.op, kVsockOpRw);
  EXPECT_EQ(data, "world");
  EXPECT_EQ(rw.fwd_cnt, 5u);  // the guest's 5 bytes went to the host
  EXPECT_EQ(connection.fate(), VsockConnection::Fate::Open);
}

TEST_F(VsockConnectionTest, DataToTheGuestStaysWithinItsCredit) {
  VsockConnection connection = from_guest(/*guest_buf_alloc=*/1000);
  EXPECT_EQ(next(connection).op, kVsockOpResponse);
  host_writes(std::string(3000, 'x'));
  connection.on_host_ready(EPOLLIN);
  size_t delivered = 0;
  while (connection.has_rx_packet()) {
    std::string data;
    VsockHeader header = next(connection, &data, 300);
    if (header.op == kVsockOpRw) delivered += data.size();
    if (header.op == kVsockOpCreditRequest) break;
  }
  EXPECT_EQ(delivered, 1000u);
  EXPECT_EQ(connection.peer_free(), 0u);
  EXPECT_EQ(connection.host_interest(), static_cast<Ready>(0));  // not reading meanwhile
  EXPECT_FALSE(connection.has_rx_packet());  // one CREDIT_REQUEST, not a stream of them

  // The guest consumed 600 bytes.
  VsockHeader update = guest_header(kVsockOpCreditUpdate);
  update.buf_alloc = 1000;
  update.fwd_cnt = 600;
  connection.on_guest_packet(update, {});
  EXPECT_EQ(connection.host_interest(), Ready::In);  // reading again
  connection.on_host_ready(EPOLLIN);
  std::string data;
  VsockHeader rw = next(connection, &data);
  EXPECT_EQ(rw.op, kVsockOpRw);
  EXPECT_EQ(data.size(), 600u);
}

TEST_F(VsockConnectionTest, BuffersTowardTheHostAtMostOurBufAlloc) {
  // A small send buffer so the host socket fills up fast.
  int small = 4096;
  ASSERT_EQ(::setsockopt(device_side_.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)), 0);
  VsockConnection connection = from_guest();
  EXPECT_EQ(next(connection).op, kVsockOpResponse);
  // A guest that honours our credit: it sends while the last fwd_cnt it saw
  // leaves room.
  uint32_t sent = 0, seen_fwd = 0;
  for (int round = 0; round < 1000; ++round) {
    uint32_t room = peer_free_bytes(limits_.buf_alloc, seen_fwd, sent);
    if (room == 0) break;
    guest_sends(connection, std::string(std::min<uint32_t>(room, 1024), static_cast<char>('a' + round % 26)));
    sent += std::min<uint32_t>(room, 1024);
    while (connection.has_rx_packet()) seen_fwd = next(connection).fwd_cnt;
  }
  ASSERT_EQ(connection.fate(), VsockConnection::Fate::Open);
  EXPECT_EQ(connection.to_host_bytes(), sent - seen_fwd);
  EXPECT_LE(connection.to_host_bytes(), limits_.buf_alloc);
  EXPECT_EQ(connection.host_interest(), Ready::In | Ready::Out);

  // The host drains; we forward the rest and tell the guest.
  std::string received;
  for (int round = 0; round < 100 && connection.to_host_bytes() > 0; ++round) {
    received += host_reads();
    connection.on_host_ready(EPOLLOUT);
  }
  received += host_reads();
  EXPECT_EQ(received.size(), sent);
  EXPECT_EQ(connection.to_host_bytes(), 0u);
  ASSERT_TRUE(connection.has_rx_packet());
  VsockHeader update = next(connection);
  EXPECT_EQ(update.op, kVsockOpCreditUpdate);
  EXPECT_EQ(update.fwd_cnt, sent);
}

TEST_F(VsockConnectionTest, GuestIgnoringOurCreditIsReset) {
  int small = 4096;
  ASSERT_EQ(::setsockopt(device_side_.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)), 0);
  VsockConnection connection = from_guest();
  (void)next(connection);
  for (int round = 0; round < 1000 && connection.fate() == VsockConnection::Fate::Open; ++round) {
    guest_sends(connection, std::string(1024, 'z'));
  }
  EXPECT_EQ(connection.fate(), VsockConnection::Fate::ReleaseWithRst);
  VsockHeader rst = connection.rst_header();
  EXPECT_EQ(rst.op, kVsockOpRst);
  EXPECT_EQ(rst.dst_port, 1234u);
}

TEST_F(VsockConnectionTest, CreditRequestIsAnswered) {
  VsockConnection connection = from_guest();
  (void)next(connection);
  connection.on_guest_packet(guest_header(kVsockOpCreditRequest), {});
  EXPECT_EQ(next(connection).op, kVsockOpCreditUpdate);
}

TEST_F(VsockConnectionTest, HalfClosesBothWaysThenTheGuestCloses) {
  VsockConnection connection = from_guest();
  (void)next(connection);
  guest_sends(connection, "last words");
  VsockHeader shutdown = guest_header(kVsockOpShutdown);
  shutdown.flags = kVsockShutdownSend;
  connection.on_guest_packet(shutdown, {});
  EXPECT_EQ(host_reads(), "last words");
  char byte;
  EXPECT_EQ(::read(host_.get(), &byte, 1), 0);  // end of file: the write side is shut
  EXPECT_EQ(connection.fate(), VsockConnection::Fate::Open);

  // The host answers and half-closes too.
  host_writes("reply");
  ASSERT_EQ(::shutdown(host_.get(), SHUT_WR), 0);
  connection.on_host_ready(EPOLLIN);
  std::string data;
  EXPECT_EQ(next(connection, &data).op, kVsockOpRw);
  EXPECT_EQ(data, "reply");
  connection.on_host_ready(EPOLLIN | EPOLLHUP);  // end of file, both sides shut
  VsockHeader ours = next(connection);
  EXPECT_EQ(ours.op, kVsockOpShutdown);
  EXPECT_EQ(ours.flags, kVsockShutdownBoth);
  EXPECT_EQ(connection.host_interest(), std::nullopt);  // no watch on a hung-up socket
  // The guest's RST completes the clean disconnect.
  connection.on_guest_packet(guest_header(kVsockOpRst), {});
  EXPECT_EQ(connection.fate(), VsockConnection::Fate::Release);
}

TEST_F(VsockConnectionTest, GuestShuttingBothWaysGetsOurRst) {
  VsockConnection connection = from_guest();
  (void)next(connection);
  VsockHeader shutdown = guest_header(kVsockOpShutdown);
  shutdown.flags = kVsockShutdownBoth;
  connection.on_guest_packet(shutdown, {});
  EXPECT_EQ(connection.fate(), VsockConnection::Fate::ReleaseWithRst);
}

TEST_F(VsockConnectionTest, HostHangupWithoutAnswerTimesOut) {
  VsockConnection connection = from_guest();
  (void)next(connection);
  host_.reset();
  connection.on_host_ready(EPOLLIN | EPOLLHUP);
  EXPECT_EQ(next(connection).flags, kVsockShutdownBoth);
  EXPECT_TRUE(connection.has_deadline());
  connection.on_tick(now_ + std::chrono::milliseconds(50));
  EXPECT_EQ(connection.fate(), VsockConnection::Fate::Open);
  connection.on_tick(now_ + std::chrono::milliseconds(150));
  EXPECT_EQ(connection.fate(), VsockConnection::Fate::ReleaseWithRst);
}

TEST_F(VsockConnectionTest, DataAfterShutdownOrBeforeResponseIsReset) {
  VsockConnection connection = from_guest();
  (void)next(connection);
  VsockHeader shutdown = guest_header(kVsockOpShutdown);
  shutdown.flags = kVsockShutdownSend;
  connection.on_guest_packet(shutdown, {});
  guest_sends(connection, "late");
  EXPECT_EQ(connection.fate(), VsockConnection::Fate::ReleaseWithRst);

  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, fds), 0);
  Fd other(fds[1]);
  VsockConnection dialing =
      VsockConnection::to_guest(Fd(fds[0]), kGuestCid, 5000, kLocalPort, limits_, now_);
  VsockHeader rw = guest_header(kVsockOpRw, 5000, kLocalPort);
  dialing.on_guest_packet(rw, {});
  EXPECT_EQ(dialing.fate(), VsockConnection::Fate::ReleaseWithRst);
}

TEST_F(VsockConnectionTest, HostInitiatedSaysOkOnResponse) {
  VsockConnection connection =
      VsockConnection::to_guest(std::move(device_side_), kGuestCid, 5000, kLocalPort, limits_, now_);
  VsockHeader request = next(connection);
  EXPECT_EQ(request.op, kVsockOpRequest);
  EXPECT_EQ(request.src_port, kLocalPort);
  EXPECT_EQ(request.dst_port, 5000u);
  EXPECT_FALSE(connection.has_rx_packet());
  EXPECT_EQ(connection.host_interest(), static_cast<Ready>(0));  // hang-ups only
  host_writes("early");  // sent before OK: waits in the socket
  VsockHeader response = guest_header(kVsockOpResponse, 5000, kLocalPort);
  connection.on_guest_packet(response, {});
  EXPECT_TRUE(connection.established());
  EXPECT_FALSE(connection.has_deadline());
  EXPECT_EQ(host_reads(), "OK 1073741824\n");
  connection.on_host_ready(EPOLLIN);
  std::string data;
  EXPECT_EQ(next(connection, &data).op, kVsockOpRw);
  EXPECT_EQ(data, "early");
  VsockHeader rw = guest_header(kVsockOpRw, 5000, kLocalPort);
  rw.len = 4;
  connection.on_guest_packet(rw, std::as_bytes(std::span("ping", 4)));
  EXPECT_EQ(host_reads(), "ping");
  EXPECT_EQ(connection.to_host_bytes(), 0u);
}

TEST_F(VsockConnectionTest, HostInitiatedRefusedHungUpOrUnanswered) {
  int fds[2];
  auto make = [&] {
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, fds), 0);
    return VsockConnection::to_guest(Fd(fds[0]), kGuestCid, 5000, kLocalPort, limits_, now_);
  };
  VsockConnection refused = make();
  Fd peer1(fds[1]);
  (void)next(refused);
  refused.on_guest_packet(guest_header(kVsockOpRst, 5000, kLocalPort), {});
  EXPECT_EQ(refused.fate(), VsockConnection::Fate::Release);

  VsockConnection hung_up = make();
  Fd(fds[1]).reset();
  hung_up.on_host_ready(EPOLLHUP);
  EXPECT_EQ(hung_up.fate(), VsockConnection::Fate::ReleaseWithRst);

  VsockConnection silent = make();
  Fd peer3(fds[1]);
  (void)next(silent);
  silent.on_tick(now_ + std::chrono::milliseconds(150));
  EXPECT_EQ(silent.fate(), VsockConnection::Fate::ReleaseWithRst);
}

}  // namespace
}  // namespace keel::devices::virtio
