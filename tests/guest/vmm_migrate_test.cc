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
#include <regex>
#include <span>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "api/client.h"
#include "base/fd.h"
#include "block/image.h"
#include "block/image_lock.h"
#include "block/qcow2/create.h"
#include "migration/snapshot.h"
#include "migration/stream.h"
#include "migration/transport.h"
#include "counting_guest.h"
#include "tiny_guest.h"
#include "vmm_api_support.h"
#include "vmm_process.h"

namespace keel::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using namespace std::chrono_literals;
using Json = nlohmann::json;

constexpr auto kGuestTimeout = kCountingTimeout;
constexpr std::string_view kBanner = kCountingBanner;
constexpr size_t kNoiseBytes = 16 << 20;

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

  void guest_continues(const std::string& dirty_log, const std::string& named);
  void memory_arrives_exactly(const std::string& dirty_log, const std::string& stats_name,
                              const std::string& backend = "anon");
  // Whether keel-vmm's --dirty-log auto picks the ring here.
  static bool ring_on_this_host() {
    Result<kvm::Kvm> kvm = kvm::Kvm::open();
    if (!kvm) return false;
    kvm->set_dirty_log_mode(kvm::DirtyLogMode::Ring);
    return kvm->create_vm().has_value();
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

  // Polls the source's statistics until its machine runs on the
  // destination while post-copy goes on; false (with why) if it never did.
  ::testing::AssertionResult wait_for_postcopy_under_way() {
    Json during;
    for (Clock::time_point deadline = Clock::now() + kGuestTimeout; Clock::now() < deadline;) {
      during = Json::parse(call(source_socket_, "GET", "/api/v1/vm/migrate").body, nullptr, false);
      const std::string phase = during.value("phase", "");
      if (phase == "postcopy" && during["postcopy"].value("running_on_destination", false)) {
        return ::testing::AssertionSuccess();
      }
      if (phase == "completed" || phase == "failed") break;
      std::this_thread::sleep_for(5ms);
    }
    return ::testing::AssertionFailure() << "never saw post-copy under way: " << during.dump();
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

  // Starts a migration to the unix socket with request's options.
  void start_migration(Json request) {
    request["destination"] = "unix:" + migration_socket_;
    api::HttpReply started = call(source_socket_, "PUT", "/api/v1/vm/migrate", request.dump());
    EXPECT_EQ(started.status, 200u) << started.body;
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
                                           const std::string& source_console,
                                           Json request = Json::object()) {
    request["destination"] = "unix:" + migration_socket_;
    api::HttpReply started = call(source_socket_, "PUT", "/api/v1/vm/migrate", request.dump());
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

  // A new image of size_bytes: raw (sparse) or an empty qcow2.
  std::string new_disk(const std::string& name, uint64_t size_bytes, bool qcow2) {
    const std::string disk = dir_.file(name);
    if (qcow2) {
      block::qcow2::CreateOptions options;
      options.size_bytes = size_bytes;
      Result<void> created = block::qcow2::create_image(disk, options);
      EXPECT_TRUE(created) << created.error().message();
      return disk;
    }
    Result<Fd> file = Fd::open(disk, O_RDWR | O_CREAT, 0600);
    EXPECT_TRUE(file) << file.error().message();
    if (file) {
      EXPECT_EQ(::ftruncate(file->get(), static_cast<off_t>(size_bytes)), 0);
    }
    return disk;
  }

  // Writes a pattern into every other 256 KiB of the image through Keel's
  // backend (qcow2 clusters allocated as a guest's writes would), leaving
  // the rest unallocated.
  void fill_disk(const std::string& disk, uint8_t seed) {
    auto backend = block::open_image(disk, block::ImageFormat::Auto, block::Access::ReadWrite);
    ASSERT_TRUE(backend) << backend.error().message();
    constexpr uint64_t kStride = 256 * 1024;
    std::vector<std::byte> data(kStride);
    for (uint64_t offset = 0; offset < (*backend)->size_bytes(); offset += 2 * kStride) {
      for (size_t i = 0; i < data.size(); ++i) {
        data[i] = std::byte(static_cast<uint8_t>(seed + offset / kStride + i / 4096 + i));
      }
      iovec part{data.data(), data.size()};
      ASSERT_TRUE((*backend)->write_at(offset, std::span(&part, 1)));
    }
    ASSERT_TRUE((*backend)->flush());
  }

  // The guest-visible contents of an image.
  std::vector<std::byte> disk_contents(const std::string& disk) {
    auto backend = block::open_image(disk, block::ImageFormat::Auto, block::Access::ReadOnly,
                                     block::Locking::ForceShare);
    EXPECT_TRUE(backend) << backend.error().message();
    if (!backend) return {};
    std::vector<std::byte> out((*backend)->size_bytes());
    iovec part{out.data(), out.size()};
    EXPECT_TRUE((*backend)->read_at(0, std::span(&part, 1)));
    return out;
  }

  // A file of size_bytes of noise: as the guest's initrd it is RAM full of
  // data, which a slow migration must send (zero pages cost nothing).
  std::string noise_initrd(size_t size_bytes) {
    const std::string path = dir_.file("noise.initrd");
    std::vector<char> noise(size_bytes);
    uint64_t state = 0x9e3779b97f4a7c15;
    for (char& byte : noise) {
      state = state * 6364136223846793005u + 1442695040888963407u;
      byte = static_cast<char>(state >> 56);
    }
    Result<Fd> file = Fd::open(path, O_RDWR | O_CREAT, 0600);
    EXPECT_TRUE(file) << file.error().message();
    if (file) {
      EXPECT_TRUE(file->pwrite_all(std::as_bytes(std::span(noise)), 0));
    }
    return path;
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

  // zero_pages_check.S, built as elf (it checks its own pages after every
  // pass and prints a letter), in a source that printed first_letters and
  // a destination waiting for it, both logging at info, with memory_mib of
  // RAM, --dirty-log dirty_log and --memory-backend memory_backend, and
  // the flags in extra.
  struct SelfCheckingPair {
    std::unique_ptr<VmmProcess> source, destination;
  };
  SelfCheckingPair start_self_checking_pair(const std::string& elf, size_t first_letters,
                                            int memory_mib = 64,
                                            const std::string& dirty_log = "auto",
                                            const std::string& memory_backend = "anon",
                                            const std::vector<std::string>& extra = {}) {
    auto args = [&](const std::string& socket, const std::string& console) {
      std::vector<std::string> all{
          "--kernel",   std::string(KEEL_VMM_GUEST_DIR) + "/" + elf,
          "--memory",   std::to_string(memory_mib),
          "--debug-exit", "--no-acpi",
          "--serial",   "file:" + console,
          "--api-socket", socket,
          "--log-level", "info",
          "--dirty-log", dirty_log,
          "--memory-backend", memory_backend};
      all.insert(all.end(), extra.begin(), extra.end());
      return all;
    };
    SelfCheckingPair pair;
    pair.source = std::make_unique<VmmProcess>(args(source_socket_, source_console_));
    EXPECT_GE(wait_for_file(source_console_, first_letters).size(), first_letters)
        << pair.source->wait(1s);
    EXPECT_TRUE(api_answers(source_socket_, kGuestTimeout));
    std::vector<std::string> incoming = args(destination_socket_, destination_console_);
    incoming.insert(incoming.end(), {"--incoming", "unix:" + migration_socket_});
    pair.destination = std::make_unique<VmmProcess>(incoming);
    EXPECT_TRUE(wait_for_listener()) << pair.destination->wait(1s);
    return pair;
  }

  // Once the source of a self-checking pair migrated away: the guest goes
  // on on the destination for letters passes with no mismatch, from the
  // letter after the source's last; then the destination is stopped.
  void expect_self_checks_go_on(VmmProcess& destination, size_t letters) {
    const std::string before = read_text(source_console_);
    ASSERT_FALSE(before.empty());
    ASSERT_TRUE(in_sequence(before, 'a')) << "the source saw a mismatch: " << before;
    std::string after = wait_for_file(destination_console_, letters);
    ASSERT_EQ(after.find("BAD"), std::string::npos)
        << "the guest found a page it did not write: " << after.substr(0, 200);
    ASSERT_GE(after.size(), letters) << "the destination printed too little: "
                                     << destination.wait(1s);
    EXPECT_TRUE(in_sequence(after, next_letter(before.back())))
        << "after '" << before.back() << "': " << after.substr(0, 200);
    ASSERT_TRUE(api_answers(destination_socket_, kGuestTimeout));
    EXPECT_EQ(call(destination_socket_, "PUT", "/api/v1/vm/stop").status, 200u);
    Outcome outcome = destination.wait(kGuestTimeout);
    EXPECT_EQ(outcome.exit_status, 0) << outcome;
  }

  // zero_pages_check_large.elf's 32 MiB of pages (post-copy goes on for a
  // while) in a self-checking pair, migrating with postcopy until its
  // machine runs on the destination while pages still come.
  SelfCheckingPair start_postcopy_under_way() {
    SelfCheckingPair pair = start_self_checking_pair("zero_pages_check_large.elf", 3, 128);
    if (HasFailure()) return pair;
    start_migration({{"postcopy", true}, {"downtime_ms", 1}, {"bandwidth_mib", 2}});
    if (HasFailure()) return pair;
    EXPECT_TRUE(wait_for_postcopy_under_way());
    return pair;
  }

  TempDir dir_;
  std::string source_socket_, source_console_;
  std::string destination_socket_, destination_console_;
  std::string migration_socket_;
};

// dirty_log: keel-vmm's --dirty-log for both processes, and the words the
// source's log must name it with.
void VmmMigrateTest::guest_continues(const std::string& dirty_log, const std::string& named) {
  std::unique_ptr<VmmProcess> source_process =
      start_source({"--log-level", "info", "--dirty-log", dirty_log});
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  std::vector<std::string> incoming = destination_args();
  incoming.insert(incoming.end(), {"--dirty-log", dirty_log});
  VmmProcess destination(incoming);
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);

  api::HttpReply started = call(
      source_socket_, "PUT", "/api/v1/vm/migrate",
      Json{{"destination", "unix:" + migration_socket_}, {"downtime_ms", 50}, {"compress", true}}
          .dump());
  ASSERT_EQ(started.status, 200u) << started.body;

  Outcome source_outcome = source.wait(kGuestTimeout);
  EXPECT_EQ(source_outcome.exit_status, 0) << source_outcome;
  EXPECT_THAT(source_outcome.err, HasSubstr("dirty log from KVM's " + named));
  EXPECT_THAT(source_outcome.err, HasSubstr("migration round 0"));
  EXPECT_THAT(source_outcome.err, HasSubstr("completed"));
  EXPECT_THAT(source_outcome.err, HasSubstr("migration downtime (us): pause "));
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

TEST_F(VmmMigrateTest, GuestContinuesOnTheDestination) {
  guest_continues("auto", ring_on_this_host() ? "dirty ring" : "dirty bitmap");
}

TEST_F(VmmMigrateTest, GuestContinuesOnTheDestinationOverTheDirtyBitmap) {
  guest_continues("bitmap", "dirty bitmap");
}

// zero_pages_check.elf checks its own memory after every pass while a
// third of its pages turn zero (and another third back to data) in each:
// after the migration it must go on with no mismatch, so every page the
// destination holds, the ones zeroed by zero records included, is the
// source's. RAM the guest never touched is not sent at all. dirty_log as
// in guest_continues; the source's migration statistics must name it. On
// both fresh-machine RAM backends (backend): the first pass finds the
// populated pages through pagemap (anonymous RAM) or SEEK_DATA (a memfd).
void VmmMigrateTest::memory_arrives_exactly(const std::string& dirty_log,
                                            const std::string& stats_name,
                                            const std::string& backend) {
  SelfCheckingPair pair =
      start_self_checking_pair("zero_pages_check.elf", 30, 64, dirty_log, backend);
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *pair.source;

  // At 4 MiB/s the first pass (about 3 MiB of data) takes long enough for
  // the guest to rewrite its pages many times, and a downtime of 5 s lets
  // the rest go in the stop-and-copy: pages that were sent with data and
  // turned zero since must go as zero records.
  api::HttpReply started = call(source_socket_, "PUT", "/api/v1/vm/migrate",
                                Json{{"destination", "unix:" + migration_socket_},
                                     {"downtime_ms", 5000},
                                     {"bandwidth_mib", 4}}
                                    .dump());
  ASSERT_EQ(started.status, 200u) << started.body;
  EXPECT_EQ(Json::parse(started.body, nullptr, false).value("dirty_log", ""), stats_name)
      << started.body;
  Outcome source_outcome = source.wait(kGuestTimeout);
  ASSERT_EQ(source_outcome.exit_status, 0) << source_outcome;
  std::smatch completed;
  const std::regex summary(
      R"(completed: (\d+) pages sent with data, (\d+) zero pages \((\d+) as zero records\), )"
      R"((\d+) bytes)");
  ASSERT_TRUE(std::regex_search(source_outcome.err, completed, summary)) << source_outcome.err;
  const uint64_t zero_pages = std::stoull(completed[2]);
  const uint64_t zero_records = std::stoull(completed[3]);
  const uint64_t bytes = std::stoull(completed[4]);
  EXPECT_GT(zero_records, 0u) << "pages that turned zero went as zero records: "
                              << source_outcome.err;
  // 64 MiB of RAM, of which the guest touches its 4 MiB and its image.
  EXPECT_GT(zero_pages, (48u << 20) / 4096) << "untouched RAM counts as zero pages";
  EXPECT_LT(bytes, 32u << 20) << "untouched RAM is not sent";
  // Hundreds of passes, each checking every page the source had written.
  expect_self_checks_go_on(*pair.destination, 300);
}

TEST_F(VmmMigrateTest, MemoryArrivesExactlyWithPagesTurningZero) {
  memory_arrives_exactly("auto", ring_on_this_host() ? "ring" : "bitmap");
}

TEST_F(VmmMigrateTest, MemoryArrivesExactlyFromAMemfd) {
  memory_arrives_exactly("auto", ring_on_this_host() ? "ring" : "bitmap", "memfd");
}

TEST_F(VmmMigrateTest, MemoryArrivesExactlyOverTheDirtyBitmap) {
  memory_arrives_exactly("bitmap", "bitmap");
}

TEST_F(VmmMigrateTest, MemoryArrivesExactlyOverTheDirtyRing) {
  if (!ring_on_this_host()) GTEST_SKIP() << "this host's KVM has no dirty ring";
  memory_arrives_exactly("ring", "ring");
}

// zero_pages_check_large.elf writes 8192 pages (32 MiB) a pass, twice as
// many as a vCPU's dirty ring holds: while the migration runs the vCPU
// exits with a full ring again and again, harvests it itself and runs on,
// and no page may get lost on the way (the guest checks every one on the
// destination).
TEST_F(VmmMigrateTest, MemoryArrivesExactlyThroughFullDirtyRings) {
  if (!ring_on_this_host()) GTEST_SKIP() << "this host's KVM has no dirty ring";
  SelfCheckingPair pair = start_self_checking_pair("zero_pages_check_large.elf", 3, 128, "ring");
  ASSERT_FALSE(HasFailure());
  // At 16 MiB/s the first pass takes over a second, many guest passes.
  start_migration({{"downtime_ms", 5000}, {"bandwidth_mib", 16}});
  ASSERT_FALSE(HasFailure());
  Outcome source_outcome = pair.source->wait(kGuestTimeout);
  ASSERT_EQ(source_outcome.exit_status, 0) << source_outcome;
  EXPECT_THAT(source_outcome.err, HasSubstr("dirty log from KVM's dirty ring"));
  EXPECT_THAT(source_outcome.err, HasSubstr("dirty-ring-full"))
      << "the guest was meant to fill its dirty ring: " << source_outcome.err;
  expect_self_checks_go_on(*pair.destination, 30);
}

// Post-copy: zero_pages_check.elf rewrites its 4 MiB all the time, so the
// first pass leaves hundreds of pages dirty, more than a 1 ms downtime
// allows, and postcopy switches over: the destination runs at once on RAM
// missing those pages, and its guest, checking every page it wrote, touches
// them long before the background stream (4 MiB/s) gets there, so most
// come on demand through userfaultfd. Every page must be exactly the
// source's (the guest checks them all, every pass).
TEST_F(VmmMigrateTest, PostcopyMemoryArrivesExactlyOnDemand) {
  SelfCheckingPair pair = start_self_checking_pair("zero_pages_check.elf", 30);
  ASSERT_FALSE(HasFailure());
  start_migration({{"postcopy", true}, {"downtime_ms", 1}, {"bandwidth_mib", 4}});
  ASSERT_FALSE(HasFailure());
  Outcome source_outcome = pair.source->wait(kGuestTimeout);
  ASSERT_EQ(source_outcome.exit_status, 0) << source_outcome;
  EXPECT_THAT(source_outcome.err, HasSubstr("switching to post-copy")) << source_outcome.err;
  EXPECT_THAT(source_outcome.err, HasSubstr("VM stopped: migrated"));
  std::smatch done;
  const std::regex summary(
      R"(post-copy done in (\d+) ms: (\d+) pages requested, (\d+) in the background)");
  ASSERT_TRUE(std::regex_search(source_outcome.err, done, summary)) << source_outcome.err;
  const uint64_t requested = std::stoull(done[2]);
  const uint64_t background = std::stoull(done[3]);
  RecordProperty("postcopy_ms", done[1].str());
  RecordProperty("pages_requested", done[2].str());
  RecordProperty("background_pages", done[3].str());
  EXPECT_GT(requested, 0u) << "the guest touched pages not sent yet: " << source_outcome.err;
  EXPECT_GT(requested + background, 100u) << source_outcome.err;
  expect_self_checks_go_on(*pair.destination, 300);
  Outcome destination_outcome = pair.destination->wait(kGuestTimeout);
  EXPECT_THAT(destination_outcome.err, HasSubstr("post-copy complete"))
      << destination_outcome.err;
}

// The source's half of post-copy's failure semantics: once the machine
// runs on the destination, a destination that dies leaves the source
// paused (resuming it would lose the destination's writes), its
// migration failed with an error saying so.
TEST_F(VmmMigrateTest, PostcopyDestinationKilledLeavesTheSourcePaused) {
  SelfCheckingPair pair = start_postcopy_under_way();
  ASSERT_FALSE(HasFailure());
  pair.destination->send_signal(SIGKILL);
  pair.destination->wait(kGuestTimeout);

  Json stats = wait_for_migration_end(source_socket_);
  EXPECT_EQ(stats["phase"], "failed") << stats.dump();
  EXPECT_THAT(stats.value("error", ""), HasSubstr("the VM stays paused here")) << stats.dump();
  EXPECT_TRUE(stats["postcopy"].value("running_on_destination", false)) << stats.dump();
  Json vm = Json::parse(call(source_socket_, "GET", "/api/v1/vm").body, nullptr, false);
  EXPECT_EQ(vm["state"], "paused") << vm.dump();
  // Its RAM is stale: it must not run again, nor be saved or sent on.
  for (const auto& [target, body] :
       {std::pair<std::string, std::string>{"/api/v1/vm/resume", ""},
        {"/api/v1/vm/snapshot", Json{{"path", dir_.file("stale.snap")}}.dump()},
        {"/api/v1/vm/migrate", Json{{"destination", "unix:" + migration_socket_}}.dump()}}) {
    api::HttpReply refused = call(source_socket_, "PUT", target, body);
    EXPECT_EQ(refused.status, 409u) << target << ": " << refused.body;
    EXPECT_THAT(refused.body, HasSubstr("stale")) << target;
  }
  vm = Json::parse(call(source_socket_, "GET", "/api/v1/vm").body, nullptr, false);
  EXPECT_EQ(vm["state"], "paused") << vm.dump();
  // It can still be stopped.
  EXPECT_EQ(call(source_socket_, "PUT", "/api/v1/vm/stop").status, 200u);
  Outcome outcome = pair.source->wait(kGuestTimeout);
  EXPECT_FALSE(outcome.timed_out) << outcome;
  EXPECT_THAT(outcome.err, HasSubstr("failed in post-copy")) << outcome.err;
}

// The destination's half: a source that dies in post-copy leaves the
// destination with RAM it can never complete; it must say so and exit
// non-zero rather than run on.
TEST_F(VmmMigrateTest, PostcopySourceKilledEndsTheDestinationWithAnError) {
  SelfCheckingPair pair = start_postcopy_under_way();
  ASSERT_FALSE(HasFailure());
  pair.source->send_signal(SIGKILL);
  pair.source->wait(kGuestTimeout);
  Outcome outcome = pair.destination->wait(kGuestTimeout);
  EXPECT_FALSE(outcome.timed_out) << outcome;
  EXPECT_EQ(outcome.exit_status, 1) << outcome;
  EXPECT_THAT(outcome.err, HasSubstr("post-copy failed")) << outcome.err;
}

// --dirty-ring-entries 1024: the 1024-page guest (4 MiB a pass) fills a
// ring of that size at least once a pass, where the default 4096 entries
// hold four passes; the pages must still arrive exactly.
TEST_F(VmmMigrateTest, ASmallerDirtyRingFillsAndLosesNoPage) {
  if (!ring_on_this_host()) GTEST_SKIP() << "this host's KVM has no dirty ring";
  SelfCheckingPair pair = start_self_checking_pair("zero_pages_check.elf", 3, 64, "ring", "anon",
                                                   {"--dirty-ring-entries", "1024"});
  ASSERT_FALSE(HasFailure());
  // At 4 MiB/s the first pass over the 4 MiB working set takes about a
  // second, many guest passes.
  start_migration({{"downtime_ms", 5000}, {"bandwidth_mib", 4}});
  ASSERT_FALSE(HasFailure());
  Outcome source_outcome = pair.source->wait(kGuestTimeout);
  ASSERT_EQ(source_outcome.exit_status, 0) << source_outcome;
  EXPECT_THAT(source_outcome.err, HasSubstr("dirty-ring-full"))
      << "a 1024-entry ring was meant to fill: " << source_outcome.err;
  expect_self_checks_go_on(*pair.destination, 30);
}

// Auto-converge: dirty_rate_check.elf (zero_pages_check's self-checking
// passes over 1 MiB, each page written then a spin, so it dirties pages at
// a rate bounded per unit of time it runs) outpaces a 4 MiB/s link; the
// migration must throttle its vCPU (throttle_percent above 0 in the API's
// statistics while it runs, still "running" rather than paused) and
// complete, the guest finding every page as it wrote it on the destination.
TEST_F(VmmMigrateTest, AutoConvergeThrottlesAGuestThatOutpacesTheLink) {
  SelfCheckingPair pair = start_self_checking_pair("dirty_rate_check.elf", 5);
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *pair.source;

  // auto_converge is on unless asked otherwise. A 1 MiB working set at
  // 4 MiB/s: each round takes a fraction of a second, and the guest at
  // full speed rewrites all of it in that time.
  start_migration({{"downtime_ms", 30}, {"bandwidth_mib", 4}});
  ASSERT_FALSE(HasFailure());
  uint64_t highest_throttle = 0;
  bool paused_while_throttled = false;
  for (Clock::time_point deadline = Clock::now() + kGuestTimeout; Clock::now() < deadline;) {
    Result<api::HttpReply> reply =
        api::Client(source_socket_, 2s).request("GET", "/api/v1/vm/migrate");
    if (!reply) break;  // the source exited: migrated
    Json stats = Json::parse(reply->body, nullptr, false);
    const uint64_t throttle = stats.value("throttle_percent", uint64_t{0});
    if (throttle > 0 && stats.value("phase", "") == "copying") {
      highest_throttle = std::max(highest_throttle, throttle);
      Result<api::HttpReply> vm = api::Client(source_socket_, 2s).request("GET", "/api/v1/vm");
      if (vm && Json::parse(vm->body, nullptr, false).value("state", "") == "paused") {
        // Only if the copy rounds still went on after it: the stop-and-copy
        // (which changes the phase first) pauses for real.
        Result<api::HttpReply> again =
            api::Client(source_socket_, 2s).request("GET", "/api/v1/vm/migrate");
        if (again && Json::parse(again->body, nullptr, false).value("phase", "") == "copying") {
          paused_while_throttled = true;
        }
      }
    }
    const std::string phase = stats.value("phase", "");
    if (phase == "completed" || phase == "failed" || phase == "cancelled") break;
    std::this_thread::sleep_for(20ms);
  }
  Outcome source_outcome = source.wait(kGuestTimeout);
  ASSERT_EQ(source_outcome.exit_status, 0) << source_outcome;
  EXPECT_GT(highest_throttle, 0u) << "never throttled: " << source_outcome.err;
  EXPECT_FALSE(paused_while_throttled) << "a throttled machine showed as paused";
  std::smatch completed;
  ASSERT_TRUE(std::regex_search(source_outcome.err, completed, std::regex(R"(throttle (\d+)%)")))
      << source_outcome.err;
  EXPECT_GT(std::stoull(completed[1]), 0u) << source_outcome.err;
  expect_self_checks_go_on(*pair.destination, 30);
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
  std::unique_ptr<VmmProcess> source_process =
      start_source({"--initrd", noise_initrd(kNoiseBytes)});
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  VmmProcess destination(destination_args());
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);
  // 1 MiB/s: the first pass (the 16 MiB initrd of noise) takes about 16 s,
  // so the destination dies in the middle of it.
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
  // 16 MiB of data at 1 MiB/s: still copying when the cancel comes.
  std::unique_ptr<VmmProcess> source_process =
      start_source({"--initrd", noise_initrd(kNoiseBytes)});
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

// A cancel ends the throttle: dirty_rate_check throttled to 99% (a
// downtime of 1 ms that a round where it ran at all never fits, at 1 MiB/s)
// prints about a letter a second at best; once cancelled it must be back at
// full speed, 30 letters well within the wait (throttled, they would take
// half a minute or more). The cancel comes early in the round after the one
// that raised the throttle to 99%, long before that round can end.
TEST_F(VmmMigrateTest, CancelEndsTheThrottle) {
  SelfCheckingPair pair = start_self_checking_pair("dirty_rate_check.elf", 5);
  ASSERT_FALSE(HasFailure());
  start_migration({{"downtime_ms", 1}, {"bandwidth_mib", 1}});
  ASSERT_FALSE(HasFailure());
  Json stats;
  for (Clock::time_point deadline = Clock::now() + kGuestTimeout; Clock::now() < deadline;) {
    stats = Json::parse(call(source_socket_, "GET", "/api/v1/vm/migrate").body, nullptr, false);
    const std::string phase = stats.value("phase", "");
    if (stats.value("throttle_percent", uint64_t{0}) >= 99 ||
        (phase != "connecting" && phase != "copying")) {
      break;
    }
    std::this_thread::sleep_for(20ms);
  }
  ASSERT_EQ(stats.value("throttle_percent", uint64_t{0}), 99u) << stats.dump();
  ASSERT_EQ(stats.value("phase", ""), "copying") << stats.dump();
  api::HttpReply cancelled = call(source_socket_, "DELETE", "/api/v1/vm/migrate");
  EXPECT_EQ(cancelled.status, 200u) << cancelled.body;
  EXPECT_EQ(wait_for_migration_end(source_socket_)["phase"], "cancelled");
  expect_source_runs_on();
  EXPECT_EQ(call(source_socket_, "PUT", "/api/v1/vm/stop").status, 200u);
  EXPECT_EQ(pair.source->wait(kGuestTimeout).exit_status, 0);
  EXPECT_NE(pair.destination->wait(kGuestTimeout).exit_status, 0);
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

// A destination builds its machine when the first pages arrive, before the
// state: a state that then fails (one it cannot decode, or one whose CPUID
// asks for what this host lacks) is still answered with a negative ack
// naming why, and the destination exits 1 without the guest having run (it
// printed nothing). The source here is the test, speaking the stream.
TEST_F(VmmMigrateTest, AStateRefusedAfterThePrebuildIsAckedNegativelyAndNothingRuns) {
  migration::MachineState incompatible;
  incompatible.config_json = "{}";
  incompatible.vcpus.emplace_back();
  kvm::CpuidEntry leaf7{};
  leaf7.function = 7;
  leaf7.ebx = 0xffffffff;  // every structured feature: some this host's KVM lacks
  incompatible.vcpus.back().cpuid = {leaf7};
  incompatible.vcpus.back().xsave.resize(4096);  // a well-formed vcpu section has one
  const std::vector<std::byte> garbage(64, std::byte{0x5a});
  struct Case {
    std::string_view name;
    std::vector<std::byte> state;
    std::string_view refusal;
  };
  const Case cases[] = {
      {"undecodable", garbage, "incoming migration from"},
      {"incompatible", migration::encode_machine_state(incompatible), "KVM on this host does not"},
  };
  for (const Case& test : cases) {
    SCOPED_TRACE(test.name);
    (void)::unlink(destination_console_.c_str());
    std::vector<std::string> args = destination_args();
    args.insert(args.end(), {"--log-level", "info"});
    VmmProcess destination(args);
    ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);
    Result<migration::StreamAddress> address =
        migration::parse_stream_address("unix:" + migration_socket_);
    ASSERT_TRUE(address) << address.error().message();
    Result<Fd> connection = migration::connect_stream(*address);
    ASSERT_TRUE(connection) << connection.error().message();
    migration::StreamWriter writer(*connection);
    migration::StreamReader reader(*connection, "destination");
    ASSERT_TRUE(writer.write_preamble());
    ASSERT_TRUE(writer.send(migration::FrameType::Hello,
                            migration::encode_hello(
                                {64ull << 20, migration::HostCpuSummary::of_this_host()})));
    ASSERT_TRUE(writer.send(migration::FrameType::Pages, migration::encode_zero_pages(0, 1)));
    ASSERT_TRUE(writer.send(migration::FrameType::MachineState, test.state));
    // The undecodable state is refused before the end, which may then find
    // the connection closed.
    (void)writer.send(migration::FrameType::End, migration::encode_end({1, 0}));
    Result<migration::Frame> answer = reader.next(30'000);
    ASSERT_TRUE(answer) << answer.error().message();
    ASSERT_EQ(answer->type, migration::FrameType::Ack);
    Result<migration::Verdict> verdict = migration::decode_verdict(answer->payload);
    ASSERT_TRUE(verdict) << verdict.error().message();
    EXPECT_FALSE(verdict->ok);
    EXPECT_THAT(verdict->message, HasSubstr(test.refusal));
    Outcome outcome = destination.wait(kGuestTimeout);
    EXPECT_EQ(outcome.exit_status, 1) << outcome;
    // Built before the state arrived, let go of unrun.
    EXPECT_THAT(outcome.err, HasSubstr("machine prebuilt in"));
    EXPECT_THAT(outcome.err, Not(HasSubstr("machine rebuilt in")));
    EXPECT_EQ(read_text(destination_console_), "");
    (void)::unlink(migration_socket_.c_str());
  }
}

// migrate_disks: a local raw and a local qcow2 disk are copied into the
// destination's own empty images of the same size while the guest runs;
// the destination runs on copies equal byte for byte (qemu-img compare for
// qcow2, when installed), and the source's disks are untouched.
TEST_F(VmmMigrateTest, MigrateDisksCopiesLocalRawAndQcow2Disks) {
  constexpr uint64_t kDiskBytes = 4 << 20;
  const std::string raw = new_disk("source.raw", kDiskBytes, false);
  const std::string qcow2 = new_disk("source.qcow2", kDiskBytes, true);
  const std::string raw_copy = new_disk("destination.raw", kDiskBytes, false);
  const std::string qcow2_copy = new_disk("destination.qcow2", kDiskBytes, true);
  fill_disk(raw, 1);
  fill_disk(qcow2, 2);
  ASSERT_FALSE(HasFailure());
  const std::vector<std::byte> raw_before = disk_contents(raw);
  const std::vector<std::byte> qcow2_before = disk_contents(qcow2);
  std::unique_ptr<VmmProcess> source_process =
      start_source({"--log-level", "info", "--disk", "path=" + raw + ",format=raw", "--disk",
                    "path=" + qcow2 + ",format=qcow2"});
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  std::vector<std::string> args = destination_args();
  args.insert(args.end(), {"--disk", "path=" + raw_copy + ",format=raw", "--disk",
                           "path=" + qcow2_copy + ",format=qcow2"});
  VmmProcess destination(args);
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);

  migrate_and_expect_counting_goes_on(source, destination, source_console_,
                                      Json{{"migrate_disks", true}, {"downtime_ms", 50}});
  ASSERT_FALSE(HasFailure());
  // The destination holds its copies; the source let go of its own as it exited.
  EXPECT_FALSE(block::ImageLock::open(raw_copy, block::Access::ReadOnly));
  EXPECT_TRUE(block::ImageLock::open(raw, block::Access::ReadWrite));
  EXPECT_EQ(call(destination_socket_, "PUT", "/api/v1/vm/stop").status, 200u);
  Outcome outcome = destination.wait(kGuestTimeout);
  EXPECT_EQ(outcome.exit_status, 0) << outcome;

  EXPECT_TRUE(disk_contents(raw) == raw_before) << "the source's raw disk changed";
  EXPECT_TRUE(disk_contents(qcow2) == qcow2_before) << "the source's qcow2 disk changed";
  EXPECT_TRUE(disk_contents(raw_copy) == raw_before) << "the raw copy differs";
  EXPECT_TRUE(disk_contents(qcow2_copy) == qcow2_before) << "the qcow2 copy differs";
  if (std::system("qemu-img --version >/dev/null 2>&1") == 0) {
    EXPECT_EQ(std::system(("qemu-img compare -q -f qcow2 -F qcow2 " + qcow2 + " " + qcow2_copy)
                              .c_str()),
              0);
    EXPECT_EQ(std::system(("qemu-img check -q " + qcow2_copy).c_str()), 0);
  }
}

// A copy of local disks that never finishes: the destination, killed in
// the middle of the disk copy, leaves the source running on its own disk,
// locked and unchanged.
TEST_F(VmmMigrateTest, MigrateDisksKilledDestinationLeavesTheSourceItsDisk) {
  constexpr uint64_t kDiskBytes = 32 << 20;
  const std::string raw = new_disk("source.raw", kDiskBytes, false);
  const std::string raw_copy = new_disk("destination.raw", kDiskBytes, false);
  fill_disk(raw, 3);
  ASSERT_FALSE(HasFailure());
  const std::vector<std::byte> before = disk_contents(raw);
  const std::vector<std::string> disk = {"--disk", "path=" + raw + ",format=raw"};
  std::unique_ptr<VmmProcess> source_process = start_source(disk);
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  std::vector<std::string> args = destination_args();
  args.insert(args.end(), {"--disk", "path=" + raw_copy + ",format=raw"});
  VmmProcess destination(args);
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);
  // 1 MiB/s: the 16 MiB of data take many seconds.
  api::HttpReply started = call(source_socket_, "PUT", "/api/v1/vm/migrate",
                                Json{{"destination", "unix:" + migration_socket_},
                                     {"bandwidth_mib", 1},
                                     {"migrate_disks", true}}
                                    .dump());
  ASSERT_EQ(started.status, 200u) << started.body;
  std::this_thread::sleep_for(1s);
  Json during = Json::parse(call(source_socket_, "GET", "/api/v1/vm/migrate").body, nullptr, false);
  EXPECT_EQ(during["phase"], "copying") << during.dump();
  EXPECT_GT(during["disk_bytes_copied"].get<uint64_t>(), 0u) << during.dump();
  destination.send_signal(SIGKILL);
  destination.wait(kGuestTimeout);

  Json stats = wait_for_migration_end(source_socket_);
  EXPECT_EQ(stats["phase"], "failed") << stats.dump();
  expect_source_runs_on();
  Result<block::ImageLock> held = block::ImageLock::open(raw, block::Access::ReadOnly);
  ASSERT_FALSE(held) << "the source does not hold its disk";
  EXPECT_EQ(held.error().code(), Errc::Busy) << held.error().message();
  call(source_socket_, "PUT", "/api/v1/vm/stop");
  EXPECT_EQ(source.wait(kGuestTimeout).exit_status, 0);
  EXPECT_TRUE(disk_contents(raw) == before) << "the source's disk changed";
}

// Without migrate_disks a writable qcow2 disk is still refused; with it,
// a destination whose disk has another size refuses saying so, and the
// source runs on.
TEST_F(VmmMigrateTest, MigrateDisksDestinationOfAnotherSizeRefuses) {
  const std::string qcow2 = new_disk("source.qcow2", 2 << 20, true);
  const std::string qcow2_copy = new_disk("destination.qcow2", 1 << 20, true);
  std::unique_ptr<VmmProcess> source_process =
      start_source({"--disk", "path=" + qcow2 + ",format=qcow2"});
  ASSERT_FALSE(HasFailure());
  VmmProcess& source = *source_process;
  std::vector<std::string> args = destination_args();
  args.insert(args.end(), {"--disk", "path=" + qcow2_copy + ",format=qcow2"});
  VmmProcess destination(args);
  ASSERT_TRUE(wait_for_listener()) << destination.wait(1s);
  api::HttpReply started = call(
      source_socket_, "PUT", "/api/v1/vm/migrate",
      Json{{"destination", "unix:" + migration_socket_}, {"migrate_disks", true}}.dump());
  ASSERT_EQ(started.status, 200u) << started.body;
  Json stats = wait_for_migration_end(source_socket_);
  EXPECT_EQ(stats["phase"], "failed") << stats.dump();
  EXPECT_THAT(stats.value("error", ""), HasSubstr(qcow2_copy)) << stats.dump();
  EXPECT_EQ(destination.wait(kGuestTimeout).exit_status, 1);
  expect_source_runs_on();
  call(source_socket_, "PUT", "/api/v1/vm/stop");
  EXPECT_EQ(source.wait(kGuestTimeout).exit_status, 0);
}

}  // namespace
}  // namespace keel::testing
