// One vCPU's dirty ring. Spec: Documentation/virt/kvm/api.rst,
// KVM_CAP_DIRTY_LOG_RING / KVM_CAP_DIRTY_LOG_RING_ACQ_REL and
// KVM_RESET_DIRTY_RINGS.
//
// KVM appends an entry (memory slot, page offset in it) each time the vCPU
// first writes a logged page, then sets the entry's DIRTY flag with release
// semantics. Userspace reads entries in order from its own fetch index,
// stops at the first one that is not DIRTY, and hands each harvested entry
// back by setting its RESET flag (release); KVM_RESET_DIRTY_RINGS then
// write-protects those pages again and clears the entries for reuse. The
// page's contents must be read after that reset: a write between the
// harvest and the reset is not logged again, but it lands before the read.
#pragma once

#include <atomic>
#include <cstdint>
#include <span>

#include "kvm/types.h"

namespace keel::kvm {

class DirtyRing {
 public:
  DirtyRing() = default;
  // entries: the ring as KVM shares it, a power-of-two number of entries.
  explicit DirtyRing(std::span<DirtyGfn> entries) : entries_(entries) {}

  bool enabled() const { return !entries_.empty(); }
  size_t size() const { return entries_.size(); }
  // Counts harvested entries from 0, wrapping with uint32_t as KVM's does.
  uint32_t fetch_index() const { return fetch_index_; }

  // Calls visit(slot, offset) for each entry KVM published since the last
  // harvest, in order, and marks it for KVM_RESET_DIRTY_RINGS. Both values
  // come from KVM on behalf of the guest: the caller checks them. Returns
  // how many entries it harvested (at most size(): a ring KVM keeps
  // filling while we read is finished on the next call). Not thread-safe:
  // one harvester at a time per ring.
  template <typename Visit>
  uint32_t harvest(Visit&& visit) {
    uint32_t harvested = 0;
    const size_t mask = entries_.size() - 1;
    while (harvested < entries_.size()) {
      DirtyGfn& entry = entries_[fetch_index_ & mask];
      std::atomic_ref<uint32_t> flags(entry.flags);
      // Acquire: slot and offset are KVM's before it published the flag.
      // Anything but exactly DIRTY (free, or already harvested and not
      // yet reset) ends what KVM has published so far.
      if ((flags.load(std::memory_order_acquire) & kDirtyGfnMask) != kDirtyGfnDirty) break;
      visit(entry.slot, entry.offset);
      flags.store(kDirtyGfnReset, std::memory_order_release);
      ++fetch_index_;
      ++harvested;
    }
    return harvested;
  }

 private:
  std::span<DirtyGfn> entries_;
  uint32_t fetch_index_ = 0;
};

}  // namespace keel::kvm
