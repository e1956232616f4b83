// Live migration end to end between two real keel-vmm processes on the
// host's /dev/kvm, over a unix socket: pvh_check's `c` ending prints a, b,
// c, ... z, a, ... forever, its position kept in guest RAM. The source is
// migrated while the guest runs (so dirty rounds carry the RAM it writes);
// the destination must go on from the letter after the source's last one,
// and the source must exit 0. A destination killed mid-migration, or a
// cancel, leaves the source running on.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "api/client.h"
#include "base/fd.h"
#include "block/image_lock.h"
#include "block/qcow2/create.h"
#include "counting_guest.h"
#include "tiny_guest.h"
#include "vmm_api_support.h"
#include "vmm_process.h"

namespace keel::testing {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;
using Json = nlohmann::json;

constexpr auto kGuestTimeout = kCountingTimeout;
constexpr std::string_view kBanner = kCountingBanner;

class VmmMigrateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (auto reason = tiny_guest_unavailable_reason()) {
      GTEST_SKIP() << "keel-vmm needs a usable /dev/kvm: " << *reason;
    }
    source_socket_ = dir_.file("source.sock");
    source_console_ = dir_.file("source.txt");
    destination_socket_ = dir_.file("destination.sock");
    destination_console_ = dir_.file("destination.txt");
    migration_socket_ = dir_.file("migration.sock");
  }

  std::vector<std::string> destination_args() {
    std::vector<std::string> args = counting_guest(destination_socket_, destination_console_);
    args.push_back("--incoming");
    args.push_back("unix:" + migration_socket_);
    return args;
  }

  // The counting guest in a source keel-vmm, printing and answering its API.
  std::unique_ptr<VmmProcess> start_source(std::vector<std::string> extra = {}) {
    std::vector<std::string> args = counting_guest(source_socket_, source_console_);
    args.insert(args.end(), extra.begin(), extra.end());
    auto source = std::make_unique<VmmProcess>(args);
    EXPECT_GE(wait_for_file(source_console_, kBanner.size() + 3).size(), kBanner.size() + 3)
        << source->wait(std::chrono::seconds(1));
    EXPECT_TRUE(api_answers(source_socket_, kGuestTimeout));
    return source;
  }

  // The destination's --incoming socket exists once it listens.
  bool wait_for_listener() {
    for (Clock::time_point deadline = Clock::now() + kGuestTimeout; Clock::now() < deadline;) {
      if (::access(migration_socket_.c_str(), F_OK) == 0) return true;
      std::this_thread::sleep_for(20ms);
    }
    return false;
  }

  api::HttpReply call(const std::string& socket, std::string_view method, std::string_view target,
                      std::string_view body = "") {
    Result<api::HttpReply> reply = api::Client(socket, 30s).request(method, target, body);
    EXPECT_TRUE(reply) << reply.error().message();
    return reply ? *reply : api::HttpReply{};
  }

  // The source's migration statistics once its phase is no longer one of
  // the running ones.
  Json wait_for_migration_end(const std::string& socket) {
    Json stats;
    for (Clock::time_point deadline = Clock::now() + kGuestTimeout; Clock::now() < deadline;) {
      stats = Json::parse(call(socket, "GET", "/api/v1/vm/migrate").body, nullptr, false);
      std::string phase = stats.value("phase", "");
      if (phase == "failed" || phase == "cancelled" || phase == "completed") return stats;
      std::this_thread::sleep_for(20ms);
    }
    return stats;
  }

  // Starts a migration to the unix socket with default options; its
  // statistics once it ended.
  Json migrate_to_an_end() {
    api::HttpReply started = call(source_socket_, "PUT", "/api/v1/vm/migrate",
                                  Json{{"destination", "unix:" + migration_socket_}}.dump());
    EXPECT_EQ(started.status, 200u) << started.body;
    return wait_for_migration_end(source_socket_);
  }

  // Migrates source to the waiting destination; the source must exit 0
  // and the destination go on counting from the letter after the source's
  // last one (in source_console).
  void migrate_and_expect_counting_goes_on(VmmProcess& source, VmmProcess& destination,
                                           const std::string& source_console) {
    api::HttpReply started = call(source_socket_, "PUT", "/api/v1/vm/migrate",
                                  Json{{"destination", "unix:" + migration_socket_}}.dump());
    ASSERT_EQ(started.status, 200u) << started.body;
    Outcome source_outcome = source.wait(kGuestTimeout);
    EXPECT_EQ(source_outcome.exit_status, 0) << source_outcome;
    // A restored source's console has letters only, no banner.
    const std::string text = read_text(source_console);
    std::string before = text.find(kBanner) == std::string::npos ? text : letters_of(text);
    ASSERT_FALSE(before.empty());
    std::string after = wait_for_file(destination_console_, 40);
    ASSERT_GE(after.size(), 40u) << "the destination printed too little: " << destination.wait(1s);
    EXPECT_TRUE(in_sequence(after, next_letter(before.back())))
        << "after '" << before.back() << "': " << after;
    ASSERT_TRUE(api_answers(destination_socket_, kGuestTimeout));
  }

  // A new 1 MiB raw image in the test's directory.
  std::string raw_disk() {
    const std::string disk = dir_.file("disk.raw");
    Result<Fd> file = Fd::open(disk, O_RDWR | O_CREAT, 0600);
    EXPECT_TRUE(file) << file.error().message();
    if (file) {
      EXPECT_EQ(::ftruncate(file->get(), 1 << 20), 0);
    }
    return disk;
  }

  // The counting guest run in a source, paused, saved to snapshot and stopped.
  void snapshot_a_source(const std::string& snapshot) {
    std::unique_ptr<VmmProcess> first = start_source();
    ASSERT_FALSE(HasFailure());
    EXPECT_EQ(call(source_socket_, "PUT", "/api/v1/vm/pause").status, 200u);
    api::HttpReply saved =
        call(source_socket_, "PUT", "/api/v1/vm/snapshot", Json{{"path", snapshot}}.dump());
    ASSERT_EQ(saved.status, 200u) << saved.body;
    call(source_socket_, "PUT", "/api/v1/vm/stop");
    EXPECT_EQ(first->wait(kGuestTimeout).exit_status, 0);
  }

  // The source goes on printing letters in order.
  void expect_source_runs_on() {
    size_t printed = read_text(source_console_).size();
    std::string later = wait_for_file(source_console_, printed + 30);
    EXPECT_GE(later.size(), printed + 30) << "the source stopped printing";
    std::string letters = letters_of(later);
    EXPECT_TRUE(in_sequence(letters, 'a')) << letters;
    Json vm = Json::parse(call(source_socket_, "GET", "/api/v1/vm").body, nullptr, false);
    EXPECT_EQ(vm["state"], "running");
  }

  TempDir dir_;
  std::string source_socket_, source_console_;
  std::string destination_socket_, destination_console_;
  std::string migration_socket_;
};

