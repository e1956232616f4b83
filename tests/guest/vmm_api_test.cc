// keel-vmm's control API end to end: the real binary with --api-socket on
// a tiny guest on the host's /dev/kvm, driven through the socket (api::Client)
// and through keelctl. pvh_check's `w` ending polls COM1's line status
// register forever (nothing arrives on /dev/null), so the guest makes a
// steady stream of io-in exits: they stop while paused and go on after a
// resume, which is how these tests see that a pause really holds the vCPUs.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "api/client.h"
#include "vmm_api_support.h"
#include "tiny_guest.h"
#include "vmm_process.h"

namespace keel::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using namespace std::chrono_literals;
using Json = nlohmann::json;

constexpr auto kGuestTimeout = 20s;

std::vector<std::string> polling_guest(const std::string& socket, int cpus = 1) {
  return {"--kernel",   std::string(KEEL_VMM_GUEST_DIR) + "/pvh_check.elf",
          "--cmdline",  "pvh-test w",
          "--memory",   "64",
          "--cpus",     std::to_string(cpus),
          "--debug-exit", "--no-acpi",
          "--api-socket", socket};
}

Outcome keelctl(const std::vector<std::string>& args) {
  VmmProcess process(args, std::nullopt, -1, KEEL_KEELCTL_BINARY);
  return process.wait(kGuestTimeout);
}

class VmmApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (auto reason = tiny_guest_unavailable_reason()) {
      GTEST_SKIP() << "keel-vmm needs a usable /dev/kvm: " << *reason;
    }
    socket_ = dir_.file("api.sock");
  }

  // Starts keel-vmm and waits until its guest printed and the API answers.
  void start(std::vector<std::string> args) {
    vmm_ = std::make_unique<VmmProcess>(args);
    ASSERT_TRUE(vmm_->wait_for_stdout("pvh ok\n", kGuestTimeout)) << vmm_->wait(1s);
    ASSERT_TRUE(api_answers(socket_, kGuestTimeout)) << "the API never answered on " << socket_;
  }

  api::Client client() const { return api::Client(socket_, 10s); }

  Json call(std::string_view method, std::string_view target, unsigned expected_status = 200) {
    Result<api::HttpReply> reply = client().request(method, target);
    EXPECT_TRUE(reply) << reply.error().message();
    if (!reply) return Json();
    EXPECT_EQ(reply->status, expected_status) << method << " " << target << ": " << reply->body;
    return Json::parse(reply->body, nullptr, false);
  }

  uint64_t io_in_exits() {
    Json metrics = call("GET", "/api/v1/vm/metrics");
    uint64_t total = 0;
    for (const Json& vcpu : metrics["vcpus"]) total += vcpu["exits"].value("io-in", uint64_t{0});
    return total;
  }

  std::vector<std::string> ctl(std::initializer_list<std::string> args) {
    std::vector<std::string> all = {"--socket", socket_};
    all.insert(all.end(), args);
    return all;
  }

  TempDir dir_;
  std::string socket_;
  std::unique_ptr<VmmProcess> vmm_;
};

TEST_F(VmmApiTest, PauseHoldsTheGuestAndResumeLetsItGo) {
  start(polling_guest(socket_));
  EXPECT_EQ(call("GET", "/api/v1/vm")["state"], "running");
  uint64_t before = io_in_exits();
  std::this_thread::sleep_for(100ms);
  EXPECT_GT(io_in_exits(), before) << "the guest polls COM1 while running";

  EXPECT_EQ(call("PUT", "/api/v1/vm/pause")["state"], "paused");
  EXPECT_EQ(call("GET", "/api/v1/vm")["state"], "paused");
  uint64_t paused = io_in_exits();
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(io_in_exits(), paused) << "no vCPU ran while paused";
  Json conflict = call("PUT", "/api/v1/vm/pause", 409);
  EXPECT_EQ(conflict["error"]["code"], "Conflict");

  EXPECT_EQ(call("PUT", "/api/v1/vm/resume")["state"], "running");
  std::this_thread::sleep_for(100ms);
  EXPECT_GT(io_in_exits(), paused) << "the guest runs again after resume";
  EXPECT_EQ(call("PUT", "/api/v1/vm/resume", 409)["error"]["message"], "the VM is not paused");

  EXPECT_EQ(call("PUT", "/api/v1/vm/stop")["state"], "stopping");
  Outcome outcome = vmm_->wait(kGuestTimeout);
  EXPECT_EQ(outcome.exit_status, 0) << outcome;
  EXPECT_NE(::access(socket_.c_str(), F_OK), 0) << "keel-vmm removes its API socket";
}

