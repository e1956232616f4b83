// NetBackend: the host end of a guest NIC, the seam between virtio-net and
// the host (a tap device in keel-vmm, a socketpair in tests). It carries
// whole Ethernet frames, one per read or write, each prefixed by the 12-byte
// struct virtio_net_hdr_v1 (virtio 1.2 §5.1.6: flags, gso_type, hdr_len,
// gso_size, csum_start, csum_offset, num_buffers), in host byte order.
#pragma once

#include <cstdint>

#include "base/result.h"

namespace keel::net {

// The header every frame on a NetBackend starts with. VERSION_1 drivers use
// the 12-byte form whether or not buffers are merged (§5.1.6).
inline constexpr uint32_t kVnetHeaderBytes = 12;

// What the host may hand the guest without finishing it first: partial
// checksums and TCP segmentation offload (the guest's GUEST_* features).
struct Offloads {
  bool csum = false;     // partial checksums (VIRTIO_NET_F_GUEST_CSUM)
  bool tso4 = false;     // TCPv4 segments larger than the MTU
  bool tso6 = false;     // TCPv6 segments larger than the MTU
  bool tso_ecn = false;  // TSO with the ECN (CWR) bit set
  bool operator==(const Offloads&) const = default;
};

class NetBackend {
 public:
  virtual ~NetBackend() = default;
  // A non-blocking descriptor: read() yields one frame (header first),
  // writev() sends one. Owned by the backend; valid for its lifetime.
  virtual int fd() const = 0;
  // Sets what frames read from fd() may carry. Frames written may always
  // use any offload; the host finishes them.
  virtual Result<void> set_offloads(const Offloads& offloads) = 0;
  // A short name for logs: "tap keeltap0".
  virtual std::string_view name() const = 0;
};

}  // namespace keel::net
