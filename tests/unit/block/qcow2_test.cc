// qcow2 through open_image: images Keel creates, backing chains, writes,
// zero clusters, discard, and hostile headers and tables.
#include <poll.h>

#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "block/image.h"
#include "block/qcow2/create.h"
#include "block/qcow2/header.h"
#include "block/qcow2/qcow2.h"
#include "qcow2_support.h"

namespace keel::block {
namespace {

using testing::pattern;
using testing::read_bytes;
using testing::read_file;
using testing::TempDir;
using testing::write_bytes;
using testing::write_file;

constexpr uint64_t kMiB = 1 << 20;

void create(const std::string& path, uint64_t size, uint32_t cluster_bits = 16,
            std::string backing = "", std::string backing_format = "", uint32_t version = 3) {
  qcow2::CreateOptions options;
  options.size_bytes = size;
  options.cluster_bits = cluster_bits;
  options.version = version;
  options.backing_file = std::move(backing);
  options.backing_format = std::move(backing_format);
  auto created = qcow2::create_image(path, options);
  ASSERT_TRUE(created.has_value()) << created.error().message();
}

std::unique_ptr<BlockBackend> open_rw(const std::string& path,
                                      ImageFormat format = ImageFormat::Auto) {
  auto disk = open_image(path, format, Access::ReadWrite);
  EXPECT_TRUE(disk.has_value()) << disk.error().message();
  return disk ? std::move(*disk) : nullptr;
}

std::unique_ptr<BlockBackend> open_ro(const std::string& path) {
  auto disk = open_image(path, ImageFormat::Auto, Access::ReadOnly);
  EXPECT_TRUE(disk.has_value()) << disk.error().message();
  return disk ? std::move(*disk) : nullptr;
}

// Patches bytes of a file in place.
void patch(const std::string& path, uint64_t offset, const std::vector<uint8_t>& bytes) {
  auto fd = Fd::open(path, O_WRONLY);
  ASSERT_TRUE(fd.has_value());
  std::vector<std::byte> data(bytes.size());
  std::memcpy(data.data(), bytes.data(), bytes.size());
  ASSERT_TRUE(fd->pwrite_all(data, offset).has_value());
}

std::vector<uint8_t> be32(uint32_t v) {
  return {uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)};
}
std::vector<uint8_t> be64(uint64_t v) {
  auto hi = be32(uint32_t(v >> 32));
  auto lo = be32(uint32_t(v));
  hi.insert(hi.end(), lo.begin(), lo.end());
  return hi;
}

Error open_error(const std::string& path, Access access = Access::ReadOnly) {
  auto disk = open_image(path, ImageFormat::Qcow2, access);
  EXPECT_FALSE(disk.has_value());
  if (disk) return Error(Errc::Io, "opened");
  return std::move(disk).error();
}

TEST(Qcow2Test, NewImageReadsZeroes) {
  TempDir dir;
  create(dir.file("a.qcow2"), 8 * kMiB);
  auto disk = open_rw(dir.file("a.qcow2"));
  ASSERT_TRUE(disk);
  EXPECT_EQ(disk->format_name(), "qcow2");
  EXPECT_EQ(disk->size_bytes(), 8 * kMiB);
  EXPECT_EQ(read_bytes(*disk, 0, 8 * kMiB), std::vector<std::byte>(8 * kMiB));
  auto format = probe_image_format(dir.file("a.qcow2"));
  ASSERT_TRUE(format.has_value());
  EXPECT_EQ(*format, ImageFormat::Qcow2);
}

TEST(Qcow2Test, WritesPersistAcrossReopen) {
  for (uint32_t version : {2u, 3u}) {
    for (uint32_t bits : {9u, 12u, 16u, 21u}) {
      SCOPED_TRACE(::testing::Message() << "version " << version << " cluster_bits " << bits);
      TempDir dir;
      const std::string path = dir.file("a.qcow2");
      create(path, 6 * kMiB, bits, "", "", version);
      std::vector<std::byte> expected(6 * kMiB);
      {
        auto disk = open_rw(path);
        ASSERT_TRUE(disk);
        // Unaligned writes straddling clusters, overwrites, the very end.
        const std::vector<std::pair<uint64_t, size_t>> writes = {
            {0, 4096}, {1000, 70000}, {3 * kMiB - 17, 300000}, {6 * kMiB - 512, 512},
            {1000, 10}, {2 * kMiB, 2 * kMiB}};
        uint8_t seed = 1;
        for (auto [offset, length] : writes) {
          auto data = pattern(length, seed++);
          ASSERT_TRUE(write_bytes(*disk, offset, data).has_value());
          std::memcpy(expected.data() + offset, data.data(), length);
        }
        EXPECT_EQ(read_bytes(*disk, 0, 6 * kMiB), expected);
        ASSERT_TRUE(disk->flush().has_value());
      }
      auto disk = open_ro(path);
      ASSERT_TRUE(disk);
      EXPECT_EQ(read_bytes(*disk, 0, 6 * kMiB), expected);
    }
  }
}

TEST(Qcow2Test, ScatterGatherReadsAndWrites) {
  TempDir dir;
  create(dir.file("a.qcow2"), 1 * kMiB, 12);
  auto disk = open_rw(dir.file("a.qcow2"));
  ASSERT_TRUE(disk);
  auto data = pattern(3 * 4096 + 100, 7);
  std::vector<iovec> iov;
  for (size_t at = 0, step = 1; at < data.size(); at += step, step = step * 3 + 1) {
    size_t n = std::min(step, data.size() - at);
    iov.push_back(iovec{data.data() + at, n});
  }
  auto written = disk->write_at(4000, iov);
  ASSERT_TRUE(written.has_value()) << written.error().message();
  EXPECT_EQ(*written, data.size());
  std::vector<std::byte> back(data.size());
  std::vector<iovec> back_iov = {{back.data(), 5}, {back.data() + 5, back.size() - 5}};
  ASSERT_TRUE(disk->read_at(4000, back_iov).has_value());
  EXPECT_EQ(back, data);
}

TEST(Qcow2Test, RangeAndAccessAreChecked) {
  TempDir dir;
  create(dir.file("a.qcow2"), 1 * kMiB);
  auto ro = open_ro(dir.file("a.qcow2"));
  ASSERT_TRUE(ro);
  auto data = pattern(512, 1);
  auto denied = write_bytes(*ro, 0, data);
  ASSERT_FALSE(denied.has_value());
  EXPECT_EQ(denied.error().code(), Errc::PermissionDenied);
  std::vector<std::byte> out(1024);
  iovec v{out.data(), out.size()};
  auto past = ro->read_at(1 * kMiB - 512, std::span(&v, 1));
  ASSERT_FALSE(past.has_value());
  EXPECT_EQ(past.error().code(), Errc::OutOfRange);
}

TEST(Qcow2Test, BackingChainReadsThroughAndCopiesOnWrite) {
  TempDir dir;
  auto base = pattern(4 * kMiB, 9);
  write_file(dir.file("base.raw"), base);
  // Relative names resolve against the overlay's directory.
  create(dir.file("mid.qcow2"), 4 * kMiB, 16, "base.raw", "raw");
  create(dir.file("top.qcow2"), 4 * kMiB, 12, "mid.qcow2", "");
  std::vector<std::byte> expected = base;
  {
    auto mid = open_rw(dir.file("mid.qcow2"));
    ASSERT_TRUE(mid);
    auto data = pattern(1000, 2);
    ASSERT_TRUE(write_bytes(*mid, 70000, data).has_value());
    std::memcpy(expected.data() + 70000, data.data(), data.size());
  }
  auto top = open_rw(dir.file("top.qcow2"));
  ASSERT_TRUE(top);
  EXPECT_EQ(read_bytes(*top, 0, 4 * kMiB), expected);
  auto data = pattern(5000, 3);
  ASSERT_TRUE(write_bytes(*top, 69000, data).has_value());
  std::memcpy(expected.data() + 69000, data.data(), data.size());
  EXPECT_EQ(read_bytes(*top, 0, 4 * kMiB), expected);
  // The backing images are untouched.
  EXPECT_EQ(read_file(dir.file("base.raw")), base);
  auto mid = open_ro(dir.file("mid.qcow2"));
  ASSERT_TRUE(mid);
  auto mid_bytes = read_bytes(*mid, 69000, 5000);
  EXPECT_NE(mid_bytes, data);
}

TEST(Qcow2Test, ShorterBackingReadsZeroesPastItsEnd) {
  TempDir dir;
  auto base = pattern(100000, 4);
  write_file(dir.file("base.raw"), base);  // rounds down to 99840 bytes
  create(dir.file("top.qcow2"), 1 * kMiB, 16, dir.file("base.raw"), "raw");
  auto top = open_rw(dir.file("top.qcow2"));
  ASSERT_TRUE(top);
  std::vector<std::byte> expected(1 * kMiB);
  std::memcpy(expected.data(), base.data(), 99840);
  EXPECT_EQ(read_bytes(*top, 0, 1 * kMiB), expected);
  // Copy-on-write of the cluster that holds the backing file's end.
  auto data = pattern(10, 5);
  ASSERT_TRUE(write_bytes(*top, 99000, data).has_value());
  std::memcpy(expected.data() + 99000, data.data(), data.size());
  EXPECT_EQ(read_bytes(*top, 0, 1 * kMiB), expected);
}

TEST(Qcow2Test, BackingLoopIsRefused) {
  TempDir dir;
  create(dir.file("a.qcow2"), 1 * kMiB, 16, "b.qcow2", "qcow2");
  create(dir.file("b.qcow2"), 1 * kMiB, 16, "a.qcow2", "qcow2");
  Error error = open_error(dir.file("a.qcow2"), Access::ReadWrite);
  EXPECT_EQ(error.code(), Errc::Unsupported);
  // Named as a loop, not as a lock held by "another process": the chain's
  // second open of a.qcow2 would conflict with its own first one.
  EXPECT_NE(error.message().find("loops back"), std::string::npos) << error.message();
  EXPECT_NE(error.message().find("a.qcow2"), std::string::npos) << error.message();
}

TEST(Qcow2Test, MissingBackingFileNamesIt) {
  TempDir dir;
  create(dir.file("a.qcow2"), 1 * kMiB, 16, "gone.raw", "raw");
  Error error = open_error(dir.file("a.qcow2"));
  EXPECT_EQ(error.code(), Errc::NotFound);
  EXPECT_NE(error.message().find("gone.raw"), std::string::npos) << error.message();
}

TEST(Qcow2Test, ResolvesBackingPaths) {
  EXPECT_EQ(qcow2::resolve_backing_path("/a/b/top.qcow2", "base.raw"), "/a/b/base.raw");
  EXPECT_EQ(qcow2::resolve_backing_path("/a/b/top.qcow2", "../c/base"), "/a/b/../c/base");
  EXPECT_EQ(qcow2::resolve_backing_path("/a/b/top.qcow2", "/abs/base"), "/abs/base");
  EXPECT_EQ(qcow2::resolve_backing_path("top.qcow2", "base.raw"), "base.raw");
}

TEST(Qcow2Test, WriteZeroesAndDiscardOnV3) {
  TempDir dir;
  auto base = pattern(2 * kMiB, 6);
  write_file(dir.file("base.raw"), base);
  create(dir.file("top.qcow2"), 2 * kMiB, 16, "base.raw", "raw");
  auto top = open_rw(dir.file("top.qcow2"));
  ASSERT_TRUE(top);
  std::vector<std::byte> expected = base;
  auto data = pattern(2 * kMiB, 8);
  ASSERT_TRUE(write_bytes(*top, 0, data).has_value());
  expected = data;
  // Whole clusters become zero clusters; the partial edges get zero bytes.
  ASSERT_TRUE(top->write_zeroes(1000, 200000, Unmap::Yes).has_value());
  std::memset(expected.data() + 1000, 0, 200000);
  ASSERT_TRUE(top->write_zeroes(300000, 65536 * 2, Unmap::No).has_value());
  std::memset(expected.data() + 300000, 0, 65536 * 2);
  EXPECT_EQ(read_bytes(*top, 0, 2 * kMiB), expected);
  // Zeroing unallocated clusters of an overlay must hide the backing data.
  // Discard in an overlay reads back as zeroes (never the backing data).
  ASSERT_TRUE(top->discard(1 * kMiB, 1 * kMiB).has_value());
  std::memset(expected.data() + 1 * kMiB, 0, 1 * kMiB);
  EXPECT_EQ(read_bytes(*top, 0, 2 * kMiB), expected);
  // Freed clusters are reused, and the data stays right.
  auto more = pattern(3 * 65536, 10);
  ASSERT_TRUE(write_bytes(*top, 1 * kMiB + 4096, more).has_value());
  std::memcpy(expected.data() + 1 * kMiB + 4096, more.data(), more.size());
  EXPECT_EQ(read_bytes(*top, 0, 2 * kMiB), expected);
}

TEST(Qcow2Test, WriteZeroesOverUnallocatedOverlayHidesBacking) {
  for (uint32_t version : {2u, 3u}) {
    TempDir dir;
    auto base = pattern(1 * kMiB, 6);
    write_file(dir.file("base.raw"), base);
    create(dir.file("top.qcow2"), 1 * kMiB, 16, "base.raw", "raw", version);
    auto top = open_rw(dir.file("top.qcow2"));
    ASSERT_TRUE(top);
    ASSERT_TRUE(top->write_zeroes(100, 300000, Unmap::Yes).has_value());
    std::vector<std::byte> expected = base;
    std::memset(expected.data() + 100, 0, 300000);
    EXPECT_EQ(read_bytes(*top, 0, 1 * kMiB), expected);
  }
}

TEST(Qcow2Test, DiscardWithoutBackingReadsZeroes) {
  TempDir dir;
  create(dir.file("a.qcow2"), 1 * kMiB, 16, "", "", 2);
  auto disk = open_rw(dir.file("a.qcow2"));
  ASSERT_TRUE(disk);
  auto data = pattern(1 * kMiB, 11);
  ASSERT_TRUE(write_bytes(*disk, 0, data).has_value());
  ASSERT_TRUE(disk->discard(65536, 3 * 65536 + 100).has_value());
  std::memset(data.data() + 65536, 0, 3 * 65536);
  EXPECT_EQ(read_bytes(*disk, 0, 1 * kMiB), data);
}

TEST(Qcow2Test, SmallClustersGrowTheRefcountTable) {
  // 512-byte clusters: one refcount block covers 128 KiB and the created
  // table only a few MiB, so filling 12 MiB adds blocks and regrows the table.
  TempDir dir;
  const std::string path = dir.file("a.qcow2");
  create(path, 12 * kMiB, 9);
  auto data = pattern(12 * kMiB, 12);
  {
    auto disk = open_rw(path);
    ASSERT_TRUE(disk);
    for (uint64_t at = 0; at < data.size(); at += 256 * 1024) {
      std::vector<std::byte> chunk(data.begin() + at, data.begin() + at + 256 * 1024);
      ASSERT_TRUE(write_bytes(*disk, at, chunk).has_value());
    }
  }
  auto disk = open_ro(path);
  ASSERT_TRUE(disk);
  EXPECT_EQ(read_bytes(*disk, 0, 12 * kMiB), data);
}

// Once everything submitted was reaped: any wake-up still on its way
// yields no completion, and then completion_fd stays quiet.
void expect_idle(BlockBackend& disk, pollfd& pfd) {
  for (int late = 0; late < 5 && ::poll(&pfd, 1, 10) == 1; ++late) {
    std::vector<BlockCompletion> none;
    EXPECT_EQ(disk.reap(none), 0u) << "a completion after all were reaped";
  }
  EXPECT_EQ(::poll(&pfd, 1, 0), 0) << "completion_fd readable with nothing to reap";
}

TEST(Qcow2Test, AsyncFaceServesManyRequests) {
  TempDir dir;
  create(dir.file("a.qcow2"), 4 * kMiB);
  auto disk = open_rw(dir.file("a.qcow2"));
  ASSERT_TRUE(disk);
  std::vector<std::vector<std::byte>> buffers;
  std::vector<iovec> iovs(64);
  for (int i = 0; i < 64; ++i) buffers.push_back(pattern(4096, static_cast<uint8_t>(i)));
  for (int i = 0; i < 64; ++i) {
    iovs[i] = iovec{buffers[i].data(), 4096};
    BlockRequest request;
    request.op = BlockOp::Write;
    request.offset = static_cast<uint64_t>(i) * 65536 + 512;
    request.iov = std::span(&iovs[i], 1);
    request.user_data = static_cast<uint64_t>(i);
    ASSERT_TRUE(disk->submit(request).has_value());
  }
  ASSERT_TRUE(disk->kick().has_value());
  // Completions come from io_uring, in as many batches as the kernel makes.
  pollfd pfd{disk->completion_fd(), POLLIN, 0};
  std::vector<BlockCompletion> done;
  while (done.size() < 64) {
    ASSERT_EQ(::poll(&pfd, 1, 5000), 1);
    disk->reap(done);
  }
  EXPECT_EQ(done.size(), 64u);
  EXPECT_EQ(disk->in_flight(), 0u);
  for (const BlockCompletion& c : done) EXPECT_EQ(c.result, 4096);
  for (int i = 0; i < 64; ++i) {
    EXPECT_EQ(read_bytes(*disk, static_cast<uint64_t>(i) * 65536 + 512, 4096), buffers[i]);
  }
  // Reaped, nothing is left: io_uring signals the eventfd just after it
  // posts a batch's completions, so a reap may have taken them before the
  // signal came; such a late wake-up reaps nothing and clears the fd. The
  // next completion signals again (once per batch, not per request).
  expect_idle(*disk, pfd);
  BlockRequest flush;
  flush.op = BlockOp::Flush;
  flush.user_data = 99;
  ASSERT_TRUE(disk->submit(flush).has_value());
  ASSERT_EQ(::poll(&pfd, 1, 5000), 1);
  done.clear();
  ASSERT_EQ(disk->reap(done), 1u);
  EXPECT_EQ(done[0].user_data, 99u);
  EXPECT_EQ(done[0].result, 0);
  expect_idle(*disk, pfd);
}

// Hostile headers: each is refused with an error naming the problem.
class Qcow2HeaderTest : public ::testing::Test {
 protected:
  void SetUp() override { create(path_, 8 * kMiB); }
  void expect_refused(Errc code, const std::string& words, Access access = Access::ReadOnly) {
    Error error = open_error(path_, access);
    EXPECT_EQ(error.code(), code) << error.message();
    EXPECT_NE(error.message().find(words), std::string::npos) << error.message();
    EXPECT_NE(error.message().find(path_), std::string::npos) << error.message();
  }
  TempDir dir_;
  std::string path_ = dir_.file("h.qcow2");
};

TEST_F(Qcow2HeaderTest, BadMagic) {
  patch(path_, 0, {'Q', 'F', 'I', 0});
  expect_refused(Errc::Corrupt, "magic");
}
TEST_F(Qcow2HeaderTest, Version) {
  patch(path_, 4, be32(4));
  expect_refused(Errc::Unsupported, "version 4");
}
TEST_F(Qcow2HeaderTest, ClusterBitsTooSmall) {
  patch(path_, 20, be32(8));
  expect_refused(Errc::Corrupt, "cluster_bits 8");
}
TEST_F(Qcow2HeaderTest, ClusterBitsTooLarge) {
  patch(path_, 20, be32(22));
  expect_refused(Errc::Corrupt, "cluster_bits 22");
}
TEST_F(Qcow2HeaderTest, L1TooSmallForSize) {
  patch(path_, 24, be64(1ull << 40));
  expect_refused(Errc::Corrupt, "l1_size");
}
TEST_F(Qcow2HeaderTest, L1OutsideFile) {
  patch(path_, 40, be64(1ull << 40));
  expect_refused(Errc::Corrupt, "l1_table_offset");
}
TEST_F(Qcow2HeaderTest, L1Unaligned) {
  patch(path_, 40, be64(0x30008));
  expect_refused(Errc::Corrupt, "l1_table_offset");
}
TEST_F(Qcow2HeaderTest, RefcountTableUnaligned) {
  patch(path_, 48, be64(0x10200));
  expect_refused(Errc::Corrupt, "refcount_table_offset");
}
TEST_F(Qcow2HeaderTest, RefcountTableHuge) {
  patch(path_, 56, be32(0xffffffff));
  expect_refused(Errc::Corrupt, "refcount_table_clusters");
}
TEST_F(Qcow2HeaderTest, RefcountOrder) {
  patch(path_, 96, be32(7));
  expect_refused(Errc::Corrupt, "refcount_order 7");
}
TEST_F(Qcow2HeaderTest, HeaderLength) {
  patch(path_, 100, be32(105));
  expect_refused(Errc::Corrupt, "header_length 105");
}
TEST_F(Qcow2HeaderTest, Encryption) {
  patch(path_, 32, be32(2));
  expect_refused(Errc::Unsupported, "encryption");
}
TEST_F(Qcow2HeaderTest, ExternalDataFile) {
  patch(path_, 72, be64(1 << 2));
  expect_refused(Errc::Unsupported, "external data file");
}
TEST_F(Qcow2HeaderTest, ExtendedL2) {
  patch(path_, 72, be64(1 << 4));
  expect_refused(Errc::Unsupported, "extended L2 entries");
}
TEST_F(Qcow2HeaderTest, UnknownIncompatibleFeatureNamedFromTheTable) {
  // A feature name table extension naming incompatible bit 9.
  std::vector<uint8_t> ext = be32(qcow2::kExtFeatureNames);
  auto length = be32(48);
  ext.insert(ext.end(), length.begin(), length.end());
  std::vector<uint8_t> entry(48, 0);
  entry[0] = 0;
  entry[1] = 9;
  std::memcpy(entry.data() + 2, "frobnication", 12);
  ext.insert(ext.end(), entry.begin(), entry.end());
  ext.resize(ext.size() + 8, 0);  // end marker
  patch(path_, 112, ext);
  patch(path_, 72, be64(1 << 9));
  expect_refused(Errc::Unsupported, "'frobnication' (bit 9)");
}
TEST_F(Qcow2HeaderTest, UnknownCompressionType) {
  patch(path_, 72, be64(1 << 3));
  patch(path_, 104, {2});
  expect_refused(Errc::Unsupported, "compression_type 2");
}
TEST_F(Qcow2HeaderTest, CompressionTypeWithoutItsBit) {
  patch(path_, 104, {1});
  expect_refused(Errc::Corrupt, "compression_type 1");
}
TEST_F(Qcow2HeaderTest, ExtensionRunsPastTheCluster) {
  std::vector<uint8_t> ext = be32(0x12345678);
  auto length = be32(70000);
  ext.insert(ext.end(), length.begin(), length.end());
  patch(path_, 112, ext);
  expect_refused(Errc::Corrupt, "header extension");
}
TEST_F(Qcow2HeaderTest, BackingNameTooLong) {
  patch(path_, 8, be64(512));
  patch(path_, 16, be32(5000));
  expect_refused(Errc::Corrupt, "backing_file_size 5000");
}
TEST_F(Qcow2HeaderTest, BackingNameOverlapsHeader) {
  patch(path_, 8, be64(16));
  patch(path_, 16, be32(10));
  expect_refused(Errc::Corrupt, "backing file name");
}
TEST_F(Qcow2HeaderTest, CorruptOpensReadOnlyOnly) {
  patch(path_, 72, be64(1 << 1));
  expect_refused(Errc::Corrupt, "read-only", Access::ReadWrite);
  auto disk = open_ro(path_);
  ASSERT_TRUE(disk);
  EXPECT_EQ(read_bytes(*disk, 0, 4096), std::vector<std::byte>(4096));
}
TEST_F(Qcow2HeaderTest, DirtyOpensReadOnlyOnly) {
  patch(path_, 72, be64(1 << 0));
  expect_refused(Errc::Unsupported, "dirty", Access::ReadWrite);
  EXPECT_TRUE(open_ro(path_));
}
TEST_F(Qcow2HeaderTest, TruncatedFile) {
  ASSERT_EQ(::truncate(path_.c_str(), 50), 0);
  expect_refused(Errc::Corrupt, "too short");
}

// Hostile tables: reads fail with Corrupt naming the entry, never crash.
TEST(Qcow2TableTest, L1EntryOutsideTheFile) {
  TempDir dir;
  const std::string path = dir.file("t.qcow2");
  create(path, 8 * kMiB);
  // Layout from create_image: header, refcount table, block, L1 at 0x30000.
  patch(path, 0x30000, be64(0x7fff0000ull | qcow2::kEntryCopied));
  auto disk = open_ro(path);
  ASSERT_TRUE(disk);
  std::vector<std::byte> out(512);
  iovec v{out.data(), out.size()};
  auto result = disk->read_at(0, std::span(&v, 1));
  ASSERT_FALSE(result.has_value());
  EXPECT_EQ(result.error().code(), Errc::Corrupt);
  EXPECT_NE(result.error().message().find("L1 entry 0"), std::string::npos);
}

TEST(Qcow2TableTest, L2EntriesUnalignedOutsideOrCompressedGarbage) {
  TempDir dir;
  const std::string path = dir.file("t.qcow2");
  create(path, 8 * kMiB);
  {
    auto disk = open_rw(path);
    ASSERT_TRUE(disk);
    ASSERT_TRUE(write_bytes(*disk, 0, pattern(4 * 65536, 1)).has_value());
  }
  // The first write allocated the L2 table right after the L1 table.
  const uint64_t l2 = 0x40000;
  patch(path, l2, be64(0x58000 | qcow2::kEntryCopied));           // unaligned
  patch(path, l2 + 8, be64(0x7fff0000ull | qcow2::kEntryCopied));  // past the end
  patch(path, l2 + 16, be64(qcow2::kEntryCompressed | 0x50000));   // not deflate
  patch(path, l2 + 24, be64(qcow2::kEntryCompressed | 0x10));      // inside the header
  auto disk = open_rw(path);
  ASSERT_TRUE(disk);
  for (uint64_t cluster = 0; cluster < 4; ++cluster) {
    std::vector<std::byte> out(512);
    iovec v{out.data(), out.size()};
    auto result = disk->read_at(cluster * 65536, std::span(&v, 1));
    ASSERT_FALSE(result.has_value()) << cluster;
    EXPECT_EQ(result.error().code(), Errc::Corrupt) << result.error().message();
    auto written = write_bytes(*disk, cluster * 65536 + 512, pattern(512, 2));
    EXPECT_FALSE(written.has_value()) << cluster;
  }
}

TEST(Qcow2TableTest, RefcountTableEntryOutsideTheFile) {
  TempDir dir;
  const std::string path = dir.file("t.qcow2");
  create(path, 8 * kMiB);
  patch(path, 0x10000, be64(0x7fff0000ull));
  auto disk = open_rw(path);
  ASSERT_TRUE(disk);
  auto written = write_bytes(*disk, 0, pattern(512, 2));
  ASSERT_FALSE(written.has_value());
  EXPECT_EQ(written.error().code(), Errc::Corrupt);
  EXPECT_NE(written.error().message().find("refcount table entry 0"), std::string::npos)
      << written.error().message();
}

}  // namespace
}  // namespace keel::block
