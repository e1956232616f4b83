// Snapshot and restore end to end through the real keel-vmm on the host's
// /dev/kvm: pvh_check's `c` ending prints a, b, c, ... z, a, ... forever,
// its position kept in guest RAM. One keel-vmm is paused and snapshotted
// through the API and killed; a new keel-vmm --restore must go on printing
// from the letter after the last one the first printed, which needs the
// vCPU, the RAM and the serial port restored.
#include <sys/stat.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "api/client.h"
#include "counting_guest.h"
#include "vmm_api_support.h"
#include "kvm/kvm.h"
#include "migration/snapshot.h"
#include "tiny_guest.h"
#include "vmm_process.h"

namespace keel::testing {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;
using Json = nlohmann::json;

constexpr auto kGuestTimeout = kCountingTimeout;
constexpr std::string_view kBanner = kCountingBanner;

class VmmSnapshotTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (auto reason = tiny_guest_unavailable_reason()) {
      GTEST_SKIP() << "keel-vmm needs a usable /dev/kvm: " << *reason;
    }
    socket_ = dir_.file("api.sock");
    snapshot_ = dir_.file("vm.snap");
    console_ = dir_.file("console.txt");
    restored_console_ = dir_.file("restored.txt");
  }

  void wait_for_api(const std::string& socket) {
    EXPECT_TRUE(api_answers(socket, kGuestTimeout)) << "the API never answered on " << socket;
  }

  api::HttpReply call(const std::string& socket, std::string_view method, std::string_view target,
                      std::string_view body = "") {
    Result<api::HttpReply> reply = api::Client(socket, 30s).request(method, target, body);
    EXPECT_TRUE(reply) << reply.error().message();
    return reply ? *reply : api::HttpReply{};
  }

  // Runs the counting guest (with extra keel-vmm arguments) until it
  // printed a few letters, pauses it and snapshots it through the API;
  // returns the letters it printed in all.
  std::string run_and_snapshot(const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args = counting_guest(socket_, console_);
    args.insert(args.end(), extra.begin(), extra.end());
    VmmProcess vmm(args);
    EXPECT_GE(wait_for_file(console_, kBanner.size() + 3).size(), kBanner.size() + 3)
        << vmm.wait(1s);
    wait_for_api(socket_);
    api::HttpReply running = call(socket_, "PUT", "/api/v1/vm/snapshot",
                                  Json{{"path", snapshot_}}.dump());
    EXPECT_EQ(running.status, 409u) << "a running VM is refused: " << running.body;
    EXPECT_NE(::access(snapshot_.c_str(), F_OK), 0) << "nothing written for a refusal";

    EXPECT_EQ(call(socket_, "PUT", "/api/v1/vm/pause").status, 200u);
    api::HttpReply saved = call(socket_, "PUT", "/api/v1/vm/snapshot",
                                Json{{"path", snapshot_}}.dump());
    saved_status_ = saved.status;
    saved_body_ = saved.body;
    std::string letters = letters_of(read_text(console_));
    Result<api::HttpReply> events =
        api::Client(socket_, 10s).request("GET", "/api/v1/events?follow=false");
    if (events) events_ = events->body;
    vmm.send_signal(SIGKILL);  // the source is gone for good
    vmm.wait(kGuestTimeout);
    return letters;
  }

  TempDir dir_;
  std::string socket_;
  std::string snapshot_;
  std::string console_;
  std::string restored_console_;
  unsigned saved_status_ = 0;
  std::string saved_body_;
  std::string events_;
};

