#include "net/mac_address.h"

#include <sys/random.h>

#include <fmt/format.h>

namespace keel::net {
namespace {

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

Result<MacAddress> MacAddress::parse(std::string_view text) {
  auto bad = [&](std::string_view why) {
    return fail(Errc::InvalidArgument, fmt::format("MAC address '{}': {}", text, why));
  };
  // "xx:xx:xx:xx:xx:xx" is 17 characters.
  if (text.size() != 17) return bad("want six hex octets as xx:xx:xx:xx:xx:xx");
  MacAddress mac;
  for (size_t i = 0; i < 6; ++i) {
    int high = hex_digit(text[3 * i]);
    int low = hex_digit(text[3 * i + 1]);
    if (high < 0 || low < 0 || (i < 5 && text[3 * i + 2] != ':')) {
      return bad("want six hex octets as xx:xx:xx:xx:xx:xx");
    }
    mac.bytes[i] = static_cast<uint8_t>(high * 16 + low);
  }
  if (mac.bytes[0] & 1) return bad("a multicast address cannot be a NIC's own");
  return mac;
}

MacAddress MacAddress::random_local() {
  MacAddress mac{{0x52, 0x54, 0x00, 0, 0, 0}};
  uint8_t random[3] = {0, 0, 0};
  // getrandom for 3 bytes never blocks once the pool is initialised and is
  // never short; should it fail, a fixed suffix is still a valid address.
  if (::getrandom(random, sizeof(random), 0) != static_cast<ssize_t>(sizeof(random))) {
    random[0] = 0x12, random[1] = 0x34, random[2] = 0x56;
  }
  mac.bytes[3] = random[0];
  mac.bytes[4] = random[1];
  mac.bytes[5] = random[2];
  return mac;
}

std::string MacAddress::to_string() const {
  return fmt::format("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", bytes[0], bytes[1], bytes[2],
                     bytes[3], bytes[4], bytes[5]);
}

}  // namespace keel::net
