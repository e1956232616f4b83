// One virtio-vsock connection: see vsock_connection.h for the status card.
#include "devices/virtio/vsock_connection.h"

#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "base/log.h"

namespace keel::devices::virtio {
namespace {

// How much we read from a host socket at a time; the guest's credit and
// the rx buffer bound it further.
constexpr size_t kStageBytes = 64 << 10;

}  // namespace

std::optional<uint32_t> parse_connect_line(std::string_view line) {
  constexpr std::string_view kPrefix = "CONNECT ";
  if (line.size() > kVsockConnectLineMaxBytes || !line.starts_with(kPrefix) ||
      !line.ends_with('\n')) {
    return std::nullopt;
  }
  std::string_view digits = line.substr(kPrefix.size(), line.size() - kPrefix.size() - 1);
  if (digits.empty() || digits.size() > 10) return std::nullopt;
  uint64_t port = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return std::nullopt;
    port = port * 10 + static_cast<uint64_t>(c - '0');
  }
  if (port > 0xffffffffull) return std::nullopt;
  return static_cast<uint32_t>(port);
}

Result<Fd> connect_unix_stream(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.size() >= sizeof(address.sun_path)) {
    return fail(Errc::InvalidArgument, fmt::format("unix socket path too long: {}", path));
  }
  std::memcpy(address.sun_path, path.data(), path.size());
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return fail_errno("socket AF_UNIX");
  // A unix connect completes at once or fails (EAGAIN: the backlog is full).
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) < 0) {
    return fail_errno(fmt::format("connect {}", path));
  }
  return fd;
}

void VsockConnection::ByteQueue::consume(size_t count) {
  head += count;
  if (head == bytes.size()) {
    clear();
  } else if (head > (64u << 10) && head > bytes.size() / 2) {
    bytes.erase(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(head));
    head = 0;
  }
}

VsockConnection::VsockConnection(Fd host, State state, uint64_t guest_cid, uint32_t guest_port,
                                 uint32_t host_port, const VsockConnectionLimits& limits)
    : host_(std::move(host)), state_(state), guest_cid_(guest_cid), guest_port_(guest_port),
      host_port_(host_port), limits_(limits) {}

VsockConnection VsockConnection::from_guest(Fd host, const VsockHeader& request,
                                            const VsockConnectionLimits& limits,
                                            VsockClock::time_point now) {
  VsockConnection connection(std::move(host), State::Established, request.src_cid,
                             request.src_port, request.dst_port, limits);
  connection.now_ = now;
  connection.peer_buf_alloc_ = request.buf_alloc;
  connection.peer_fwd_cnt_ = request.fwd_cnt;
  connection.response_pending_ = true;
  connection.settle();
  return connection;
}

VsockConnection VsockConnection::to_guest(Fd host, uint64_t guest_cid, uint32_t guest_port,
                                          uint32_t local_port, const VsockConnectionLimits& limits,
                                          VsockClock::time_point now) {
  VsockConnection connection(std::move(host), State::Dialing, guest_cid, guest_port, local_port,
                             limits);
  connection.now_ = now;
  connection.request_pending_ = true;
  connection.deadline_ = now + limits.connect_timeout;
  connection.settle();
  return connection;
}

VsockHeader VsockConnection::header(uint16_t op) const {
  return VsockHeader{.src_cid = kVsockHostCid,
                     .dst_cid = guest_cid_,
                     .src_port = host_port_,
                     .dst_port = guest_port_,
                     .len = 0,
                     .type = kVsockTypeStream,
                     .op = op,
                     .flags = 0,
                     .buf_alloc = limits_.buf_alloc,
                     .fwd_cnt = fwd_cnt_};
}

VsockHeader VsockConnection::rst_header() const { return header(kVsockOpRst); }

void VsockConnection::end(Fate fate, std::string_view reason) {
  if (fate_ != Fate::Open) return;
  fate_ = fate;
  fate_reason_ = reason;
}

