// The migration stream's records for local disks copied with the machine
// (docs/migration-protocol.md, "Local disks"): a disk-info frame names the
// disks and their sizes once, then disk-chunk frames carry their contents,
// a chunk at a time, as data or as zeroes. Decoding checks the layout and
// bounds only; the destination checks chunks against what disk info said.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/result.h"

namespace keel::migration {

inline constexpr uint32_t kDiskRecordVersion = 1;
inline constexpr uint32_t kMaxMirroredDisks = 64;
// A chunk's data travels in one frame (kMaxFramePayloadBytes is 8 MiB).
inline constexpr uint32_t kMaxDiskChunkBytes = 4u << 20;

struct MirroredDisk {
  uint32_t index = 0;  // in the config's disk list (disk0, disk1, ...)
  uint64_t size_bytes = 0;
  bool operator==(const MirroredDisk&) const = default;
};

struct DiskInfo {
  uint32_t chunk_bytes = 0;  // every chunk but a disk's last is this long
  std::vector<MirroredDisk> disks;
  bool operator==(const DiskInfo&) const = default;
};
std::vector<std::byte> encode_disk_info(const DiskInfo& info);
Result<DiskInfo> decode_disk_info(std::span<const std::byte> payload);

enum class ChunkEncoding : uint32_t { Data = 0, Zeroes = 1 };

struct DiskChunk {
  uint32_t disk = 0;  // a MirroredDisk::index
  ChunkEncoding encoding = ChunkEncoding::Data;
  uint64_t offset = 0;  // bytes, a multiple of 512
  uint32_t length_bytes = 0;  // a multiple of 512, 1..kMaxDiskChunkBytes
  std::span<const std::byte> data;  // length_bytes of them for Data, none for Zeroes
};
std::vector<std::byte> encode_disk_chunk(const DiskChunk& chunk);
// chunk.data points into payload.
Result<DiskChunk> decode_disk_chunk(std::span<const std::byte> payload);

}  // namespace keel::migration
