// virtio-vsock packets: see vsock_packet.h for the status card.
#include "devices/virtio/vsock_packet.h"

namespace keel::devices::virtio {

std::string_view to_string(VsockPacketError error) {
  switch (error) {
    case VsockPacketError::None: return "none";
    case VsockPacketError::PayloadTooLong: return "payload longer than 64 KiB";
    case VsockPacketError::PayloadPastChain: return "len past the end of the chain";
    case VsockPacketError::WrongSource: return "src_cid is not the guest's CID";
    case VsockPacketError::WrongDestination: return "dst_cid is not the host";
    case VsockPacketError::BadType: return "type is not STREAM";
    case VsockPacketError::BadOp: return "unknown op";
  }
  return "?";
}

VsockPacketError check_tx_header(const VsockHeader& header, uint64_t payload_bytes,
                                 uint64_t guest_cid) {
  if (header.len > kVsockMaxPayloadBytes) return VsockPacketError::PayloadTooLong;
  if (header.len > payload_bytes) return VsockPacketError::PayloadPastChain;
  if (header.src_cid != guest_cid) return VsockPacketError::WrongSource;
  if (header.dst_cid != kVsockHostCid) return VsockPacketError::WrongDestination;
  if (header.type != kVsockTypeStream) return VsockPacketError::BadType;
  if (header.op < kVsockOpRequest || header.op > kVsockOpCreditRequest) {
    return VsockPacketError::BadOp;
  }
  return VsockPacketError::None;
}

bool error_wants_rst(const VsockHeader& header, VsockPacketError error) {
  if (error == VsockPacketError::None || header.op == kVsockOpRst) return false;
  // A packet claiming another source CID would make our RST go to someone
  // the guest is not; the guest's driver drops such a reply anyway (its
  // dst_cid would not be the guest's), so answering costs an rx buffer for
  // nothing.
  return error != VsockPacketError::WrongSource;
}

VsockHeader reply_header(const VsockHeader& packet, uint16_t op) {
  return VsockHeader{.src_cid = packet.dst_cid,
                     .dst_cid = packet.src_cid,
                     .src_port = packet.dst_port,
                     .dst_port = packet.src_port,
                     .len = 0,
                     .type = kVsockTypeStream,
                     .op = op,
                     .flags = 0,
                     .buf_alloc = 0,
                     .fwd_cnt = 0};
}

}  // namespace keel::devices::virtio
