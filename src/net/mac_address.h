// MacAddress: an Ethernet address as the guest sees it in virtio-net's
// configuration space, parsed from "52:54:00:12:34:56".
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "base/result.h"

namespace keel::net {

struct MacAddress {
  std::array<uint8_t, 6> bytes{};

  // Six two-digit hex octets separated by ':'. A multicast address (low bit
  // of the first octet) cannot be a NIC's own and is refused.
  static Result<MacAddress> parse(std::string_view text);
  // 52:54:00:xx:xx:xx with three random octets: locally administered,
  // unicast, in the prefix QEMU and libvirt use for guests.
  static MacAddress random_local();

  std::string to_string() const;
  bool operator==(const MacAddress&) const = default;
};

}  // namespace keel::net
