#include "block/dirty_tracker.h"

#include <gtest/gtest.h>

namespace keel::block {
namespace {

TEST(DirtyTrackerTest, ChunksCoverTheDiskWithAShortLastOne) {
  DirtyTracker tracker(10 * 1024 + 512, 4096);
  EXPECT_EQ(tracker.chunk_count(), 3u);
  EXPECT_EQ(tracker.chunk_length(0), 4096u);
  EXPECT_EQ(tracker.chunk_length(2), 2048u + 512u);
  EXPECT_EQ(tracker.chunk_offset(2), 8192u);
  EXPECT_EQ(tracker.chunk_length(3), 0u);
  EXPECT_EQ(tracker.dirty_count(), 0u);
}

TEST(DirtyTrackerTest, MarkTouchesEveryChunkOfTheRangeOnce) {
  DirtyTracker tracker(1 << 20, 4096);
  tracker.mark(4095, 2);  // straddles chunks 0 and 1
  tracker.mark(4096, 4096);
  tracker.mark(40960, 1);
  EXPECT_EQ(tracker.dirty_chunks(), (std::vector<uint64_t>{0, 1, 10}));
  EXPECT_EQ(tracker.dirty_count(), 3u);
  EXPECT_EQ(tracker.dirty_bytes(), 3u * 4096u);
  tracker.mark(100, 0);  // nothing
  EXPECT_EQ(tracker.dirty_count(), 3u);
}

TEST(DirtyTrackerTest, RangesPastTheEndAreClampedOrIgnored) {
  DirtyTracker tracker(3 * 4096, 4096);
  tracker.mark(3 * 4096, 4096);  // starts at the end
  tracker.mark(UINT64_MAX - 10, 100);
  EXPECT_EQ(tracker.dirty_count(), 0u);
  tracker.mark(2 * 4096 + 10, UINT64_MAX);
  EXPECT_EQ(tracker.dirty_chunks(), (std::vector<uint64_t>{2}));
}

TEST(DirtyTrackerTest, ClearReportsWhetherTheChunkWasDirty) {
  DirtyTracker tracker(130 * 4096, 4096);
  tracker.mark_all();
  EXPECT_EQ(tracker.dirty_count(), 130u);
  EXPECT_EQ(tracker.dirty_chunks().size(), 130u);
  EXPECT_EQ(tracker.dirty_chunks().back(), 129u);
  EXPECT_TRUE(tracker.clear(64));
  EXPECT_FALSE(tracker.clear(64));
  EXPECT_FALSE(tracker.clear(130));  // past the end
  EXPECT_EQ(tracker.dirty_count(), 129u);
  tracker.mark(64 * 4096, 1);  // written again after it was copied
  EXPECT_EQ(tracker.dirty_count(), 130u);
}

}  // namespace
}  // namespace keel::block