TEST_F(VmmApiTest, APausedVmWithSeveralVcpusCanBeStopped) {
  start(polling_guest(socket_, 2));
  call("PUT", "/api/v1/vm/pause");
  Json metrics = call("GET", "/api/v1/vm/metrics");
  EXPECT_EQ(metrics["state"], "paused");
  EXPECT_EQ(metrics["vcpus"].size(), 2u);
  call("PUT", "/api/v1/vm/stop");
  Outcome outcome = vmm_->wait(kGuestTimeout);
  EXPECT_EQ(outcome.exit_status, 0) << outcome;
}

TEST_F(VmmApiTest, DevicesMetricsAndConfig) {
  start(polling_guest(socket_));
  Json vm = call("GET", "/api/v1/vm");
  EXPECT_EQ(vm["config"]["memory_mib"], 64);
  EXPECT_EQ(vm["config"]["cmdline"], "pvh-test w");
  EXPECT_EQ(vm["boot"], 1);
  Json devices = call("GET", "/api/v1/vm/devices")["devices"];
  ASSERT_TRUE(devices.is_array());
  ASSERT_FALSE(devices.empty());
  EXPECT_EQ(devices[0]["type"], "pci-host-bridge");
  EXPECT_EQ(devices[0]["address"], "0000:00:00.0");
  bool serial = false, debug_exit = false;
  for (const Json& device : devices) {
    serial = serial || (device["type"] == "serial-16550a" && device["address"] == "0x3f8");
    debug_exit = debug_exit || device["type"] == "debug-exit";
  }
  EXPECT_TRUE(serial) << devices.dump();
  EXPECT_TRUE(debug_exit) << devices.dump();

  Result<api::HttpReply> prometheus = client().request("GET", "/metrics");
  ASSERT_TRUE(prometheus);
  EXPECT_EQ(prometheus->status, 200u);
  EXPECT_THAT(prometheus->body, HasSubstr("keel_vcpu_exits_total{vcpu=\"0\",reason=\"io-in\"} "));
  EXPECT_THAT(prometheus->body, HasSubstr("keel_guest_memory_bytes 67108864\n"));
  call("PUT", "/api/v1/vm/stop");
  EXPECT_EQ(vmm_->wait(kGuestTimeout).exit_status, 0);
}

TEST_F(VmmApiTest, EventsTellTheLifecycleInOrder) {
  start(polling_guest(socket_));
  std::vector<Json> followed;
  std::thread follower([&] {
    // Follows from the start until keel-vmm exits and closes the stream.
    Result<api::HttpReply> reply = api::Client(socket_, 10s).stream_lines(
        "/api/v1/events?after=0", [&](std::string_view line) {
          followed.push_back(Json::parse(line, nullptr, false));
          return true;
        });
    EXPECT_TRUE(reply);
  });
  call("PUT", "/api/v1/vm/pause");
  call("PUT", "/api/v1/vm/resume");
  call("PUT", "/api/v1/vm/stop");
  Outcome outcome = vmm_->wait(kGuestTimeout);
  follower.join();
  EXPECT_EQ(outcome.exit_status, 0) << outcome;
  std::vector<std::string> types;
  for (const Json& event : followed) types.push_back(event.value("type", "?"));
  EXPECT_EQ(types, (std::vector<std::string>{"created", "running", "paused", "resumed",
                                             "stopping", "stopped"}))
      << outcome;
  for (size_t i = 0; i < followed.size(); ++i) EXPECT_EQ(followed[i]["seq"], i + 1);
  if (followed.size() == 6) {
    EXPECT_EQ(followed[4]["reason"], "stopped");
    EXPECT_EQ(followed[5]["reason"], "stopped");
    EXPECT_EQ(followed[5]["detail"], "stopped through the API");
  }
}

