// A VM configured and started through the control API: keel-vmm with only
// --api-socket waits (not-configured), PUT /api/v1/vm/config gives it
// pvh_check.elf (configured), PUT /api/v1/vm/start boots it. Through
// api::Client and through keelctl (vm create, vm start), on the host's /dev/kvm.
#include <chrono>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "api/client.h"
#include "tiny_guest.h"
#include "vmm_api_support.h"
#include "vmm_process.h"

namespace keel::testing {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;
using Json = nlohmann::json;

constexpr auto kTimeout = 20s;

// pvh_check.elf with an ending given by letter (docs in pvh_check.S).
Json guest_config(const std::string& letter) {
  return Json{{"kernel", std::string(KEEL_VMM_GUEST_DIR) + "/pvh_check.elf"},
              {"cmdline", "pvh-test " + letter},
              {"memory_mib", 64},
              {"debug_exit", true},
              {"acpi", false}};
}

class VmmApiStartTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (auto reason = tiny_guest_unavailable_reason()) {
      GTEST_SKIP() << "keel-vmm needs a usable /dev/kvm: " << *reason;
    }
    socket_ = dir_.file("api.sock");
    vmm_ = std::make_unique<VmmProcess>(std::vector<std::string>{"--api-socket", socket_});
    ASSERT_TRUE(api_answers(socket_, kTimeout)) << "the API never answered\n" << vmm_->wait(1s);
  }

  api::HttpReply request(std::string_view method, std::string_view target,
                         std::string_view body = "") {
    Result<api::HttpReply> reply = api::Client(socket_, 10s).request(method, target, body);
    EXPECT_TRUE(reply) << reply.error().message();
    return reply ? *reply : api::HttpReply{};
  }

  Json call(std::string_view method, std::string_view target, unsigned expected_status = 200,
            std::string_view body = "") {
    api::HttpReply reply = request(method, target, body);
    EXPECT_EQ(reply.status, expected_status) << method << " " << target << ": " << reply.body;
    return Json::parse(reply.body, nullptr, false);
  }

  // The field a refused PUT /api/v1/vm/config names.
  std::string refused_field(const Json& config, const Json& changes = Json::object()) {
    Json changed = config;
    changed.update(changes);
    return refused_body_field(changed);
  }
  std::string refused_body_field(const Json& config) {
    Json error = call("PUT", "/api/v1/vm/config", 400, config.dump())["error"];
    return error.value("field", "(none)");
  }

  Outcome keelctl(std::vector<std::string> args) {
    args.insert(args.begin(), {"--socket", socket_});
    VmmProcess process(args, std::nullopt, -1, KEEL_KEELCTL_BINARY);
    return process.wait(kTimeout);
  }

  TempDir dir_;
  std::string socket_;
  std::unique_ptr<VmmProcess> vmm_;
};

// Checked before KVM is opened: no skip.
TEST(VmmApiStartFlagsTest, FlagsThatMakePartOfAConfigNeedKernelOrConfig) {
  TempDir dir;
  VmmProcess vmm({"--api-socket", dir.file("api.sock"), "--cpus", "2"});
  Outcome outcome = vmm.wait(kTimeout);
  EXPECT_EQ(outcome.exit_status, 2) << outcome;
  EXPECT_THAT(outcome.err, HasSubstr("--cpus needs --kernel or --config"));
  EXPECT_THAT(outcome.err, HasSubstr("PUT /api/v1/vm/config"));
}

TEST_F(VmmApiStartTest, WaitsUnconfiguredAndRefusesWhatNeedsAVm) {
  Json vm = call("GET", "/api/v1/vm");
  EXPECT_EQ(vm["state"], "not-configured");
  EXPECT_EQ(vm["boot"], 0);
  EXPECT_FALSE(vm.contains("config"));
  Json metrics = call("GET", "/api/v1/vm/metrics");
  EXPECT_EQ(metrics["state"], "not-configured");
  EXPECT_TRUE(metrics["vcpus"].empty());
  api::HttpReply prometheus = request("GET", "/metrics");
  EXPECT_EQ(prometheus.status, 200u);
  EXPECT_THAT(prometheus.body, HasSubstr("keel_vm_state{state=\"not-configured\"} 1\n"));
  for (auto [method, target] : {std::pair{"PUT", "/api/v1/vm/start"},
                                std::pair{"GET", "/api/v1/vm/config"},
                                std::pair{"GET", "/api/v1/vm/devices"},
                                std::pair{"PUT", "/api/v1/vm/pause"},
                                std::pair{"PUT", "/api/v1/vm/reset"}}) {
    Json error = call(method, target, 409)["error"];
    EXPECT_THAT(error.value("message", ""), HasSubstr("configure")) << target;
  }
  Outcome waited = vmm_->wait(200ms);
  EXPECT_TRUE(waited.timed_out) << "keel-vmm keeps waiting\n" << waited;
}

TEST_F(VmmApiStartTest, BadConfigsAreRefusedNamingTheField) {
  Json config = guest_config("w");
  EXPECT_EQ(refused_field(Json{{"kernel", "/nonexistent/keel/vmlinuz"}}), "kernel");
  EXPECT_EQ(refused_field(config, {{"cpus", 0}}), "cpus");
  EXPECT_EQ(refused_field(config, {{"memory_mib", "lots"}}), "memory_mib");
  EXPECT_EQ(refused_field(config, {{"colour", "red"}}), "colour");
  EXPECT_EQ(refused_body_field(Json::array()), "body");
  EXPECT_EQ(call("GET", "/api/v1/vm")["state"], "not-configured") << "refused: nothing changed";
}

