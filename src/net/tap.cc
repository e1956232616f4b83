// Tap: see tap.h.
#include "net/tap.h"

#include <linux/if_bridge.h>
#include <linux/if_tun.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <cstring>

#include <fmt/format.h>

namespace keel::net {
namespace {

ifreq request_for(const std::string& interface) {
  ifreq request{};
  std::memcpy(request.ifr_name, interface.data(), std::min(interface.size(), size_t{IFNAMSIZ - 1}));
  return request;
}

// Interface ioctls (MTU, flags, bridge ports) go through any socket.
Result<Fd> control_socket() {
  int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail_errno("socket for interface ioctls");
  return Fd(fd);
}

// Whether interface index is a port of bridge, through the bridge's own
// port list (sysfs would show the namespace it was mounted in, which need
// not be ours).
bool is_port_of(const Fd& socket, const std::string& bridge, unsigned int index) {
  std::array<int, 1024> ports{};  // BR_MAX_PORTS
  ifreq request = request_for(bridge);
  unsigned long args[4] = {BRCTL_GET_PORT_LIST, reinterpret_cast<unsigned long>(ports.data()),
                           ports.size(), 0};
  request.ifr_data = reinterpret_cast<char*>(args);
  if (::ioctl(socket.get(), SIOCDEVPRIVATE, &request) < 0) return false;
  return std::find(ports.begin(), ports.end(), static_cast<int>(index)) != ports.end();
}

}  // namespace

Result<std::unique_ptr<Tap>> Tap::open(const TapOptions& options) {
  const std::string& name = options.name;
  if (name.empty() || name.size() >= IFNAMSIZ) {
    return fail(Errc::InvalidArgument,
                fmt::format("tap '{}': an interface name has 1-{} bytes", name, IFNAMSIZ - 1));
  }
  Fd fd = TRY_CONTEXT(Fd::open("/dev/net/tun", O_RDWR | O_NONBLOCK),
                      fmt::format("tap '{}' (is the tun module loaded?)", name));
  unsigned int supported = 0;
  if (::ioctl(fd.get(), TUNGETFEATURES, &supported) < 0) {
    return fail_errno(fmt::format("tap '{}': TUNGETFEATURES", name));
  }
  if (!(supported & IFF_VNET_HDR)) {
    return fail(Errc::Unsupported,
                fmt::format("tap '{}': the kernel's tun driver lacks IFF_VNET_HDR", name));
  }

  // TUNSETIFF attaches to an existing tap or creates one; which it did is
  // only for the log, so the race with someone creating it meanwhile is
  // harmless.
  const bool existed = ::if_nametoindex(name.c_str()) != 0;
  ifreq request = request_for(name);
  request.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
  if (::ioctl(fd.get(), TUNSETIFF, &request) < 0) {
    int error = errno;
    switch (error) {
      case EPERM:
        return fail_errno(
            fmt::format("tap '{}': {} it needs CAP_NET_ADMIN (or a persistent tap owned by "
                        "this user or group)",
                        name, existed ? "attaching to" : "creating"),
            error);
      case EBUSY:
        return fail_errno(fmt::format("tap '{}': already attached to another process", name),
                          error);
      case EINVAL:
        return fail_errno(
            fmt::format("tap '{}': an interface of that name exists but is not a tap "
                        "(a tun device or another kind of interface)",
                        name),
            error);
      default:
        return fail_errno(fmt::format("tap '{}': TUNSETIFF", name), error);
    }
  }
  // The kernel may have completed a name with a %d; keep the one it chose.
  std::string interface(request.ifr_name, ::strnlen(request.ifr_name, IFNAMSIZ));
  std::unique_ptr<Tap> tap(new Tap(std::move(fd), std::move(interface), !existed));

  int header_bytes = static_cast<int>(kVnetHeaderBytes);
  if (::ioctl(tap->fd(), TUNSETVNETHDRSZ, &header_bytes) < 0) {
    return fail_errno(fmt::format("tap '{}': TUNSETVNETHDRSZ {}", name, header_bytes));
  }
  // Nothing the guest has not agreed to receive, until it negotiates.
  TRY(tap->set_offloads(Offloads{}));
  TRY(tap->set_mtu(options.mtu));
  TRY(tap->set_up());
  if (!options.bridge.empty()) TRY(tap->join_bridge(options.bridge));
  return tap;
}

Result<void> Tap::set_offloads(const Offloads& offloads) {
  // TUN_F_* say what the tap may hand us: the guest's receive offloads.
  // Linux takes TSO only together with partial checksums.
  unsigned int flags = 0;
  if (offloads.csum) {
    flags |= TUN_F_CSUM;
    if (offloads.tso4) flags |= TUN_F_TSO4;
    if (offloads.tso6) flags |= TUN_F_TSO6;
    if ((offloads.tso4 || offloads.tso6) && offloads.tso_ecn) flags |= TUN_F_TSO_ECN;
  }
  if (::ioctl(fd_.get(), TUNSETOFFLOAD, static_cast<unsigned long>(flags)) < 0) {
    return fail_errno(fmt::format("{}: TUNSETOFFLOAD {:#x}", label_, flags));
  }
  return ok();
}

Result<void> Tap::set_mtu(uint32_t mtu) const {
  Fd socket = TRY(control_socket());
  ifreq request = request_for(interface_);
  request.ifr_mtu = static_cast<int>(mtu);
  if (::ioctl(socket.get(), SIOCSIFMTU, &request) < 0) {
    return fail_errno(fmt::format("{}: set MTU {}", label_, mtu));
  }
  return ok();
}

Result<void> Tap::set_up() const {
  Fd socket = TRY(control_socket());
  ifreq request = request_for(interface_);
  if (::ioctl(socket.get(), SIOCGIFFLAGS, &request) < 0) {
    return fail_errno(fmt::format("{}: read interface flags", label_));
  }
  if (request.ifr_flags & IFF_UP) return ok();
  request.ifr_flags = static_cast<short>(request.ifr_flags | IFF_UP);
  if (::ioctl(socket.get(), SIOCSIFFLAGS, &request) < 0) {
    return fail_errno(fmt::format("{}: bring the link up", label_));
  }
  return ok();
}

Result<void> Tap::join_bridge(const std::string& bridge) const {
  if (bridge.size() >= IFNAMSIZ) {
    return fail(Errc::InvalidArgument, fmt::format("bridge '{}': name longer than {} bytes",
                                                   bridge, IFNAMSIZ - 1));
  }
  unsigned int index = ::if_nametoindex(interface_.c_str());
  if (index == 0) return fail_errno(fmt::format("{}: interface index", label_));
  if (::if_nametoindex(bridge.c_str()) == 0) {
    return fail(Errc::NotFound,
                fmt::format("{}: bridge '{}' does not exist (create it first, e.g. "
                            "ip link add {} type bridge)",
                            label_, bridge, bridge));
  }
  Fd socket = TRY(control_socket());
  ifreq request = request_for(bridge);
  request.ifr_ifindex = static_cast<int>(index);
  if (::ioctl(socket.get(), SIOCBRADDIF, &request) == 0) return ok();
  int error = errno;
  // An existing tap may already be a port: fine if of this very bridge.
  if (error == EBUSY) {
    if (is_port_of(socket, bridge, index)) return ok();
    return fail_errno(fmt::format("{}: cannot join bridge '{}': already a port of another "
                                  "bridge or bond",
                                  label_, bridge),
                      error);
  }
  if (error == ENODEV) {
    return fail_errno(fmt::format("{}: bridge '{}' does not exist", label_, bridge), error);
  }
  if (error == EOPNOTSUPP || error == EINVAL) {
    return fail_errno(fmt::format("{}: '{}' is not a bridge", label_, bridge), error);
  }
  return fail_errno(fmt::format("{}: join bridge '{}'", label_, bridge), error);
}

}  // namespace keel::net
