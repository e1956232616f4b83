// qcow2 interop with Debian's qemu-img (and qemu-io): images QEMU made and
// wrote read byte for byte like `qemu-img convert -O raw`, and images Keel
// wrote pass `qemu-img check` and `qemu-img compare`. Skips without qemu-img.
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "block/image.h"
#include "block/image_lock.h"
#include "block/qcow2/check.h"
#include "block/qcow2/create.h"
#include "qcow2_support.h"

namespace keel::block {
namespace {

using testing::have_program;
using testing::lock_byte_held;
using testing::output_of;
using testing::pattern;
using testing::read_bytes;
using testing::read_file;
using testing::run;
using testing::run_capturing;
using testing::TempDir;
using testing::write_bytes;
using testing::write_file;

constexpr uint64_t kMiB = 1 << 20;

class Qcow2InteropTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_program("qemu-img")) GTEST_SKIP() << "qemu-img is not installed (Debian qemu-utils)";
  }
  static bool have_qemu_io() { return have_program("qemu-io"); }

  // Runs a command that must succeed.
  void sh(const std::string& command) {
    ASSERT_EQ(run(command), 0) << command << "\n" << output_of(command + " 2>&1");
  }
  void qemu_io(const std::string& image, const std::string& format,
               const std::vector<std::string>& commands) {
    std::string line = "qemu-io -f " + format;
    for (const std::string& c : commands) line += " -c '" + c + "'";
    sh(line + " " + image);
  }

  // Keel's view of image (all of it) must equal qemu-img's raw conversion.
  void expect_same_as_qemu(const std::string& image) {
    const std::string raw = dir_.file("expected.raw");
    sh("qemu-img convert -O raw " + image + " " + raw);
    auto expected = read_file(raw);
    auto disk = open_image(image, ImageFormat::Auto, Access::ReadOnly);
    ASSERT_TRUE(disk.has_value()) << disk.error().message();
    ASSERT_EQ((*disk)->size_bytes(), expected.size());
    // Read in uneven pieces so requests start and end inside clusters.
    std::vector<std::byte> got;
    for (uint64_t at = 0; at < expected.size();) {
      const uint64_t n = std::min<uint64_t>(expected.size() - at, 70000 - (at % 512));
      const size_t piece = static_cast<size_t>(n - n % 512 == 0 ? n : n - n % 512);
      auto bytes = read_bytes(**disk, at, piece);
      got.insert(got.end(), bytes.begin(), bytes.end());
      at += piece;
    }
    EXPECT_TRUE(got == expected) << image << " differs from qemu-img convert";
    // Keel's check agrees with QEMU that QEMU's own images are clean.
    if (std::string((*disk)->format_name()) == "qcow2") expect_keel_check_clean(image);
  }

  // qemu-img check must find nothing wrong (no corruption, no leaks), and
  // neither must Keel's own check.
  void expect_clean(const std::string& image) {
    const std::string command = "qemu-img check " + image;
    EXPECT_EQ(run(command), 0) << output_of(command + " 2>&1");
    expect_keel_check_clean(image);
  }
  static void expect_keel_check_clean(const std::string& image) {
    auto report = qcow2::check_image(image);
    ASSERT_TRUE(report.has_value()) << report.error().message();
    EXPECT_EQ(report->corruptions, 0u) << (report->messages.empty() ? "" : report->messages[0]);
    EXPECT_EQ(report->leaks, 0u) << (report->messages.empty() ? "" : report->messages[0]);
  }
  void expect_equal_to_raw(const std::string& image, const std::vector<std::byte>& contents) {
    const std::string raw = dir_.file("compare.raw");
    write_file(raw, contents);
    const std::string command = "qemu-img compare -f raw -F qcow2 " + raw + " " + image;
    EXPECT_EQ(run(command), 0) << output_of(command + " 2>&1");
  }

  TempDir dir_;
};