void VsockConnection::on_guest_packet(const VsockHeader& packet,
                                      std::span<const std::byte> payload) {
  if (fate_ != Fate::Open) return;
  // §5.10.6.3: every packet of the flow carries the peer's credit.
  uint32_t free_before = peer_free();
  peer_buf_alloc_ = packet.buf_alloc;
  peer_fwd_cnt_ = packet.fwd_cnt;
  if (peer_free() > free_before) credit_requested_ = false;

  const bool dialing = state_ == State::Dialing;
  switch (packet.op) {
    case kVsockOpRequest:
      end(Fate::ReleaseWithRst, "REQUEST on a live connection");
      break;
    case kVsockOpResponse:
      if (!dialing || request_pending_) {
        end(Fate::ReleaseWithRst, "unexpected RESPONSE");
        break;
      }
      state_ = State::Established;
      deadline_.reset();
      {
        // The host client learns its connection is up, before any data.
        std::string ok = fmt::format("OK {}\n", host_port_);
        to_host_.append(std::as_bytes(std::span(ok)));
        to_host_prefix_ = ok.size();
      }
      flush_to_host();
      break;
    case kVsockOpRst:
      end(Fate::Release, dialing ? "the guest refused the connection" : "the guest reset it");
      break;
    case kVsockOpShutdown:
      if (dialing) {
        end(Fate::ReleaseWithRst, "SHUTDOWN before RESPONSE");
        break;
      }
      // §5.10.6.5: the hints are permanent; later packets cannot clear them.
      guest_shut_recv_ |= (packet.flags & kVsockShutdownRcv) != 0;
      guest_shut_send_ |= (packet.flags & kVsockShutdownSend) != 0;
      if (guest_shut_recv_) staged_.clear();  // nobody will read it
      shut_host_write_if_done();
      break;
    case kVsockOpRw: {
      if (dialing) {
        end(Fate::ReleaseWithRst, "data before RESPONSE");
        break;
      }
      if (guest_shut_send_) {
        end(Fate::ReleaseWithRst, "data after SHUTDOWN(SEND)");
        break;
      }
      // The guest may not send past our buf_alloc (§5.10.6.3); one that does
      // would make us buffer without bound.
      if (payload.size() > limits_.buf_alloc - to_host_bytes()) {
        LOG_RATELIMITED(warn, "virtio-vsock: guest port {} sent {} bytes past its credit",
                        guest_port_, payload.size());
        end(Fate::ReleaseWithRst, "the guest ignored our credit");
        break;
      }
      rx_cnt_ += static_cast<uint32_t>(payload.size());
      if (host_hup_) {
        // The host is gone and the guest was (or is being) told; the bytes
        // have nowhere to go.
        fwd_cnt_ += static_cast<uint32_t>(payload.size());
        break;
      }
      to_host_.append(payload);
      flush_to_host();
      break;
    }
    case kVsockOpCreditUpdate:
      break;  // the credit fields were taken above
    case kVsockOpCreditRequest:
      credit_update_pending_ = true;
      break;
    default:
      end(Fate::ReleaseWithRst, "unknown op");
      break;
  }
  settle();
}

void VsockConnection::on_host_ready(uint32_t events) {
  if (fate_ != Fate::Open) return;
  if (events & EPOLLERR) {
    end(Fate::ReleaseWithRst, "host socket error");
  } else if (state_ == State::Dialing) {
    // Only hang-ups are watched before RESPONSE: the client gave up.
    if (events & (EPOLLHUP | EPOLLRDHUP)) end(Fate::ReleaseWithRst, "the host client hung up");
  } else {
    if (events & EPOLLOUT) flush_to_host();
    if ((events & EPOLLIN) && can_read_host()) read_host();
    if ((events & EPOLLHUP) && fate_ == Fate::Open) {
      // Both directions are shut on the host side. What it wrote before is
      // still readable (read_host drains it as credit allows, without
      // epoll); what the guest sends from now on is dropped.
      host_hup_ = true;
      fwd_cnt_ += static_cast<uint32_t>(to_host_bytes());
      to_host_.clear();
      to_host_prefix_ = 0;
    }
  }
  settle();
}

void VsockConnection::on_tick(VsockClock::time_point now) {
  now_ = now;
  if (fate_ == Fate::Open && deadline_ && now >= *deadline_) {
    end(Fate::ReleaseWithRst, state_ == State::Dialing ? "the guest did not answer REQUEST"
                                                       : "closing timed out");
  }
  settle();
}

bool VsockConnection::can_read_host() const {
  return fate_ == Fate::Open && state_ == State::Established && !host_eof_ && !guest_shut_recv_ &&
         staged_.empty() && peer_free() > 0;
}

void VsockConnection::read_host() {
  size_t want = std::min<size_t>(kStageBytes, peer_free());
  staged_.bytes.resize(want);
  staged_.head = 0;
  ssize_t n = ::recv(host_.get(), staged_.bytes.data(), want, MSG_DONTWAIT);
  if (n > 0) {
    staged_.bytes.resize(static_cast<size_t>(n));
    return;
  }
  staged_.clear();
  if (n == 0) {
    host_eof_ = true;
  } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
    end(Fate::ReleaseWithRst, "host socket read failed");
  }
}

void VsockConnection::flush_to_host() {
  while (!to_host_.empty() && fate_ == Fate::Open) {
    std::span<const std::byte> data = to_host_.front();
    ssize_t n = ::send(host_.get(), data.data(), data.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;  // the Out watch resumes
      end(Fate::ReleaseWithRst, "host socket write failed");
      return;
    }
    auto written = static_cast<size_t>(n);
    size_t prefix = std::min(written, to_host_prefix_);
    to_host_prefix_ -= prefix;
    fwd_cnt_ += static_cast<uint32_t>(written - prefix);
    to_host_.consume(written);
  }
  shut_host_write_if_done();
}

