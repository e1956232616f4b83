#include "migration/disk_records.h"

#include <fmt/format.h>

#include "base/bytes.h"

namespace keel::migration {
namespace {

Result<void> check_version(ByteReader& in, std::string_view frame) {
  auto version = TRY_CONTEXT(in.get<uint32_t>("version"), frame);
  if (version != kDiskRecordVersion) {
    return fail(Errc::Unsupported, fmt::format("{}: version {}, this Keel reads {}", frame, version,
                                               kDiskRecordVersion));
  }
  return ok();
}

Result<void> check_consumed(const ByteReader& in, std::string_view frame) {
  if (in.remaining() != 0) {
    return fail(Errc::Corrupt, fmt::format("{}: {} bytes too many", frame, in.remaining()));
  }
  return ok();
}

}  // namespace

std::vector<std::byte> encode_disk_info(const DiskInfo& info) {
  ByteWriter out;
  out.put(kDiskRecordVersion);
  out.put(info.chunk_bytes);
  out.put(static_cast<uint32_t>(info.disks.size()));
  for (const MirroredDisk& disk : info.disks) {
    out.put(disk.index);
    out.put(uint32_t{0});
    out.put(disk.size_bytes);
  }
  return std::move(out.data());
}

Result<DiskInfo> decode_disk_info(std::span<const std::byte> payload) {
  constexpr std::string_view kFrame = "disk info frame";
  ByteReader in(payload);
  TRY(check_version(in, kFrame));
  DiskInfo info;
  info.chunk_bytes = TRY_CONTEXT(in.get<uint32_t>("chunk bytes"), kFrame);
  if (info.chunk_bytes == 0 || info.chunk_bytes % 512 != 0 ||
      info.chunk_bytes > kMaxDiskChunkBytes) {
    return fail(Errc::Corrupt, fmt::format("{}: chunk size {} (a multiple of 512, at most {})",
                                           kFrame, info.chunk_bytes, kMaxDiskChunkBytes));
  }
  auto count = TRY_CONTEXT(in.get<uint32_t>("disk count"), kFrame);
  if (count == 0 || count > kMaxMirroredDisks) {
    return fail(Errc::Corrupt, fmt::format("{}: {} disks (1-{})", kFrame, count, kMaxMirroredDisks));
  }
  for (uint32_t n = 0; n < count; ++n) {
    MirroredDisk disk;
    disk.index = TRY_CONTEXT(in.get<uint32_t>("disk index"), kFrame);
    auto reserved = TRY_CONTEXT(in.get<uint32_t>("reserved"), kFrame);
    disk.size_bytes = TRY_CONTEXT(in.get<uint64_t>("disk size"), kFrame);
    if (reserved != 0) {
      return fail(Errc::Corrupt, fmt::format("{}: disk {}: reserved word {}", kFrame, disk.index,
                                             reserved));
    }
    if (disk.size_bytes % 512 != 0) {
      return fail(Errc::Corrupt, fmt::format("{}: disk {}: size {} is not a multiple of 512",
                                             kFrame, disk.index, disk.size_bytes));
    }
    for (const MirroredDisk& earlier : info.disks) {
      if (earlier.index == disk.index) {
        return fail(Errc::Corrupt, fmt::format("{}: disk {} twice", kFrame, disk.index));
      }
    }
    info.disks.push_back(disk);
  }
  TRY(check_consumed(in, kFrame));
  return info;
}

std::vector<std::byte> encode_disk_chunk(const DiskChunk& chunk) {
  ByteWriter out;
  out.put(chunk.disk);
  out.put(static_cast<uint32_t>(chunk.encoding));
  out.put(chunk.offset);
  out.put(chunk.length_bytes);
  out.put(uint32_t{0});
  if (chunk.encoding == ChunkEncoding::Data) out.put_bytes(chunk.data);
  return std::move(out.data());
}

Result<DiskChunk> decode_disk_chunk(std::span<const std::byte> payload) {
  constexpr std::string_view kFrame = "disk chunk frame";
  ByteReader in(payload);
  DiskChunk chunk;
  chunk.disk = TRY_CONTEXT(in.get<uint32_t>("disk index"), kFrame);
  auto encoding = TRY_CONTEXT(in.get<uint32_t>("encoding"), kFrame);
  chunk.offset = TRY_CONTEXT(in.get<uint64_t>("offset"), kFrame);
  chunk.length_bytes = TRY_CONTEXT(in.get<uint32_t>("length"), kFrame);
  auto reserved = TRY_CONTEXT(in.get<uint32_t>("reserved"), kFrame);
  if (reserved != 0) {
    return fail(Errc::Corrupt, fmt::format("{}: reserved word {}", kFrame, reserved));
  }
  if (chunk.offset % 512 != 0 || chunk.length_bytes == 0 || chunk.length_bytes % 512 != 0 ||
      chunk.length_bytes > kMaxDiskChunkBytes) {
    return fail(Errc::Corrupt, fmt::format("{}: disk {}: offset {} length {} (multiples of 512, "
                                           "length 512-{})",
                                           kFrame, chunk.disk, chunk.offset, chunk.length_bytes,
                                           kMaxDiskChunkBytes));
  }
  switch (encoding) {
    case static_cast<uint32_t>(ChunkEncoding::Data):
      chunk.encoding = ChunkEncoding::Data;
      chunk.data = TRY_CONTEXT(in.get_bytes(chunk.length_bytes, "data"), kFrame);
      break;
    case static_cast<uint32_t>(ChunkEncoding::Zeroes):
      chunk.encoding = ChunkEncoding::Zeroes;
      break;
    default:
      return fail(Errc::Corrupt, fmt::format("{}: unknown encoding {}", kFrame, encoding));
  }
  TRY(check_consumed(in, kFrame));
  return chunk;
}

}  // namespace keel::migration
