// One virtio-vsock stream connection between a guest port and a host unix
// socket. Spec: virtio 1.2 §5.10.6.3 (buffer space management), §5.10.6.5
// (stream sockets: REQUEST/RESPONSE, SHUTDOWN, RST, clean disconnect).
// Host side: Firecracker-style hybrid vsock (docs/vsock.md).
// Implemented: both directions of connection set-up (a guest REQUEST whose
// host socket the device already connected; a host client's CONNECT that
// becomes a REQUEST to the guest, answered on RESPONSE with "OK <port>\n"),
// credit both ways (never more than the guest's buf_alloc minus what is in
// flight; our own buf_alloc honoured by bounded buffering toward the host
// socket, CREDIT_UPDATE as it drains, CREDIT_REQUEST answered and sent when
// the guest's credit runs out), half-close in both directions, RST on any
// violation, deadlines for set-up and for closing.
// Missing: nothing known. The connection does no epoll itself: the device
// asks host_interest() and keeps the watch, so this class is testable with
// a socketpair alone.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/event_loop.h"
#include "base/fd.h"
#include "base/result.h"
#include "devices/virtio/vsock_packet.h"

namespace keel::devices::virtio {

using VsockClock = std::chrono::steady_clock;

struct VsockConnectionLimits {
  // Our receive buffer per connection (§5.10.6.3 buf_alloc): the most
  // guest data we hold for a host socket that does not read.
  uint32_t buf_alloc = 256 << 10;
  // Host-initiated: how long the guest has to answer our REQUEST.
  std::chrono::milliseconds connect_timeout{5000};
  // Closing: how long we wait for the guest's RST after telling it we are
  // done both ways, or for a host socket to take the last guest data.
  std::chrono::milliseconds close_timeout{8000};
};

// "CONNECT <port>\n" from a host client (the newline included); nullopt if
// malformed (the port is decimal, 0..2^32-1, no sign, no spaces around it).
std::optional<uint32_t> parse_connect_line(std::string_view line);
inline constexpr size_t kVsockConnectLineMaxBytes = 32;

// A non-blocking connected unix stream socket to path, or an error
// (nobody listening, a full backlog, a path too long).
Result<Fd> connect_unix_stream(const std::string& path);

class VsockConnection {
 public:
  // What the device must do with the connection after a call.
  enum class Fate { Open, Release, ReleaseWithRst };

  // A guest's REQUEST that the device has connected to a host socket:
  // RESPONSE goes out first.
  static VsockConnection from_guest(Fd host, const VsockHeader& request,
                                    const VsockConnectionLimits& limits, VsockClock::time_point now);
  // A host client's CONNECT: the REQUEST goes out first, then the
  // connection waits (until the connect deadline) for the guest's RESPONSE.
  static VsockConnection to_guest(Fd host, uint64_t guest_cid, uint32_t guest_port,
                                  uint32_t local_port, const VsockConnectionLimits& limits,
                                  VsockClock::time_point now);

  VsockConnection(VsockConnection&&) noexcept = default;
  VsockConnection& operator=(VsockConnection&&) noexcept = default;

  // A driver packet of this flow that passed check_tx_header.
  void on_guest_packet(const VsockHeader& header, std::span<const std::byte> payload);
  // The host socket became ready (epoll bits).
  void on_host_ready(uint32_t events);
  void on_tick(VsockClock::time_point now);

  // What the host socket's watch should wait for; nullopt means no watch
  // at all (the peer hung up, which epoll would report forever, or the
  // connection is over).
  std::optional<Ready> host_interest() const;

  bool has_rx_packet() const;
  // Fills header and up to room payload bytes into data for the guest's
  // rx queue; returns the payload length. Only if has_rx_packet().
  uint32_t next_rx_packet(VsockHeader& header, std::span<std::byte> data);

  Fate fate() const { return fate_; }
  // Why the connection ends, for the log.
  std::string_view fate_reason() const { return fate_reason_; }
  // The header of the RST the device sends for ReleaseWithRst.
  VsockHeader rst_header() const;
  bool has_deadline() const { return deadline_.has_value(); }

  int host_fd() const { return host_.get(); }
  uint32_t guest_port() const { return guest_port_; }
  uint32_t host_port() const { return host_port_; }
  bool established() const { return state_ == State::Established; }
  // Guest data held for the host socket, and what the guest may still send.
  size_t to_host_bytes() const { return to_host_.size() - to_host_prefix_; }
  uint32_t peer_free() const { return peer_free_bytes(peer_buf_alloc_, peer_fwd_cnt_, tx_cnt_); }

 private:
  enum class State { Dialing, Established };

  // A FIFO of bytes that keeps its storage.
  struct ByteQueue {
    std::vector<std::byte> bytes;
    size_t head = 0;
    size_t size() const { return bytes.size() - head; }
    bool empty() const { return size() == 0; }
    std::span<const std::byte> front() const { return std::span(bytes).subspan(head); }
    void append(std::span<const std::byte> data) { bytes.insert(bytes.end(), data.begin(), data.end()); }
    void consume(size_t count);
    void clear() { bytes.clear(); head = 0; }
  };

  VsockConnection(Fd host, State state, uint64_t guest_cid, uint32_t guest_port,
                  uint32_t host_port, const VsockConnectionLimits& limits);

  VsockHeader header(uint16_t op) const;
  void end(Fate fate, std::string_view reason);
  bool can_read_host() const;
  void read_host();
  void flush_to_host();
  void shut_host_write_if_done();
  // Recomputes what to tell the guest and whether the connection is over;
  // runs at the end of every public call.
  void settle();

  Fd host_;
  State state_;
  uint64_t guest_cid_;
  uint32_t guest_port_;
  uint32_t host_port_;
  VsockConnectionLimits limits_;
  Fate fate_ = Fate::Open;
  std::string_view fate_reason_;
  std::optional<VsockClock::time_point> deadline_;
  VsockClock::time_point now_;

  bool request_pending_ = false;   // our REQUEST not yet in an rx buffer
  bool response_pending_ = false;  // our RESPONSE not yet in an rx buffer

  // Guest -> host.
  ByteQueue to_host_;
  size_t to_host_prefix_ = 0;  // leading bytes that are our "OK" line, not guest data
  uint32_t rx_cnt_ = 0;        // guest payload bytes received
  uint32_t fwd_cnt_ = 0;       // of those, written to the host socket
  uint32_t advertised_fwd_cnt_ = 0;
  bool credit_update_pending_ = false;

  // Host -> guest.
  ByteQueue staged_;           // read from the host, not yet in an rx buffer
  uint32_t tx_cnt_ = 0;        // payload bytes put in rx buffers
  uint32_t peer_buf_alloc_ = 0;
  uint32_t peer_fwd_cnt_ = 0;
  bool credit_request_pending_ = false;
  bool credit_requested_ = false;  // sent since the credit last moved

  bool guest_shut_send_ = false;
  bool guest_shut_recv_ = false;
  bool host_eof_ = false;         // the host will send no more
  bool host_hup_ = false;         // the host hung up: it will read no more either
  bool host_write_shut_ = false;  // we shut the host socket's write side
  uint32_t shutdown_sent_ = 0;    // SHUTDOWN flags the guest has been told
};

}  // namespace keel::devices::virtio
