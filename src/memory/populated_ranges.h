// Which parts of a piece of memory may hold data: what a snapshot writes and
// what a migration's first pass sends. The rest reads as zeros and costs
// nothing to skip. Two ways to learn it, one per kind of guest RAM:
//   - a file (the memfd backend): its data extents, lseek(SEEK_DATA/SEEK_HOLE);
//   - a private anonymous mapping: the pages the kernel has given it,
//     /proc/self/pagemap (Documentation/admin-guide/mm/pagemap.rst).
// Both may over-report (a page touched once and left zero, a read fault that
// mapped the shared zero page); neither may under-report.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/fd.h"
#include "base/result.h"

namespace keel::memory {

// [begin, end) byte offsets, begin < end.
struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;
  bool operator==(const ByteRange&) const = default;
};

// The ranges of file below length that hold data, in order, rounded out to
// whole pages of page_bytes; all of it where the file system cannot tell.
Result<std::vector<ByteRange>> file_data_ranges(const Fd& file, uint64_t length,
                                                uint64_t page_bytes);

// The ranges of mapping (page aligned, this process's) whose pages are
// present or swapped out, in order, as offsets from its start. A page is
// untouched only when pagemap says neither: mincore() would call a swapped
// page absent, and a snapshot would lose it.
Result<std::vector<ByteRange>> resident_ranges(std::span<const std::byte> mapping);

}  // namespace keel::memory
