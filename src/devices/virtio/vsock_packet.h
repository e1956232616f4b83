// virtio-vsock packets. Spec: virtio 1.2 §5.10.6 (device operation): the
// packet header struct virtio_vsock_hdr, the op and type constants,
// §5.10.6.2 addressing, §5.10.6.3 buffer space management (credit),
// §5.10.6.4 receive and transmit (RST for an unknown type), §5.10.6.5
// stream sockets (SHUTDOWN flags).
// Implemented: the header layout, the constants, the checks every packet
// from the driver goes through before it reaches a connection, reply
// headers, and the credit arithmetic. Missing: SEQPACKET (type 2, EOM/EOR
// flags), which the device never offers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace keel::devices::virtio {

// struct virtio_vsock_hdr (§5.10.6), little-endian, 44 bytes, no padding.
struct [[gnu::packed]] VsockHeader {
  uint64_t src_cid;
  uint64_t dst_cid;
  uint32_t src_port;
  uint32_t dst_port;
  uint32_t len;
  uint16_t type;
  uint16_t op;
  uint32_t flags;
  uint32_t buf_alloc;
  uint32_t fwd_cnt;
};
static_assert(sizeof(VsockHeader) == 44);
inline constexpr uint32_t kVsockHeaderBytes = sizeof(VsockHeader);

// Well-known CIDs (§5.10.4).
inline constexpr uint64_t kVsockHostCid = 2;

// Feature bits (§5.10.3). Without any, the device is stream-only.
inline constexpr uint64_t kVsockFeatureStream = 1ull << 0;
inline constexpr uint64_t kVsockFeatureSeqpacket = 1ull << 1;

inline constexpr uint16_t kVsockTypeStream = 1;

// Operations (§5.10.6).
inline constexpr uint16_t kVsockOpRequest = 1;
inline constexpr uint16_t kVsockOpResponse = 2;
inline constexpr uint16_t kVsockOpRst = 3;
inline constexpr uint16_t kVsockOpShutdown = 4;
inline constexpr uint16_t kVsockOpRw = 5;
inline constexpr uint16_t kVsockOpCreditUpdate = 6;
inline constexpr uint16_t kVsockOpCreditRequest = 7;

// Event IDs (§5.10.6, device events: struct virtio_vsock_event).
inline constexpr uint32_t kVsockEventTransportReset = 0;

// SHUTDOWN flags (§5.10.6.5): the sender will not receive / not send more.
inline constexpr uint32_t kVsockShutdownRcv = 1;
inline constexpr uint32_t kVsockShutdownSend = 2;
inline constexpr uint32_t kVsockShutdownBoth = kVsockShutdownRcv | kVsockShutdownSend;

// The largest payload one packet may carry, as Linux's
// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE; a driver announcing more is hostile.
inline constexpr uint32_t kVsockMaxPayloadBytes = 64 << 10;

// What is wrong with a packet from the driver, found before any
// connection sees it.
enum class VsockPacketError {
  None,
  PayloadTooLong,   // len above kVsockMaxPayloadBytes
  PayloadPastChain, // len larger than the chain's readable bytes after the header
  WrongSource,      // src_cid is not the guest's CID (§5.10.6.4)
  WrongDestination, // dst_cid is not the host: Keel connects the guest to the host only
  BadType,          // not STREAM: answered with RST (§5.10.6.4)
  BadOp,            // INVALID or an op past CREDIT_REQUEST
};

std::string_view to_string(VsockPacketError error);

// Checks a tx packet's header; payload_bytes is what the chain holds after
// the header.
VsockPacketError check_tx_header(const VsockHeader& header, uint64_t payload_bytes,
                                 uint64_t guest_cid);

// Whether a packet with this error is answered with RST: everything whose
// addresses can be trusted enough to reply to, except an RST itself (two
// peers must never trade RSTs forever).
bool error_wants_rst(const VsockHeader& header, VsockPacketError error);

// The header of a reply to packet: addresses swapped, no payload, no credit
// information (the caller fills buf_alloc/fwd_cnt where a connection has them).
VsockHeader reply_header(const VsockHeader& packet, uint16_t op);

// §5.10.6.3: the free space a peer has for us, given what it announced and
// what we have sent. All three counters are free-running u32 values; a peer
// that claims to have consumed more than we sent, or shrank its buffer
// below what is in flight, gets 0, never a huge wrapped value.
constexpr uint32_t peer_free_bytes(uint32_t peer_buf_alloc, uint32_t peer_fwd_cnt,
                                   uint32_t tx_cnt) {
  uint32_t in_flight = tx_cnt - peer_fwd_cnt;
  return in_flight > peer_buf_alloc ? 0 : peer_buf_alloc - in_flight;
}

}  // namespace keel::devices::virtio
