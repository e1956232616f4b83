// Tap tests on real tap devices, each in a network namespace of its own
// (net_namespace.h); skipped, saying why, without /dev/net/tun or the right
// to unshare. Covered: create and attach, MTU, link up, non-blocking fd,
// frames both ways with the 12-byte vnet header, offloads, joining a
// bridge (again, and a missing one), a name that is not a tap, and the
// CAP_NET_ADMIN error. Also MacAddress.
#include "net/tap.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if_bridge.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <linux/sockios.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <linux/capability.h>

#include <array>
#include <chrono>
#include <cstring>
#include <optional>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "net/mac_address.h"
#include "net/net_namespace.h"

namespace keel::net {
namespace {

using ::testing::HasSubstr;

constexpr uint16_t kTestEtherType = 0x88b5;  // IEEE local experimental

ifreq request_for(const char* name) {
  ifreq request{};
  std::strncpy(request.ifr_name, name, IFNAMSIZ - 1);
  return request;
}

Fd inet_socket() { return Fd(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0)); }

int interface_mtu(const char* name) {
  Fd socket = inet_socket();
  ifreq request = request_for(name);
  if (::ioctl(socket.get(), SIOCGIFMTU, &request) < 0) return -1;
  return request.ifr_mtu;
}

int interface_flags(const char* name) {
  Fd socket = inet_socket();
  ifreq request = request_for(name);
  if (::ioctl(socket.get(), SIOCGIFFLAGS, &request) < 0) return -1;
  return request.ifr_flags;
}

// Makes a bridge; empty on success, else why not.
std::string add_bridge(const char* name) {
  Fd socket = inet_socket();
  if (::ioctl(socket.get(), SIOCBRADDBR, name) < 0) {
    return std::string("cannot create a bridge (bridge module?): ") + std::strerror(errno);
  }
  return {};
}

// The interface indices of a bridge's ports (the old bridge ioctl; sysfs
// shows the namespace it was mounted in, not ours).
std::vector<int> bridge_ports(const char* bridge) {
  std::array<int, 256> indices{};
  Fd socket = inet_socket();
  ifreq request = request_for(bridge);
  unsigned long args[4] = {BRCTL_GET_PORT_LIST, reinterpret_cast<unsigned long>(indices.data()),
                           indices.size(), 0};
  request.ifr_data = reinterpret_cast<char*>(args);
  if (::ioctl(socket.get(), SIOCDEVPRIVATE, &request) < 0) return {};
  std::vector<int> ports;
  for (int index : indices) {
    if (index != 0) ports.push_back(index);
  }
  return ports;
}

// A persistent tap made behind Tap's back, as an administrator would.
void make_persistent_tap(const char* name) {
  Fd fd(::open("/dev/net/tun", O_RDWR | O_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  ifreq request = request_for(name);
  request.ifr_flags = IFF_TAP | IFF_NO_PI;
  ASSERT_EQ(::ioctl(fd.get(), TUNSETIFF, &request), 0) << std::strerror(errno);
  ASSERT_EQ(::ioctl(fd.get(), TUNSETPERSIST, 1), 0) << std::strerror(errno);
}

std::vector<std::byte> ethernet_frame(size_t payload_bytes, uint8_t seed) {
  std::vector<std::byte> frame(14 + payload_bytes);
  for (size_t i = 0; i < 6; ++i) frame[i] = std::byte{0xff};
  const uint8_t source[6] = {0x52, 0x54, 0x00, 0xaa, 0xbb, seed};
  std::memcpy(frame.data() + 6, source, 6);
  frame[12] = std::byte{kTestEtherType >> 8};
  frame[13] = std::byte{kTestEtherType & 0xff};
  for (size_t i = 0; i < payload_bytes; ++i) frame[14 + i] = std::byte(static_cast<uint8_t>(seed + i));
  return frame;
}

// Reads from fd until a frame of our test EtherType arrives (the kernel
// sends IPv6 neighbour discovery out of a fresh link too); skip bytes of
// header come first.
std::optional<std::vector<std::byte>> read_test_frame(int fd, size_t skip) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  std::vector<std::byte> buffer(70000);
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, 100) <= 0) continue;
    ssize_t got = ::read(fd, buffer.data(), buffer.size());
    if (got < static_cast<ssize_t>(skip + 14)) continue;
    auto type = static_cast<uint16_t>((static_cast<uint8_t>(buffer[skip + 12]) << 8) |
                                      static_cast<uint8_t>(buffer[skip + 13]));
    if (type != kTestEtherType) continue;
    buffer.resize(static_cast<size_t>(got));
    return buffer;
  }
  return std::nullopt;
}

// An AF_PACKET socket on the tap interface: the far side of the link.
Fd packet_socket(const char* interface) {
  Fd fd(::socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(kTestEtherType)));
  EXPECT_TRUE(fd.valid()) << std::strerror(errno);
  sockaddr_ll address{};
  address.sll_family = AF_PACKET;
  address.sll_protocol = htons(kTestEtherType);
  address.sll_ifindex = static_cast<int>(::if_nametoindex(interface));
  EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0)
      << std::strerror(errno);
  return fd;
}

class TapTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why = testing::enter_private_net_namespace();
    if (!why.empty()) GTEST_SKIP() << why;
  }
};

TEST_F(TapTest, CreatesATapWithItsMtuAndTheLinkUp) {
  ASSERT_EQ(::if_nametoindex("keeltest0"), 0u);
  auto tap = Tap::open({.name = "keeltest0", .mtu = 9000, .bridge = ""});
  ASSERT_TRUE(tap.has_value()) << tap.error().message();
  EXPECT_TRUE((*tap)->created());
  EXPECT_EQ((*tap)->interface_name(), "keeltest0");
  EXPECT_EQ((*tap)->name(), "tap keeltest0");
  EXPECT_NE(::if_nametoindex("keeltest0"), 0u);
  EXPECT_EQ(interface_mtu("keeltest0"), 9000);
  EXPECT_TRUE(interface_flags("keeltest0") & IFF_UP);
  EXPECT_TRUE(::fcntl((*tap)->fd(), F_GETFL) & O_NONBLOCK);
  // Nothing sent yet that we asked for: a read does not block.
  std::array<std::byte, 64> buffer;
  (void)::read((*tap)->fd(), buffer.data(), buffer.size());  // may be IPv6 ND
  // A tap Tap made is not persistent: it goes with the object.
  tap->reset();
  EXPECT_EQ(::if_nametoindex("keeltest0"), 0u);
}

TEST_F(TapTest, AttachesToAnExistingTapAndLeavesIt) {
  make_persistent_tap("keeltest1");
  {
    auto tap = Tap::open({.name = "keeltest1", .mtu = 1500, .bridge = ""});
    ASSERT_TRUE(tap.has_value()) << tap.error().message();
    EXPECT_FALSE((*tap)->created());
    EXPECT_TRUE(interface_flags("keeltest1") & IFF_UP);
  }
  EXPECT_NE(::if_nametoindex("keeltest1"), 0u);
}

TEST_F(TapTest, FramesCrossTheTapBothWaysWithTheVnetHeader) {
  auto tap = Tap::open({.name = "keeltest2", .mtu = 1500, .bridge = ""});
  ASSERT_TRUE(tap.has_value()) << tap.error().message();
  Fd far_end = packet_socket("keeltest2");

  // Guest to host: header, then the frame; the host sees the frame alone.
  std::vector<std::byte> out(kVnetHeaderBytes, std::byte{0});
  std::vector<std::byte> frame = ethernet_frame(200, 7);
  out.insert(out.end(), frame.begin(), frame.end());
  ASSERT_EQ(::write((*tap)->fd(), out.data(), out.size()), static_cast<ssize_t>(out.size()))
      << std::strerror(errno);
  auto seen = read_test_frame(far_end.get(), 0);
  ASSERT_TRUE(seen.has_value());
  EXPECT_EQ(*seen, frame);

  // Host to guest: the tap hands over a 12-byte header before the frame.
  std::vector<std::byte> back = ethernet_frame(300, 9);
  ASSERT_EQ(::send(far_end.get(), back.data(), back.size(), 0), static_cast<ssize_t>(back.size()))
      << std::strerror(errno);
  auto received = read_test_frame((*tap)->fd(), kVnetHeaderBytes);
  ASSERT_TRUE(received.has_value());
  ASSERT_EQ(received->size(), kVnetHeaderBytes + back.size());
  EXPECT_TRUE(std::equal(back.begin(), back.end(), received->begin() + kVnetHeaderBytes));
  EXPECT_EQ((*received)[1], std::byte{0});  // gso_type NONE
}

TEST_F(TapTest, SetsOffloads) {
  auto tap = Tap::open({.name = "keeltest3", .mtu = 1500, .bridge = ""});
  ASSERT_TRUE(tap.has_value()) << tap.error().message();
  EXPECT_TRUE((*tap)->set_offloads({.csum = true, .tso4 = true, .tso6 = true, .tso_ecn = true})
                  .has_value());
  EXPECT_TRUE((*tap)->set_offloads({.csum = true}).has_value());
  // TSO without checksums is not a combination the tap takes; Tap asks for none.
  EXPECT_TRUE((*tap)->set_offloads({.tso4 = true}).has_value());
  EXPECT_TRUE((*tap)->set_offloads({}).has_value());
}

TEST_F(TapTest, JoinsAnExistingBridgeAgainAndAgain) {
  std::string why = add_bridge("keelbr0");
  if (!why.empty()) GTEST_SKIP() << why;
  make_persistent_tap("keeltest4");
  const int index = static_cast<int>(::if_nametoindex("keeltest4"));
  {
    auto tap = Tap::open({.name = "keeltest4", .mtu = 1500, .bridge = "keelbr0"});
    ASSERT_TRUE(tap.has_value()) << tap.error().message();
  }
  EXPECT_THAT(bridge_ports("keelbr0"), ::testing::ElementsAre(index));
  // The persistent tap stays a port; attaching again to the same bridge is fine.
  auto again = Tap::open({.name = "keeltest4", .mtu = 1500, .bridge = "keelbr0"});
  ASSERT_TRUE(again.has_value()) << again.error().message();
  EXPECT_THAT(bridge_ports("keelbr0"), ::testing::ElementsAre(index));
}

