#include "machine/disk_mirror.h"

#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "block/image.h"
#include "block/qcow2/create.h"
#include "block/raw/raw_file.h"
#include "block/temp_image.h"

namespace keel::machine {
namespace {

using block::testing::TempImage;

constexpr uint32_t kChunk = 64 * 1024;
constexpr uint64_t kDiskBytes = 3 * kChunk + 8192;  // the last chunk is short

// A config with one writable (or read-only) disk at path.
VmConfig config_with(const std::string& path, bool read_only = false) {
  VmConfig config;
  DiskConfig disk;
  disk.path = path;
  disk.read_only = read_only;
  config.disks.push_back(disk);
  return config;
}

std::vector<std::byte> read_image(const std::string& path, uint64_t size) {
  auto backend = block::open_image(path, block::ImageFormat::Auto, block::Access::ReadOnly);
  EXPECT_TRUE(backend.has_value()) << backend.error().message();
  std::vector<std::byte> out(size);
  iovec part{out.data(), out.size()};
  EXPECT_TRUE((*backend)->read_at(0, std::span(&part, 1)).has_value());
  return out;
}

migration::DiskChunk data_chunk(uint64_t index, std::span<const std::byte> data) {
  return {.disk = 0, .encoding = migration::ChunkEncoding::Data, .offset = index * kChunk,
          .length_bytes = static_cast<uint32_t>(data.size()), .data = data};
}

TEST(DiskMirrorTargetTest, WritesChunksAndFinishesOnlyOnceEveryChunkArrived) {
  TempImage target(kDiskBytes, 7);  // "preallocated" with anything
  migration::DiskInfo info{.chunk_bytes = kChunk, .disks = {{0, kDiskBytes}}};
  auto mirror = DiskMirrorTarget::open(info, config_with(target.path()));
  ASSERT_TRUE(mirror.has_value()) << mirror.error().message();

  std::vector<std::byte> expected(kDiskBytes);
  for (size_t i = 0; i < expected.size(); ++i) expected[i] = std::byte(static_cast<uint8_t>(i / 7));
  auto part = [&](uint64_t index) {
    return std::span(expected).subspan(index * kChunk, std::min<uint64_t>(kChunk, kDiskBytes - index * kChunk));
  };
  ASSERT_TRUE(mirror->apply(data_chunk(0, part(0))).has_value());
  std::fill_n(expected.begin() + kChunk, kChunk, std::byte{0});
  ASSERT_TRUE(mirror->apply({.disk = 0, .encoding = migration::ChunkEncoding::Zeroes,
                             .offset = kChunk, .length_bytes = kChunk, .data = {}})
                  .has_value());
  ASSERT_TRUE(mirror->apply(data_chunk(3, part(3))).has_value());
  auto partial = mirror->finish();
  ASSERT_FALSE(partial.has_value());
  EXPECT_EQ(partial.error().code(), Errc::Corrupt);
  EXPECT_NE(partial.error().message().find("1 of 4 chunks never arrived"), std::string::npos)
      << partial.error().message();

  // A chunk sent again (written after it was copied) replaces the first copy.
  std::vector<std::byte> stale(kChunk, std::byte{0xee});
  ASSERT_TRUE(mirror->apply(data_chunk(2, stale)).has_value());
  ASSERT_TRUE(mirror->apply(data_chunk(2, part(2))).has_value());
  ASSERT_TRUE(mirror->finish().has_value());
  EXPECT_EQ(target.read_back(0, kDiskBytes), expected);
}

TEST(DiskMirrorTargetTest, RefusesTargetsAndChunksThatDoNotFit) {
  TempImage target(kDiskBytes);
  migration::DiskInfo info{.chunk_bytes = kChunk, .disks = {{0, kDiskBytes}}};
  // Another size, a disk the config lacks, a read-only disk.
  migration::DiskInfo bigger{.chunk_bytes = kChunk, .disks = {{0, kDiskBytes + 512}}};
  auto size = DiskMirrorTarget::open(bigger, config_with(target.path()));
  ASSERT_FALSE(size.has_value());
  EXPECT_NE(size.error().message().find(target.path()), std::string::npos);
  migration::DiskInfo second{.chunk_bytes = kChunk, .disks = {{1, kDiskBytes}}};
  EXPECT_FALSE(DiskMirrorTarget::open(second, config_with(target.path())).has_value());
  EXPECT_FALSE(
      DiskMirrorTarget::open(info, config_with(target.path(), true))
          .has_value());
  // A writable disk here that the source does not copy.
  VmConfig two = config_with(target.path());
  two.disks.push_back(two.disks[0]);
  two.disks[1].path = "/nonexistent/other.img";
  auto uncopied = DiskMirrorTarget::open(info, two);
  ASSERT_FALSE(uncopied.has_value());
  EXPECT_NE(uncopied.error().message().find("does not copy disk 1"), std::string::npos)
      << uncopied.error().message();

  auto mirror = DiskMirrorTarget::open(info, config_with(target.path()));
  ASSERT_TRUE(mirror.has_value()) << mirror.error().message();
  // Locked: a second writer is refused.
  EXPECT_FALSE(DiskMirrorTarget::open(info, config_with(target.path())).has_value());
  std::vector<std::byte> data(kChunk);
  migration::DiskChunk other_disk = data_chunk(0, data);
  other_disk.disk = 1;
  EXPECT_FALSE(mirror->apply(other_disk).has_value());
  migration::DiskChunk unaligned = data_chunk(0, std::span(data).first(4096));
  unaligned.offset = 4096;
  EXPECT_FALSE(mirror->apply(unaligned).has_value());
  EXPECT_FALSE(mirror->apply(data_chunk(0, std::span(data).first(4096))).has_value());
  EXPECT_FALSE(mirror->apply(data_chunk(3, data)).has_value());  // the last chunk is shorter
  EXPECT_FALSE(mirror->apply(data_chunk(4, std::span(data).first(8192))).has_value());
  EXPECT_EQ(target.read_back(0, kDiskBytes), target.contents());
}

// The source's side over a stream into a qcow2 target: every chunk goes
// once, a zero chunk as a zeroes record, and a second pass with nothing
// written since sends nothing (blk_test covers the marking of writes).
TEST(DiskMirrorTest, SourceCopiesEveryChunkOnceIntoAQcow2Target) {
  TempImage source(kDiskBytes, 11);
  {
    auto raw = block::RawFile::open(source.path(), block::Access::ReadWrite);
    ASSERT_TRUE(raw.has_value());
    ASSERT_TRUE((*raw)->write_zeroes(kChunk, kChunk, block::Unmap::No).has_value());
  }
  auto backend = block::RawFile::open(source.path(), block::Access::ReadWrite);
  ASSERT_TRUE(backend.has_value());
  auto blk = devices::virtio::Blk::create(std::move(*backend), {});
  ASSERT_TRUE(blk.has_value()) << blk.error().message();

  char name[] = "/tmp/keel-mirror-target-XXXXXX";
  int fd = ::mkstemp(name);
  ASSERT_GE(fd, 0);
  ::close(fd);
  const std::string target_path = name;
  block::qcow2::CreateOptions options;
  options.size_bytes = kDiskBytes;
  ASSERT_TRUE(block::qcow2::create_image(target_path, options).has_value());

  Fd stream(::memfd_create("mirror-stream", MFD_CLOEXEC));
  ASSERT_TRUE(stream.valid());
  migration::StreamWriter writer(stream);
  uint64_t chunks_sent = 0;
  {
    DiskMirrorSource mirror({{0, "disk 'test'", blk->get()}}, kChunk);
    EXPECT_EQ(mirror.dirty_bytes(), kDiskBytes);
    ASSERT_TRUE(writer.send(migration::FrameType::DiskInfo,
                            migration::encode_disk_info(mirror.info()))
                    .has_value());
    auto count = [&chunks_sent](uint64_t) -> Result<void> {
      ++chunks_sent;
      return ok();
    };
    ASSERT_TRUE(mirror.send_dirty(writer, count).has_value());
    EXPECT_EQ(chunks_sent, 4u);
    EXPECT_EQ(mirror.dirty_bytes(), 0u);
    ASSERT_TRUE(mirror.send_dirty(writer, count).has_value());
    EXPECT_EQ(chunks_sent, 4u);
  }
  ASSERT_EQ(::lseek(stream.get(), 0, SEEK_SET), 0);
  migration::StreamReader reader(stream, "test");
  auto info_frame = reader.next(0);
  ASSERT_TRUE(info_frame.has_value()) << info_frame.error().message();
  ASSERT_EQ(info_frame->type, migration::FrameType::DiskInfo);
  auto info = migration::decode_disk_info(info_frame->payload);
  ASSERT_TRUE(info.has_value());
  auto target = DiskMirrorTarget::open(*info, config_with(target_path));
  ASSERT_TRUE(target.has_value()) << target.error().message();
  uint64_t zero_chunks = 0;
  for (;;) {
    auto frame = reader.next(0);
    if (!frame) break;
    ASSERT_EQ(frame->type, migration::FrameType::DiskChunk);
    auto chunk = migration::decode_disk_chunk(frame->payload);
    ASSERT_TRUE(chunk.has_value()) << chunk.error().message();
    if (chunk->encoding == migration::ChunkEncoding::Zeroes) ++zero_chunks;
    ASSERT_TRUE(target->apply(*chunk).has_value());
  }
  EXPECT_EQ(zero_chunks, 1u);  // chunk 1
  ASSERT_TRUE(target->finish().has_value());
  std::vector<std::byte> expected = source.contents();
  std::fill_n(expected.begin() + kChunk, kChunk, std::byte{0});
  EXPECT_EQ(read_image(target_path, kDiskBytes), expected);
  ::unlink(target_path.c_str());
}

}  // namespace
}  // namespace keel::machine
