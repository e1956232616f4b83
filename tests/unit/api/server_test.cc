// The API server on a temporary unix socket with a fake CommandHandler: no
// machine, no /dev/kvm. Well-formed requests go through api::Client; raw
// sockets send what a client should not (malformed, oversized, stalled).
#include "api/server.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "api/client.h"
#include "api/command_queue.h"
#include "api/routes.h"

namespace keel::api {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// Answers like a machine would: a running/paused state machine, or holds
// every command unanswered (hold = true) to test timeouts.
class FakeHandler : public CommandHandler {
 public:
  void submit(Command command, ReplyCallback done) override {
    std::unique_lock lock(mutex_);
    seen_.push_back(command.kind);
    if (command.kind == CommandKind::Snapshot) snapshot_paths_.push_back(command.path);
    if (command.kind == CommandKind::Migrate) migrations_.push_back(command.migrate);
    if (hold_) {
      held_.push_back(std::move(done));
      return;
    }
    Reply reply = answer(command);
    lock.unlock();
    // From another thread, as keel-vmm's main thread does.
    std::thread([done = std::move(done), reply = std::move(reply)] { done(reply); }).join();
  }

  std::vector<CommandKind> seen() {
    std::lock_guard lock(mutex_);
    return seen_;
  }
  std::vector<std::string> snapshot_paths() {
    std::lock_guard lock(mutex_);
    return snapshot_paths_;
  }
  std::vector<MigrateRequest> migrations() {
    std::lock_guard lock(mutex_);
    return migrations_;
  }
  void hold() {
    std::lock_guard lock(mutex_);
    hold_ = true;
  }
  std::vector<ReplyCallback> take_held() {
    std::lock_guard lock(mutex_);
    return std::move(held_);
  }

 private:
  Reply answer(const Command& command) {
    switch (command.kind) {
      case CommandKind::GetVm:
        return nlohmann::json{{"state", paused_ ? "paused" : "running"}, {"config", {{"cpus", 1}}}};
      case CommandKind::GetDevices: return nlohmann::json{{"devices", nlohmann::json::array()}};
      case CommandKind::GetMetrics:
        return nlohmann::json{{"state", "running"},
                              {"vcpus", {{{"index", 0}, {"exits", {{"io-out", 42}}}}}},
                              {"memory", {{"guest_bytes", 1 << 20}}}};
      case CommandKind::Pause:
        if (paused_) return fail(Errc::Busy, "the VM is already paused");
        paused_ = true;
        return nlohmann::json{{"state", "paused"}};
      case CommandKind::Resume:
        if (!paused_) return fail(Errc::Busy, "the VM is not paused");
        paused_ = false;
        return nlohmann::json{{"state", "running"}};
      case CommandKind::Reset:
      case CommandKind::Stop: return nlohmann::json{{"state", "stopping"}};
      case CommandKind::PowerButton:
        return nlohmann::json{{"state", "running"}, {"power_button", "pressed"}};
      case CommandKind::SetBalloon:
        // As the balloon does for a 1 GiB guest.
        if (command.balloon_target_mib > 1024) {
          return fail(Errc::OutOfRange, "a target of more than the guest's 1024 MiB");
        }
        return nlohmann::json{{"target_mib", command.balloon_target_mib}, {"actual_mib", 0}};
      case CommandKind::Snapshot:
        if (!paused_) return fail(Errc::Busy, "snapshot: the VM is not paused");
        return nlohmann::json{{"path", "/x"}, {"bytes", 4096}};
      case CommandKind::AddDisk:
      case CommandKind::AddNet:
        return nlohmann::json{{"id", command.device.id}, {"address", "0000:00:05.0"}};
      case CommandKind::RemoveDisk:
      case CommandKind::RemoveNet:
        if (command.device.id == "missing") return fail(Errc::NotFound, "id: no such device");
        return nlohmann::json{{"id", command.device.id}, {"state", "eject-requested"}};
      case CommandKind::ResizeDisk:
        return nlohmann::json{{"id", command.device.id}, {"size_bytes", command.device.size_bytes}};
      case CommandKind::GetConfig: return nlohmann::json{{"cpus", 1}};
      case CommandKind::Configure: {
        // As keel-vmm's validation does: the context starts with the key.
        nlohmann::json config = nlohmann::json::parse(command.body);
        if (config.value("cpus", 1) == 0) {
          return fail(Errc::InvalidArgument, "cpus: must be at least 1 (got 0)");
        }
        return nlohmann::json{{"state", "configured"}, {"config", config}};
      }
      case CommandKind::Start:
      case CommandKind::Restore:
      case CommandKind::Receive: return fail(Errc::Busy, "the VM is already running");
      case CommandKind::Migrate:
        migrating_ = true;
        return nlohmann::json{{"phase", "connecting"}, {"destination", command.migrate.destination}};
      case CommandKind::GetMigration:
        if (!migrating_) return nlohmann::json{{"phase", "none"}};
        return nlohmann::json{{"phase", "copying"}, {"rounds", 2}};
      case CommandKind::CancelMigration:
        if (!migrating_) return fail(Errc::Busy, "no migration is running");
        migrating_ = false;
        return nlohmann::json{{"phase", "cancelled"}};
    }
    return fail(Errc::Unsupported, "?");
  }

