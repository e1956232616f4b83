#include "migration/transport.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "migration/stream.h"

namespace keel::migration {
namespace {

TEST(TransportTest, ParsesAddresses) {
  StreamAddress unix_socket = *parse_stream_address("unix:/run/keel/mig.sock");
  EXPECT_EQ(unix_socket.kind, StreamAddress::Kind::Unix);
  EXPECT_EQ(unix_socket.path, "/run/keel/mig.sock");
  StreamAddress tcp = *parse_stream_address("tcp:10.0.0.2:4444");
  EXPECT_EQ(tcp.kind, StreamAddress::Kind::Tcp);
  EXPECT_EQ(tcp.host, "10.0.0.2");
  EXPECT_EQ(tcp.port, 4444);
  StreamAddress v6 = *parse_stream_address("tcp:[::1]:80");
  EXPECT_EQ(v6.host, "::1");
  EXPECT_EQ(v6.port, 80);
}

TEST(TransportTest, RefusesBadAddressesNamingThem) {
  for (const std::string& text : std::vector<std::string>{
           "", "unix:", "tcp:host", "tcp::80", "tcp:h:0", "tcp:h:65536", "tcp:h:8x", "udp:h:1",
           "/path", "unix:/a\nb", "unix:/" + std::string(200, 'a')}) {
    Result<StreamAddress> parsed = parse_stream_address(text);
    ASSERT_FALSE(parsed) << text;
    EXPECT_EQ(parsed.error().code(), Errc::InvalidArgument) << text;
  }
  EXPECT_NE(parse_stream_address("tcp:h:99999").error().context().find("99999"), std::string::npos);
}

void expect_connects(const std::string& text) {
  StreamAddress address = *parse_stream_address(text);
  Result<Fd> listener = listen_stream(address);
  ASSERT_TRUE(listener) << listener.error().message();
  Result<Fd> source = connect_stream(address);
  ASSERT_TRUE(source) << source.error().message();
  Result<Fd> destination = accept_stream(*listener, address, 1000);
  ASSERT_TRUE(destination) << destination.error().message();
  StreamWriter writer(*source);
  ASSERT_TRUE(writer.write_preamble());
  StreamReader reader(*destination, text);
  EXPECT_TRUE(reader.read_preamble(1000));
}

TEST(TransportTest, ConnectsOverUnixSockets) {
  std::string path = ::testing::TempDir() + "keel-transport-" + std::to_string(::getpid());
  expect_connects("unix:" + path);
  expect_connects("unix:" + path);  // a stale socket file is replaced
  ::unlink(path.c_str());
}

TEST(TransportTest, ConnectsOverTcpLoopback) {
  // A port from the dynamic range, derived from the pid to dodge parallel runs.
  expect_connects("tcp:127.0.0.1:" + std::to_string(40000 + ::getpid() % 20000));
}

TEST(TransportTest, AcceptTimesOutAndConnectFails) {
  std::string path = ::testing::TempDir() + "keel-transport-idle-" + std::to_string(::getpid());
  StreamAddress address = *parse_stream_address("unix:" + path);
  Result<Fd> listener = listen_stream(address);
  ASSERT_TRUE(listener);
  Result<Fd> accepted = accept_stream(*listener, address, 10);
  ASSERT_FALSE(accepted);
  EXPECT_EQ(accepted.error().code(), Errc::Timeout);
  ::unlink(path.c_str());
  Result<Fd> connected = connect_stream(address);
  ASSERT_FALSE(connected);
  EXPECT_NE(connected.error().context().find(path), std::string::npos);
}

}  // namespace
}  // namespace keel::migration