TEST_F(VmmMigrateTest, GuestContinuesOnTheDestination) {
  std::unique_ptr<VmmProcess> source_process = start_source({"--log-level", "info"});
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  VmmProcess destination(destination_args());
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);

  api::HttpReply started = call(
      source_socket_, "PUT", "/api/v1/vm/migrate",
      Json{{"destination", "unix:" + migration_socket_}, {"downtime_ms", 50}, {"compress", true}}
          .dump());
  ASSERT_EQ(started.status, 200u) << started.body;

  Outcome source_outcome = source.wait(kGuestTimeout);
  EXPECT_EQ(source_outcome.exit_status, 0) << source_outcome;
  EXPECT_THAT(source_outcome.err, HasSubstr("migration round 0"));
  EXPECT_THAT(source_outcome.err, HasSubstr("completed"));
  EXPECT_THAT(source_outcome.err, HasSubstr("VM stopped: migrated"));
  std::string before = letters_of(read_text(source_console_));
  ASSERT_GE(before.size(), 3u);
  ASSERT_TRUE(in_sequence(before, 'a')) << before;

  // Forty letters: more than a whole a..z round, so the position in RAM
  // and the vCPU's loop both carried over.
  std::string after = wait_for_file(destination_console_, 40);
  ASSERT_GE(after.size(), 40u) << "the destination printed too little: " << destination.wait(1s);
  EXPECT_EQ(after.find(kBanner), std::string::npos) << "the guest booted again instead";
  const char first = next_letter(before.back());
  EXPECT_TRUE(in_sequence(after, first))
      << "expected a run from '" << first << "' after '" << before.back() << "', got " << after;

  ASSERT_TRUE(api_answers(destination_socket_, kGuestTimeout));
  Json vm = Json::parse(call(destination_socket_, "GET", "/api/v1/vm").body, nullptr, false);
  EXPECT_EQ(vm["state"], "running");
  EXPECT_EQ(call(destination_socket_, "PUT", "/api/v1/vm/stop").status, 200u);
  Outcome outcome = destination.wait(kGuestTimeout);
  EXPECT_EQ(outcome.exit_status, 0) << outcome;
}