TEST_F(Qcow2InteropTest, BackingChainWrittenByQemu) {
  if (!have_qemu_io()) GTEST_SKIP() << "qemu-io is not installed";
  const std::string base = dir_.file("base.qcow2");
  const std::string mid = dir_.file("mid.qcow2");
  const std::string top = dir_.file("top.qcow2");
  sh("qemu-img create -f qcow2 " + base + " 4M");
  qemu_io(base, "qcow2", {"write -P 0x11 0 1M", "write -P 0x12 3M 512k"});
  sh("cd " + dir_.path() + " && qemu-img create -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2");
  qemu_io(mid, "qcow2", {"write -P 0x21 512k 1M", "write -P 0x22 100k 7k"});
  sh("cd " + dir_.path() + " && qemu-img create -f qcow2 -o cluster_size=4096 -b mid.qcow2 "
     "-F qcow2 top.qcow2 6M");
  qemu_io(top, "qcow2", {"write -P 0x31 3000 5000", "write -P 0x32 5M 10k"});
  expect_same_as_qemu(top);
  expect_same_as_qemu(mid);
}

TEST_F(Qcow2InteropTest, RawBackingAndV2) {
  if (!have_qemu_io()) GTEST_SKIP() << "qemu-io is not installed";
  const std::string base = dir_.file("base.raw");
  write_file(base, pattern(3 * kMiB, 1));
  const std::string top = dir_.file("top.qcow2");
  sh("qemu-img create -f qcow2 -o compat=0.10 -b " + base + " -F raw " + top + " 4M");
  qemu_io(top, "qcow2", {"write -P 0x41 1M 64k", "write -P 0x42 2900k 300k"});
  expect_same_as_qemu(top);
}

TEST_F(Qcow2InteropTest, CompressedClustersZlib) {
  const std::string raw = dir_.file("in.raw");
  // Compressible data: runs of a pattern with some noise.
  auto data = pattern(3 * kMiB, 2);
  for (size_t i = 0; i < data.size(); ++i) {
    if ((i / 4096) % 3 != 0) data[i] = std::byte(static_cast<uint8_t>(i / 4096));
  }
  write_file(raw, data);
  const std::string image = dir_.file("c.qcow2");
  sh("qemu-img convert -c -O qcow2 " + raw + " " + image);
  expect_same_as_qemu(image);
  auto disk = open_image(image, ImageFormat::Qcow2, Access::ReadOnly);
  ASSERT_TRUE(disk.has_value()) << disk.error().message();
  EXPECT_TRUE(read_bytes(**disk, 0, data.size()) == data);
}

TEST_F(Qcow2InteropTest, CompressedClustersZstd) {
  const std::string raw = dir_.file("in.raw");
  auto data = pattern(2 * kMiB, 3);
  for (size_t i = 0; i < data.size(); ++i) {
    if ((i / 512) % 4 != 0) data[i] = std::byte(static_cast<uint8_t>(i / 512));
  }
  write_file(raw, data);
  const std::string image = dir_.file("z.qcow2");
  const std::string command =
      "qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=16k " + raw + " " + image;
  if (run(command) != 0) GTEST_SKIP() << "this qemu-img cannot write zstd clusters";
  expect_same_as_qemu(image);
}

TEST_F(Qcow2InteropTest, ZeroClustersFromQemuIo) {
  if (!have_qemu_io()) GTEST_SKIP() << "qemu-io is not installed (needed for write -z)";
  const std::string base = dir_.file("base.raw");
  write_file(base, pattern(2 * kMiB, 4));
  const std::string image = dir_.file("z.qcow2");
  sh("qemu-img create -f qcow2 -b " + base + " -F raw " + image);
  qemu_io(image, "qcow2", {"write -P 0x51 0 512k", "write -z 64k 128k", "write -z 1M 256k",
                           "write -z -u 1536k 64k", "write -z 3000 1000"});
  expect_same_as_qemu(image);
}

TEST_F(Qcow2InteropTest, InternalSnapshotsReadTheActiveState) {
  if (!have_qemu_io()) GTEST_SKIP() << "qemu-io is not installed";
  const std::string image = dir_.file("s.qcow2");
  sh("qemu-img create -f qcow2 " + image + " 2M");
  qemu_io(image, "qcow2", {"write -P 0x61 0 1M"});
  sh("qemu-img snapshot -c first " + image);
  qemu_io(image, "qcow2", {"write -P 0x62 256k 64k", "write -P 0x63 1536k 4k"});
  expect_same_as_qemu(image);
  auto writable = open_image(image, ImageFormat::Qcow2, Access::ReadWrite);
  ASSERT_FALSE(writable.has_value());
  EXPECT_NE(writable.error().message().find("snapshot"), std::string::npos);
}

