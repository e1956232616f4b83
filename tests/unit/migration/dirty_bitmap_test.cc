#include "migration/dirty_bitmap.h"

#include <gtest/gtest.h>

#include <array>
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

// A dirty ring in plain memory, filled as KVM fills it: slot, offset, then
// the DIRTY flag; reset_by_kvm() plays KVM_RESET_DIRTY_RINGS.
class FakeRing {
 public:
  explicit FakeRing(size_t size) : entries_(size) {}
  kvm::DirtyRing ring() { return kvm::DirtyRing(entries_); }
  void push(uint32_t slot, uint64_t offset) {
    kvm::DirtyGfn& entry = entries_[dirty_index_++ % entries_.size()];
    ASSERT_EQ(entry.flags, 0u) << "KVM only reuses entries it reset";
    entry.slot = slot;
    entry.offset = offset;
    entry.flags = kvm::kDirtyGfnDirty;
  }
  // KVM resets, in order from its reset index, the entries marked RESET.
  uint32_t reset_by_kvm() {
    uint32_t reset = 0;
    while (reset_index_ != dirty_index_ &&
           (entries_[reset_index_ % entries_.size()].flags & kvm::kDirtyGfnReset) != 0) {
      entries_[reset_index_++ % entries_.size()].flags = 0;
      ++reset;
    }
    return reset;
  }
  uint32_t flags(size_t index) const { return entries_[index].flags; }

 private:
  std::vector<kvm::DirtyGfn> entries_;
  uint32_t dirty_index_ = 0;
  uint32_t reset_index_ = 0;
};

// Two slots as the machine lays them out: low RAM, then high RAM after it.
constexpr std::array<SlotPages, 2> kSlots = {SlotPages{.first_page = 0, .page_count = 100},
                                             SlotPages{.first_page = 100, .page_count = 28}};

TEST(DirtyRingHarvestTest, MarksEachEntrysPageByItsSlotAndMarksTheEntryForReset) {
  FakeRing fake(8);
  kvm::DirtyRing ring = fake.ring();
  fake.push(0, 5);
  fake.push(1, 0);
  fake.push(1, 27);
  DirtyBitmap dirty(128);
  RingHarvest harvest = harvest_ring(ring, kSlots, dirty);
  EXPECT_EQ(harvest.entries, 3u);
  EXPECT_EQ(harvest.rejected, 0u);
  EXPECT_EQ(runs_of(dirty), (Runs{{5, 1}, {100, 1}, {127, 1}}));
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(fake.flags(i), kvm::kDirtyGfnReset) << i;
  EXPECT_EQ(fake.flags(3), 0u);
  EXPECT_EQ(ring.fetch_index(), 3u);
  // Nothing new: nothing harvested, the entries wait for KVM's reset.
  EXPECT_EQ(harvest_ring(ring, kSlots, dirty).entries, 0u);
  EXPECT_EQ(fake.reset_by_kvm(), 3u);
}

TEST(DirtyRingHarvestTest, EntriesNamingNoRamAreCountedAndIgnored) {
  FakeRing fake(8);
  kvm::DirtyRing ring = fake.ring();
  fake.push(2, 0);                // no such slot
  fake.push(0, 100);              // one past slot 0's end
  fake.push(1, ~uint64_t{0});     // far past slot 1's end
  fake.push(1u << 16, 3);         // slot 0 of address space 1 (SMM): not ours
  fake.push(0xffffffff, 0);
  fake.push(0, 99);               // the last page of slot 0: fine
  DirtyBitmap dirty(128);
  RingHarvest harvest = harvest_ring(ring, kSlots, dirty);
  EXPECT_EQ(harvest.entries, 6u);
  EXPECT_EQ(harvest.rejected, 5u);
  EXPECT_EQ(runs_of(dirty), (Runs{{99, 1}}));
  // Rejected entries are handed back too, or the ring would fill up.
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(fake.flags(i), kvm::kDirtyGfnReset) << i;
}

TEST(DirtyRingHarvestTest, SlotsTooLargeForTheBitmapAreRejectedNotCrashed) {
  FakeRing fake(4);
  kvm::DirtyRing ring = fake.ring();
  fake.push(1, 27);  // page 127, but this bitmap has 120 pages
  DirtyBitmap dirty(120);
  EXPECT_EQ(harvest_ring(ring, kSlots, dirty).rejected, 1u);
  EXPECT_TRUE(dirty.empty());
}

TEST(DirtyRingHarvestTest, WrapsAroundTheRingInOrder) {
  FakeRing fake(4);
  kvm::DirtyRing ring = fake.ring();
  DirtyBitmap dirty(128);
  uint64_t page = 0;
  // Ten rounds of three entries over a ring of four: every round crosses
  // the end of the ring somewhere, and the fetch index keeps counting.
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < 3; ++i) fake.push(0, page++);
    RingHarvest harvest = harvest_ring(ring, kSlots, dirty);
    EXPECT_EQ(harvest.entries, 3u) << round;
    EXPECT_EQ(fake.reset_by_kvm(), 3u) << round;
  }
  EXPECT_EQ(ring.fetch_index(), 30u);
  EXPECT_EQ(runs_of(dirty), (Runs{{0, 30}}));
}

TEST(DirtyRingHarvestTest, AFullRingIsHarvestedWholeAndStopsAtEntriesNotYetReset) {
  FakeRing fake(4);
  kvm::DirtyRing ring = fake.ring();
  for (uint64_t page = 0; page < 4; ++page) fake.push(0, page);
  DirtyBitmap dirty(128);
  EXPECT_EQ(harvest_ring(ring, kSlots, dirty).entries, 4u);
  // Harvested but not reset by KVM: the next harvest must not take them
  // again (the fetch index is back at a RESET entry).
  EXPECT_EQ(harvest_ring(ring, kSlots, dirty).entries, 0u);
  EXPECT_EQ(fake.reset_by_kvm(), 4u);
  fake.push(0, 50);
  EXPECT_EQ(harvest_ring(ring, kSlots, dirty).entries, 1u);
  EXPECT_EQ(runs_of(dirty), (Runs{{0, 4}, {50, 1}}));
}

TEST(DirtyRingHarvestTest, AnEntryWithoutTheDirtyFlagEndsTheHarvest) {
  // KVM has claimed entry 1 but not yet published it; entry 2 is stale.
  std::vector<kvm::DirtyGfn> raw(8);
  raw[0] = {.flags = kvm::kDirtyGfnDirty, .slot = 0, .offset = 1};
  raw[1] = {.flags = 0, .slot = 0, .offset = 7};
  raw[2] = {.flags = kvm::kDirtyGfnDirty, .slot = 0, .offset = 8};
  kvm::DirtyRing ring(raw);
  DirtyBitmap dirty(128);
  EXPECT_EQ(harvest_ring(ring, kSlots, dirty).entries, 1u);
  EXPECT_EQ(runs_of(dirty), (Runs{{1, 1}}));
  EXPECT_EQ(raw[2].flags, kvm::kDirtyGfnDirty);
}

TEST(DirtyRingHarvestTest, ADisabledRingHarvestsNothing) {
  kvm::DirtyRing ring;
  EXPECT_FALSE(ring.enabled());
  DirtyBitmap dirty(128);
  EXPECT_EQ(harvest_ring(ring, kSlots, dirty).entries, 0u);
}

}  // namespace
}  // namespace keel::migration