TEST_F(VmmApiStartTest, ConfiguredStartedAndRunningTheGuest) {
  // A first configuration, then its replacement before start.
  Json first = call("PUT", "/api/v1/vm/config", 200, guest_config("").dump());
  EXPECT_EQ(first["state"], "configured");
  EXPECT_EQ(first["config"]["cmdline"], "pvh-test ");
  Json config = guest_config("w");  // polls COM1 forever: still running when asked
  call("PUT", "/api/v1/vm/config", 200, config.dump());
  Json vm = call("GET", "/api/v1/vm");
  EXPECT_EQ(vm["state"], "configured");
  EXPECT_EQ(vm["config"]["cmdline"], "pvh-test w");
  Json stored = call("GET", "/api/v1/vm/config");
  EXPECT_EQ(stored["memory_mib"], 64);
  EXPECT_EQ(stored["cpus"], 1) << "a key left out takes its default";

  EXPECT_EQ(call("PUT", "/api/v1/vm/start")["state"], "running");
  ASSERT_TRUE(vmm_->wait_for_stdout("pvh ok\n", kTimeout)) << vmm_->wait(1s);
  EXPECT_EQ(call("GET", "/api/v1/vm")["state"], "running");
  EXPECT_EQ(call("GET", "/api/v1/vm")["boot"], 1);
  EXPECT_EQ(call("GET", "/api/v1/vm/config")["cmdline"], "pvh-test w");
  EXPECT_THAT(call("PUT", "/api/v1/vm/start", 409)["error"]["message"].get<std::string>(),
              HasSubstr("started already"));
  call("PUT", "/api/v1/vm/config", 409, config.dump());
  call("PUT", "/api/v1/vm/pause");
  call("PUT", "/api/v1/vm/resume");

  api::HttpReply events = request("GET", "/api/v1/events?follow=false");
  std::vector<std::string> types;
  for (size_t start = 0; start < events.body.size();) {
    size_t end = events.body.find('\n', start);
    Json event = Json::parse(events.body.substr(start, end - start), nullptr, false);
    types.push_back(event.value("type", "?"));
    if (types.size() <= 2) {
      EXPECT_EQ(event["replaced"], types.size() == 2) << event.dump();
    }
    start = end == std::string::npos ? end : end + 1;
  }
  EXPECT_EQ(types, (std::vector<std::string>{"configured", "configured", "created", "running",
                                             "paused", "resumed"}))
      << events.body;

  call("PUT", "/api/v1/vm/stop");
  Outcome outcome = vmm_->wait(kTimeout);
  EXPECT_EQ(outcome.exit_status, 0) << outcome;
}

TEST_F(VmmApiStartTest, AStartThatFailsLeavesTheVmConfigured) {
  // Readable, so the config is valid, but no kernel: building the VM fails.
  Json config = guest_config("");
  config["kernel"] = dir_.write("not-a-kernel", std::string(8192, 'x'));
  call("PUT", "/api/v1/vm/config", 200, config.dump());
  api::HttpReply refused = request("PUT", "/api/v1/vm/start");
  EXPECT_GE(refused.status, 400u) << refused.body;
  EXPECT_THAT(refused.body, HasSubstr("start"));
  EXPECT_EQ(call("GET", "/api/v1/vm")["state"], "configured");
  // Fixed, it starts; pvh_check's plain ending exits 0 through the debug port.
  call("PUT", "/api/v1/vm/config", 200, guest_config("").dump());
  call("PUT", "/api/v1/vm/start");
  Outcome outcome = vmm_->wait(kTimeout);
  EXPECT_EQ(outcome.exit_status, 0) << outcome;
  EXPECT_THAT(outcome.out, HasSubstr("pvh ok\n"));
}

TEST_F(VmmApiStartTest, KeelctlCreatesAndStartsTheVm) {
  std::string file = dir_.write("vm.json", guest_config("").dump());
  Outcome created = keelctl({"vm", "create", file});
  EXPECT_EQ(created.exit_status, 0) << created;
  EXPECT_THAT(created.out, HasSubstr("configured"));
  Outcome shown = keelctl({"vm", "config"});
  EXPECT_EQ(shown.exit_status, 0) << shown;
  EXPECT_THAT(shown.out, HasSubstr("pvh_check.elf"));
  Outcome missing = keelctl({"vm", "create", dir_.file("missing.json")});
  EXPECT_EQ(missing.exit_status, 2) << missing;
  Outcome started = keelctl({"vm", "start"});
  EXPECT_EQ(started.exit_status, 0) << started;
  EXPECT_EQ(started.out, "running\n");
  Outcome outcome = vmm_->wait(kTimeout);
  EXPECT_EQ(outcome.exit_status, 0) << outcome;
  EXPECT_THAT(outcome.out, HasSubstr("pvh ok\n"));
}

TEST_F(VmmApiStartTest, StopBeforeStartEndsKeelVmm) {
  EXPECT_EQ(call("PUT", "/api/v1/vm/stop")["state"], "stopping");
  Outcome outcome = vmm_->wait(kTimeout);
  EXPECT_EQ(outcome.exit_status, 0) << outcome;
}

}  // namespace
}  // namespace keel::testing