// With a virtio device on the PCI bus (one the tiny guest never drives):
// its function is saved and restored too.
TEST_F(VmmSnapshotTest, RestoredGuestContinuesInANewProcess) {
  std::string before = run_and_snapshot({"--rng"});
  if (HasFatalFailure()) return;
  if (saved_status_ != 200 && kvm::Kvm::vendor_module() == "kvm_pvm") {
    GTEST_SKIP() << "this host's KVM is PVM, which refuses part of the saved state: "
                 << saved_body_;
  }
  ASSERT_EQ(saved_status_, 200u) << saved_body_;
  Json saved = Json::parse(saved_body_, nullptr, false);
  EXPECT_EQ(saved["path"], snapshot_);
  struct stat info {};
  ASSERT_EQ(::stat(snapshot_.c_str(), &info), 0);
  EXPECT_EQ(saved["bytes"], static_cast<uint64_t>(info.st_size));
  EXPECT_THAT(events_, HasSubstr("\"snapshot-saved\""));
  EXPECT_NE(::access((snapshot_ + ".partial").c_str(), F_OK), 0);
  ASSERT_GE(before.size(), 3u);
  ASSERT_TRUE(in_sequence(before, 'a')) << before;

  std::string restored_socket = dir_.file("restored.sock");
  // --serial sends the restored console elsewhere than the snapshot's.
  VmmProcess restored({"--restore", snapshot_, "--serial", "file:" + restored_console_,
                       "--api-socket", restored_socket});
  const char first = next_letter(before.back());
  // Forty letters: more than a whole a..z round, so the position in RAM
  // and the vCPU's loop both carried over.
  std::string after = wait_for_file(restored_console_, 40);
  ASSERT_GE(after.size(), 40u) << "the restored guest printed too little: " << restored.wait(1s);
  EXPECT_EQ(after.find(kBanner), std::string::npos) << "the guest booted again instead";
  EXPECT_TRUE(in_sequence(after, first))
      << "expected a run from '" << first << "' after '" << before.back() << "', got " << after;

  wait_for_api(restored_socket);
  Json vm = Json::parse(call(restored_socket, "GET", "/api/v1/vm").body, nullptr, false);
  EXPECT_EQ(vm["state"], "running");
  EXPECT_EQ(vm["config"]["cmdline"], "pvh-test c");
  EXPECT_EQ(call(restored_socket, "PUT", "/api/v1/vm/stop").status, 200u);
  Outcome outcome = restored.wait(kGuestTimeout);
  EXPECT_EQ(outcome.exit_status, 0) << outcome;
}

TEST_F(VmmSnapshotTest, RestorePausedWaitsForResume) {
  run_and_snapshot();
  if (HasFatalFailure()) return;
  if (saved_status_ != 200) GTEST_SKIP() << "no snapshot (see the test above): " << saved_body_;
  std::string restored_socket = dir_.file("restored.sock");
  VmmProcess restored({"--restore", snapshot_, "--restore-paused", "--serial",
                       "file:" + restored_console_, "--api-socket", restored_socket});
  wait_for_api(restored_socket);
  Json vm = Json::parse(call(restored_socket, "GET", "/api/v1/vm").body, nullptr, false);
  EXPECT_EQ(vm["state"], "paused");
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(read_text(restored_console_), "") << "nothing runs before resume";
  EXPECT_EQ(call(restored_socket, "PUT", "/api/v1/vm/resume").status, 200u);
  EXPECT_FALSE(wait_for_file(restored_console_, 1).empty()) << "the guest runs after resume";
  call(restored_socket, "PUT", "/api/v1/vm/stop");
  EXPECT_EQ(restored.wait(kGuestTimeout).exit_status, 0);
}

TEST_F(VmmSnapshotTest, RestoreRefusesABadFileNamingIt) {
  std::string bogus = dir_.write("bogus.snap", "not a snapshot at all");
  VmmProcess restored({"--restore", bogus});
  Outcome outcome = restored.wait(kGuestTimeout);
  EXPECT_NE(outcome.exit_status, 0) << outcome;
  EXPECT_THAT(outcome.err, HasSubstr(bogus));

  VmmProcess missing({"--restore", dir_.file("missing.snap")});
  outcome = missing.wait(kGuestTimeout);
  EXPECT_NE(outcome.exit_status, 0) << outcome;
  EXPECT_THAT(outcome.err, HasSubstr("missing.snap"));
}