TEST_F(VmmApiTest, ResetThroughTheApiRebootsTheGuest) {
  start(polling_guest(socket_));
  EXPECT_EQ(call("PUT", "/api/v1/vm/reset")["reason"], "reset");
  ASSERT_TRUE(vmm_->wait_for_stdout("pvh ok\npvh ok\n", kGuestTimeout)) << vmm_->wait(1s);
  // The next boot's commands are served by the new machine.
  Clock::time_point deadline = Clock::now() + kGuestTimeout;
  Json vm;
  while (Clock::now() < deadline) {
    vm = call("GET", "/api/v1/vm");
    if (vm.value("boot", 0) == 2) break;
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_EQ(vm["boot"], 2);
  Result<api::HttpReply> events = client().request("GET", "/api/v1/events?follow=false");
  ASSERT_TRUE(events);
  EXPECT_THAT(events->body, HasSubstr("\"type\":\"reset\""));
  EXPECT_THAT(events->body, HasSubstr("\"reason\":\"reset\""));
  call("PUT", "/api/v1/vm/stop");
  EXPECT_EQ(vmm_->wait(kGuestTimeout).exit_status, 0);
}

TEST_F(VmmApiTest, BalloonTargetIsSetWithinTheGuestsRam) {
  std::vector<std::string> args = polling_guest(socket_);
  args.insert(args.end(), {"--balloon", "on"});
  start(args);
  Result<api::HttpReply> reply =
      client().request("PUT", "/api/v1/vm/balloon", R"({"target_mib": 16})");
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->status, 200u) << reply->body;
  EXPECT_EQ(Json::parse(reply->body, nullptr, false)["target_mib"], 16);
  bool shown = false;
  const Json devices = call("GET", "/api/v1/vm/devices")["devices"];
  for (const Json& device : devices) {
    if (device["type"] == "virtio-balloon") {
      EXPECT_EQ(device["properties"]["target_mib"], "16") << device.dump();
      shown = true;
    }
  }
  EXPECT_TRUE(shown);
  // Its counters in the metrics, JSON and Prometheus.
  const Json metrics = call("GET", "/api/v1/vm/metrics");
  ASSERT_EQ(metrics["devices"].size(), 1u) << metrics.dump();
  EXPECT_EQ(metrics["devices"][0]["type"], "virtio-balloon");
  EXPECT_EQ(metrics["devices"][0]["counters"]["queue_notifications"], 0) << "no driver here";
  Result<api::HttpReply> prometheus = client().request("GET", "/metrics");
  ASSERT_TRUE(prometheus);
  EXPECT_THAT(prometheus->body,
              HasSubstr("keel_virtio_interrupts_total{device=\"virtio-balloon\",address=\"0000:00:01.0\"} "));

  reply = client().request("PUT", "/api/v1/vm/balloon", R"({"target_mib": 65})");
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->status, 400u) << reply->body;
  Json error = Json::parse(reply->body, nullptr, false)["error"];
  EXPECT_EQ(error["field"], "target_mib");
  EXPECT_THAT(error["message"].get<std::string>(), HasSubstr("64 MiB"));

  Outcome set = keelctl(ctl({"vm", "balloon", "--target-mib", "8"}));
  EXPECT_EQ(set.exit_status, 0) << set;
  EXPECT_THAT(set.out, HasSubstr("balloon target 8 MiB"));
  Outcome events = keelctl(ctl({"--json", "vm", "events"}));
  EXPECT_THAT(events.out, HasSubstr("\"type\":\"balloon\""));
  EXPECT_EQ(call("GET", "/api/v1/vm")["state"], "running") << "a refused request leaves the VM be";
  call("PUT", "/api/v1/vm/stop");
  EXPECT_EQ(vmm_->wait(kGuestTimeout).exit_status, 0);
}

TEST_F(VmmApiTest, BalloonAndPowerButtonAreConflictsWithoutTheirDevice) {
  start(polling_guest(socket_));  // no --balloon, --no-acpi
  Result<api::HttpReply> reply =
      client().request("PUT", "/api/v1/vm/balloon", R"({"target_mib": 16})");
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->status, 409u) << reply->body;
  EXPECT_THAT(reply->body, HasSubstr("--balloon"));
  reply = client().request("PUT", "/api/v1/vm/power-button");
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->status, 409u) << reply->body;
  EXPECT_THAT(reply->body, HasSubstr("--no-acpi"));
  reply = client().request("PUT", "/api/v1/vm/nets", R"({"id": "n", "tap": "keel-never0"})");
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->status, 409u) << reply->body;
  EXPECT_THAT(reply->body, HasSubstr("no ACPI"));
  EXPECT_EQ(call("GET", "/api/v1/vm")["state"], "running");
  call("PUT", "/api/v1/vm/stop");
  EXPECT_EQ(vmm_->wait(kGuestTimeout).exit_status, 0);
}

