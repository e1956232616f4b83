// The qcow2 operations keel-img's subcommands are built on, without QEMU:
// compressed writes, block_status, resize, make_empty, set_backing_file and
// repair_leaks, each checked by reading back and by Keel's own check.
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "block/image.h"
#include "block/map.h"
#include "block/qcow2/check.h"
#include "block/qcow2/create.h"
#include "block/qcow2/qcow2.h"
#include "qcow2_support.h"

namespace keel::block {
namespace {

using testing::create_qcow2;
using testing::open_qcow2;
using testing::pattern;
using testing::read_be64;
using testing::read_bytes;
using testing::TempDir;
using testing::write_be64;
using testing::write_bytes;
using testing::write_file;
using Status = qcow2::Qcow2Image::Status;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1 << 20;

void expect_check_clean(const std::string& path) {
  auto report = qcow2::check_image(path);
  ASSERT_TRUE(report.has_value()) << report.error().message();
  EXPECT_EQ(report->corruptions, 0u) << (report->messages.empty() ? "" : report->messages[0]);
  EXPECT_EQ(report->leaks, 0u) << (report->messages.empty() ? "" : report->messages[0]);
}

// One cluster of text-like bytes: compresses well.
std::vector<std::byte> compressible(size_t length, uint8_t seed) {
  std::vector<std::byte> out(length);
  for (size_t i = 0; i < length; ++i) out[i] = std::byte(static_cast<uint8_t>('a' + (i / 64 + seed) % 26));
  return out;
}

TEST(Qcow2ToolsTest, CompressedWritesPackAndReadBack) {
  TempDir dir;
  const std::string path = dir.file("c.qcow2");
  create_qcow2(path, 1 * kMiB, 12);  // 4 KiB clusters
  const auto a = compressible(4 * kKiB, 1);
  const auto b = compressible(4 * kKiB, 2);
  const auto noise = pattern(4 * kKiB, 3);
  {
    auto image = open_qcow2(path, Access::ReadWrite);
    ASSERT_TRUE(image->write_compressed(0, a).has_value());
    ASSERT_TRUE(image->write_compressed(4 * kKiB, b).has_value());
    ASSERT_TRUE(image->write_compressed(8 * kKiB, noise).has_value());  // does not shrink
    // An allocated cluster is rewritten in place, uncompressed.
    ASSERT_TRUE(image->write_compressed(4 * kKiB, a).has_value());
    auto past = image->write_compressed(1 * kMiB, a);
    ASSERT_FALSE(past.has_value());
    EXPECT_EQ(past.error().code(), Errc::OutOfRange);
    auto partial = image->write_compressed(512, a);
    EXPECT_FALSE(partial.has_value());
  }
  expect_check_clean(path);
  auto image = open_qcow2(path, Access::ReadOnly);
  EXPECT_TRUE(read_bytes(*image, 0, 4 * kKiB) == a);
  EXPECT_TRUE(read_bytes(*image, 4 * kKiB, 4 * kKiB) == a);
  EXPECT_TRUE(read_bytes(*image, 8 * kKiB, 4 * kKiB) == noise);
  auto first = image->block_status(0, 1 * kMiB);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->status, Status::Compressed);
  EXPECT_EQ(first->length_bytes, 4 * kKiB);
  auto third = image->block_status(8 * kKiB, 4 * kKiB);
  ASSERT_TRUE(third.has_value());
  EXPECT_EQ(third->status, Status::Data);
  EXPECT_NE(third->host_offset, 0u);