  std::mutex mutex_;
  std::vector<CommandKind> seen_;
  std::vector<std::string> snapshot_paths_;
  std::vector<MigrateRequest> migrations_;
  bool paused_ = false;
  bool migrating_ = false;
  bool hold_ = false;
  std::vector<ReplyCallback> held_;
};

// A plain socket for requests a well-behaved client would not send.
class RawConnection {
 public:
  explicit RawConnection(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
      ADD_FAILURE() << "connect: " << std::strerror(errno);
    }
  }
  ~RawConnection() { ::close(fd_); }

  void send(std::string_view text) {
    ASSERT_EQ(::write(fd_, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  }
  // Everything until the server closes, or the timeout.
  std::string read_until_close(Clock::duration timeout = 5s) {
    std::string received;
    Clock::time_point deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      if (!read_some(received, 50ms)) break;
    }
    return received;
  }
  // One response with a Content-Length body.
  std::string read_response(Clock::duration timeout = 5s) {
    std::string received;
    Clock::time_point deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      size_t end = received.find("\r\n\r\n");
      if (end != std::string::npos) {
        size_t length_at = received.find("Content-Length: ");
        size_t length = length_at == std::string::npos
                            ? 0
                            : std::stoul(received.substr(length_at + 16));
        if (received.size() >= end + 4 + length) return received;
      }
      if (!read_some(received, 50ms)) break;
    }
    return received;
  }
  // True if the server has closed the connection (end of file now).
  bool closed_by_server(Clock::duration timeout) {
    std::string ignored;
    Clock::time_point deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      pollfd fd{fd_, POLLIN, 0};
      if (::poll(&fd, 1, 20) > 0) {
        char buffer[512];
        ssize_t n = ::read(fd_, buffer, sizeof(buffer));
        if (n <= 0) return true;
      }
    }
    return false;
  }

 private:
  // False at end of file.
  bool read_some(std::string& received, std::chrono::milliseconds wait) {
    pollfd fd{fd_, POLLIN, 0};
    if (::poll(&fd, 1, static_cast<int>(wait.count())) <= 0) return true;
    char buffer[4096];
    ssize_t n = ::read(fd_, buffer, sizeof(buffer));
    if (n <= 0) return false;
    received.append(buffer, static_cast<size_t>(n));
    return true;
  }

  int fd_ = -1;
};

unsigned status_of(const std::string& response) {
  if (response.size() < 12 || response.compare(0, 9, "HTTP/1.1 ") != 0) return 0;
  return static_cast<unsigned>(std::stoul(response.substr(9, 3)));
}

std::string body_of(const std::string& response) {
  size_t end = response.find("\r\n\r\n");
  return end == std::string::npos ? "" : response.substr(end + 4);
}

class ApiServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "keel-api-test-XXXXXX";
    std::vector<char> path(pattern.begin(), pattern.end());
    path.push_back('\0');
    ASSERT_NE(::mkdtemp(path.data()), nullptr);
    dir_ = path.data();
    socket_ = dir_ + "/api.sock";
  }
  void TearDown() override {
    server_.reset();
    ::unlink(socket_.c_str());
    ::rmdir(dir_.c_str());
  }

  void start(ServerOptions options = {}) {
    Result<std::unique_ptr<ApiServer>> server = ApiServer::start(socket_, handler_, events_, options);
    ASSERT_TRUE(server) << server.error().message();
    server_ = std::move(*server);
  }

  HttpReply request(std::string_view method, std::string_view target, std::string_view body = "") {
    Result<HttpReply> reply = Client(socket_, 5s).request(method, target, body);
    EXPECT_TRUE(reply) << reply.error().message();
    return reply ? *reply : HttpReply{};
  }

  static nlohmann::json json_of(const HttpReply& reply) {
    return nlohmann::json::parse(reply.body, nullptr, false);
  }

  std::string dir_;
  std::string socket_;
  FakeHandler handler_;
  EventLog events_;
  std::unique_ptr<ApiServer> server_;
};

TEST_F(ApiServerTest, GetVmIsACommandForTheMachineSide) {
  start();
  HttpReply reply = request("GET", "/api/v1/vm");
  EXPECT_EQ(reply.status, 200u);
  EXPECT_EQ(reply.content_type, "application/json");
  EXPECT_EQ(json_of(reply)["state"], "running");
  EXPECT_EQ(handler_.seen(), std::vector<CommandKind>{CommandKind::GetVm});
}

