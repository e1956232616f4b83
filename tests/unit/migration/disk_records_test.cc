#include "migration/disk_records.h"

#include <gtest/gtest.h>

#include <cstring>

namespace keel::migration {
namespace {

TEST(DiskRecordsTest, DiskInfoRoundTrips) {
  DiskInfo info{.chunk_bytes = 1 << 20, .disks = {{0, 64 << 20}, {2, 512}}};
  auto decoded = decode_disk_info(encode_disk_info(info));
  ASSERT_TRUE(decoded.has_value()) << decoded.error().message();
  EXPECT_EQ(*decoded, info);
}

TEST(DiskRecordsTest, DiskInfoRefusesBadFields) {
  auto refused = [](DiskInfo info) { return !decode_disk_info(encode_disk_info(info)); };
  EXPECT_TRUE(refused({.chunk_bytes = 0, .disks = {{0, 512}}}));
  EXPECT_TRUE(refused({.chunk_bytes = 1000, .disks = {{0, 512}}}));
  EXPECT_TRUE(refused({.chunk_bytes = kMaxDiskChunkBytes + 512, .disks = {{0, 512}}}));
  EXPECT_TRUE(refused({.chunk_bytes = 4096, .disks = {}}));
  EXPECT_TRUE(refused({.chunk_bytes = 4096, .disks = {{0, 513}}}));
  EXPECT_TRUE(refused({.chunk_bytes = 4096, .disks = {{1, 512}, {1, 1024}}}));
  std::vector<MirroredDisk> many(kMaxMirroredDisks + 1);
  for (uint32_t i = 0; i < many.size(); ++i) many[i].index = i;
  EXPECT_TRUE(refused({.chunk_bytes = 4096, .disks = many}));

  std::vector<std::byte> payload = encode_disk_info({.chunk_bytes = 4096, .disks = {{0, 512}}});
  std::vector<std::byte> versioned = payload;
  versioned[0] = std::byte{2};
  auto version = decode_disk_info(versioned);
  ASSERT_FALSE(version.has_value());
  EXPECT_EQ(version.error().code(), Errc::Unsupported);
  std::vector<std::byte> reserved = payload;
  reserved[16] = std::byte{1};
  EXPECT_FALSE(decode_disk_info(reserved).has_value());
  std::vector<std::byte> longer = payload;
  longer.push_back(std::byte{0});
  EXPECT_FALSE(decode_disk_info(longer).has_value());
  for (size_t size = 0; size < payload.size(); ++size) {
    EXPECT_FALSE(decode_disk_info(std::span(payload).first(size)).has_value()) << size;
  }
}

TEST(DiskRecordsTest, DataAndZeroChunksRoundTrip) {
  std::vector<std::byte> data(1024, std::byte{0x5a});
  auto payload = encode_disk_chunk({.disk = 3, .encoding = ChunkEncoding::Data, .offset = 4096,
                                    .length_bytes = 1024, .data = data});
  auto decoded = decode_disk_chunk(payload);
  ASSERT_TRUE(decoded.has_value()) << decoded.error().message();
  EXPECT_EQ(decoded->disk, 3u);
  EXPECT_EQ(decoded->encoding, ChunkEncoding::Data);
  EXPECT_EQ(decoded->offset, 4096u);
  EXPECT_EQ(decoded->length_bytes, 1024u);
  EXPECT_TRUE(std::equal(decoded->data.begin(), decoded->data.end(), data.begin(), data.end()));

  // Zeroes carry no data, whatever the span says.
  auto zero_payload = encode_disk_chunk({.disk = 0, .encoding = ChunkEncoding::Zeroes,
                                         .offset = 0, .length_bytes = 1 << 20, .data = data});
  EXPECT_EQ(zero_payload.size(), 24u);
  auto zero = decode_disk_chunk(zero_payload);
  ASSERT_TRUE(zero.has_value()) << zero.error().message();
  EXPECT_EQ(zero->encoding, ChunkEncoding::Zeroes);
  EXPECT_EQ(zero->length_bytes, 1u << 20);
  EXPECT_TRUE(zero->data.empty());
}

TEST(DiskRecordsTest, ChunksOfBadShapeAreCorrupt) {
  std::vector<std::byte> data(1024);
  auto chunk = [&](ChunkEncoding encoding, uint64_t offset, uint32_t length) {
    return encode_disk_chunk({.disk = 0, .encoding = encoding, .offset = offset,
                              .length_bytes = length, .data = data});
  };
  EXPECT_FALSE(decode_disk_chunk(chunk(ChunkEncoding::Zeroes, 100, 512)).has_value());
  EXPECT_FALSE(decode_disk_chunk(chunk(ChunkEncoding::Zeroes, 0, 0)).has_value());
  EXPECT_FALSE(decode_disk_chunk(chunk(ChunkEncoding::Zeroes, 0, 700)).has_value());
  EXPECT_FALSE(
      decode_disk_chunk(chunk(ChunkEncoding::Zeroes, 0, kMaxDiskChunkBytes + 512)).has_value());
  // Data shorter or longer than the length says.
  EXPECT_FALSE(decode_disk_chunk(chunk(ChunkEncoding::Data, 0, 1536)).has_value());
  EXPECT_FALSE(decode_disk_chunk(chunk(ChunkEncoding::Data, 0, 512)).has_value());
  auto unknown = chunk(ChunkEncoding::Zeroes, 0, 512);
  unknown[4] = std::byte{7};
  EXPECT_FALSE(decode_disk_chunk(unknown).has_value());
  auto reserved = chunk(ChunkEncoding::Zeroes, 0, 512);
  reserved[20] = std::byte{1};
  EXPECT_FALSE(decode_disk_chunk(reserved).has_value());
  auto whole = chunk(ChunkEncoding::Data, 0, 1024);
  for (size_t size = 0; size < 24; ++size) {
    EXPECT_FALSE(decode_disk_chunk(std::span(whole).first(size)).has_value()) << size;
  }
}

}  // namespace
}  // namespace keel::migration