TEST_F(Qcow2InteropTest, KeelWritesPassQemuCheckAndCompare) {
  for (uint32_t version : {2u, 3u}) {
    for (uint32_t bits : {9u, 16u, 21u}) {
      SCOPED_TRACE(::testing::Message() << "version " << version << " cluster_bits " << bits);
      TempDir dir;
      const std::string image = dir.file("k.qcow2");
      qcow2::CreateOptions options;
      options.size_bytes = 8 * kMiB;
      options.cluster_bits = bits;
      options.version = version;
      ASSERT_TRUE(qcow2::create_image(image, options).has_value());
      expect_clean(image);
      std::vector<std::byte> expected(8 * kMiB);
      {
        auto disk = open_image(image, ImageFormat::Qcow2, Access::ReadWrite);
        ASSERT_TRUE(disk.has_value()) << disk.error().message();
        uint8_t seed = 5;
        for (auto [offset, length] : std::vector<std::pair<uint64_t, size_t>>{
                 {0, 5000}, {4 * kMiB - 100, 3 * 65536}, {7 * kMiB, kMiB}, {2000, 1}}) {
          auto data = pattern(length, seed++);
          ASSERT_TRUE(write_bytes(**disk, offset, data).has_value());
          std::memcpy(expected.data() + offset, data.data(), length);
        }
        ASSERT_TRUE((*disk)->write_zeroes(7 * kMiB + 1000, 300000, Unmap::Yes).has_value());
        std::memset(expected.data() + 7 * kMiB + 1000, 0, 300000);
        ASSERT_TRUE((*disk)->discard(4 * kMiB, 4 * kMiB).has_value());
        // Discard may drop whole clusters only (without a backing file they
        // read as zeroes).
        const uint64_t cluster = uint64_t{1} << bits;
        const uint64_t first = (4 * kMiB + cluster - 1) / cluster * cluster;
        std::memset(expected.data() + first, 0, 8 * kMiB - first);
        // Zeroes that keep the clusters allocated (v3 zero flag on an
        // allocated cluster), over written data.
        ASSERT_TRUE((*disk)->write_zeroes(0, 2 * kMiB, Unmap::No).has_value());
        std::memset(expected.data(), 0, 2 * kMiB);
        ASSERT_TRUE(write_bytes(**disk, 3 * kMiB, pattern(70000, 9)).has_value());
        {
          auto data = pattern(70000, 9);
          std::memcpy(expected.data() + 3 * kMiB, data.data(), data.size());
        }
        ASSERT_TRUE((*disk)->flush().has_value());
      }
      expect_clean(image);
      expect_equal_to_raw(image, expected);
    }
  }
}

TEST_F(Qcow2InteropTest, PartialWritesToNewClustersPastTheEndWriteOnlyTheirBytes) {
  const std::string image = dir_.file("fresh.qcow2");
  qcow2::CreateOptions options;
  options.size_bytes = 4 * kMiB;
  ASSERT_TRUE(qcow2::create_image(image, options).has_value());
  std::vector<std::byte> expected(4 * kMiB);
  auto put = [&](BlockBackend& disk, uint64_t offset, size_t length, uint8_t seed) {
    auto data = pattern(length, seed);
    ASSERT_TRUE(write_bytes(disk, offset, data).has_value());
    std::memcpy(expected.data() + offset, data.data(), length);
  };
  {
    auto disk = open_image(image, ImageFormat::Qcow2, Access::ReadWrite);
    ASSERT_TRUE(disk.has_value()) << disk.error().message();
    put(**disk, 8192, 4096, 1);            // inside a new cluster
    const uint64_t short_end = std::filesystem::file_size(image);
    put(**disk, kMiB + 65024, 512, 2);     // the last sector of another one
    // The first cluster was not filled out with zeroes: the file ends inside it.
    EXPECT_EQ(short_end % 65536, 12288u);
    put(**disk, 0, 512, 3);                // in place, into the short cluster
    ASSERT_TRUE((*disk)->write_zeroes(2 * kMiB, 65536, Unmap::Yes).has_value());
    put(**disk, 2 * kMiB + 4096, 4096, 4); // a zero cluster gets a new one
    EXPECT_EQ(read_bytes(**disk, 0, 4 * kMiB), expected);
    ASSERT_TRUE((*disk)->flush().has_value());
  }
  expect_clean(image);
  expect_equal_to_raw(image, expected);
  expect_same_as_qemu(image);
}