TEST_F(ApiServerTest, GetVmIsAnsweredFromThePublishedStatus) {
  VmStatus status;
  start(ServerOptions{.vm_status = &status});
  // Nothing published yet: the machine side answers.
  EXPECT_EQ(json_of(request("GET", "/api/v1/vm"))["state"], "running");
  EXPECT_EQ(handler_.seen(), std::vector<CommandKind>{CommandKind::GetVm});
  status.publish({{"state", "paused"}, {"boot", 3}}, VmStatus::Clock::now() - 2s);
  nlohmann::json vm = json_of(request("GET", "/api/v1/vm"));
  EXPECT_EQ(vm["state"], "paused");
  EXPECT_EQ(vm["boot"], 3);
  EXPECT_GE(vm["uptime_seconds"].get<double>(), 2.0);
  status.publish({{"state", "configured"}, {"boot", 0}}, std::nullopt);
  vm = json_of(request("GET", "/api/v1/vm"));
  EXPECT_EQ(vm["state"], "configured");
  EXPECT_EQ(vm["uptime_seconds"], 0.0);
  EXPECT_EQ(handler_.seen(), std::vector<CommandKind>{CommandKind::GetVm})
      << "answered on the API thread";
}

TEST_F(ApiServerTest, SocketIsPrivate) {
  start();
  struct stat info {};
  ASSERT_EQ(::stat(socket_.c_str(), &info), 0);
  EXPECT_TRUE(S_ISSOCK(info.st_mode));
  EXPECT_EQ(info.st_mode & 0777, 0600u);
}

TEST_F(ApiServerTest, EveryRouteIsServed) {
  start();
  for (const Route& route : routes()) {
    std::string target(route.path);
    if (route.id == RouteId::Events) target += "?follow=false";
    std::string body = route.id == RouteId::Balloon ? R"({"target_mib": 0})" : "";
    HttpReply reply = request(route.method, target, body);
    EXPECT_LT(reply.status, 500u) << route.method << " " << route.path << ": " << reply.body;
    EXPECT_NE(reply.status, 404u) << route.path;
    EXPECT_NE(reply.status, 405u) << route.path;
  }
}

TEST_F(ApiServerTest, PauseResumeAndStateConflicts) {
  start();
  EXPECT_EQ(request("PUT", "/api/v1/vm/pause").status, 200u);
  HttpReply again = request("PUT", "/api/v1/vm/pause");
  EXPECT_EQ(again.status, 409u);
  nlohmann::json error = json_of(again);
  EXPECT_EQ(error["error"]["code"], "Conflict");
  EXPECT_EQ(error["error"]["message"], "the VM is already paused");
  EXPECT_EQ(json_of(request("GET", "/api/v1/vm"))["state"], "paused");
  EXPECT_EQ(request("PUT", "/api/v1/vm/resume").status, 200u);
  HttpReply not_paused = request("PUT", "/api/v1/vm/resume");
  EXPECT_EQ(not_paused.status, 409u);
  EXPECT_EQ(json_of(not_paused)["error"]["message"], "the VM is not paused");
}

TEST_F(ApiServerTest, SnapshotPassesThePathAndNeedsAPause) {
  start();
  HttpReply running = request("PUT", "/api/v1/vm/snapshot", R"({"path": "/tmp/a.snap"})");
  EXPECT_EQ(running.status, 409u);
  EXPECT_EQ(request("PUT", "/api/v1/vm/pause").status, 200u);
  HttpReply saved = request("PUT", "/api/v1/vm/snapshot", R"({"path": "/tmp/a.snap"})");
  EXPECT_EQ(saved.status, 200u) << saved.body;
  EXPECT_EQ(handler_.snapshot_paths(), (std::vector<std::string>{"/tmp/a.snap", "/tmp/a.snap"}));
}

TEST_F(ApiServerTest, SnapshotWithABadBodyIs400NamingTheFieldAndNeverReachesTheMachine) {
  start();
  for (const char* body : {"", R"({})", R"({"path": 5})", R"({"path": "rel"})",
                           R"({"path": "/a", "compress": true})"}) {
    HttpReply reply = request("PUT", "/api/v1/vm/snapshot", body);
    EXPECT_EQ(reply.status, 400u) << body;
    EXPECT_TRUE(json_of(reply)["error"].contains("field")) << body;
  }
  EXPECT_TRUE(handler_.snapshot_paths().empty());
}