TEST_F(VmmMigrateTest, KeelctlMigratesAndReportsTheEnd) {
  std::unique_ptr<VmmProcess> source_process = start_source();
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  VmmProcess status({"--socket", source_socket_, "vm", "migrate-status"}, std::nullopt, -1,
                    KEEL_KEELCTL_BINARY);
  Outcome before = status.wait(kGuestTimeout);
  EXPECT_EQ(before.exit_status, 0) << before;
  EXPECT_THAT(before.out, HasSubstr("migration none"));

  VmmProcess destination(destination_args());
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);
  VmmProcess keelctl({"--socket", source_socket_, "vm", "migrate", "unix:" + migration_socket_,
                      "--downtime-ms", "50"},
                     std::nullopt, -1, KEEL_KEELCTL_BINARY);
  Outcome migrated = keelctl.wait(kGuestTimeout);
  EXPECT_EQ(migrated.exit_status, 0) << migrated;
  EXPECT_THAT(migrated.out, HasSubstr("migrated to unix:" + migration_socket_));
  EXPECT_EQ(source.wait(kGuestTimeout).exit_status, 0);
  EXPECT_FALSE(wait_for_file(destination_console_, 10).empty()) << "the destination runs";
  ASSERT_TRUE(api_answers(destination_socket_, kGuestTimeout));
  call(destination_socket_, "PUT", "/api/v1/vm/stop");
  EXPECT_EQ(destination.wait(kGuestTimeout).exit_status, 0);
}

// A machine restored from a snapshot has its RAM in a private mapping of
// the file, not a memfd: migration reads it from the mapping all the same.
TEST_F(VmmMigrateTest, RestoredMachineMigrates) {
  const std::string snapshot = dir_.file("vm.snap");
  snapshot_a_source(snapshot);
  if (HasFatalFailure()) return;
  std::string restored_console = dir_.file("restored.txt");
  VmmProcess source({"--restore", snapshot, "--serial", "file:" + restored_console, "--api-socket",
                     source_socket_});
  ASSERT_FALSE(wait_for_file(restored_console, 5).empty()) << source.wait(1s);
  ASSERT_TRUE(api_answers(source_socket_, kGuestTimeout));
  VmmProcess destination(destination_args());
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);
  migrate_and_expect_counting_goes_on(source, destination, restored_console);
  ASSERT_FALSE(HasFailure());
  call(destination_socket_, "PUT", "/api/v1/vm/stop");
  EXPECT_EQ(destination.wait(kGuestTimeout).exit_status, 0);
}

