#include "memory/populated_ranges.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "base/mmap.h"

namespace keel::memory {
namespace {

constexpr uint64_t kPage = 4096;

std::vector<ByteRange> pages(std::initializer_list<std::pair<uint64_t, uint64_t>> first_count) {
  std::vector<ByteRange> ranges;
  for (auto [first, count] : first_count) ranges.push_back({first * kPage, (first + count) * kPage});
  return ranges;
}

// 1 MiB of anonymous memory without hugepages, so that touching one page
// maps exactly that page.
Mmap small_pages_mapping() {
  Mmap mapping = *Mmap::anonymous(256 * kPage);
  EXPECT_EQ(::madvise(mapping.data(), mapping.size_bytes(), MADV_NOHUGEPAGE), 0);
  return mapping;
}

TEST(ResidentRangesTest, UntouchedAnonymousMemoryHasNone) {
  Mmap mapping = small_pages_mapping();
  Result<std::vector<ByteRange>> ranges = resident_ranges(mapping.bytes());
  ASSERT_TRUE(ranges) << ranges.error().message();
  EXPECT_TRUE(ranges->empty());
}

TEST(ResidentRangesTest, TouchedPagesAreFoundAndNeighboursMerged) {
  Mmap mapping = small_pages_mapping();
  for (uint64_t page : {0, 5, 6, 7, 100, 255}) mapping.data()[page * kPage + 17] = std::byte{1};
  Result<std::vector<ByteRange>> ranges = resident_ranges(mapping.bytes());
  ASSERT_TRUE(ranges) << ranges.error().message();
  EXPECT_EQ(*ranges, pages({{0, 1}, {5, 3}, {100, 1}, {255, 1}}));
  // A window of the mapping reports offsets from the window's start.
  Result<std::vector<ByteRange>> window =
      resident_ranges(mapping.bytes().subspan(4 * kPage, 10 * kPage));
  ASSERT_TRUE(window) << window.error().message();
  EXPECT_EQ(*window, pages({{1, 3}}));
}

TEST(ResidentRangesTest, ADiscardedPageReadsAsUntouched) {
  Mmap mapping = small_pages_mapping();
  std::memset(mapping.data() + 10 * kPage, 0x5a, 4 * kPage);
  ASSERT_EQ(::madvise(mapping.data() + 11 * kPage, 2 * kPage, MADV_DONTNEED), 0);
  Result<std::vector<ByteRange>> ranges = resident_ranges(mapping.bytes());
  ASSERT_TRUE(ranges) << ranges.error().message();
  EXPECT_EQ(*ranges, pages({{10, 1}, {13, 1}}));
}

TEST(ResidentRangesTest, RangesThatAreNotWholePagesAreRefused) {
  Mmap mapping = small_pages_mapping();
  Result<std::vector<ByteRange>> odd = resident_ranges(mapping.bytes().subspan(1, kPage));
  ASSERT_FALSE(odd);
  EXPECT_EQ(odd.error().code(), Errc::InvalidArgument);
  EXPECT_FALSE(resident_ranges(mapping.bytes().first(100)));
  EXPECT_TRUE(resident_ranges({}).value().empty());
}

TEST(FileDataRangesTest, AMemfdsDataExtentsInWholePages) {
  Fd file(::memfd_create("keel-populated-test", MFD_CLOEXEC));
  ASSERT_TRUE(file.valid());
  ASSERT_EQ(::ftruncate(file.get(), 64 * kPage), 0);
  Result<std::vector<ByteRange>> empty = file_data_ranges(file, 64 * kPage, kPage);
  ASSERT_TRUE(empty) << empty.error().message();
  EXPECT_TRUE(empty->empty());

  std::vector<std::byte> bytes(2 * kPage, std::byte{7});
  ASSERT_TRUE(file.pwrite_all(std::span(bytes).first(1), 3 * kPage + 5));  // one byte: whole page
  ASSERT_TRUE(file.pwrite_all(bytes, 20 * kPage));
  ASSERT_TRUE(file.pwrite_all(std::span(bytes).first(kPage), 63 * kPage));
  Result<std::vector<ByteRange>> ranges = file_data_ranges(file, 64 * kPage, kPage);
  ASSERT_TRUE(ranges) << ranges.error().message();
  EXPECT_EQ(*ranges, pages({{3, 1}, {20, 2}, {63, 1}}));
  // Only below length.
  Result<std::vector<ByteRange>> first = file_data_ranges(file, 21 * kPage, kPage);
  ASSERT_TRUE(first) << first.error().message();
  EXPECT_EQ(*first, pages({{3, 1}, {20, 1}}));

  ASSERT_EQ(::fallocate(file.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 20 * kPage, kPage),
            0);
  ranges = file_data_ranges(file, 64 * kPage, kPage);
  ASSERT_TRUE(ranges) << ranges.error().message();
  EXPECT_EQ(*ranges, pages({{3, 1}, {21, 1}, {63, 1}}));
}

}  // namespace
}  // namespace keel::memory