TEST_F(VmmApiTest, PowerButtonIsPressedAndPublished) {
  // With ACPI tables: the tiny guest ignores them, and the GED's interrupt.
  std::vector<std::string> args = polling_guest(socket_);
  std::erase(args, "--no-acpi");
  start(args);
  const Json devices = call("GET", "/api/v1/vm/devices")["devices"];
  bool ged = false;
  for (const Json& device : devices) ged = ged || device["type"] == "acpi-ged";
  EXPECT_TRUE(ged) << devices.dump();
  Outcome pressed = keelctl(ctl({"vm", "power-button"}));
  EXPECT_EQ(pressed.exit_status, 0) << pressed;
  EXPECT_THAT(pressed.out, HasSubstr("power button pressed"));
  Outcome events = keelctl(ctl({"--json", "vm", "events"}));
  EXPECT_THAT(events.out, HasSubstr("\"type\":\"power-button\""));
  call("PUT", "/api/v1/vm/stop");
  EXPECT_EQ(vmm_->wait(kGuestTimeout).exit_status, 0);
}

// The tiny guest has no ACPI interpreter, so it never ejects: the unplug
// times out, is published as eject-timeout, and the disk stays plugged.
TEST_F(VmmApiTest, HotplugOfADiskTheGuestNeverEjectsTimesOut) {
  std::vector<std::string> args = polling_guest(socket_);
  std::erase(args, "--no-acpi");
  start(args);
  const std::string image = dir_.file("hot.raw");
  { std::ofstream(image, std::ios::binary).put('\0'); }
  std::filesystem::resize_file(image, 1 << 20);
  auto put = [this](std::string_view target, const Json& body) {
    Result<api::HttpReply> reply = client().request("PUT", target, body.dump());
    EXPECT_TRUE(reply) << reply.error().message();
    return reply ? *reply : api::HttpReply{};
  };
  const std::string long_image = dir_.file("long.raw");
  { std::ofstream(long_image, std::ios::binary).put('\0'); }
  std::filesystem::resize_file(long_image, 1 << 20);
  EXPECT_EQ(put("/api/v1/vm/disks", {{"id", std::string(32, 'x')}, {"path", long_image},
                                     {"readonly", true}}).status, 200u)
      << "an id longer than a virtio-blk serial is cut for the serial";
  api::HttpReply added =
      put("/api/v1/vm/disks", {{"id", "hot1"}, {"path", image}, {"format", "raw"}});
  ASSERT_EQ(added.status, 200u) << added.body;
  const std::string address = Json::parse(added.body)["address"];
  EXPECT_EQ(put("/api/v1/vm/disks", {{"id", "hot1"}, {"path", image}}).status, 409u)
      << "the image is locked by the first disk";
  auto hot1_properties = [this]() {
    const Json devices = call("GET", "/api/v1/vm/devices")["devices"];
    for (const Json& device : devices) {
      if (device["properties"].value("id", "") == "hot1") return device["properties"];
    }
    return Json();
  };
  ASSERT_FALSE(hot1_properties().is_null()) << call("GET", "/api/v1/vm/devices").dump();
  EXPECT_EQ(hot1_properties()["size_bytes"], std::to_string(1 << 20));

  api::HttpReply resized = put("/api/v1/vm/disks/resize", {{"id", "hot1"}, {"size_bytes", 4 << 20}});
  EXPECT_EQ(resized.status, 200u) << resized.body;
  EXPECT_EQ(std::filesystem::file_size(image), 4u << 20);
  EXPECT_EQ(hot1_properties()["size_bytes"], std::to_string(4 << 20));
  EXPECT_EQ(put("/api/v1/vm/disks/resize", {{"id", "hot1"}, {"size_bytes", 1 << 20}}).status, 400u);
  EXPECT_EQ(put("/api/v1/vm/disks/resize", {{"id", "nope"}, {"size_bytes", 1 << 20}}).status, 404u);

  api::HttpReply removing = put("/api/v1/vm/disks/remove", {{"id", "hot1"}, {"timeout_ms", 300}});
  EXPECT_EQ(removing.status, 200u) << removing.body;
  EXPECT_EQ(Json::parse(removing.body)["state"], "eject-requested");
  EXPECT_EQ(hot1_properties()["unplug"], "pending");
  EXPECT_EQ(put("/api/v1/vm/disks/remove", {{"id", "hot1"}}).status, 409u) << "already pending";
  EXPECT_EQ(put("/api/v1/vm/nets/remove", {{"id", "hot1"}}).status, 404u) << "hot1 is a disk";
  bool timed_out = false;
  for (auto deadline = std::chrono::steady_clock::now() + 10s;
       !timed_out && std::chrono::steady_clock::now() < deadline;) {
    Outcome events = keelctl(ctl({"--json", "vm", "events"}));
    timed_out = events.out.find("\"type\":\"eject-timeout\"") != std::string::npos;
    if (!timed_out) std::this_thread::sleep_for(100ms);
  }
  EXPECT_TRUE(timed_out) << "no eject-timeout event";
  Json still = hot1_properties();
  ASSERT_FALSE(still.is_null()) << "the disk stays after a timed-out unplug";
  EXPECT_FALSE(still.contains("unplug"));
  Outcome events = keelctl(ctl({"--json", "vm", "events"}));
  EXPECT_THAT(events.out, HasSubstr("\"type\":\"device-added\""));
  EXPECT_THAT(events.out, HasSubstr("\"address\":\"" + address + "\""));
  EXPECT_THAT(events.out, HasSubstr("\"type\":\"disk-resized\""));
  EXPECT_THAT(events.out, Not(HasSubstr("device-removed")));
  // A slot may be asked for; 0 (the host bridge's) and a taken one may not.
  const std::string slotted_image = dir_.file("slotted.raw");
  { std::ofstream(slotted_image, std::ios::binary).put('\0'); }
  std::filesystem::resize_file(slotted_image, 1 << 20);
  api::HttpReply slotted = put("/api/v1/vm/disks", {{"id", "slotted"}, {"path", slotted_image},
                                                    {"readonly", true}, {"slot", 20}});
  ASSERT_EQ(slotted.status, 200u) << slotted.body;
  EXPECT_EQ(Json::parse(slotted.body)["address"], "0000:00:14.0");
  api::HttpReply host_bridge = put("/api/v1/vm/nets", {{"id", "n0"}, {"tap", "keel-never0"},
                                                      {"slot", 0}});
  EXPECT_EQ(host_bridge.status, 400u) << host_bridge.body;
  EXPECT_EQ(Json::parse(host_bridge.body, nullptr, false)["error"]["field"], "slot");
  EXPECT_EQ(put("/api/v1/vm/disks", {{"id", "again"}, {"path", long_image}, {"readonly", true},
                                     {"slot", 20}}).status, 409u)
      << "slot 20 is taken";
  // The current config lists the hot-plugged disks with their slots.
  const Json current = call("GET", "/api/v1/vm/config");
  bool listed = false;
  for (const Json& disk : current["disks"]) {
    if (disk.value("id", "") == "slotted") listed = disk.value("slot", 0) == 20;
  }
  EXPECT_TRUE(listed) << current.dump();
  // The tiny guest never reads the ACPI hotplug registers, so the plugs'
  // notifications are still pending: a snapshot is refused (the registers
  // are not saved), naming the device.
  call("PUT", "/api/v1/vm/pause");
  api::HttpReply snapshot = put("/api/v1/vm/snapshot", {{"path", dir_.file("vm.snap")}});
  EXPECT_EQ(snapshot.status, 409u) << snapshot.body;
  EXPECT_THAT(snapshot.body, HasSubstr("disk '" + std::string(32, 'x') + "'"));
  EXPECT_THAT(snapshot.body, HasSubstr("has not taken its hotplug notification"));
  EXPECT_FALSE(std::filesystem::exists(dir_.file("vm.snap")));
  call("PUT", "/api/v1/vm/stop");
  EXPECT_EQ(vmm_->wait(kGuestTimeout).exit_status, 0);
}