TEST_F(ApiServerTest, HotplugBodiesReachTheMachineSideChecked) {
  start();
  HttpReply added = request("PUT", "/api/v1/vm/disks",
                            R"({"id": "d1", "path": "/tmp/d1.qcow2", "format": "qcow2"})");
  EXPECT_EQ(added.status, 200u) << added.body;
  EXPECT_EQ(json_of(added)["id"], "d1");
  HttpReply resized =
      request("PUT", "/api/v1/vm/disks/resize", R"({"id": "d1", "size_bytes": 2097152})");
  EXPECT_EQ(json_of(resized)["size_bytes"], 2097152);
  EXPECT_EQ(request("PUT", "/api/v1/vm/nets", R"({"id": "n1", "tap": "tap0"})").status, 200u);
  HttpReply removed = request("PUT", "/api/v1/vm/nets/remove", R"({"id": "n1"})");
  EXPECT_EQ(json_of(removed)["state"], "eject-requested");
  HttpReply missing = request("PUT", "/api/v1/vm/disks/remove", R"({"id": "missing"})");
  EXPECT_EQ(missing.status, 404u);
  EXPECT_EQ(handler_.seen(),
            (std::vector<CommandKind>{CommandKind::AddDisk, CommandKind::ResizeDisk,
                                      CommandKind::AddNet, CommandKind::RemoveNet,
                                      CommandKind::RemoveDisk}));
}

TEST_F(ApiServerTest, BadHotplugBodiesAre400NamingTheFieldAndNeverReachTheMachine) {
  start();
  const std::tuple<const char*, const char*, const char*> cases[] = {
      {"/api/v1/vm/disks", R"({"path": "/d"})", "id"},
      {"/api/v1/vm/disks", R"({"id": "d", "path": "d"})", "path"},
      {"/api/v1/vm/disks", R"({"id": "d", "path": "/d", "cache": "none"})", "cache"},
      {"/api/v1/vm/disks/resize", R"({"id": "d", "size_bytes": 513})", "size_bytes"},
      {"/api/v1/vm/nets", R"({"id": "n", "tap": "x", "mac": "nope"})", "mac"},
      {"/api/v1/vm/nets/remove", R"({"id": "n", "timeout_ms": -1})", "timeout_ms"},
  };
  for (const auto& [path, body, field] : cases) {
    HttpReply reply = request("PUT", path, body);
    EXPECT_EQ(reply.status, 400u) << path << " " << body;
    EXPECT_EQ(json_of(reply)["error"]["field"], field) << path << " " << body;
  }
  EXPECT_TRUE(handler_.seen().empty());
}

TEST_F(ApiServerTest, ConfigBodyIsCheckedHereAndValuesOnTheMachineSide) {
  start();
  // Not an object of known keys: refused here, naming the field.
  for (auto [body, field] : {std::pair{"", "body"}, std::pair{"[1]", "body"},
                             std::pair{R"({"kernel": "/k", "colour": "red"})", "colour"}}) {
    HttpReply reply = request("PUT", "/api/v1/vm/config", body);
    EXPECT_EQ(reply.status, 400u) << body;
    EXPECT_EQ(json_of(reply)["error"]["field"], field) << reply.body;
  }
  EXPECT_TRUE(handler_.seen().empty());
  // A value the machine side refuses: the field is the key its message starts with.
  HttpReply refused = request("PUT", "/api/v1/vm/config", R"({"kernel": "/k", "cpus": 0})");
  EXPECT_EQ(refused.status, 400u);
  EXPECT_EQ(json_of(refused)["error"]["field"], "cpus") << refused.body;
  HttpReply accepted = request("PUT", "/api/v1/vm/config", R"({"kernel": "/k", "cpus": 2})");
  EXPECT_EQ(accepted.status, 200u) << accepted.body;
  EXPECT_EQ(json_of(accepted)["config"]["cpus"], 2);
  EXPECT_EQ(request("PUT", "/api/v1/vm/start", R"({"now": true})").status, 400u);
  EXPECT_EQ(request("PUT", "/api/v1/vm/start").status, 409u);
  EXPECT_EQ(handler_.seen(),
            (std::vector<CommandKind>{CommandKind::Configure, CommandKind::Configure,
                                      CommandKind::Start}));
}

TEST_F(ApiServerTest, MigrateStartsWatchesAndCancels) {
  start();
  EXPECT_EQ(json_of(request("GET", "/api/v1/vm/migrate"))["phase"], "none");
  EXPECT_EQ(request("DELETE", "/api/v1/vm/migrate").status, 409u);
  HttpReply started = request(
      "PUT", "/api/v1/vm/migrate",
      R"({"destination": "unix:/tmp/m.sock", "downtime_ms": 50, "bandwidth_mib": 100, "compress": true,
          "migrate_disks": true, "auto_converge": false, "postcopy": true})");
  EXPECT_EQ(started.status, 200u) << started.body;
  ASSERT_EQ(handler_.migrations().size(), 1u);
  MigrateRequest sent = handler_.migrations().front();
  EXPECT_EQ(sent.destination, "unix:/tmp/m.sock");
  EXPECT_EQ(sent.downtime_ms, 50u);
  EXPECT_EQ(sent.bandwidth_mib, 100u);
  EXPECT_TRUE(sent.compress);
  EXPECT_TRUE(sent.migrate_disks);
  EXPECT_FALSE(sent.auto_converge);
  EXPECT_TRUE(sent.postcopy);
  EXPECT_EQ(json_of(request("GET", "/api/v1/vm/migrate"))["rounds"], 2);
  EXPECT_EQ(request("DELETE", "/api/v1/vm/migrate").status, 200u);
}

