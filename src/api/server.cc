#include "api/server.h"

#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <optional>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>

#include "api/prometheus.h"
#include "api/routes.h"
#include "base/log.h"

namespace keel::api {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using Protocol = net::local::stream_protocol;
using ErrorCode = boost::system::error_code;

namespace {

constexpr size_t kEventsPerWrite = 64;
constexpr auto kShutdownGrace = std::chrono::milliseconds(1000);
constexpr std::string_view kJson = "application/json";

template <typename Json>
std::string dump(const Json& json) {
  // Strings such as a stop detail may hold bytes that are not UTF-8.
  return json.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n";
}

}  // namespace

class Session;

struct ApiServer::State : std::enable_shared_from_this<ApiServer::State> {
  State(CommandHandler& command_handler, EventLog& event_log, const ServerOptions& server_options)
      : handler(command_handler), events(event_log), options(server_options),
        io(std::make_unique<net::io_context>(1)), acceptor(*io), retry_timer(*io) {}
  // The io_context goes first: its handlers own the sessions, whose
  // destructors still count connections here.
  ~State() {
    acceptor.reset();
    retry_timer.reset();
    io.reset();
  }

  void accept_next();
  void wake_streams();
  // Stops accepting, closes every connection (a followed events stream
  // after writing what it has not sent yet) and stops the loop once all
  // are gone, or after kShutdownGrace.
  void shut_down();

  CommandHandler& handler;
  EventLog& events;
  const ServerOptions options;
  // Everything below belongs to the API thread.
  size_t connections = 0;
  std::vector<std::weak_ptr<Session>> sessions;  // every connection
  std::vector<std::weak_ptr<Session>> streams;   // those following events
  bool shutting_down = false;
  std::unique_ptr<net::io_context> io;
  std::optional<Protocol::acceptor> acceptor;
  std::optional<net::steady_timer> retry_timer;
};

using State = ApiServer::State;

// One connection: requests one after another (keep-alive), or, after a
// GET /api/v1/events with follow, a stream of JSON lines until either side
// closes. Every asynchronous operation holds a shared_ptr to the session,
// so it lives exactly as long as something is pending on it.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(State& state, Protocol::socket socket)
      : state_(state), socket_(std::move(socket)), timer_(*state.io) {
    ++state_.connections;
  }
  ~Session() {
    // The last one gone ends a shutdown's grace period early.
    if (--state_.connections == 0 && state_.shutting_down && state_.retry_timer) {
      state_.retry_timer->cancel();
    }
  }

  void start() { read_request(); }

  void reject_busy() {
    keep_alive_ = false;
    send_error(ApiError{503,
                        fmt::format("too many connections (at most {})",
                                    state_.options.max_connections),
                        ""});
  }

  // New events were published (API thread).
  void wake() {
    if (streaming_) pump_events();
  }

  // The server is going away: a follower gets the events it has not seen
  // yet (the last ones tell how keel-vmm stopped), everyone else is closed.
  void shut_down() {
    if (!streaming_) return close();
    closing_ = true;
    pump_events();
    if (!writing_) close();
  }

 private:
  enum class Phase { Reading, AwaitingReply, Writing, Streaming };

  void close() {
    ErrorCode ignored;
    socket_.shutdown(Protocol::socket::shutdown_both, ignored);
    socket_.close(ignored);
    cancel_timer();
  }

  void arm_timer(std::chrono::milliseconds timeout) {
    uint64_t generation = ++timer_generation_;
    timer_.expires_after(timeout);
    timer_.async_wait([self = shared_from_this(), generation](const ErrorCode& error) {
      if (error || generation != self->timer_generation_) return;
      self->on_timeout();
    });
  }
  void cancel_timer() {
    ++timer_generation_;
    timer_.cancel();
  }

  void on_timeout() {
    switch (phase_) {
      case Phase::Reading:
        // Cancel the read; on_read answers 408 if part of a request came.
        timed_out_ = true;
        {
          ErrorCode ignored;
          socket_.cancel(ignored);
        }
        break;
      case Phase::AwaitingReply:
        phase_ = Phase::Writing;
        keep_alive_ = false;
        send_error(ApiError{503,
                            fmt::format("the VM did not answer within {} ms",
                                        state_.options.command_timeout.count()),
                            ""});
        break;
      case Phase::Writing:
      case Phase::Streaming: close(); break;
    }
  }

