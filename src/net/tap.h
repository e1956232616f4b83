// Tap: a Linux tap device as a NetBackend. Opens /dev/net/tun with
// TUNSETIFF (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), which attaches to an
// existing tap of that name or creates one; sets the 12-byte vnet header
// (TUNSETVNETHDRSZ), the offloads (TUNSETOFFLOAD), the MTU (SIOCSIFMTU),
// brings the link up and optionally makes it a port of an existing bridge
// (SIOCBRADDIF). The descriptor is non-blocking.
// A tap this class created is not persistent: it disappears (and leaves its
// bridge) when the Tap is destroyed. An existing tap is left as it is.
// Implemented: the above, errors naming the tap or bridge. Missing:
// multiqueue taps (IFF_MULTI_QUEUE), USO offloads (Linux 6.2+).
#pragma once

#include <memory>
#include <string>

#include "base/fd.h"
#include "base/result.h"
#include "net/net_backend.h"

namespace keel::net {

struct TapOptions {
  std::string name;    // the interface name, 1-15 bytes
  uint32_t mtu = 1500;
  std::string bridge;  // an existing bridge to join; empty for none
};

class Tap final : public NetBackend {
 public:
  // Needs CAP_NET_ADMIN to create a tap, set its MTU or join a bridge.
  static Result<std::unique_ptr<Tap>> open(const TapOptions& options);

  int fd() const override { return fd_.get(); }
  Result<void> set_offloads(const Offloads& offloads) override;
  std::string_view name() const override { return label_; }

  const std::string& interface_name() const { return interface_; }
  // Whether open() made the interface (rather than attaching to one).
  bool created() const { return created_; }

 private:
  Tap(Fd fd, std::string interface, bool created)
      : fd_(std::move(fd)), interface_(std::move(interface)), label_("tap " + interface_),
        created_(created) {}

  Result<void> set_mtu(uint32_t mtu) const;
  Result<void> set_up() const;
  Result<void> join_bridge(const std::string& bridge) const;

  Fd fd_;
  std::string interface_;
  std::string label_;
  bool created_;
};

}  // namespace keel::net