TEST_F(ApiServerTest, MigrateWithABadBodyIs400NamingTheFieldAndNeverReachesTheMachine) {
  start();
  for (const char* body : {"", "{}", R"({"destination": 5})", R"({"destination": "/x"})",
                           R"({"destination": "unix:/x", "downtime_ms": 0})",
                           R"({"destination": "unix:/x", "downtime_ms": -5})",
                           R"({"destination": "unix:/x", "bandwidth_mib": 1.5})",
                           R"({"destination": "unix:/x", "compress": "yes"})",
                           R"({"destination": "unix:/x", "migrate_disks": 1})",
                           R"({"destination": "unix:/x", "auto_converge": "on"})",
                           R"({"destination": "unix:/x", "postcopy": "yes"})",
                           R"({"destination": "unix:/x", "speed": 1})"}) {
    HttpReply reply = request("PUT", "/api/v1/vm/migrate", body);
    EXPECT_EQ(reply.status, 400u) << body;
    EXPECT_TRUE(json_of(reply)["error"].contains("field")) << body;
  }
  EXPECT_TRUE(handler_.migrations().empty());
}

TEST_F(ApiServerTest, UnknownRouteIs404AndWrongMethod405) {
  start();
  HttpReply missing = request("GET", "/api/v1/nothing");
  EXPECT_EQ(missing.status, 404u);
  EXPECT_EQ(json_of(missing)["error"]["code"], "NotFound");
  RawConnection raw(socket_);
  raw.send("POST /api/v1/vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
  std::string response = raw.read_response();
  EXPECT_EQ(status_of(response), 405u) << response;
  EXPECT_THAT(response, HasSubstr("Allow: PUT\r\n"));
  EXPECT_TRUE(handler_.seen().empty()) << "refused requests never reach the machine side";
}

TEST_F(ApiServerTest, ActionBodyWithAFieldIs400NamingIt) {
  start();
  HttpReply reply = request("PUT", "/api/v1/vm/stop", R"({"force": true})");
  EXPECT_EQ(reply.status, 400u);
  EXPECT_EQ(json_of(reply)["error"]["field"], "force");
  reply = request("PUT", "/api/v1/vm/stop", "{oops");
  EXPECT_EQ(reply.status, 400u);
  EXPECT_EQ(json_of(reply)["error"]["field"], "body");
  EXPECT_TRUE(handler_.seen().empty());
  EXPECT_EQ(request("PUT", "/api/v1/vm/stop", "{}").status, 200u);
}

TEST_F(ApiServerTest, BalloonTargetGoesToTheMachineSide) {
  start();
  HttpReply reply = request("PUT", "/api/v1/vm/balloon", R"({"target_mib": 256})");
  EXPECT_EQ(reply.status, 200u) << reply.body;
  EXPECT_EQ(json_of(reply)["target_mib"], 256);
  EXPECT_EQ(handler_.seen(), std::vector<CommandKind>{CommandKind::SetBalloon});
}

TEST_F(ApiServerTest, BadBalloonBodyIs400NamingTheFieldAndNeverReachesTheVm) {
  start();
  const std::pair<const char*, const char*> cases[] = {
      {"", "body"},
      {"[1]", "body"},
      {R"({"target_mib": "256"})", "target_mib"},
      {R"({"target_mib": -1})", "target_mib"},
      {R"({"target_mib": 1.5})", "target_mib"},
      {R"({"target_mib": null})", "target_mib"},
      {R"({})", "target_mib"},
      {R"({"target_mib": 1, "size": 2})", "size"},
  };
  for (const auto& [body, field] : cases) {
    HttpReply reply = request("PUT", "/api/v1/vm/balloon", body);
    EXPECT_EQ(reply.status, 400u) << body;
    EXPECT_EQ(json_of(reply)["error"]["field"], field) << body;
  }
  EXPECT_TRUE(handler_.seen().empty());
}

TEST_F(ApiServerTest, BalloonTargetBeyondTheGuestsRamIs400NamingTheField) {
  start();
  HttpReply reply = request("PUT", "/api/v1/vm/balloon", R"({"target_mib": 4096})");
  EXPECT_EQ(reply.status, 400u);
  EXPECT_EQ(json_of(reply)["error"]["field"], "target_mib");
  EXPECT_THAT(json_of(reply)["error"]["message"].get<std::string>(), HasSubstr("1024 MiB"));
}

TEST_F(ApiServerTest, PowerButtonIsAnActionWithoutParameters) {
  start();
  HttpReply reply = request("PUT", "/api/v1/vm/power-button", R"({"hold_ms": 5000})");
  EXPECT_EQ(reply.status, 400u);
  EXPECT_EQ(json_of(reply)["error"]["field"], "hold_ms");
  EXPECT_TRUE(handler_.seen().empty());
  reply = request("PUT", "/api/v1/vm/power-button");
  EXPECT_EQ(reply.status, 200u);
  EXPECT_EQ(json_of(reply)["power_button"], "pressed");
  EXPECT_EQ(handler_.seen(), std::vector<CommandKind>{CommandKind::PowerButton});
}

TEST_F(ApiServerTest, BadQueryIs400NamingTheParameter) {
  start();
  HttpReply reply = request("GET", "/api/v1/events?after=soon");
  EXPECT_EQ(reply.status, 400u);
  EXPECT_EQ(json_of(reply)["error"]["field"], "after");
  reply = request("GET", "/api/v1/vm?pretty=1");
  EXPECT_EQ(reply.status, 400u);
  EXPECT_EQ(json_of(reply)["error"]["field"], "pretty");
}

TEST_F(ApiServerTest, OversizedBodyIs413) {
  ServerOptions options;
  options.max_body_bytes = 1024;
  start(options);
  RawConnection raw(socket_);
  raw.send("PUT /api/v1/vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" +
           std::string(2048, ' '));
  std::string response = raw.read_until_close();
  EXPECT_EQ(status_of(response), 413u) << response;
  EXPECT_THAT(body_of(response), HasSubstr("\"field\":\"body\""));
  EXPECT_TRUE(handler_.seen().empty());
}

TEST_F(ApiServerTest, OversizedHeaderIs431) {
  ServerOptions options;
  options.max_header_bytes = 1024;
  start(options);
  RawConnection raw(socket_);
  raw.send("GET /api/v1/vm HTTP/1.1\r\nHost: x\r\nX-Junk: " + std::string(4096, 'j') +
           "\r\n\r\n");
  std::string response = raw.read_until_close();
  EXPECT_EQ(status_of(response), 431u) << response;
}

TEST_F(ApiServerTest, MalformedRequestIs400AndTheServerCarriesOn) {
  start();
  {
    RawConnection raw(socket_);
    raw.send("THIS IS NOT HTTP\r\n\r\n");
    std::string response = raw.read_until_close();
    EXPECT_EQ(status_of(response), 400u) << response;
    EXPECT_THAT(body_of(response), HasSubstr("malformed HTTP request"));
  }
  {
    RawConnection raw(socket_);
    raw.send("GET /api/v1/vm HTTP/1.1\r\nContent-Length: -5\r\n\r\n");
    EXPECT_EQ(status_of(raw.read_until_close()), 400u);
  }
  EXPECT_EQ(request("GET", "/api/v1/version").status, 200u);
}

TEST_F(ApiServerTest, KeepAliveServesRequestsInTurn) {
  start();
  RawConnection raw(socket_);
  raw.send("GET /api/v1/version HTTP/1.1\r\nHost: x\r\n\r\n");
  std::string first = raw.read_response();
  EXPECT_EQ(status_of(first), 200u) << first;
  raw.send("GET /api/v1/vm HTTP/1.1\r\nHost: x\r\n\r\n");
  std::string second = raw.read_response();
  EXPECT_EQ(status_of(second), 200u) << second;
  EXPECT_THAT(body_of(second), HasSubstr("\"state\":\"running\""));
}

TEST_F(ApiServerTest, StalledClientDoesNotBlockOthersAndTimesOut) {
  ServerOptions options;
  options.read_timeout = 300ms;
  start(options);
  RawConnection stalled(socket_);
  stalled.send("GET /api/v1/vm HTTP/1.1\r\nHost: x\r\n");  // never finishes its header
  RawConnection silent(socket_);                           // never sends anything
  Clock::time_point before = Clock::now();
  EXPECT_EQ(request("GET", "/api/v1/vm").status, 200u);
  EXPECT_LT(Clock::now() - before, 250ms) << "the stalled clients held up another";
  std::string response = stalled.read_until_close(3s);
  EXPECT_EQ(status_of(response), 408u) << response;
  EXPECT_TRUE(silent.closed_by_server(3s)) << "an idle connection is closed after the timeout";
}

TEST_F(ApiServerTest, ConnectionsBeyondTheCapGet503) {
  ServerOptions options;
  options.max_connections = 2;
  start(options);
  RawConnection first(socket_);
  RawConnection second(socket_);
  // Let the server accept both before the third arrives.
  std::this_thread::sleep_for(100ms);
  RawConnection third(socket_);
  std::string response = third.read_until_close(3s);
  EXPECT_EQ(status_of(response), 503u) << response;
  EXPECT_THAT(body_of(response), HasSubstr("too many connections"));
}

TEST_F(ApiServerTest, MachineThatDoesNotAnswerGets503) {
  ServerOptions options;
  options.command_timeout = 200ms;
  start(options);
  handler_.hold();
  HttpReply reply = request("PUT", "/api/v1/vm/pause");
  EXPECT_EQ(reply.status, 503u);
  EXPECT_THAT(json_of(reply)["error"]["message"].get<std::string>(), HasSubstr("did not answer"));
  // A late answer finds nobody waiting, and harms nothing.
  for (ReplyCallback& done : handler_.take_held()) done(nlohmann::json{{"state", "paused"}});
  EXPECT_EQ(request("GET", "/api/v1/version").status, 200u);
}

TEST_F(ApiServerTest, ServerGoesAwayWithACommandPending) {
  start();
  handler_.hold();
  std::thread client([this] {
    Result<HttpReply> reply = Client(socket_, 5s).request("GET", "/api/v1/vm");
    EXPECT_FALSE(reply && reply->status == 200);
  });
  while (handler_.seen().empty()) std::this_thread::sleep_for(5ms);
  server_.reset();
  client.join();
  for (ReplyCallback& done : handler_.take_held()) done(nlohmann::json::object());
  EXPECT_NE(::access(socket_.c_str(), F_OK), 0) << "the socket is removed";
}

TEST_F(ApiServerTest, CommandQueueAsTheHandler) {
  Result<CommandQueue> queue = CommandQueue::create(2);
  ASSERT_TRUE(queue);
  Result<std::unique_ptr<ApiServer>> server = ApiServer::start(socket_, *queue, events_);
  ASSERT_TRUE(server);
  // The "main thread": serves the queue when its eventfd is readable.
  std::atomic<bool> done{false};
  std::thread machine([&] {
    while (!done) {
      pollfd fd{queue->ready_event().get(), POLLIN, 0};
      if (::poll(&fd, 1, 20) <= 0) continue;
      for (CommandQueue::Pending& pending : queue->take()) {
        pending.done(nlohmann::json{{"command", std::string(command_name(pending.command.kind))}});
      }
    }
  });
  Result<HttpReply> reply = Client(socket_, 5s).request("GET", "/api/v1/vm/devices");
  ASSERT_TRUE(reply);
  EXPECT_EQ(nlohmann::json::parse(reply->body)["command"], "get-devices");
  done = true;
  machine.join();
  queue->close("exiting");
  reply = Client(socket_, 5s).request("PUT", "/api/v1/vm/reset");
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->status, 409u);
  EXPECT_THAT(reply->body, HasSubstr("exiting"));
}