  void read_request() {
    phase_ = Phase::Reading;
    timed_out_ = false;
    parser_.emplace();
    parser_->body_limit(state_.options.max_body_bytes);
    parser_->header_limit(static_cast<uint32_t>(state_.options.max_header_bytes));
    arm_timer(state_.options.read_timeout);
    http::async_read(socket_, buffer_, *parser_,
                     [self = shared_from_this()](const ErrorCode& error, size_t) {
                       self->on_read(error);
                     });
  }

  void on_read(const ErrorCode& error) {
    cancel_timer();
    keep_alive_ = false;
    if (error == http::error::end_of_stream || error == net::error::eof) return close();
    if (timed_out_) {
      // Quiet on an idle kept-alive connection; a 408 for a request cut short.
      if (buffer_.size() == 0 && !parser_->got_some()) return close();
      return send_error(ApiError{408,
                                 fmt::format("the request did not arrive within {} ms",
                                             state_.options.read_timeout.count()),
                                 ""});
    }
    if (error == http::error::body_limit) {
      return send_error(ApiError{413,
                                 fmt::format("the body is larger than {} bytes",
                                             state_.options.max_body_bytes),
                                 "body"});
    }
    if (error == http::error::header_limit) {
      return send_error(ApiError{431,
                                 fmt::format("the header is larger than {} bytes",
                                             state_.options.max_header_bytes),
                                 "header"});
    }
    if (error == net::error::operation_aborted || error == net::error::bad_descriptor) {
      return close();
    }
    if (error) {
      if (!parser_->got_some()) return close();
      return send_error(ApiError{400, fmt::format("malformed HTTP request: {}", error.message()),
                                 ""});
    }
    http::request<http::string_body> request = parser_->release();
    keep_alive_ = request.keep_alive();
    version_ = request.version();
    try {
      handle(request);
    } catch (const std::exception& exception) {
      // JSON and formatting are the only sources; nothing else throws here.
      LOG_RATELIMITED(warn, "api: {} {}: {}", std::string(request.method_string()),
                      std::string(request.target()), exception.what());
      keep_alive_ = false;
      send_error(ApiError{500, exception.what(), ""});
    }
  }