// keelctl against a keel-vmm started with --api-socket alone: a refused
// restore leaves it waiting; `vm restore --paused` rebuilds the snapshot's
// machine held until `vm resume`, which goes on from the letter after the
// source's last one.
TEST_F(VmmMigrateTest, KeelctlRestoresASnapshotIntoAWaitingKeelVmm) {
  const std::string snapshot = dir_.file("vm.snap");
  snapshot_a_source(snapshot);
  if (HasFatalFailure()) return;
  const std::string before = letters_of(read_text(source_console_));
  ASSERT_FALSE(before.empty());
  VmmProcess waiting({"--api-socket", destination_socket_});
  ASSERT_TRUE(api_answers(destination_socket_, kGuestTimeout)) << waiting.wait(1s);
  auto keelctl = [this](std::vector<std::string> args) {
    args.insert(args.begin(), {"--socket", destination_socket_, "vm"});
    return VmmProcess(args, std::nullopt, -1, KEEL_KEELCTL_BINARY).wait(kGuestTimeout);
  };
  std::string bogus = dir_.write("bogus.snap", "not a snapshot at all");
  Outcome refused = keelctl({"restore", bogus});
  EXPECT_EQ(refused.exit_status, 1) << refused;
  EXPECT_THAT(refused.err, HasSubstr(bogus));
  Json vm = Json::parse(call(destination_socket_, "GET", "/api/v1/vm").body, nullptr, false);
  EXPECT_EQ(vm["state"], "not-configured") << "a refused restore leaves it waiting";

  Outcome restored = keelctl({"restore", snapshot, "--paused", "--serial",
                              "file:" + destination_console_});
  ASSERT_EQ(restored.exit_status, 0) << restored;
  EXPECT_EQ(restored.out, "paused: restored from " + snapshot + "\n");
  vm = Json::parse(call(destination_socket_, "GET", "/api/v1/vm").body, nullptr, false);
  EXPECT_EQ(vm["state"], "paused");
  EXPECT_EQ(vm["config"]["cmdline"], "pvh-test c") << "the configuration is the snapshot's";
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(read_text(destination_console_), "") << "nothing runs before resume";
  Outcome again = keelctl({"restore", snapshot});
  EXPECT_EQ(again.exit_status, 1) << again;
  EXPECT_THAT(again.err, HasSubstr("started already"));
  EXPECT_EQ(keelctl({"resume"}).exit_status, 0);
  std::string after = wait_for_file(destination_console_, 40);
  ASSERT_GE(after.size(), 40u) << waiting.wait(1s);
  EXPECT_TRUE(in_sequence(after, next_letter(before.back())))
      << "after '" << before.back() << "': " << after;
  EXPECT_EQ(keelctl({"stop"}).exit_status, 0);
  EXPECT_EQ(waiting.wait(kGuestTimeout).exit_status, 0);
}