TEST_F(ApiServerTest, CommandQueueRefusesBeyondItsCapacity) {
  Result<CommandQueue> queue = CommandQueue::create(1);
  ASSERT_TRUE(queue);
  std::vector<Reply> replies;
  queue->submit(Command{.kind = CommandKind::GetVm},
                [&](Reply reply) { replies.push_back(reply); });
  queue->submit(Command{.kind = CommandKind::GetVm},
                [&](Reply reply) { replies.push_back(reply); });
  ASSERT_EQ(replies.size(), 1u) << "the second is refused at once";
  EXPECT_FALSE(replies[0]);
  EXPECT_EQ(queue->take().size(), 1u);
}

TEST_F(ApiServerTest, PrometheusMetrics) {
  start();
  HttpReply reply = request("GET", "/metrics");
  EXPECT_EQ(reply.status, 200u);
  EXPECT_THAT(reply.content_type, StartsWith("text/plain"));
  EXPECT_THAT(reply.body, HasSubstr("keel_vcpu_exits_total{vcpu=\"0\",reason=\"io-out\"} 42\n"));
  EXPECT_THAT(reply.body, HasSubstr("keel_guest_memory_bytes 1048576\n"));
}

std::vector<nlohmann::json> lines_of(const std::string& body) {
  std::vector<nlohmann::json> lines;
  size_t start = 0, end;
  while ((end = body.find('\n', start)) != std::string::npos) {
    lines.push_back(nlohmann::json::parse(body.substr(start, end - start), nullptr, false));
    start = end + 1;
  }
  return lines;
}

