#include "api/client.h"

#include <sys/socket.h>
#include <sys/time.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>

namespace keel::api {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using Protocol = net::local::stream_protocol;
using ErrorCode = boost::system::error_code;

namespace {

constexpr size_t kMaxReplyBytes = 16 << 20;

void set_timeouts(Protocol::socket& socket, std::chrono::milliseconds timeout) {
  timeval value{static_cast<time_t>(timeout.count() / 1000),
                static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
  ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &value, sizeof(value));
  ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_SNDTIMEO, &value, sizeof(value));
}

Failure io_failure(const std::string& what, const ErrorCode& error) {
  if (error.category() == boost::system::system_category() ||
      error.category() == boost::system::generic_category()) {
    return fail_errno(what, error.value());
  }
  return fail(Errc::Io, fmt::format("{}: {}", what, error.message()));
}

Result<void> connect_and_send(Protocol::socket& socket, const std::string& path,
                              std::chrono::milliseconds timeout, std::string_view method,
                              std::string_view target, std::string_view body) {
  ErrorCode error;
  socket.open(Protocol(), error);
  if (error) return io_failure("socket", error);
  set_timeouts(socket, timeout);
  socket.connect(Protocol::endpoint(path), error);
  if (error) return io_failure(fmt::format("connect to '{}'", path), error);
  http::request<http::string_body> request(
      http::string_to_verb(beast::string_view(method.data(), method.size())), std::string(target),
      11);
  request.set(http::field::host, "localhost");
  request.set(http::field::user_agent, "keelctl");
  request.keep_alive(false);
  if (!body.empty()) {
    request.set(http::field::content_type, "application/json");
    request.body() = std::string(body);
  }
  request.prepare_payload();
  http::write(socket, request, error);
  if (error) return io_failure(fmt::format("send to '{}'", path), error);
  return ok();
}

}  // namespace

Result<HttpReply> Client::request(std::string_view method, std::string_view target,
                                  std::string_view body) const {
  net::io_context io;
  Protocol::socket socket(io);
  TRY(connect_and_send(socket, socket_path_, timeout_, method, target, body));
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(kMaxReplyBytes);
  ErrorCode error;
  http::read(socket, buffer, parser, error);
  if (error) return io_failure(fmt::format("read the reply from '{}'", socket_path_), error);
  const auto& response = parser.get();
  return HttpReply{response.result_int(), std::string(response[http::field::content_type]),
                   response.body()};
}

Result<HttpReply> Client::stream_lines(std::string_view target,
                                       const std::function<bool(std::string_view)>& on_line) const {
  net::io_context io;
  Protocol::socket socket(io);
  TRY(connect_and_send(socket, socket_path_, timeout_, "GET", target, ""));
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(kMaxReplyBytes);
  ErrorCode error;
  http::read_header(socket, buffer, parser, error);
  if (error) return io_failure(fmt::format("read the reply from '{}'", socket_path_), error);
  HttpReply reply{parser.get().result_int(),
                  std::string(parser.get()[http::field::content_type]), ""};
  if (reply.status != 200) {
    http::read(socket, buffer, parser, error);
    if (error) return io_failure(fmt::format("read the reply from '{}'", socket_path_), error);
    reply.body = parser.get().body();
    return reply;
  }
  // The body is close-delimited (or sized, for follow=false): read lines
  // straight from the socket with no read timeout while following.
  set_timeouts(socket, std::chrono::milliseconds(0));
  std::string pending(static_cast<const char*>(buffer.data().data()), buffer.size());
  for (;;) {
    size_t newline;
    while ((newline = pending.find('\n')) != std::string::npos) {
      if (!on_line(std::string_view(pending).substr(0, newline))) return reply;
      pending.erase(0, newline + 1);
    }
    char chunk[4096];
    size_t n = socket.read_some(net::buffer(chunk), error);
    if (error == net::error::eof) return reply;
    if (error) return io_failure(fmt::format("read events from '{}'", socket_path_), error);
    pending.append(chunk, n);
  }
}

}  // namespace keel::api