// The destination as a keel-vmm started with --api-socket alone:
// `vm receive` is refused until it is configured, then listens (state
// receiving) and returns once the migrated guest runs there.
TEST_F(VmmMigrateTest, KeelctlReceivesAMigrationIntoAWaitingKeelVmm) {
  std::unique_ptr<VmmProcess> source_process = start_source();
  ASSERT_FALSE(HasFailure());
  VmmProcess destination({"--api-socket", destination_socket_});
  ASSERT_TRUE(api_answers(destination_socket_, kGuestTimeout)) << destination.wait(1s);
  auto keelctl = [this](std::vector<std::string> args) {
    args.insert(args.begin(), {"--socket", destination_socket_, "vm"});
    return std::make_unique<VmmProcess>(args, std::nullopt, -1, KEEL_KEELCTL_BINARY);
  };
  const std::string source = "unix:" + migration_socket_;
  Outcome unconfigured = keelctl({"receive", source})->wait(kGuestTimeout);
  EXPECT_EQ(unconfigured.exit_status, 1) << unconfigured;
  EXPECT_THAT(unconfigured.err, HasSubstr("not configured"));
  Json config = {{"kernel", std::string(KEEL_VMM_GUEST_DIR) + "/pvh_check.elf"},
                 {"cmdline", "pvh-test c"},
                 {"memory_mib", 64},
                 {"debug_exit", true},
                 {"acpi", false},
                 {"serial", "file:" + destination_console_}};
  Outcome created = keelctl({"create", dir_.write("vm.json", config.dump())})->wait(kGuestTimeout);
  ASSERT_EQ(created.exit_status, 0) << created;

  std::unique_ptr<VmmProcess> receiving = keelctl({"receive", source});
  ASSERT_TRUE(wait_for_listener()) << receiving->wait(1s);
  Json vm = Json::parse(call(destination_socket_, "GET", "/api/v1/vm").body, nullptr, false);
  EXPECT_EQ(vm["state"], "receiving");
  migrate_and_expect_counting_goes_on(*source_process, destination, source_console_);
  Outcome received = receiving->wait(kGuestTimeout);
  EXPECT_EQ(received.exit_status, 0) << received;
  EXPECT_EQ(received.out, "receiving on " + source + "\nreceived: the VM is running\n");
  call(destination_socket_, "PUT", "/api/v1/vm/stop");
  EXPECT_EQ(destination.wait(kGuestTimeout).exit_status, 0);
}

TEST_F(VmmMigrateTest, KillingTheDestinationLeavesTheSourceRunning) {
  std::unique_ptr<VmmProcess> source_process = start_source();
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  VmmProcess destination(destination_args());
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);
  // 1 MiB/s: the 64 MiB first pass takes about a minute, so the
  // destination dies in the middle of it.
  api::HttpReply started =
      call(source_socket_, "PUT", "/api/v1/vm/migrate",
           Json{{"destination", "unix:" + migration_socket_}, {"bandwidth_mib", 1}}.dump());
  ASSERT_EQ(started.status, 200u) << started.body;
  std::this_thread::sleep_for(500ms);
  Json during = Json::parse(call(source_socket_, "GET", "/api/v1/vm/migrate").body, nullptr, false);
  EXPECT_EQ(during["phase"], "copying") << during.dump();
  EXPECT_GT(during["bytes_sent"].get<uint64_t>(), 0u) << during.dump();
  destination.send_signal(SIGKILL);
  destination.wait(kGuestTimeout);

  Json stats = wait_for_migration_end(source_socket_);
  EXPECT_EQ(stats["phase"], "failed") << stats.dump();
  EXPECT_FALSE(stats.value("error", "").empty()) << stats.dump();
  expect_source_runs_on();
  Result<api::HttpReply> events =
      api::Client(source_socket_, 10s).request("GET", "/api/v1/events?follow=false");
  ASSERT_TRUE(events);
  EXPECT_THAT(events->body, HasSubstr("\"migration-started\""));
  EXPECT_THAT(events->body, HasSubstr("\"migration-failed\""));
  EXPECT_EQ(call(source_socket_, "PUT", "/api/v1/vm/stop").status, 200u);
  EXPECT_EQ(source.wait(kGuestTimeout).exit_status, 0);
}