TEST_F(TapTest, ACreatedTapJoinsTheBridgeAndLeavesItWhenClosed) {
  std::string why = add_bridge("keelbr1");
  if (!why.empty()) GTEST_SKIP() << why;
  auto tap = Tap::open({.name = "keeltest5", .mtu = 9000, .bridge = "keelbr1"});
  ASSERT_TRUE(tap.has_value()) << tap.error().message();
  EXPECT_THAT(bridge_ports("keelbr1"),
              ::testing::ElementsAre(static_cast<int>(::if_nametoindex("keeltest5"))));
  tap->reset();
  EXPECT_TRUE(bridge_ports("keelbr1").empty());
}

TEST_F(TapTest, AMissingBridgeIsNamed) {
  auto tap = Tap::open({.name = "keeltest6", .mtu = 1500, .bridge = "nobridge0"});
  ASSERT_FALSE(tap.has_value());
  EXPECT_EQ(tap.error().code(), Errc::NotFound);
  EXPECT_THAT(tap.error().message(), HasSubstr("bridge 'nobridge0' does not exist"));
}

TEST_F(TapTest, AnInterfaceThatIsNotABridgeIsRefused) {
  make_persistent_tap("keeltest7");
  auto tap = Tap::open({.name = "keeltest8", .mtu = 1500, .bridge = "keeltest7"});
  ASSERT_FALSE(tap.has_value());
  EXPECT_THAT(tap.error().message(), HasSubstr("'keeltest7' is not a bridge"));
}

TEST_F(TapTest, AnInterfaceThatIsNotATapIsRefused) {
  auto tap = Tap::open({.name = "lo", .mtu = 1500, .bridge = ""});
  ASSERT_FALSE(tap.has_value());
  EXPECT_THAT(tap.error().message(), HasSubstr("tap 'lo': an interface of that name exists but is not a tap"));
}

TEST_F(TapTest, ABadNameIsRefused) {
  auto tap = Tap::open({.name = "a-name-of-16-byt", .mtu = 1500, .bridge = ""});
  ASSERT_FALSE(tap.has_value());
  EXPECT_EQ(tap.error().code(), Errc::InvalidArgument);
}

TEST_F(TapTest, WithoutCapNetAdminTheErrorSaysSo) {
  // In a child (a death test), drop CAP_NET_ADMIN from the effective set.
  auto child = [] {
    __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[2]{};
    if (::syscall(SYS_capget, &header, data) != 0) std::_Exit(2);
    data[CAP_NET_ADMIN / 32].effective &= ~(1u << (CAP_NET_ADMIN % 32));
    if (::syscall(SYS_capset, &header, data) != 0) std::_Exit(3);
    auto tap = Tap::open({.name = "keeltest9", .mtu = 1500, .bridge = ""});
    if (tap.has_value()) std::_Exit(4);
    if (tap.error().message().find("tap 'keeltest9': creating it needs CAP_NET_ADMIN") ==
        std::string::npos) {
      std::fprintf(stderr, "%s\n", tap.error().message().c_str());
      std::_Exit(5);
    }
    std::_Exit(0);
  };
  EXPECT_EXIT(child(), ::testing::ExitedWithCode(0), "");
}

TEST(MacAddressTest, ParsesAndPrints) {
  auto mac = MacAddress::parse("52:54:00:AB:cd:0f");
  ASSERT_TRUE(mac.has_value()) << mac.error().message();
  EXPECT_EQ(mac->bytes, (std::array<uint8_t, 6>{0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f}));
  EXPECT_EQ(mac->to_string(), "52:54:00:ab:cd:0f");
}

TEST(MacAddressTest, RefusesMalformedAndMulticast) {
  for (const char* text : {"", "52:54:00:12:34", "52:54:00:12:34:567", "52-54-00-12-34-56",
                           "52:54:00:12:34:5g", "52:54:00:12:34:56:"}) {
    auto mac = MacAddress::parse(text);
    EXPECT_FALSE(mac.has_value()) << text;
  }
  auto multicast = MacAddress::parse("01:00:5e:00:00:01");
  ASSERT_FALSE(multicast.has_value());
  EXPECT_THAT(multicast.error().message(), HasSubstr("multicast"));
}

TEST(MacAddressTest, RandomIsLocallyAdministeredUnicastIn525400) {
  MacAddress a = MacAddress::random_local();
  EXPECT_EQ(a.bytes[0], 0x52);
  EXPECT_EQ(a.bytes[1], 0x54);
  EXPECT_EQ(a.bytes[2], 0x00);
  EXPECT_EQ(a.bytes[0] & 1, 0);
  EXPECT_EQ(a.bytes[0] & 2, 2);
}

}  // namespace
}  // namespace keel::net
