#include "block/map.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include <fmt/format.h>

#include "block/qcow2/qcow2.h"
#include "block/raw/raw_file.h"

namespace keel::block {
namespace {

// A raw file's answer: data where the file has blocks, zeroes in its holes,
// both at the same offset in the file.
Result<MapEntry> raw_status(const RawFile& raw, uint64_t offset, uint64_t max_length) {
  MapEntry entry;
  entry.start = offset;
  entry.present = true;
  entry.has_offset = true;
  entry.offset = offset;
  const auto at = static_cast<off_t>(offset);
  const off_t data = ::lseek(raw.fd(), at, SEEK_DATA);
  if (data < 0 && errno == ENXIO) {  // a hole up to the end of the file
    entry.zero = true;
    entry.length = max_length;
    return entry;
  }
  if (data < 0 && errno != EINVAL && errno != EOPNOTSUPP) {
    return fail_errno(fmt::format("raw image {}: lseek SEEK_DATA at {}", raw.path(), offset));
  }
  if (data < 0) {  // the file system cannot tell: all data
    entry.data = true;
    entry.length = max_length;
    return entry;
  }
  if (data > at) {
    entry.zero = true;
    entry.length = std::min(max_length, static_cast<uint64_t>(data - at));
    return entry;
  }
  const off_t hole = ::lseek(raw.fd(), at, SEEK_HOLE);
  if (hole < 0) {
    return fail_errno(fmt::format("raw image {}: lseek SEEK_HOLE at {}", raw.path(), offset));
  }
  entry.data = true;
  entry.length = std::min(max_length, std::max<uint64_t>(static_cast<uint64_t>(hole - at), 1));
  return entry;
}

}  // namespace

bool MapEntry::continues_with(const MapEntry& next) const {
  if (next.start != start + length || next.depth != depth || next.present != present ||
      next.zero != zero || next.data != data || next.has_offset != has_offset ||
      next.file != file) {
    return false;
  }
  return !has_offset || next.offset == offset + length;
}

Result<MapEntry> map_at(BlockBackend& image, const std::string& path, uint64_t offset,
                        uint64_t max_length) {
  BlockBackend* layer = &image;
  std::string layer_path = path;
  uint32_t depth = 0;
  uint64_t length = max_length;
  while (true) {
    if (auto* raw = dynamic_cast<RawFile*>(layer)) {
      MapEntry entry = TRY(raw_status(*raw, offset, length));
      entry.depth = depth;
      entry.file = layer_path;
      return entry;
    }
    auto* qcow2 = dynamic_cast<qcow2::Qcow2Image*>(layer);
    if (qcow2 == nullptr) {
      return fail(Errc::Unsupported,
                  fmt::format("image {}: cannot map a {} image", layer_path, layer->format_name()));
    }
    const qcow2::Qcow2Image::Extent extent = TRY(qcow2->block_status(offset, length));
    MapEntry entry;
    entry.start = offset;
    entry.length = extent.length_bytes;
    entry.depth = depth;
    entry.file = layer_path;
    using Status = qcow2::Qcow2Image::Status;
    switch (extent.status) {
      case Status::Data:
        entry.present = entry.data = entry.has_offset = true;
        entry.offset = extent.host_offset;
        return entry;
      case Status::Compressed:
        entry.present = entry.data = true;
        return entry;
      case Status::Zero:
        entry.present = entry.zero = true;
        entry.has_offset = extent.host_offset != 0;
        entry.offset = extent.host_offset;
        return entry;
      case Status::Unallocated:
        break;
    }
    BlockBackend* backing = qcow2->backing();
    // Without a backing image, or past its end, the layer itself reads as
    // zeroes without having them allocated.
    if (backing == nullptr || offset >= backing->size_bytes()) {
      entry.zero = true;
      return entry;
    }
    length = std::min(extent.length_bytes, backing->size_bytes() - offset);
    layer_path = qcow2->backing_path();
    layer = backing;
    ++depth;
  }
}

}  // namespace keel::block
