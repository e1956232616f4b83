#include "migration/dirty_bitmap.h"

#include <algorithm>
#include <bit>

#include "base/check.h"
#include "base/log.h"

namespace keel::migration {

bool DirtyBitmap::test(uint64_t page) const {
  if (page >= page_count_) return false;
  return (words_[page / 64] >> (page % 64)) & 1;
}

void DirtyBitmap::set(uint64_t page) {
  CHECK(page < page_count_, "dirty page past the end of RAM");
  words_[page / 64] |= uint64_t{1} << (page % 64);
}

void DirtyBitmap::reset(uint64_t page) {
  CHECK(page < page_count_, "dirty page past the end of RAM");
  words_[page / 64] &= ~(uint64_t{1} << (page % 64));
}

void DirtyBitmap::set_range(uint64_t first_page, uint64_t count) {
  CHECK(first_page <= page_count_ && count <= page_count_ - first_page,
        "dirty range past the end of RAM");
  uint64_t page = first_page;
  uint64_t end = first_page + count;
  while (page < end && page % 64 != 0) set(page++);
  for (; page + 64 <= end; page += 64) words_[page / 64] = ~uint64_t{0};
  while (page < end) set(page++);
}

void DirtyBitmap::clear() {
  std::fill(words_.begin(), words_.end(), 0);
}

void DirtyBitmap::merge(const DirtyBitmap& other) {
  CHECK(other.page_count_ == page_count_, "merging dirty bitmaps of different sizes");
  for (size_t i = 0; i < words_.size(); ++i) words_[i] |= other.words_[i];
}

void DirtyBitmap::merge_words(uint64_t first_page, std::span<const uint64_t> words) {
  if (first_page % 64 == 0) {
    size_t base = first_page / 64;
    for (size_t i = 0; i < words.size() && base + i < words_.size(); ++i) {
      words_[base + i] |= words[i];
    }
    trim();
    return;
  }
  for (size_t i = 0; i < words.size(); ++i) {
    for (uint64_t bits = words[i]; bits != 0; bits &= bits - 1) {
      uint64_t page = first_page + i * 64 + static_cast<uint64_t>(std::countr_zero(bits));
      if (page < page_count_) set(page);
    }
  }
}

void DirtyBitmap::trim() {
  if (page_count_ % 64 != 0) words_.back() &= (uint64_t{1} << (page_count_ % 64)) - 1;
}

uint64_t DirtyBitmap::count() const {
  uint64_t total = 0;
  for (uint64_t word : words_) total += static_cast<uint64_t>(std::popcount(word));
  return total;
}

void DirtyBitmap::for_each_run(uint64_t max_run_pages,
                               const std::function<void(uint64_t, uint64_t)>& visit) const {
  CHECK(max_run_pages > 0, "runs of zero pages");
  uint64_t page = 0;
  while (page < page_count_) {
    uint64_t word = words_[page / 64] >> (page % 64);
    if (word == 0) {
      page = (page / 64 + 1) * 64;  // the rest of this word is clean
      continue;
    }
    page += static_cast<uint64_t>(std::countr_zero(word));
    uint64_t first = page;
    while (page < page_count_ && test(page) && page - first < max_run_pages) ++page;
    visit(first, page - first);
  }
}

RingHarvest harvest_ring(kvm::DirtyRing& ring, std::span<const SlotPages> slots,
                         DirtyBitmap& dirty) {
  RingHarvest result;
  result.entries = ring.harvest([&](uint32_t slot, uint64_t offset) {
    // The slot's upper 16 bits are its address space (api.rst): ours is 0,
    // so such an entry is past the end of slots like any unknown slot.
    const bool known = slot < slots.size() && offset < slots[slot].page_count &&
                       slots[slot].first_page + offset < dirty.page_count();
    if (!known) {
      ++result.rejected;
      LOG_RATELIMITED(warn, "dirty ring: entry for slot {:#x} page {:#x} is not guest RAM; ignored",
                      slot, offset);
      return;
    }
    dirty.set(slots[slot].first_page + offset);
  });
  return result;
}

}  // namespace keel::migration
