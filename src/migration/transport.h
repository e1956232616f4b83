// Where a migration stream goes: "unix:PATH" or "tcp:HOST:PORT", parsed
// with errors naming the text, and the connected sockets for either end.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "base/fd.h"
#include "base/result.h"

namespace keel::migration {

struct StreamAddress {
  enum class Kind { Unix, Tcp };
  Kind kind = Kind::Unix;
  std::string path;  // Unix
  std::string host;  // Tcp: a name or address ("[::1]" brackets allowed)
  uint16_t port = 0;
  std::string text;  // as given, for messages
};

Result<StreamAddress> parse_stream_address(std::string_view text);

// The source's end: a connected stream socket.
Result<Fd> connect_stream(const StreamAddress& address);

// The destination's end: a listening socket (a unix path is replaced if a
// stale socket is there), then one accepted connection. accept_stream
// waits at most timeout_ms (< 0: forever).
Result<Fd> listen_stream(const StreamAddress& address);
Result<Fd> accept_stream(const Fd& listener, const StreamAddress& address, int timeout_ms = -1);

}  // namespace keel::migration