TEST_F(VmmMigrateTest, CancelKeepsTheSourceAndEndsTheDestination) {
  std::unique_ptr<VmmProcess> source_process = start_source();
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  VmmProcess destination(destination_args());
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);
  ASSERT_EQ(call(source_socket_, "PUT", "/api/v1/vm/migrate",
                 Json{{"destination", "unix:" + migration_socket_}, {"bandwidth_mib", 1}}.dump())
                .status,
            200u);
  EXPECT_EQ(call(source_socket_, "PUT", "/api/v1/vm/pause").status, 409u)
      << "no pause while migrating";
  std::this_thread::sleep_for(300ms);
  api::HttpReply cancelled = call(source_socket_, "DELETE", "/api/v1/vm/migrate");
  EXPECT_EQ(cancelled.status, 200u) << cancelled.body;
  Json stats = wait_for_migration_end(source_socket_);
  EXPECT_EQ(stats["phase"], "cancelled") << stats.dump();
  expect_source_runs_on();

  Outcome outcome = destination.wait(kGuestTimeout);
  EXPECT_NE(outcome.exit_status, 0) << outcome;
  EXPECT_TRUE(read_text(destination_console_).empty()) << "the destination never ran the guest";
  EXPECT_EQ(call(source_socket_, "PUT", "/api/v1/vm/stop").status, 200u);
  EXPECT_EQ(source.wait(kGuestTimeout).exit_status, 0);
}

TEST_F(VmmMigrateTest, NoDestinationFailsAndTheSourceRunsOn) {
  std::unique_ptr<VmmProcess> source_process = start_source();
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  Json stats = migrate_to_an_end();
  EXPECT_EQ(stats["phase"], "failed");
  EXPECT_THAT(stats.value("error", ""), HasSubstr(migration_socket_));
  expect_source_runs_on();
  api::HttpReply bad = call(source_socket_, "PUT", "/api/v1/vm/migrate",
                            Json{{"destination", "tcp:host-without-port"}}.dump());
  EXPECT_EQ(bad.status, 400u) << bad.body;
  call(source_socket_, "PUT", "/api/v1/vm/stop");
  EXPECT_EQ(source.wait(kGuestTimeout).exit_status, 0);
}

TEST_F(VmmMigrateTest, ADestinationOfAnotherSizeRefusesSayingWhy) {
  std::unique_ptr<VmmProcess> source_process = start_source();
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  std::vector<std::string> args = destination_args();
  auto memory = std::find(args.begin(), args.end(), "--memory");
  ASSERT_NE(memory, args.end());
  *(memory + 1) = "32";
  VmmProcess destination(args);
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);
  Json stats = migrate_to_an_end();
  EXPECT_EQ(stats["phase"], "failed");
  EXPECT_THAT(stats.value("error", ""), HasSubstr("32 MiB")) << stats.dump();
  Outcome outcome = destination.wait(kGuestTimeout);
  EXPECT_EQ(outcome.exit_status, 1) << outcome;
  EXPECT_THAT(outcome.err, HasSubstr("32 MiB"));
  expect_source_runs_on();
  call(source_socket_, "PUT", "/api/v1/vm/stop");
  EXPECT_EQ(source.wait(kGuestTimeout).exit_status, 0);
}

// The destination would read a qcow2 image's metadata before the source's
// last writes: refused at the start, naming the disk; the source runs on.
TEST_F(VmmMigrateTest, WritableQcow2DiskIsRefused) {
  const std::string disk = dir_.file("disk.qcow2");
  block::qcow2::CreateOptions options;
  options.size_bytes = 1 << 20;
  Result<void> created = block::qcow2::create_image(disk, options);
  ASSERT_TRUE(created) << created.error().message();
  std::unique_ptr<VmmProcess> source_process =
      start_source({"--disk", "path=" + disk + ",format=qcow2"});
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  api::HttpReply refused = call(source_socket_, "PUT", "/api/v1/vm/migrate",
                                Json{{"destination", "unix:" + migration_socket_}}.dump());
  EXPECT_EQ(refused.status, 501u) << refused.body;
  EXPECT_THAT(refused.body, HasSubstr(disk));
  EXPECT_THAT(refused.body, HasSubstr("raw only"));
  expect_source_runs_on();
  call(source_socket_, "PUT", "/api/v1/vm/stop");
  EXPECT_EQ(source.wait(kGuestTimeout).exit_status, 0);
}

