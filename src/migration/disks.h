// Which disk images a snapshot was taken with, so a restore can refuse
// disks that changed since (docs/snapshot-format.md, "disks section"): a
// guest's RAM holds caches of its disks, and a different or modified image
// under it would be corrupted.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace keel::migration {

struct DiskIdentity {
  std::string path;
  uint64_t size_bytes = 0;
  uint64_t device = 0;  // st_dev and st_ino: the same file, not a copy
  uint64_t inode = 0;
  int64_t modified_ns = 0;  // st_mtime: untouched since
  bool operator==(const DiskIdentity&) const = default;
};

// stat()s the image at path.
Result<DiskIdentity> identify_disk(const std::string& path);
// Refuses the first disk that is missing, replaced, resized or modified
// since the snapshot, naming it and what changed.
Result<void> check_disks_unchanged(std::span<const DiskIdentity> saved);

std::vector<std::byte> encode_disks(std::span<const DiskIdentity> disks);
Result<std::vector<DiskIdentity>> decode_disks(std::span<const std::byte> payload,
                                               std::string_view label);

}  // namespace keel::migration
