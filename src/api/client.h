// A synchronous client for the control API on its unix socket: keelctl and
// the tests use it. One connection per request (Connection: close).
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <string_view>

#include "base/result.h"

namespace keel::api {

struct HttpReply {
  unsigned status = 0;
  std::string content_type;
  std::string body;
};

class Client {
 public:
  // timeout bounds connecting, sending and each read (not a followed stream).
  explicit Client(std::string socket_path,
                  std::chrono::milliseconds timeout = std::chrono::seconds(30))
      : socket_path_(std::move(socket_path)), timeout_(timeout) {}

  // NotFound if the socket does not exist, Io if nobody serves it; an
  // HTTP error status is a reply, not an error.
  Result<HttpReply> request(std::string_view method, std::string_view target,
                            std::string_view body = "") const;

  // GET target and hand each line of a 200 body to on_line until the server
  // closes or on_line returns false. A non-200 reply comes back whole.
  Result<HttpReply> stream_lines(std::string_view target,
                                 const std::function<bool(std::string_view)>& on_line) const;

  const std::string& socket_path() const { return socket_path_; }

 private:
  std::string socket_path_;
  std::chrono::milliseconds timeout_;
};

}  // namespace keel::api
