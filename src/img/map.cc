// keel-img map: which ranges of an image hold data or zeroes, and in which
// file of its backing chain at what offset. The JSON is qemu-img map
// --output=json's, text for text (QEMU 7.2, qemu-img.c dump_map_entry), so
// scripts written for one read the other; the human table lists the ranges
// with data, as qemu-img's does.
#include <cinttypes>
#include <cstdio>

#include <fmt/format.h>

#include "block/image.h"
#include "block/map.h"
#include "img/commands.h"

namespace keel::img {
namespace {

void print_json(const block::MapEntry& e, bool first) {
  std::printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %" PRIu32
              ", \"present\": %s, \"zero\": %s, \"data\": %s",
              first ? "[" : ",\n", e.start, e.length, e.depth, e.present ? "true" : "false",
              e.zero ? "true" : "false", e.data ? "true" : "false");
  if (e.has_offset) std::printf(", \"offset\": %" PRIu64, e.offset);
  std::printf("}");
}

Result<void> print_human(const block::MapEntry& e) {
  if (e.data && !e.has_offset) {
    return fail(Errc::Unsupported,
                fmt::format("image {}: compressed clusters at {} have no offset to show; use "
                            "--output json",
                            e.file, e.start));
  }
  if (e.data && !e.zero) {
    std::printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e.start, e.length, e.offset,
                e.file.c_str());
  }
  return ok();
}

}  // namespace

Result<void> map(const MapArgs& args) {
  const bool json = args.output == "json";
  if (!json && args.output != "human") {
    return fail(Errc::InvalidArgument,
                fmt::format("map {}: --output '{}' (human or json)", args.file, args.output));
  }
  const block::ImageFormat format = TRY(block::parse_image_format(args.format));
  auto image = TRY(block::open_image(args.file, format, block::Access::ReadOnly, args.locking));
  const uint64_t size = image->size_bytes();
  if (!json) std::printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
  // Entries are printed merged: one line per run of equal ranges.
  std::optional<block::MapEntry> pending;
  bool first = true;
  auto emit = [&](const block::MapEntry& e) -> Result<void> {
    if (json) {
      print_json(e, first);
      first = false;
      return ok();
    }
    return print_human(e);
  };
  for (uint64_t pos = 0; pos < size;) {
    block::MapEntry entry = TRY(block::map_at(*image, args.file, pos, size - pos));
    pos += entry.length;
    if (pending && pending->continues_with(entry)) {
      pending->length += entry.length;
      continue;
    }
    if (pending) TRY(emit(*pending));
    pending = std::move(entry);
  }
  if (pending) TRY(emit(*pending));
  if (json) std::printf("%s]\n", first ? "[" : "");
  return ok();
}

}  // namespace keel::img