  void handle(const http::request<http::string_body>& request) {
    const std::string method(request.method_string());
    const std::string target(request.target());
    LOG_DEBUG("api: {} {}", method, target);
    Routed routed = route_request(method, target);
    if (routed.error) return send_error(*routed.error, routed.allow);
    route_ = routed.route;
    switch (route_->id) {
      case RouteId::Version:
        return send(200, kJson,
                    dump(nlohmann::json{{"name", "keel-vmm"}, {"version", KEEL_VERSION}, {"api", "v1"}}));
      case RouteId::Events: return start_events(routed.query);
      case RouteId::Pause:
      case RouteId::Resume:
      case RouteId::Reset:
      case RouteId::Stop:
      case RouteId::PowerButton:
        if (auto bad = check_empty_body(request.body())) return send_error(*bad);
        break;
      case RouteId::Balloon: {
        std::string bad_field;
        Result<uint64_t> balloon_target = parse_balloon_body(request.body(), bad_field);
        if (!balloon_target) {
          return send_error(ApiError{400, balloon_target.error().context(), bad_field});
        }
        return submit(
            Command{.kind = CommandKind::SetBalloon, .balloon_target_mib = *balloon_target});
      }
      case RouteId::Snapshot: {
        auto parsed = parse_snapshot_body(request.body());
        if (auto* bad = std::get_if<ApiError>(&parsed)) return send_error(*bad);
        return submit(Command{.kind = CommandKind::Snapshot,
                              .path = std::get<std::string>(std::move(parsed))});
      }
      case RouteId::AddDisk:
      case RouteId::RemoveDisk:
      case RouteId::ResizeDisk:
      case RouteId::AddNet:
      case RouteId::RemoveNet: {
        auto parsed = parse_device_body(*route_, request.body());
        if (auto* bad = std::get_if<ApiError>(&parsed)) return send_error(*bad);
        return submit(Command{.kind = *route_->command,
                              .device = std::get<DeviceRequest>(std::move(parsed))});
      }
      case RouteId::PutConfig:
        if (auto bad = check_config_body(request.body(), route_->body_fields)) {
          return send_error(*bad);
        }
        return submit(Command{.kind = CommandKind::Configure, .body = request.body()});
      case RouteId::Start:
        if (auto bad = check_empty_body(request.body())) return send_error(*bad);
        break;
      case RouteId::Restore: {
        auto parsed = parse_restore_body(request.body());
        if (auto* bad = std::get_if<ApiError>(&parsed)) return send_error(*bad);
        return submit(Command{.kind = CommandKind::Restore,
                              .restore = std::get<RestoreRequest>(std::move(parsed))});
      }
      case RouteId::Receive: {
        auto parsed = parse_receive_body(request.body());
        if (auto* bad = std::get_if<ApiError>(&parsed)) return send_error(*bad);
        return submit(Command{.kind = CommandKind::Receive,
                              .source = std::get<std::string>(std::move(parsed))});
      }
      case RouteId::Migrate: {
        auto parsed = parse_migrate_body(request.body());
        if (auto* bad = std::get_if<ApiError>(&parsed)) return send_error(*bad);
        return submit(Command{.kind = CommandKind::Migrate,
                              .migrate = std::get<MigrateRequest>(std::move(parsed))});
      }
      case RouteId::CancelMigration:
        if (auto bad = check_empty_body(request.body())) return send_error(*bad);
        break;
      case RouteId::GetVm:
        if (state_.options.vm_status != nullptr) {
          if (std::optional<std::string> vm = state_.options.vm_status->current()) {
            return send(200, kJson, std::move(*vm));
          }
        }
        break;
      case RouteId::GetMigration:
      case RouteId::GetConfig:
      case RouteId::GetDevices:
      case RouteId::GetMetrics:
      case RouteId::PrometheusMetrics: break;
    }
    CHECK(route_->command.has_value(), "a machine route without a command");
    submit(Command{.kind = *route_->command});
  }

  void submit(Command command) {
    phase_ = Phase::AwaitingReply;
    arm_timer(state_.options.command_timeout);
    std::weak_ptr<State> weak_state = state_.weak_from_this();
    std::weak_ptr<Session> weak_self = weak_from_this();
    // done may run on any thread, after this session or the server is gone.
    state_.handler.submit(std::move(command), [weak_state, weak_self](Reply reply) {
      std::shared_ptr<State> state = weak_state.lock();
      if (state == nullptr) return;
      net::post(*state->io, [weak_self, reply = std::move(reply)]() mutable {
        if (std::shared_ptr<Session> self = weak_self.lock()) self->on_reply(std::move(reply));
      });
    });
  }

  void on_reply(Reply reply) {
    if (phase_ != Phase::AwaitingReply) return;  // timed out; already answered
    cancel_timer();
    if (!reply) {
      ApiError error = error_from(reply.error());
      // The machine side checks a body's value against the VM (a balloon
      // target against its RAM): name the field when there is only one.
      if (error.status == 400 && route_->body_fields.size() == 1) {
        error.field = std::string(route_->body_fields.front());
      } else if (error.status == 400) {
        error.field = field_named_by(error.message, route_->body_fields);
      }
      return send_error(error);
    }
    try {
      if (route_->id == RouteId::PrometheusMetrics) {
        return send(200, "text/plain; version=0.0.4", prometheus_text(*reply));
      }
      send(200, kJson, dump(*reply));
    } catch (const std::exception& exception) {
      keep_alive_ = false;
      send_error(ApiError{500, exception.what(), ""});
    }
  }

  void send_error(const ApiError& error, const std::string& allow = "") {
    send(error.status, kJson, dump(error.to_json()), allow);
  }

  void send(unsigned status, std::string_view content_type, std::string body,
            const std::string& allow = "") {
    phase_ = Phase::Writing;
    response_ = {};
    response_.result(status);
    response_.version(version_);
    response_.set(http::field::server, "keel-vmm");
    response_.set(http::field::content_type,
                  beast::string_view(content_type.data(), content_type.size()));
    if (!allow.empty()) response_.set(http::field::allow, allow);
    response_.keep_alive(keep_alive_);
    response_.body() = std::move(body);
    response_.prepare_payload();
    arm_timer(state_.options.write_timeout);
    http::async_write(socket_, response_,
                      [self = shared_from_this()](const ErrorCode& error, size_t) {
                        self->cancel_timer();
                        if (error || !self->keep_alive_) return self->close();
                        self->read_request();
                      });
  }