// Through the API, a bad snapshot is the client's fault, not the server's:
// a malformed or truncated file is a 422, a missing one a 404, each naming
// the file, and keel-vmm stays unconfigured, ready for a good one.
TEST_F(VmmSnapshotTest, ApiRestoreRefusesABadFileWithA4xx) {
  std::string letters = run_and_snapshot();
  ASSERT_EQ(saved_status_, 200u) << saved_body_;
  std::string whole = read_text(snapshot_);
  ASSERT_GT(whole.size(), 4096u);
  std::string truncated = dir_.write("truncated.snap", whole.substr(0, whole.size() / 2));
  std::string bogus = dir_.write("bogus.snap", "not a snapshot at all");

  std::string restored_socket = dir_.file("restored.sock");
  VmmProcess vmm({"--api-socket", restored_socket});
  wait_for_api(restored_socket);
  for (const std::string& bad : {bogus, truncated}) {
    api::HttpReply reply =
        call(restored_socket, "PUT", "/api/v1/vm/restore", Json{{"path", bad}}.dump());
    EXPECT_EQ(reply.status, 422u) << bad << ": " << reply.body;
    EXPECT_THAT(reply.body, HasSubstr(bad));
  }
  std::string missing = dir_.file("missing.snap");
  api::HttpReply reply =
      call(restored_socket, "PUT", "/api/v1/vm/restore", Json{{"path", missing}}.dump());
  EXPECT_EQ(reply.status, 404u) << reply.body;
  EXPECT_THAT(reply.body, HasSubstr(missing));
  Json vm = Json::parse(call(restored_socket, "GET", "/api/v1/vm").body, nullptr, false);
  EXPECT_EQ(vm["state"], "not-configured") << "refused: nothing changed";

  // The good snapshot still restores in the same keel-vmm.
  reply = call(restored_socket, "PUT", "/api/v1/vm/restore",
               Json{{"path", snapshot_}, {"paused", true}, {"serial", "none"}}.dump());
  EXPECT_EQ(reply.status, 200u) << reply.body;
  EXPECT_EQ(call(restored_socket, "PUT", "/api/v1/vm/stop").status, 200u);
  EXPECT_EQ(vmm.wait(kGuestTimeout).exit_status, 0);
  EXPECT_FALSE(letters.empty());
}

TEST_F(VmmSnapshotTest, RestoreRefusesBootOptions) {
  VmmProcess restored({"--restore", dir_.file("any.snap"), "--kernel", "/x"});
  Outcome outcome = restored.wait(kGuestTimeout);
  EXPECT_NE(outcome.exit_status, 0) << outcome;
  EXPECT_THAT(outcome.err, HasSubstr("--restore"));
}

// A restored machine is snapshotted again, onto the very file its RAM is
// mapped from (the new file is renamed over it; the mapping keeps the old
// one), and that snapshot restores too: the count goes on across both.
TEST_F(VmmSnapshotTest, RestoredMachineIsSnapshottedAgainOverItsOwnFile) {
  std::string before = run_and_snapshot();
  if (HasFatalFailure()) return;
  if (saved_status_ != 200) GTEST_SKIP() << "no snapshot (see the first test): " << saved_body_;
  std::string restored_socket = dir_.file("restored.sock");
  std::string middle;
  {
    VmmProcess restored({"--restore", snapshot_, "--serial", "file:" + restored_console_,
                         "--api-socket", restored_socket});
    middle = wait_for_file(restored_console_, 10);
    ASSERT_GE(middle.size(), 10u) << restored.wait(1s);
    wait_for_api(restored_socket);
    EXPECT_EQ(call(restored_socket, "PUT", "/api/v1/vm/pause").status, 200u);
    api::HttpReply saved =
        call(restored_socket, "PUT", "/api/v1/vm/snapshot", Json{{"path", snapshot_}}.dump());
    ASSERT_EQ(saved.status, 200u) << saved.body;
    middle = read_text(restored_console_);
    // The paused machine still runs from its mapping after the rename.
    EXPECT_EQ(call(restored_socket, "PUT", "/api/v1/vm/resume").status, 200u);
    EXPECT_GT(wait_for_file(restored_console_, middle.size() + 5).size(), middle.size());
    restored.send_signal(SIGKILL);
    restored.wait(kGuestTimeout);
  }
  EXPECT_TRUE(in_sequence(middle, next_letter(before.back()))) << before << " then " << middle;
  const std::string again_console = dir_.file("again.txt");
  VmmProcess again({"--restore", snapshot_, "--serial", "file:" + again_console});
  std::string after = wait_for_file(again_console, 30);
  ASSERT_GE(after.size(), 30u) << again.wait(1s);
  EXPECT_TRUE(in_sequence(after, next_letter(middle.back())))
      << "after '" << middle.back() << "': " << after;
  again.send_signal(SIGTERM);
  again.wait(kGuestTimeout);
}

