#include "migration/transport.h"

#include <fmt/format.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <memory>

namespace keel::migration {
namespace {

Result<sockaddr_un> unix_address(const StreamAddress& address) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (address.path.size() >= sizeof(addr.sun_path)) {
    return fail(Errc::InvalidArgument, fmt::format("{}: the path is longer than {} bytes",
                                                   address.text, sizeof(addr.sun_path) - 1));
  }
  std::memcpy(addr.sun_path, address.path.c_str(), address.path.size() + 1);
  return addr;
}

using AddrInfo = std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)>;

Result<AddrInfo> resolve(const StreamAddress& address, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* found = nullptr;
  std::string port = std::to_string(address.port);
  int rc = ::getaddrinfo(address.host.empty() ? nullptr : address.host.c_str(), port.c_str(),
                         &hints, &found);
  if (rc != 0) {
    return fail(Errc::NotFound, fmt::format("{}: {}", address.text, ::gai_strerror(rc)));
  }
  return AddrInfo(found, &::freeaddrinfo);
}

}  // namespace

Result<StreamAddress> parse_stream_address(std::string_view text) {
  StreamAddress address;
  address.text = std::string(text);
  if (text.starts_with("unix:")) {
    address.kind = StreamAddress::Kind::Unix;
    address.path = std::string(text.substr(5));
    if (address.path.empty()) {
      return fail(Errc::InvalidArgument, fmt::format("'{}': unix: needs a socket path", text));
    }
    for (char c : address.path) {
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
        return fail(Errc::InvalidArgument,
                    fmt::format("'{}': the path has a control character", text));
      }
    }
    TRY(unix_address(address));
    return address;
  }
  if (text.starts_with("tcp:")) {
    address.kind = StreamAddress::Kind::Tcp;
    std::string_view rest = text.substr(4);
    size_t colon = rest.rfind(':');
    if (colon == std::string_view::npos) {
      return fail(Errc::InvalidArgument, fmt::format("'{}': tcp: needs HOST:PORT", text));
    }
    std::string_view host = rest.substr(0, colon);
    std::string_view port = rest.substr(colon + 1);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
      host = host.substr(1, host.size() - 2);
    }
    unsigned value = 0;
    auto [end, error] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (port.empty() || error != std::errc() || end != port.data() + port.size() || value == 0 ||
        value > 65535) {
      return fail(Errc::InvalidArgument,
                  fmt::format("'{}': port '{}' is not a number from 1 to 65535", text, port));
    }
    if (host.empty()) {
      return fail(Errc::InvalidArgument, fmt::format("'{}': tcp: needs a host", text));
    }
    address.host = std::string(host);
    address.port = static_cast<uint16_t>(value);
    return address;
  }
  return fail(Errc::InvalidArgument, fmt::format("'{}' is not unix:PATH or tcp:HOST:PORT", text));
}

Result<Fd> connect_stream(const StreamAddress& address) {
  if (address.kind == StreamAddress::Kind::Unix) {
    sockaddr_un addr = TRY(unix_address(address));
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd.valid()) return fail_errno("socket");
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) {
      return fail_errno(fmt::format("connect to {}", address.text));
    }
    return fd;
  }
  AddrInfo found = TRY(resolve(address, false));
  int last_errno = ECONNREFUSED;
  for (addrinfo* entry = found.get(); entry != nullptr; entry = entry->ai_next) {
    Fd fd(::socket(entry->ai_family, entry->ai_socktype | SOCK_CLOEXEC, entry->ai_protocol));
    if (!fd.valid()) continue;
    if (::connect(fd.get(), entry->ai_addr, entry->ai_addrlen) == 0) {
      int one = 1;
      (void)::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      return fd;
    }
    last_errno = errno;
  }
  errno = last_errno;
  return fail_errno(fmt::format("connect to {}", address.text));
}

Result<Fd> listen_stream(const StreamAddress& address) {
  if (address.kind == StreamAddress::Kind::Unix) {
    sockaddr_un addr = TRY(unix_address(address));
    struct stat info {};
    if (::lstat(address.path.c_str(), &info) == 0 && S_ISSOCK(info.st_mode)) {
      ::unlink(address.path.c_str());  // a stale socket from an earlier run
    }
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd.valid()) return fail_errno("socket");
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) {
      return fail_errno(fmt::format("bind {}", address.text));
    }
    if (::listen(fd.get(), 1) < 0) return fail_errno(fmt::format("listen on {}", address.text));
    return fd;
  }
  AddrInfo found = TRY(resolve(address, true));
  int last_errno = EADDRNOTAVAIL;
  for (addrinfo* entry = found.get(); entry != nullptr; entry = entry->ai_next) {
    Fd fd(::socket(entry->ai_family, entry->ai_socktype | SOCK_CLOEXEC, entry->ai_protocol));
    if (!fd.valid()) continue;
    int one = 1;
    (void)::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd.get(), entry->ai_addr, entry->ai_addrlen) == 0 && ::listen(fd.get(), 1) == 0) {
      return fd;
    }
    last_errno = errno;
  }
  errno = last_errno;
  return fail_errno(fmt::format("listen on {}", address.text));
}

Result<Fd> accept_stream(const Fd& listener, const StreamAddress& address, int timeout_ms) {
  for (;;) {
    pollfd waiting{.fd = listener.get(), .events = POLLIN, .revents = 0};
    int ready = ::poll(&waiting, 1, timeout_ms);
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) return fail_errno(fmt::format("wait for a connection on {}", address.text));
    if (ready == 0) {
      return fail(Errc::Timeout, fmt::format("no migration connection on {} within {} ms",
                                             address.text, timeout_ms));
    }
    Fd fd(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (fd.valid()) {
      if (address.kind == StreamAddress::Kind::Tcp) {
        int one = 1;
        (void)::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      }
      return fd;
    }
    if (errno != EINTR && errno != ECONNABORTED) {
      return fail_errno(fmt::format("accept on {}", address.text));
    }
  }
}

}  // namespace keel::migration