TEST_F(ApiServerTest, EventsAfterASequenceNumber) {
  start();
  events_.publish("created", {{"boot", 1}});
  events_.publish("running");
  events_.publish("paused");
  HttpReply all = request("GET", "/api/v1/events?follow=false");
  EXPECT_EQ(all.status, 200u);
  EXPECT_EQ(all.content_type, "application/x-ndjson");
  std::vector<nlohmann::json> lines = lines_of(all.body);
  ASSERT_EQ(lines.size(), 3u) << all.body;
  EXPECT_EQ(lines[0]["seq"], 1);
  EXPECT_EQ(lines[0]["type"], "created");
  EXPECT_EQ(lines[0]["boot"], 1);
  EXPECT_EQ(lines[2]["type"], "paused");
  lines = lines_of(request("GET", "/api/v1/events?after=2&follow=false").body);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0]["seq"], 3);
  EXPECT_TRUE(lines_of(request("GET", "/api/v1/events?after=3&follow=false").body).empty());
  HttpReply future = request("GET", "/api/v1/events?after=4&follow=false");
  EXPECT_EQ(future.status, 400u);
  EXPECT_EQ(json_of(future)["error"]["field"], "after");
}

TEST_F(ApiServerTest, EventsFellOutOfTheBufferAreReportedAsMissed) {
  EventLog small(4);
  Result<std::unique_ptr<ApiServer>> server = ApiServer::start(socket_, handler_, small);
  ASSERT_TRUE(server);
  for (int i = 0; i < 10; ++i) small.publish("resumed");
  Result<HttpReply> reply = Client(socket_, 5s).request("GET", "/api/v1/events?after=2&follow=false");
  ASSERT_TRUE(reply);
  std::vector<nlohmann::json> lines = lines_of(reply->body);
  ASSERT_EQ(lines.size(), 5u) << reply->body;
  EXPECT_EQ(lines[0]["type"], "missed");
  EXPECT_FALSE(lines[0].contains("seq"));
  EXPECT_EQ(lines[0]["after"], 2);
  EXPECT_EQ(lines[0]["next_seq"], 7);
  EXPECT_EQ(lines[1]["seq"], 7);
  EXPECT_EQ(lines[4]["seq"], 10);
}

