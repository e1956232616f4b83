// ApiServer: keel-vmm's control API, HTTP/1.1 with JSON bodies on a unix
// socket (routes in routes.h, documented in docs/api/openapi.json). One
// thread runs a Boost.Asio io_context; every connection is an asynchronous
// Beast session, so a slow or stuck client holds only its own connection:
// requests have a size limit and read/write timeouts, connections a cap,
// and machine commands a reply timeout. Requests that need the machine
// become Commands for the CommandHandler; the events stream, the version
// and (from the published VmStatus) the VM's state are answered here.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "api/command.h"
#include "api/event_log.h"
#include "api/vm_status.h"
#include "base/result.h"

namespace keel::api {

struct ServerOptions {
  size_t max_connections = 64;
  size_t max_body_bytes = 64 * 1024;
  size_t max_header_bytes = 16 * 1024;
  // Reading one request (or waiting for the next on a kept-alive
  // connection), writing one response or one chunk of events.
  std::chrono::milliseconds read_timeout{30'000};
  std::chrono::milliseconds write_timeout{30'000};
  // How long a request waits for the machine side before a 503.
  std::chrono::milliseconds command_timeout{15'000};
  // If set, GET /api/v1/vm is answered from it on the API thread once the
  // machine side has published (else it is a command like the others).
  const VmStatus* vm_status = nullptr;
};

class ApiServer {
 public:
  // Listens on socket_path (mode 0600). A stale socket file nobody serves
  // is replaced; Busy if a live process serves it. handler and events
  // must outlive the server.
  static Result<std::unique_ptr<ApiServer>> start(const std::string& socket_path,
                                                  CommandHandler& handler, EventLog& events,
                                                  ServerOptions options = {});
  // Stops the API thread, drops every connection and removes the socket.
  ~ApiServer();
  ApiServer(const ApiServer&) = delete;
  ApiServer& operator=(const ApiServer&) = delete;

  const std::string& socket_path() const { return socket_path_; }

  struct State;  // the io_context and everything its thread owns

 private:
  ApiServer(std::string socket_path, std::shared_ptr<State> state);

  std::string socket_path_;
  std::shared_ptr<State> state_;
  std::thread thread_;  // runs the io_context
};

}  // namespace keel::api
