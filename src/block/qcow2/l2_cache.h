// TableCache: a bounded LRU cache of one-cluster metadata tables (L2 tables
// and refcount blocks), keyed by their offset in the image file. Refcount
// blocks use it write-through (the file and the copy change together). L2
// tables may be marked dirty: updated here first and written back by the
// owner later (Qcow2Image::write_back, after the clusters they point at are
// on disk); dirty tables are never evicted, so the owner writes back before
// dirty_count() reaches capacity().
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <span>
#include <unordered_map>
#include <vector>

#include "base/result.h"
#include "block/qcow2/image_file.h"

namespace keel::block::qcow2 {

class TableCache {
 public:
  // Holds at most max(4, budget_bytes / table_bytes) tables.
  TableCache(uint64_t table_bytes, uint64_t budget_bytes);

  // The table at offset, read from file on a miss. The span stays valid
  // until the cache holds capacity() newer tables (at least three more
  // get() calls), so a caller may hold two at once.
  Result<std::span<std::byte>> get(const ImageFile& file, uint64_t offset);
  // Caches a table the caller just wrote in full.
  void put(uint64_t offset, std::span<const std::byte> table);
  void erase(uint64_t offset);
  // Dirty tables: changed here, not yet in the file.
  void mark_dirty(uint64_t offset);
  size_t dirty_count() const { return dirty_count_; }
  // Calls write(offset, table) for every dirty table, clearing each whose
  // write succeeded; stops at the first error.
  template <typename Write>
  Result<void> write_back(Write&& write) {
    for (Entry& entry : entries_) {
      if (!entry.dirty) continue;
      TRY(write(entry.offset, std::span<const std::byte>(entry.table)));
      entry.dirty = false;
      --dirty_count_;
    }
    return ok();
  }

  size_t capacity() const { return capacity_; }
  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    uint64_t offset;
    std::vector<std::byte> table;
    bool dirty = false;
  };
  std::span<std::byte> insert(uint64_t offset, std::vector<std::byte> table);

  uint64_t table_bytes_;
  size_t capacity_;
  size_t dirty_count_ = 0;
  std::list<Entry> entries_;  // most recently used first
  std::unordered_map<uint64_t, std::list<Entry>::iterator> index_;
};

}  // namespace keel::block::qcow2