TEST_F(VmmApiTest, KeelctlDrivesTheVm) {
  start(polling_guest(socket_));
  Outcome info = keelctl(ctl({"vm", "info"}));
  EXPECT_EQ(info.exit_status, 0) << info;
  EXPECT_THAT(info.out, HasSubstr("running"));
  EXPECT_THAT(info.out, HasSubstr("64 MiB"));

  Outcome paused = keelctl(ctl({"vm", "pause"}));
  EXPECT_EQ(paused.exit_status, 0) << paused;
  EXPECT_EQ(paused.out, "paused\n");
  Outcome again = keelctl(ctl({"vm", "pause"}));
  EXPECT_EQ(again.exit_status, 1) << again;
  EXPECT_THAT(again.err, HasSubstr("already paused"));
  EXPECT_THAT(again.err, HasSubstr("409"));

  Outcome json = keelctl(ctl({"--json", "vm", "info"}));
  EXPECT_EQ(json.exit_status, 0) << json;
  EXPECT_EQ(Json::parse(json.out, nullptr, false)["state"], "paused");

  Outcome resumed = keelctl(ctl({"vm", "resume"}));
  EXPECT_EQ(resumed.exit_status, 0) << resumed;
  EXPECT_EQ(resumed.out, "running\n");

  Outcome devices = keelctl(ctl({"vm", "devices"}));
  EXPECT_EQ(devices.exit_status, 0) << devices;
  EXPECT_THAT(devices.out, HasSubstr("TYPE"));
  EXPECT_THAT(devices.out, HasSubstr("pci-host-bridge"));
  EXPECT_THAT(devices.out, HasSubstr("serial-16550a"));

  Outcome metrics = keelctl(ctl({"vm", "metrics"}));
  EXPECT_EQ(metrics.exit_status, 0) << metrics;
  EXPECT_THAT(metrics.out, HasSubstr("VCPU"));
  EXPECT_THAT(metrics.out, HasSubstr("io-in"));

  Outcome events = keelctl(ctl({"vm", "events"}));
  EXPECT_EQ(events.exit_status, 0) << events;
  EXPECT_THAT(events.out, HasSubstr("created"));
  EXPECT_THAT(events.out, HasSubstr("resumed"));
  Outcome later = keelctl(ctl({"--json", "vm", "events", "--after", "3"}));
  EXPECT_EQ(later.exit_status, 0) << later;
  EXPECT_THAT(later.out, ::testing::StartsWith("{\"seq\":4,"));

  Outcome stopped = keelctl(ctl({"vm", "stop"}));
  EXPECT_EQ(stopped.exit_status, 0) << stopped;
  EXPECT_EQ(vmm_->wait(kGuestTimeout).exit_status, 0);
}

