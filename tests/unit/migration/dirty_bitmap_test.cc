#include "migration/dirty_bitmap.h"

#include <gtest/gtest.h>

#include <utility>
#include <vector>

namespace keel::migration {
namespace {

using Runs = std::vector<std::pair<uint64_t, uint64_t>>;

Runs runs_of(const DirtyBitmap& bitmap, uint64_t max_run = 1 << 20) {
  Runs runs;
  bitmap.for_each_run(max_run,
                      [&](uint64_t first, uint64_t count) { runs.emplace_back(first, count); });
  return runs;
}

TEST(DirtyBitmapTest, StartsClean) {
  DirtyBitmap bitmap(1000);
  EXPECT_EQ(bitmap.count(), 0u);
  EXPECT_TRUE(bitmap.empty());
  EXPECT_TRUE(runs_of(bitmap).empty());
}

TEST(DirtyBitmapTest, SetsAndCountsPages) {
  DirtyBitmap bitmap(200);
  bitmap.set(0);
  bitmap.set(63);
  bitmap.set(64);
  bitmap.set(199);
  EXPECT_EQ(bitmap.count(), 4u);
  EXPECT_TRUE(bitmap.test(63));
  EXPECT_FALSE(bitmap.test(62));
  EXPECT_FALSE(bitmap.test(200));  // past the end reads clean
  bitmap.clear();
  EXPECT_EQ(bitmap.count(), 0u);
}

TEST(DirtyBitmapTest, RangesCrossWordBoundaries) {
  DirtyBitmap bitmap(300);
  bitmap.set_range(60, 140);  // pages 60..199
  EXPECT_EQ(bitmap.count(), 140u);
  EXPECT_FALSE(bitmap.test(59));
  EXPECT_TRUE(bitmap.test(60));
  EXPECT_TRUE(bitmap.test(199));
  EXPECT_FALSE(bitmap.test(200));
  bitmap.set_all();
  EXPECT_EQ(bitmap.count(), 300u);
}

TEST(DirtyBitmapTest, IteratesRunsInOrder) {
  DirtyBitmap bitmap(256);
  bitmap.set_range(3, 2);
  bitmap.set_range(62, 5);  // across a word boundary
  bitmap.set(255);
  EXPECT_EQ(runs_of(bitmap), (Runs{{3, 2}, {62, 5}, {255, 1}}));
}

TEST(DirtyBitmapTest, SplitsLongRuns) {
  DirtyBitmap bitmap(100);
  bitmap.set_range(10, 25);
  EXPECT_EQ(runs_of(bitmap, 10), (Runs{{10, 10}, {20, 10}, {30, 5}}));
}

TEST(DirtyBitmapTest, MergesBitmaps) {
  DirtyBitmap a(130);
  DirtyBitmap b(130);
  a.set(1);
  b.set(1);
  b.set(129);
  a.merge(b);
  EXPECT_EQ(a.count(), 2u);
  EXPECT_TRUE(a.test(129));
}

TEST(DirtyBitmapTest, MergesSlotLogsAtAnOffset) {
  DirtyBitmap bitmap(200);
  std::vector<uint64_t> slot = {0b101, uint64_t{1} << 63};
  bitmap.merge_words(64, slot);  // aligned: pages 64, 66, 191
  EXPECT_EQ(runs_of(bitmap), (Runs{{64, 1}, {66, 1}, {191, 1}}));
  bitmap.clear();
  bitmap.merge_words(10, slot);  // unaligned: pages 10, 12, 137
  EXPECT_EQ(runs_of(bitmap), (Runs{{10, 1}, {12, 1}, {137, 1}}));
}

TEST(DirtyBitmapTest, IgnoresSlotBitsPastTheEnd) {
  DirtyBitmap bitmap(70);
  std::vector<uint64_t> slot = {~uint64_t{0}, ~uint64_t{0}};
  bitmap.merge_words(0, slot);
  EXPECT_EQ(bitmap.count(), 70u);
  bitmap.clear();
  bitmap.merge_words(60, slot);
  EXPECT_EQ(bitmap.count(), 10u);
  EXPECT_EQ(runs_of(bitmap), (Runs{{60, 10}}));
}

}  // namespace
}  // namespace keel::migration