  // ---- GET /api/v1/events ----

  void start_events(const Query& query) {
    std::string bad_field;
    Result<EventsQuery> parsed = parse_events_query(query, bad_field);
    if (!parsed) return send_error(ApiError{400, parsed.error().context(), bad_field});
    uint64_t last = state_.events.last_seq();
    if (parsed->after > last) {
      return send_error(ApiError{
          400,
          fmt::format("after {} is past the last event, {} (from another keel-vmm process?)",
                      parsed->after, last),
          "after"});
    }
    cursor_ = parsed->after;
    if (!parsed->follow) {
      // What is buffered now, as one ordinary response.
      std::string body;
      while (append_events(body)) {
      }
      return send(200, "application/x-ndjson", std::move(body));
    }
    // A close-delimited body (RFC 9112 §6.3): one JSON object per line
    // until either side closes.
    phase_ = Phase::Streaming;
    streaming_ = true;
    state_.streams.push_back(weak_from_this());
    stream_buffer_ =
        "HTTP/1.1 200 OK\r\nServer: keel-vmm\r\nContent-Type: application/x-ndjson\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n";
    append_events(stream_buffer_);
    write_stream();
    watch_for_close();
  }

  // Appends up to kEventsPerWrite lines after cursor_; false if none.
  bool append_events(std::string& out) {
    EventLog::Slice slice = state_.events.after(cursor_, kEventsPerWrite);
    if (slice.events.empty()) return false;
    if (slice.missed) {
      uint64_t next = slice.events.front().seq;
      out += dump(nlohmann::ordered_json{{"type", "missed"},
                   {"after", cursor_},
                   {"next_seq", next},
                   {"message", fmt::format("events {} to {} fell out of the {}-event buffer",
                                           cursor_ + 1, next - 1, state_.events.capacity())}});
    }
    for (const Event& event : slice.events) out += dump(event.to_json());
    cursor_ = slice.events.back().seq;
    return true;
  }

  void pump_events() {
    if (writing_ || !socket_.is_open()) return;
    if (!append_events(stream_buffer_)) {
      if (closing_) close();
      return;
    }
    write_stream();
  }

  void write_stream() {
    writing_ = true;
    arm_timer(state_.options.write_timeout);
    net::async_write(socket_, net::buffer(stream_buffer_),
                     [self = shared_from_this()](const ErrorCode& error, size_t) {
                       self->writing_ = false;
                       self->cancel_timer();
                       self->stream_buffer_.clear();
                       if (error) return self->close();
                       self->pump_events();
                     });
  }

  // A streaming client sends nothing more; a read ends when it goes away.
  void watch_for_close() {
    socket_.async_read_some(net::buffer(discard_),
                            [self = shared_from_this()](const ErrorCode& error, size_t) {
                              if (error) return self->close();
                              self->watch_for_close();
                            });
  }

  State& state_;
  Protocol::socket socket_;
  net::steady_timer timer_;
  uint64_t timer_generation_ = 0;
  Phase phase_ = Phase::Reading;
  bool timed_out_ = false;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> response_;
  unsigned version_ = 11;
  bool keep_alive_ = true;
  const Route* route_ = nullptr;
  // Streaming events.
  bool streaming_ = false;
  bool writing_ = false;
  bool closing_ = false;  // shutting down: close once the events are written
  uint64_t cursor_ = 0;
  std::string stream_buffer_;
  std::array<char, 256> discard_{};
};

