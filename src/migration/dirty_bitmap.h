// DirtyBitmap: which pages of guest RAM changed, one bit per 4 KiB page,
// numbered by offset in the RAM (GuestMemory::ram()), as the migration stream sends
// them. KVM's per-slot dirty logs and GuestMemory's VMM-side marks are
// merged into one; the sender walks it as runs of consecutive pages.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "kvm/dirty_ring.h"

namespace keel::migration {

class DirtyBitmap {
 public:
  explicit DirtyBitmap(uint64_t page_count)
      : page_count_(page_count), words_((page_count + 63) / 64, 0) {}

  uint64_t page_count() const { return page_count_; }
  bool test(uint64_t page) const;
  // Pages past the end are ignored (CHECKed: our own callers compute them).
  void set(uint64_t page);
  void set_range(uint64_t first_page, uint64_t count);
  void reset(uint64_t page);
  void set_all() { set_range(0, page_count_); }
  void clear();
  // ORs other (of the same size) into this.
  void merge(const DirtyBitmap& other);
  // ORs a bitmap of words whose bit 0 is page first_page (a KVM slot's log);
  // bits beyond page_count() are ignored.
  void merge_words(uint64_t first_page, std::span<const uint64_t> words);
  uint64_t count() const;
  bool empty() const { return count() == 0; }

  // Calls visit(first_page, count) for every run of set pages in order, no
  // run longer than max_run_pages (at least 1).
  void for_each_run(uint64_t max_run_pages,
                    const std::function<void(uint64_t, uint64_t)>& visit) const;

  // The raw words, for GuestMemory::take_dirty_pages.
  std::span<uint64_t> words() { return words_; }
  std::span<const uint64_t> words() const { return words_; }

 private:
  void trim();  // keeps the bits past page_count_ clear

  uint64_t page_count_;
  std::vector<uint64_t> words_;
};

// Where one KVM memory slot's pages sit in the RAM's page numbering.
struct SlotPages {
  uint64_t first_page = 0;
  uint64_t page_count = 0;
};

struct RingHarvest {
  uint64_t entries = 0;   // harvested from the ring, rejected ones included
  uint64_t rejected = 0;  // naming a slot or page that is not RAM
};

// Harvests a vCPU's dirty ring (kvm/dirty_ring.h) into dirty: an entry's
// slot indexes slots, its offset is a page of that slot. Both come from
// KVM, on behalf of the guest: an entry naming another address space, a
// slot not in slots or a page past its slot's end is counted as rejected
// (with a rate-limited log line) and otherwise ignored.
RingHarvest harvest_ring(kvm::DirtyRing& ring, std::span<const SlotPages> slots,
                         DirtyBitmap& dirty);

}  // namespace keel::migration