TEST_F(ApiServerTest, FollowedStreamDeliversNewEventsAndResumesAfterReconnect) {
  start();
  events_.publish("created");
  std::vector<nlohmann::json> received;
  std::thread follower([&] {
    Result<HttpReply> reply = Client(socket_, 5s).stream_lines(
        "/api/v1/events?after=0", [&](std::string_view line) {
          received.push_back(nlohmann::json::parse(line, nullptr, false));
          return received.size() < 3;  // hang up after the third
        });
    EXPECT_TRUE(reply);
    EXPECT_EQ(reply->status, 200u);
  });
  // Published after the follower connected, and while it waits.
  std::this_thread::sleep_for(100ms);
  events_.publish("running");
  std::this_thread::sleep_for(50ms);
  events_.publish("paused");
  events_.publish("resumed");  // after the follower hung up
  follower.join();
  ASSERT_EQ(received.size(), 3u);
  EXPECT_EQ(received[0]["type"], "created");
  EXPECT_EQ(received[1]["type"], "running");
  EXPECT_EQ(received[2]["type"], "paused");
  // Reconnecting with the last seq seen gets exactly what came after.
  uint64_t last = received.back()["seq"].get<uint64_t>();
  std::vector<nlohmann::json> rest = lines_of(
      request("GET", "/api/v1/events?follow=false&after=" + std::to_string(last)).body);
  ASSERT_EQ(rest.size(), 1u);
  EXPECT_EQ(rest[0]["type"], "resumed");
  EXPECT_EQ(rest[0]["seq"], last + 1);
}

TEST_F(ApiServerTest, AFollowerThatStopsReadingDoesNotBlockOthers) {
  start();
  RawConnection follower(socket_);
  follower.send("GET /api/v1/events HTTP/1.1\r\nHost: x\r\n\r\n");
  // Far more than the socket buffers hold, with nobody reading.
  for (int i = 0; i < 3000; ++i) events_.publish("paused", {{"padding", std::string(200, 'p')}});
  Clock::time_point before = Clock::now();
  EXPECT_EQ(request("GET", "/api/v1/vm").status, 200u);
  EXPECT_LT(Clock::now() - before, 1s);
}

TEST_F(ApiServerTest, StaleSocketIsReplacedAndALiveOneRefused) {
  {
    // A socket file nobody listens on, as a killed keel-vmm leaves it.
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::memcpy(address.sun_path, socket_.c_str(), socket_.size() + 1);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
    ::close(fd);
  }
  start();
  EXPECT_EQ(request("GET", "/api/v1/version").status, 200u);
  FakeHandler other_handler;
  Result<std::unique_ptr<ApiServer>> second = ApiServer::start(socket_, other_handler, events_);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code(), Errc::Busy);
  EXPECT_EQ(request("GET", "/api/v1/version").status, 200u) << "the first server still serves";
}

TEST_F(ApiServerTest, BadSocketPaths) {
  EXPECT_FALSE(ApiServer::start("", handler_, events_));
  EXPECT_FALSE(ApiServer::start(dir_ + "/" + std::string(200, 'x'), handler_, events_));
  EXPECT_FALSE(ApiServer::start(dir_, handler_, events_)) << "a directory is not a socket";
  EXPECT_FALSE(ApiServer::start("/nonexistent-dir/api.sock", handler_, events_));
}

TEST_F(ApiServerTest, ClientReportsAMissingSocket) {
  Result<HttpReply> reply = Client(dir_ + "/none.sock", 1s).request("GET", "/api/v1/vm");
  ASSERT_FALSE(reply);
  EXPECT_EQ(reply.error().code(), Errc::NotFound);
}

}  // namespace
}  // namespace keel::api