// ---- keelctl without a VM: no /dev/kvm needed ----

TEST(KeelctlTest, HelpListsTheVmCommands) {
  Outcome outcome = keelctl({"vm", "--help"});
  EXPECT_EQ(outcome.exit_status, 0) << outcome;
  for (const char* command : {"info", "devices", "pause", "resume", "reset", "stop", "metrics",
                              "events", "balloon", "power-button"}) {
    EXPECT_THAT(outcome.out, HasSubstr(command));
  }
}

TEST(KeelctlTest, MissingSocketIsAClearErrorWithStatusThree) {
  Outcome outcome = keelctl({"--socket", "/nonexistent/keel-api.sock", "vm", "info"});
  EXPECT_EQ(outcome.exit_status, 3) << outcome;
  EXPECT_THAT(outcome.err, HasSubstr("/nonexistent/keel-api.sock"));
  EXPECT_THAT(outcome.err, HasSubstr("--api-socket"));
}

TEST(KeelctlTest, NoSocketOrCommandIsUsageError) {
  EXPECT_EQ(keelctl({"vm", "info"}).exit_status, 2);
  EXPECT_EQ(keelctl({"--socket", "/x"}).exit_status, 2);
  EXPECT_EQ(keelctl({"--socket", "/x", "vm", "bogus"}).exit_status, 2);
}

TEST(VmmApiFlagTest, BadApiSocketPathExitsTwoNamingTheFlag) {
  if (auto reason = tiny_guest_unavailable_reason()) {
    GTEST_SKIP() << "keel-vmm opens /dev/kvm first: " << *reason;
  }
  VmmProcess process({"--kernel", std::string(KEEL_VMM_GUEST_DIR) + "/pvh_check.elf",
                      "--memory", "64", "--api-socket", "/nonexistent-dir/api.sock"});
  Outcome outcome = process.wait(kGuestTimeout);
  EXPECT_EQ(outcome.exit_status, 2) << outcome;
  EXPECT_THAT(outcome.err, HasSubstr("--api-socket"));
}

}  // namespace
}  // namespace keel::testing