void State::accept_next() {
  acceptor->async_accept([this](const ErrorCode& error, Protocol::socket socket) {
    if (error == net::error::operation_aborted || !acceptor->is_open()) return;
    if (error) {
      // Out of file descriptors, say: try again shortly instead of spinning.
      LOG_RATELIMITED(warn, "api: accept: {}", error.message());
      retry_timer->expires_after(std::chrono::milliseconds(100));
      retry_timer->async_wait([this](const ErrorCode& wait_error) {
        if (!wait_error) accept_next();
      });
      return;
    }
    bool over_cap = connections >= options.max_connections;
    auto session = std::make_shared<Session>(*this, std::move(socket));
    std::erase_if(sessions, [](const std::weak_ptr<Session>& weak) { return weak.expired(); });
    sessions.push_back(session);
    if (over_cap) {
      LOG_RATELIMITED(warn, "api: refusing a connection: {} are open", options.max_connections);
      session->reject_busy();
    } else {
      session->start();
    }
    accept_next();
  });
}

void State::shut_down() {
  shutting_down = true;
  ErrorCode ignored;
  acceptor->close(ignored);
  retry_timer->cancel();
  for (const std::weak_ptr<Session>& weak : sessions) {
    if (std::shared_ptr<Session> session = weak.lock()) session->shut_down();
  }
  // Whatever is still pending then (a stuck follower's write) is dropped.
  retry_timer->expires_after(kShutdownGrace);
  retry_timer->async_wait([this](const ErrorCode& error) {
    if (!error) io->stop();
  });
  if (connections == 0) retry_timer->cancel();
}

void State::wake_streams() {
  std::erase_if(streams, [](const std::weak_ptr<Session>& weak) { return weak.expired(); });
  for (const std::weak_ptr<Session>& weak : streams) {
    if (std::shared_ptr<Session> session = weak.lock()) session->wake();
  }
}

ApiServer::ApiServer(std::string socket_path, std::shared_ptr<State> state)
    : socket_path_(std::move(socket_path)), state_(std::move(state)) {}

Result<std::unique_ptr<ApiServer>> ApiServer::start(const std::string& socket_path,
                                                    CommandHandler& handler, EventLog& events,
                                                    ServerOptions options) {
  const std::string what = fmt::format("api socket '{}'", socket_path);
  if (socket_path.empty()) return fail(Errc::InvalidArgument, "api socket: the path is empty");
  if (socket_path.size() >= sizeof(sockaddr_un::sun_path)) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: longer than {} bytes", what, sizeof(sockaddr_un::sun_path) - 1));
  }
  auto state = std::make_shared<State>(handler, events, options);
  struct stat info {};
  if (::lstat(socket_path.c_str(), &info) == 0) {
    if (!S_ISSOCK(info.st_mode)) {
      return fail(Errc::InvalidArgument, fmt::format("{}: exists and is not a socket", what));
    }
    Protocol::socket probe(*state->io);
    ErrorCode error;
    probe.connect(Protocol::endpoint(socket_path), error);
    if (!error) return fail(Errc::Busy, fmt::format("{}: another process serves it", what));
    ::unlink(socket_path.c_str());  // stale: left by a process that died
  }
  ErrorCode error;
  Protocol::endpoint endpoint(socket_path);
  state->acceptor->open(endpoint.protocol(), error);
  if (!error) state->acceptor->bind(endpoint, error);
  if (error) return fail(Errc::Io, fmt::format("{}: {}", what, error.message()));
  // Whoever can connect controls the VM.
  if (::chmod(socket_path.c_str(), 0600) != 0) return fail_errno(what + ": chmod");
  state->acceptor->listen(net::socket_base::max_listen_connections, error);
  if (error) return fail(Errc::Io, fmt::format("{}: listen: {}", what, error.message()));
  std::weak_ptr<State> weak_state = state;
  events.set_listener([weak_state] {
    if (std::shared_ptr<State> locked = weak_state.lock()) {
      net::post(*locked->io, [weak_state] {
        if (std::shared_ptr<State> alive = weak_state.lock()) alive->wake_streams();
      });
    }
  });
  state->accept_next();
  std::unique_ptr<ApiServer> server(new ApiServer(socket_path, state));
  server->thread_ = std::thread([state] { state->io->run(); });
  return server;
}

ApiServer::~ApiServer() {
  state_->events.set_listener({});
  // Events published up to now still reach the followers.
  net::post(*state_->io, [state = state_] { state->shut_down(); });
  if (thread_.joinable()) thread_.join();
  ::unlink(socket_path_.c_str());
}

}  // namespace keel::api