// A balloon and a vsock device (which the tiny guest never drives) are
// saved and restored: the run-time balloon target carries over, and the
// vsock's listening socket, left behind by the killed source, is taken
// over by the restored process.
TEST_F(VmmSnapshotTest, BalloonAndVsockMachineIsSavedAndRestored) {
  const std::string vsock_socket = dir_.file("v.sock");
  std::vector<std::string> args = counting_guest(socket_, console_);
  args.insert(args.end(), {"--balloon", "target-mib=1", "--vsock", "cid=5,socket=" + vsock_socket});
  std::string before;
  {
    VmmProcess vmm(args);
    ASSERT_FALSE(wait_for_file(console_, kBanner.size() + 3).empty()) << vmm.wait(1s);
    wait_for_api(socket_);
    EXPECT_EQ(call(socket_, "PUT", "/api/v1/vm/balloon", R"({"target_mib": 3})").status, 200u);
    EXPECT_EQ(call(socket_, "PUT", "/api/v1/vm/pause").status, 200u);
    api::HttpReply saved =
        call(socket_, "PUT", "/api/v1/vm/snapshot", Json{{"path", snapshot_}}.dump());
    saved_status_ = saved.status;
    saved_body_ = saved.body;
    before = letters_of(read_text(console_));
    vmm.send_signal(SIGKILL);
    vmm.wait(kGuestTimeout);
  }
  if (saved_status_ != 200 && kvm::Kvm::vendor_module() == "kvm_pvm") {
    GTEST_SKIP() << "this host's KVM is PVM, which refuses part of the saved state: "
                 << saved_body_;
  }
  ASSERT_EQ(saved_status_, 200u) << saved_body_;
  ASSERT_FALSE(before.empty());

  std::string restored_socket = dir_.file("restored.sock");
  VmmProcess restored({"--restore", snapshot_, "--serial", "file:" + restored_console_,
                       "--api-socket", restored_socket});
  std::string after = wait_for_file(restored_console_, 30);
  ASSERT_GE(after.size(), 30u) << restored.wait(1s);
  EXPECT_TRUE(in_sequence(after, next_letter(before.back()))) << before << " then " << after;
  wait_for_api(restored_socket);
  Json devices = Json::parse(call(restored_socket, "GET", "/api/v1/vm/devices").body, nullptr,
                             false)["devices"];
  bool balloon = false;
  bool vsock = false;
  for (const Json& device : devices) {
    if (device["type"] == "virtio-balloon") {
      EXPECT_EQ(device["properties"]["target_mib"], "3") << device.dump();
      balloon = true;
    }
    if (device["type"] == "virtio-vsock") vsock = true;
  }
  EXPECT_TRUE(balloon && vsock) << devices.dump();
  struct stat info {};
  EXPECT_EQ(::stat(vsock_socket.c_str(), &info), 0) << "the restored vsock listens again";
  call(restored_socket, "PUT", "/api/v1/vm/stop");
  EXPECT_EQ(restored.wait(kGuestTimeout).exit_status, 0);
}

}  // namespace
}  // namespace keel::testing