TEST_F(Qcow2InteropTest, KeelWritesIntoQemuImages) {
  if (!have_qemu_io()) GTEST_SKIP() << "qemu-io is not installed";
  for (const std::string& options :
       {std::string("cluster_size=512,refcount_bits=1"), std::string("refcount_bits=64"),
        std::string("compat=0.10,cluster_size=4096"), std::string("lazy_refcounts=on")}) {
    SCOPED_TRACE(options);
    TempDir dir;
    const std::string base = dir.file("base.raw");
    auto base_data = pattern(3 * kMiB, 6);
    write_file(base, base_data);
    const std::string image = dir.file("q.qcow2");
    sh("qemu-img create -f qcow2 -o " + options + " -b " + base + " -F raw " + image + " 4M");
    qemu_io(image, "qcow2", {"write -P 0x71 1M 200k"});
    std::vector<std::byte> expected(4 * kMiB);
    std::memcpy(expected.data(), base_data.data(), base_data.size());
    std::memset(expected.data() + kMiB, 0x71, 200 * 1024);
    {
      auto disk = open_image(image, ImageFormat::Qcow2, Access::ReadWrite);
      ASSERT_TRUE(disk.has_value()) << disk.error().message();
      auto data = pattern(400000, 7);
      ASSERT_TRUE(write_bytes(**disk, 1 * kMiB + 100 * 1024, data).has_value());
      std::memcpy(expected.data() + kMiB + 100 * 1024, data.data(), data.size());
      ASSERT_TRUE((*disk)->write_zeroes(2 * kMiB + 512, 4096, Unmap::No).has_value());
      std::memset(expected.data() + 2 * kMiB + 512, 0, 4096);
      ASSERT_TRUE((*disk)->flush().has_value());
    }
    expect_clean(image);
    expect_equal_to_raw(image, expected);
  }
}

TEST_F(Qcow2InteropTest, KeelOverlayOnQemuChain) {
  const std::string base = dir_.file("base.qcow2");
  sh("qemu-img create -f qcow2 " + base + " 2M");
  if (have_qemu_io()) qemu_io(base, "qcow2", {"write -P 0x33 0 2M"});
  const std::string before = output_of("md5sum < " + base);
  const std::string top = dir_.file("top.qcow2");
  qcow2::CreateOptions options;
  options.size_bytes = 2 * kMiB;
  options.backing_file = "base.qcow2";
  options.backing_format = "qcow2";
  ASSERT_TRUE(qcow2::create_image(top, options).has_value());
  {
    auto disk = open_image(top, ImageFormat::Qcow2, Access::ReadWrite);
    ASSERT_TRUE(disk.has_value()) << disk.error().message();
    ASSERT_TRUE(write_bytes(**disk, 12345, pattern(100000, 8)).has_value());
  }
  expect_clean(top);
  expect_same_as_qemu(top);
  EXPECT_EQ(output_of("md5sum < " + base), before);
  const std::string info = output_of("qemu-img info --backing-chain " + top);
  EXPECT_NE(info.find("backing file: base.qcow2"), std::string::npos) << info;
}