  // Eight small compressed clusters share one host cluster: the file holds
  // the four metadata clusters create_image writes, one L2 table and one
  // cluster of compressed data.
  const std::string packed = dir.file("p.qcow2");
  create_qcow2(packed, 1 * kMiB, 12);
  {
    auto writer = open_qcow2(packed, Access::ReadWrite);
    for (uint8_t i = 0; i < 8; ++i) {
      ASSERT_TRUE(writer->write_compressed(i * 4 * kKiB, compressible(4 * kKiB, i)).has_value());
    }
  }
  expect_check_clean(packed);
  auto size = Fd::open(packed, O_RDONLY)->size_bytes();
  ASSERT_TRUE(size.has_value());
  EXPECT_LE(*size, 6 * 4 * kKiB);
  auto reader = open_qcow2(packed, Access::ReadOnly);
  for (uint8_t i = 0; i < 8; ++i) {
    EXPECT_TRUE(read_bytes(*reader, i * 4 * kKiB, 4 * kKiB) == compressible(4 * kKiB, i));
  }
}

TEST(Qcow2ToolsTest, BlockStatusRunsAndMap) {
  TempDir dir;
  write_file(dir.file("base.raw"), pattern(256 * kKiB, 4));
  const std::string path = dir.file("o.qcow2");
  create_qcow2(path, 512 * kKiB, 16, "base.raw", "raw");
  {
    auto image = open_qcow2(path, Access::ReadWrite);
    ASSERT_TRUE(write_bytes(*image, 0, pattern(128 * kKiB, 5)).has_value());
    ASSERT_TRUE(image->write_zeroes(128 * kKiB, 64 * kKiB, Unmap::Yes).has_value());
  }
  auto image = open_qcow2(path, Access::ReadOnly);
  auto data = image->block_status(0, 512 * kKiB);
  ASSERT_TRUE(data.has_value());
  EXPECT_EQ(data->status, Status::Data);
  EXPECT_EQ(data->length_bytes, 128 * kKiB);  // two contiguous clusters in one run
  auto zero = image->block_status(128 * kKiB, 384 * kKiB);
  ASSERT_TRUE(zero.has_value());
  EXPECT_EQ(zero->status, Status::Zero);
  auto rest = image->block_status(192 * kKiB, 320 * kKiB);
  ASSERT_TRUE(rest.has_value());
  EXPECT_EQ(rest->status, Status::Unallocated);
  EXPECT_EQ(rest->length_bytes, 320 * kKiB);
  // Through the chain: the backing file's data up to its end, then zeroes.
  auto below = map_at(*image, path, 192 * kKiB, 320 * kKiB);
  ASSERT_TRUE(below.has_value());
  EXPECT_EQ(below->depth, 1u);
  EXPECT_EQ(below->length, 64 * kKiB);
  EXPECT_TRUE(below->data);
  EXPECT_EQ(below->file, dir.file("base.raw"));
  auto past = map_at(*image, path, 256 * kKiB, 256 * kKiB);
  ASSERT_TRUE(past.has_value());
  EXPECT_EQ(past->depth, 0u);
  EXPECT_TRUE(past->zero);
  EXPECT_FALSE(past->present);
}

TEST(Qcow2ToolsTest, ResizeGrowsTheL1TableAndShrinksCleanly) {
  TempDir dir;
  const std::string path = dir.file("r.qcow2");
  create_qcow2(path, 1 * kMiB, 12);  // one L1 entry covers 2 MiB
  const auto head = pattern(64 * kKiB, 6);
  const auto tail = pattern(100 * kKiB, 7);
  {
    auto image = open_qcow2(path, Access::ReadWrite);
    ASSERT_TRUE(write_bytes(*image, 0, head).has_value());
    ASSERT_TRUE(write_bytes(*image, 900 * kKiB, tail).has_value());
    ASSERT_TRUE(image->resize(64 * kMiB).has_value());
    EXPECT_EQ(image->size_bytes(), 64 * kMiB);
    EXPECT_GE(image->header().l1_size, 32u);
    ASSERT_TRUE(write_bytes(*image, 63 * kMiB, head).has_value());
    EXPECT_FALSE(image->resize(64 * kMiB + 100).has_value());
  }
  expect_check_clean(path);
  {
    auto image = open_qcow2(path, Access::ReadWrite);
    EXPECT_EQ(image->size_bytes(), 64 * kMiB);
    EXPECT_TRUE(read_bytes(*image, 0, head.size()) == head);
    EXPECT_TRUE(read_bytes(*image, 900 * kKiB, tail.size()) == tail);
    EXPECT_TRUE(read_bytes(*image, 63 * kMiB, head.size()) == head);
    EXPECT_TRUE(read_bytes(*image, 2 * kMiB, 4 * kKiB) == std::vector<std::byte>(4 * kKiB));
    ASSERT_TRUE(image->resize(32 * kKiB).has_value());
  }
  expect_check_clean(path);
  auto image = open_qcow2(path, Access::ReadWrite);
  EXPECT_EQ(image->size_bytes(), 32 * kKiB);
  EXPECT_TRUE(read_bytes(*image, 0, 32 * kKiB) ==
              std::vector<std::byte>(head.begin(), head.begin() + 32 * kKiB));
  std::vector<std::byte> buffer(4 * kKiB);
  const iovec v{buffer.data(), buffer.size()};
  EXPECT_FALSE(image->read_at(32 * kKiB, std::span(&v, 1)).has_value());
  // Grown again, the dropped part reads as zeroes.
  ASSERT_TRUE(image->resize(1 * kMiB).has_value());
  EXPECT_TRUE(read_bytes(*image, 32 * kKiB, 32 * kKiB) == std::vector<std::byte>(32 * kKiB));
}

TEST(Qcow2ToolsTest, MakeEmptyShowsTheBackingAgain) {
  TempDir dir;
  const auto base = pattern(1 * kMiB, 8);
  write_file(dir.file("base.raw"), base);
  const std::string path = dir.file("o.qcow2");
  create_qcow2(path, 1 * kMiB, 16, "base.raw", "raw");
  {
    auto image = open_qcow2(path, Access::ReadWrite);
    ASSERT_TRUE(write_bytes(*image, 4 * kKiB, pattern(200 * kKiB, 9)).has_value());
    ASSERT_TRUE(image->write_zeroes(512 * kKiB, 128 * kKiB, Unmap::Yes).has_value());
    ASSERT_TRUE(image->make_empty().has_value());
    EXPECT_TRUE(read_bytes(*image, 0, 1 * kMiB) == base);
  }
  expect_check_clean(path);
  auto report = qcow2::check_image(path);
  ASSERT_TRUE(report.has_value());
  EXPECT_EQ(report->allocated_clusters, 0u);
}

TEST(Qcow2ToolsTest, SetBackingFileKeepsTheRest) {
  TempDir dir;
  write_file(dir.file("one.raw"), pattern(1 * kMiB, 10));
  write_file(dir.file("two.raw"), pattern(1 * kMiB, 11));
  const std::string path = dir.file("o.qcow2");
  create_qcow2(path, 1 * kMiB, 16, "one.raw", "raw");
  {
    auto image = open_qcow2(path, Access::ReadWrite);
    ASSERT_TRUE(write_bytes(*image, 0, pattern(4 * kKiB, 12)).has_value());
  }
  ASSERT_TRUE(qcow2::set_backing_file(path, "two.raw", "raw").has_value());
  {
    auto image = open_qcow2(path, Access::ReadOnly);
    EXPECT_EQ(image->header().backing_file, "two.raw");
    EXPECT_EQ(image->header().backing_format, "raw");
    EXPECT_TRUE(read_bytes(*image, 0, 4 * kKiB) == pattern(4 * kKiB, 12));
    EXPECT_TRUE(read_bytes(*image, 64 * kKiB, 4 * kKiB) ==
                read_bytes(*image->backing(), 64 * kKiB, 4 * kKiB));
  }
  ASSERT_TRUE(qcow2::set_backing_file(path, "", "").has_value());
  auto image = open_qcow2(path, Access::ReadOnly);
  EXPECT_TRUE(image->header().backing_file.empty());
  EXPECT_EQ(image->backing(), nullptr);
  expect_check_clean(path);
  EXPECT_FALSE(qcow2::set_backing_file(path, std::string(2000, 'x'), "raw").has_value());
}

TEST(Qcow2ToolsTest, SetBackingFileRefusesAHostileExtension) {
  TempDir dir;
  const std::string path = dir.file("v2.qcow2");
  qcow2::CreateOptions options;
  options.size_bytes = 1 * kMiB;
  options.version = 2;
  ASSERT_TRUE(qcow2::create_image(path, options).has_value());
  // A version 2 header followed by an "extension" longer than the cluster.
  write_be64(path, 72, 0x12345678ffffff00ull);
  const auto before = testing::read_file(path);
  auto result = qcow2::set_backing_file(path, "base.raw", "raw");
  ASSERT_FALSE(result.has_value());
  EXPECT_EQ(result.error().code(), Errc::Corrupt);
  EXPECT_NE(result.error().message().find("v2.qcow2"), std::string::npos);
  EXPECT_TRUE(testing::read_file(path) == before);
}

TEST(Qcow2ToolsTest, RepairLeaksLowersRefcountsOnly) {
  TempDir dir;
  const std::string path = dir.file("l.qcow2");
  create_qcow2(path, 1 * kMiB, 16);
  {
    auto image = open_qcow2(path, Access::ReadWrite);
    ASSERT_TRUE(write_bytes(*image, 0, pattern(192 * kKiB, 13)).has_value());
  }
  // Layout from create_image: the L1 table at 0x30000.
  const uint64_t l2 = read_be64(path, 0x30000) & qcow2::kEntryOffsetMask;
  write_be64(path, l2 + 8, 0);
  auto report = qcow2::check_image(path);
  ASSERT_TRUE(report.has_value());
  ASSERT_EQ(report->leaks, 1u);
  ASSERT_EQ(report->leaked.size(), 1u);
  auto fixed = qcow2::repair_leaks(path, *report);
  ASSERT_TRUE(fixed.has_value()) << fixed.error().message();
  EXPECT_EQ(*fixed, 1u);
  expect_check_clean(path);
  // The same (now stale) report fixes nothing more.
  fixed = qcow2::repair_leaks(path, *report);
  ASSERT_TRUE(fixed.has_value());
  EXPECT_EQ(*fixed, 0u);
}

}  // namespace
}  // namespace keel::block