// A virtio-rng and a raw disk both sides open (shared storage on one host):
// the source lets go of the disk's lock before the end, the destination
// takes it before it runs, and the guest counts on.
TEST_F(VmmMigrateTest, MachineWithRngAndSharedDiskContinuesOnTheDestination) {
  const std::string disk = raw_disk();
  ASSERT_FALSE(HasFailure());
  const std::vector<std::string> devices = {"--rng", "--disk", "path=" + disk + ",format=raw"};
  std::unique_ptr<VmmProcess> source_process = start_source(devices);
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  std::vector<std::string> args = destination_args();
  args.insert(args.end(), devices.begin(), devices.end());
  VmmProcess destination(args);
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);

  migrate_and_expect_counting_goes_on(source, destination, source_console_);
  ASSERT_FALSE(HasFailure());

  // The destination holds the disk now: no one else may even read it.
  Result<block::ImageLock> held = block::ImageLock::open(disk, block::Access::ReadOnly);
  ASSERT_FALSE(held) << "the destination does not hold the disk's lock";
  EXPECT_EQ(held.error().code(), Errc::Busy) << held.error().message();
  EXPECT_EQ(call(destination_socket_, "PUT", "/api/v1/vm/stop").status, 200u);
  Outcome outcome = destination.wait(kGuestTimeout);
  EXPECT_EQ(outcome.exit_status, 0) << outcome;
  EXPECT_TRUE(block::ImageLock::open(disk, block::Access::ReadWrite));
}

// A balloon and a vsock device migrate too. Both processes live at once,
// so the destination's config names its own vsock socket.
TEST_F(VmmMigrateTest, MachineWithBalloonAndVsockContinuesOnTheDestination) {
  std::unique_ptr<VmmProcess> source_process = start_source(
      {"--balloon", "target-mib=2", "--vsock", "cid=5,socket=" + dir_.file("source-v.sock")});
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  std::vector<std::string> args = destination_args();
  args.insert(args.end(), {"--balloon", "target-mib=2", "--vsock",
                           "cid=5,socket=" + dir_.file("destination-v.sock")});
  VmmProcess destination(args);
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);
  migrate_and_expect_counting_goes_on(source, destination, source_console_);
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(call(destination_socket_, "PUT", "/api/v1/vm/stop").status, 200u);
  Outcome outcome = destination.wait(kGuestTimeout);
  EXPECT_EQ(outcome.exit_status, 0) << outcome;
}

// A destination that refuses the machine after the end (another vCPU
// count, which only the state shows) when the source had already let go
// of its disk's lock: the source takes it back and runs on.
TEST_F(VmmMigrateTest, RefusalAfterTheEndGivesTheSourceItsDiskBack) {
  const std::string disk = raw_disk();
  ASSERT_FALSE(HasFailure());
  const std::vector<std::string> devices = {"--disk", "path=" + disk + ",format=raw"};
  std::unique_ptr<VmmProcess> source_process = start_source(devices);
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  std::vector<std::string> args = destination_args();
  args.insert(args.end(), devices.begin(), devices.end());
  args.insert(args.end(), {"--cpus", "2"});
  VmmProcess destination(args);
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);

  Json stats = migrate_to_an_end();
  EXPECT_EQ(stats["phase"], "failed");
  EXPECT_THAT(stats.value("error", ""), HasSubstr("vcpu sections")) << stats.dump();
  EXPECT_EQ(destination.wait(kGuestTimeout).exit_status, 1);
  expect_source_runs_on();
  Result<block::ImageLock> held = block::ImageLock::open(disk, block::Access::ReadOnly);
  ASSERT_FALSE(held) << "the source did not take its disk's lock back";
  EXPECT_EQ(held.error().code(), Errc::Busy) << held.error().message();
  call(source_socket_, "PUT", "/api/v1/vm/stop");
  EXPECT_EQ(source.wait(kGuestTimeout).exit_status, 0);
}

}  // namespace
}  // namespace keel::testing
