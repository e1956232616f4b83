// qcow2 host cluster refcounts: the refcount table (kept in memory) and its
// refcount blocks (in a TableCache), and cluster allocation.
// Spec: QEMU docs/interop/qcow2.txt, "Host cluster management".
// Implemented: refcount widths 1..64 bits (refcount_order 0..6), reads,
// writes (write-through), first-fit allocation of contiguous runs, new
// refcount blocks, and growing the refcount table (a new table written
// elsewhere, then the header switched to it).
//
// Crash safety: a new refcount block is written and synced before the table
// entry that points at it; a grown table and its blocks are synced before the
// header points at them. allocate() changes refcounts in the cache only;
// callers write_back() and sync after allocate() and before they write an
// L1/L2 entry pointing at the new cluster (Qcow2Image::sync_file), so a crash
// can leak clusters but never leave a table pointing at a cluster whose
// refcount is 0. Every other change is written through at once.
#pragma once

#include <cstdint>
#include <vector>

#include "base/result.h"
#include "block/qcow2/header.h"
#include "block/qcow2/image_file.h"
#include "block/qcow2/l2_cache.h"

namespace keel::block::qcow2 {

class Refcounts {
 public:
  // Reads the refcount table; entries are checked when first used.
  static Result<Refcounts> load(ImageFile& file, const Header& header);

  Result<uint64_t> get(uint64_t cluster_index);
  // Writes one refcount (creating its refcount block, growing the table if
  // needed). value must fit refcount_bits; larger is an error.
  Result<void> set(uint64_t cluster_index, uint64_t value);
  Result<void> increment(uint64_t cluster_index);
  // Corrupt if the refcount is already 0.
  Result<void> decrement(uint64_t cluster_index);
  // Finds count contiguous free clusters and sets their refcounts to 1 (in
  // the cache: write_back() writes them); returns the first one's host offset.
  Result<uint64_t> allocate(uint64_t count);
  // Writes the refcount blocks allocate() changed (not synced).
  Result<void> write_back();

  uint64_t entries_per_block() const { return entries_per_block_; }
  uint64_t max_refcount() const { return max_refcount_; }
  uint64_t table_offset() const { return table_offset_; }
  uint64_t table_clusters() const;
  // The refcount block offsets, 0 where none is allocated.
  const std::vector<uint64_t>& table() const { return table_; }
  // Checked offset of the refcount block for table index, 0 if none.
  Result<uint64_t> block_offset(uint64_t table_index) const;

 private:
  Refcounts(ImageFile& file, const Header& header, std::vector<uint64_t> table);
  // Makes sure table_index has a refcount block, placing a new one at the
  // first cluster it covers (all of which are free), or the second if the
  // first is avoid_cluster.
  Result<uint64_t> ensure_block(uint64_t table_index, uint64_t avoid_cluster);
  Result<void> grow_table(uint64_t table_index);
  uint64_t decode(std::span<const std::byte> block, uint64_t index) const;
  // Encodes value into block and returns the byte range to write back.
  std::pair<uint64_t, uint64_t> encode(std::span<std::byte> block, uint64_t index,
                                       uint64_t value) const;

  ImageFile* file_;
  uint32_t cluster_bits_;
  uint32_t refcount_order_;
  uint64_t entries_per_block_;
  uint64_t max_refcount_;
  uint64_t table_offset_;
  std::vector<uint64_t> table_;
  TableCache blocks_;
  uint64_t free_hint_ = 0;  // no free cluster below this one
};

}  // namespace keel::block::qcow2