// kill -9 at arbitrary moments while Keel writes, discards and zeroes an
// overlay: qemu-img check may find leaks (exit 3) but never corruption.
// workload(disk, random, data) runs in the child until it is killed.
template <typename Workload>
void kill_nine_rounds(const TempDir& dir, Workload&& workload) {
  const std::string base = dir.file("base.raw");
  write_file(base, pattern(4 * kMiB, 1));
  const std::string image = dir.file("crash.qcow2");
  qcow2::CreateOptions options;
  options.size_bytes = 4 * kMiB;
  options.cluster_bits = 12;
  options.backing_file = "base.raw";
  options.backing_format = "raw";
  ASSERT_TRUE(qcow2::create_image(image, options).has_value());
  std::mt19937 random(1234);
  for (int round = 0; round < 12; ++round) {
    SCOPED_TRACE(round);
    const auto seed = static_cast<unsigned>(random());
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      std::mt19937 r(seed);  // NOLINT
      auto disk = open_image(image, ImageFormat::Qcow2, Access::ReadWrite);
      if (!disk) ::_exit(2);
      std::vector<std::byte> data = pattern(256 * 1024, static_cast<uint8_t>(seed));
      workload(**disk, r, data);
      ::_exit(3);
    }
    ::usleep(static_cast<useconds_t>(20000 + random() % 200000));
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the writer stopped by itself: " << status;
    // The dead writer's image lock lasts until the kernel has finished the
    // writes it had in flight (io_uring holds the open file until then), so
    // nothing else can open the image while they may still land. Wait for
    // that, boundedly, before checking.
    bool released = false;
    for (int i = 0; i < 1000 && !released; ++i) {
      released = !lock_byte_held(image, ImageLock::kPermissionBase + 1);
      if (!released) ::usleep(10000);
    }
    ASSERT_TRUE(released) << "the killed writer's lock on " << image << " outlived it by 10 s";
    const std::string command = "qemu-img check " + image;
    std::string out;
    const int verdict = run_capturing(command, &out);
    EXPECT_TRUE(verdict == 0 || verdict == 3) << verdict << " " << out;
    auto report = qcow2::check_image(image);
    ASSERT_TRUE(report.has_value()) << report.error().message();
    EXPECT_EQ(report->corruptions, 0u) << (report->messages.empty() ? "" : report->messages[0]);
  }
}

// A random request inside the 4 MiB disk: offset and length in sectors.
std::pair<uint64_t, uint64_t> random_range(std::mt19937& r) {
  const uint64_t at = (r() % (4 * kMiB / 512)) * 512;
  const uint64_t length = std::min<uint64_t>((r() % 512 + 1) * 512, 4 * kMiB - at);
  return {at, length};
}

TEST_F(Qcow2InteropTest, KillNineLeavesNoCorruption) {
  kill_nine_rounds(dir_, [](BlockBackend& disk, std::mt19937& r, std::vector<std::byte>& data) {
    while (true) {
      const auto [at, length] = random_range(r);
      switch (r() % 8) {
        case 0: (void)disk.discard(at, length); break;
        case 1: (void)disk.write_zeroes(at, length, Unmap::Yes); break;
        case 2: (void)disk.write_zeroes(at, length, Unmap::No); break;
        case 3: (void)disk.flush(); break;
        default: {
          iovec v{data.data(), std::min<uint64_t>(length, data.size())};
          (void)disk.write_at(at, std::span(&v, 1));
        }
      }
    }
  });
}

// The same through the asynchronous face: batches of overlapping writes
// (many allocating), discards, zeroing and flushes in flight at once.
TEST_F(Qcow2InteropTest, KillNineDuringAsynchronousRequestsLeavesNoCorruption) {
  kill_nine_rounds(dir_, [](BlockBackend& disk, std::mt19937& r, std::vector<std::byte>& data) {
    std::vector<iovec> iovs(32);
    std::vector<BlockCompletion> done;
    while (true) {
      for (uint64_t i = 0; i < iovs.size(); ++i) {
        const auto [at, length] = random_range(r);
        BlockRequest request;
        request.offset = at;
        request.length_bytes = length;
        switch (r() % 10) {
          case 0: request.op = BlockOp::Discard; break;
          case 1: request.op = BlockOp::WriteZeroesUnmap; break;
          case 2: request.op = BlockOp::Flush; break;
          case 3: request.op = BlockOp::Read; break;
          default: request.op = BlockOp::Write;
        }
        iovs[i] = iovec{data.data(), std::min<uint64_t>(length, data.size())};
        request.iov = std::span(&iovs[i], 1);
        (void)disk.submit(request);
      }
      (void)disk.kick();
      while (disk.in_flight() > 0) {
        pollfd pfd{disk.completion_fd(), POLLIN, 0};
        (void)::poll(&pfd, 1, 1000);
        disk.reap(done);
      }
      done.clear();
    }
  });
}

}  // namespace
}  // namespace keel::block
