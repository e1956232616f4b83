#include "block/qcow2/l2_cache.h"

#include <algorithm>
#include <cstring>

namespace keel::block::qcow2 {

TableCache::TableCache(uint64_t table_bytes, uint64_t budget_bytes)
    : table_bytes_(table_bytes),
      capacity_(static_cast<size_t>(std::max<uint64_t>(4, budget_bytes / table_bytes))) {}

Result<std::span<std::byte>> TableCache::get(const ImageFile& file, uint64_t offset) {
  auto it = index_.find(offset);
  if (it != index_.end()) {
    entries_.splice(entries_.begin(), entries_, it->second);
    return std::span<std::byte>(it->second->table);
  }
  std::vector<std::byte> table(table_bytes_);
  TRY(file.read(offset, table));
  return insert(offset, std::move(table));
}

void TableCache::put(uint64_t offset, std::span<const std::byte> table) {
  auto it = index_.find(offset);
  if (it != index_.end()) {
    std::memcpy(it->second->table.data(), table.data(), std::min<size_t>(table.size(),
                                                                         table_bytes_));
    entries_.splice(entries_.begin(), entries_, it->second);
    return;
  }
  std::vector<std::byte> copy(table_bytes_);
  std::memcpy(copy.data(), table.data(), std::min<size_t>(table.size(), table_bytes_));
  (void)insert(offset, std::move(copy));
}

void TableCache::erase(uint64_t offset) {
  auto it = index_.find(offset);
  if (it == index_.end()) return;
  if (it->second->dirty) --dirty_count_;
  entries_.erase(it->second);
  index_.erase(it);
}

void TableCache::mark_dirty(uint64_t offset) {
  auto it = index_.find(offset);
  CHECK(it != index_.end(), "TableCache::mark_dirty on a table not in the cache");
  if (!it->second->dirty) ++dirty_count_;
  it->second->dirty = true;
}

std::span<std::byte> TableCache::insert(uint64_t offset, std::vector<std::byte> table) {
  // Evict the least recently used clean tables; dirty ones stay (the owner
  // bounds how many there are).
  auto victim = entries_.end();
  while (entries_.size() >= capacity_ && victim != entries_.begin()) {
    --victim;
    if (victim->dirty) continue;
    index_.erase(victim->offset);
    victim = entries_.erase(victim);
  }
  entries_.push_front(Entry{offset, std::move(table)});
  index_[offset] = entries_.begin();
  return std::span<std::byte>(entries_.front().table);
}

}  // namespace keel::block::qcow2
