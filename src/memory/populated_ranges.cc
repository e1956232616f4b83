#include "memory/populated_ranges.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include <fmt/format.h>

namespace keel::memory {
namespace {

// Adds [begin, end) to ranges, merged with the last one where they touch.
void append(std::vector<ByteRange>& ranges, uint64_t begin, uint64_t end) {
  if (end <= begin) return;
  if (!ranges.empty() && ranges.back().end >= begin) {
    ranges.back().end = std::max(ranges.back().end, end);
    return;
  }
  ranges.push_back({begin, end});
}

// pagemap entries, 8 bytes per page: bit 63 present in RAM, bit 62 swapped.
constexpr uint64_t kPagemapPresent = uint64_t{1} << 63;
constexpr uint64_t kPagemapSwapped = uint64_t{1} << 62;
// Entries read per pread: 64 Ki entries (512 KiB) cover 256 MiB of 4 KiB
// pages, so 8 GiB of guest RAM takes 32 reads.
constexpr size_t kPagemapBatch = size_t{64} << 10;

}  // namespace

Result<std::vector<ByteRange>> file_data_ranges(const Fd& file, uint64_t length,
                                                uint64_t page_bytes) {
  std::vector<ByteRange> ranges;
  uint64_t position = 0;
  while (position < length) {
    off_t start = ::lseek(file.get(), static_cast<off_t>(position), SEEK_DATA);
    if (start < 0 && errno == ENXIO) break;  // only a hole is left
    if (start < 0) {
      append(ranges, position, length);  // the file system cannot tell: all of it
      break;
    }
    off_t end = ::lseek(file.get(), start, SEEK_HOLE);
    if (end < 0) return fail_errno(fmt::format("lseek SEEK_HOLE at {}", start));
    const uint64_t begin = static_cast<uint64_t>(start) / page_bytes * page_bytes;
    uint64_t finish = (static_cast<uint64_t>(end) + page_bytes - 1) / page_bytes * page_bytes;
    finish = std::min(finish, length);
    append(ranges, std::min(begin, length), finish);
    position = std::max(finish, position + 1);
  }
  return ranges;
}

Result<std::vector<ByteRange>> resident_ranges(std::span<const std::byte> mapping) {
  const uint64_t page_bytes = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t start = reinterpret_cast<uintptr_t>(mapping.data());
  if (start % page_bytes != 0 || mapping.size() % page_bytes != 0) {
    return fail(Errc::InvalidArgument,
                fmt::format("resident ranges of {} bytes at {:#x}: not whole pages",
                            mapping.size(), start));
  }
  std::vector<ByteRange> ranges;
  if (mapping.empty()) return ranges;
  Fd pagemap = TRY(Fd::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  std::vector<uint64_t> entries(std::min<uint64_t>(kPagemapBatch, mapping.size() / page_bytes));
  const uint64_t pages = mapping.size() / page_bytes;
  for (uint64_t page = 0; page < pages;) {
    const size_t count = static_cast<size_t>(std::min<uint64_t>(entries.size(), pages - page));
    const off_t at = static_cast<off_t>((start / page_bytes + page) * sizeof(uint64_t));
    auto bytes = std::as_writable_bytes(std::span(entries).first(count));
    TRY_CONTEXT(pagemap.pread_all(bytes, static_cast<uint64_t>(at)), "read /proc/self/pagemap");
    for (size_t i = 0; i < count; ++i) {
      if ((entries[i] & (kPagemapPresent | kPagemapSwapped)) != 0) {
        const uint64_t offset = (page + i) * page_bytes;
        append(ranges, offset, offset + page_bytes);
      }
    }
    page += count;
  }
  return ranges;
}

}  // namespace keel::memory
