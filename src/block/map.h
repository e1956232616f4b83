// What each range of a disk image is and where its bytes live, through the
// whole backing chain: keel-img map, and convert skipping what reads as
// zeroes. The answers follow qemu-img map's (QEMU qemu-img.c, "map"): each
// layer is asked in turn from the top, and the first that says "data" or
// "zero" decides; qcow2 clusters from their L2 entries, raw files from
// lseek(SEEK_DATA/SEEK_HOLE).
#pragma once

#include <cstdint>
#include <string>

#include "base/result.h"
#include "block/block_backend.h"

namespace keel::block {

struct MapEntry {
  uint64_t start = 0;
  uint64_t length = 0;
  uint32_t depth = 0;     // 0: the image itself, 1: its backing image, ...
  bool present = false;   // allocated in (or synthesized by) the layer at depth
  bool zero = false;      // reads as zeroes
  bool data = false;      // data (compressed data has no offset)
  bool has_offset = false;
  uint64_t offset = 0;    // in file, where has_offset
  std::string file;       // the path of the layer at depth

  // Whether next continues this entry (qemu-img map's merge rule: the same
  // attributes, and contiguous offsets where they have offsets).
  bool continues_with(const MapEntry& next) const;
};

// The entry at offset, at most max_length bytes long. image is a backend
// open_image made (qcow2 chains and raw files); path is its own path.
Result<MapEntry> map_at(BlockBackend& image, const std::string& path, uint64_t offset,
                        uint64_t max_length);

}  // namespace keel::block