void VsockConnection::shut_host_write_if_done() {
  if (guest_shut_send_ && to_host_.empty() && !host_write_shut_ && !host_hup_ &&
      fate_ == Fate::Open) {
    host_write_shut_ = true;
    (void)::shutdown(host_.get(), SHUT_WR);
  }
}

void VsockConnection::settle() {
  if (fate_ != Fate::Open) return;
  // In pull mode (after a hang-up) there is no watch: read here whenever
  // the guest can take more. Each read returns data or end of file.
  if (host_hup_ && can_read_host()) read_host();
  if (fate_ != Fate::Open) return;

  // The guest said it will neither send nor receive: once its data is out,
  // the RST that ends the connection is ours to send (§5.10.6.5).
  if (guest_shut_send_ && guest_shut_recv_) {
    if (to_host_.empty() || host_hup_) {
      end(Fate::ReleaseWithRst, "closed by the guest");
      return;
    }
    if (!deadline_) deadline_ = now_ + limits_.close_timeout;
  }
  if (shutdown_sent_ == kVsockShutdownBoth && !deadline_) {
    deadline_ = now_ + limits_.close_timeout;  // the guest's RST should follow
  }

  // Our CREDIT_UPDATE: when the guest's picture of our free space is
  // getting small and we have freed some since we last told it.
  uint32_t threshold = std::min<uint32_t>(64 << 10, limits_.buf_alloc / 2);
  if (state_ == State::Established && fwd_cnt_ != advertised_fwd_cnt_ &&
      peer_free_bytes(limits_.buf_alloc, advertised_fwd_cnt_, rx_cnt_) < threshold) {
    credit_update_pending_ = true;
  }
  // The guest's credit ran out: ask once, in case its update got lost in
  // a driver that only answers requests.
  if (state_ == State::Established && peer_free() == 0 && !host_eof_ && !guest_shut_recv_ &&
      !credit_requested_) {
    credit_requested_ = true;
    credit_request_pending_ = true;
  }
}

std::optional<Ready> VsockConnection::host_interest() const {
  if (fate_ != Fate::Open || host_hup_) return std::nullopt;
  uint32_t bits = 0;
  if (can_read_host()) bits |= static_cast<uint32_t>(Ready::In);
  if (!to_host_.empty()) bits |= static_cast<uint32_t>(Ready::Out);
  return static_cast<Ready>(bits);
}

bool VsockConnection::has_rx_packet() const {
  if (fate_ != Fate::Open) return false;
  if (request_pending_ || response_pending_) return true;
  if (state_ != State::Established) return false;
  if (!staged_.empty() && peer_free() > 0 && !guest_shut_recv_) return true;
  uint32_t shutdown_flags = 0;
  if (host_eof_ && staged_.empty()) shutdown_flags |= kVsockShutdownSend;
  if (host_hup_ && staged_.empty()) shutdown_flags |= kVsockShutdownRcv;
  if (shutdown_flags & ~shutdown_sent_) return true;
  return credit_update_pending_ || credit_request_pending_;
}

uint32_t VsockConnection::next_rx_packet(VsockHeader& out, std::span<std::byte> data) {
  uint32_t length = 0;
  if (request_pending_) {
    request_pending_ = false;
    out = header(kVsockOpRequest);
  } else if (response_pending_) {
    response_pending_ = false;
    out = header(kVsockOpResponse);
  } else if (!staged_.empty() && peer_free() > 0 && !guest_shut_recv_ && !data.empty()) {
    length = static_cast<uint32_t>(std::min<size_t>({staged_.size(), data.size(), peer_free()}));
    std::memcpy(data.data(), staged_.front().data(), length);
    staged_.consume(length);
    tx_cnt_ += length;
    out = header(kVsockOpRw);
    out.len = length;
  } else {
    uint32_t flags = 0;
    if (host_eof_ && staged_.empty()) flags |= kVsockShutdownSend;
    if (host_hup_ && staged_.empty()) flags |= kVsockShutdownRcv;
    if (flags & ~shutdown_sent_) {
      shutdown_sent_ |= flags;
      out = header(kVsockOpShutdown);
      out.flags = shutdown_sent_;
    } else if (credit_update_pending_) {
      out = header(kVsockOpCreditUpdate);
    } else {
      credit_request_pending_ = false;
      out = header(kVsockOpCreditRequest);
    }
  }
  // Every packet carries fwd_cnt, so each is a credit update as well.
  advertised_fwd_cnt_ = fwd_cnt_;
  credit_update_pending_ = false;
  settle();
  return length;
}

}  // namespace keel::devices::virtio
