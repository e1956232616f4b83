// qcow2 refcounts; see refcount.h for the status card.
#include "block/qcow2/refcount.h"

#include <algorithm>

#include <fmt/format.h>

namespace keel::block::qcow2 {
namespace {

constexpr uint64_t kBlockBudgetBytes = 1ull << 20;
constexpr uint64_t kTableEntryReserved = 0x1ff;

}  // namespace

Refcounts::Refcounts(ImageFile& file, const Header& header, std::vector<uint64_t> table)
    : file_(&file),
      cluster_bits_(header.cluster_bits),
      refcount_order_(header.refcount_order),
      entries_per_block_((header.cluster_size() * 8) >> header.refcount_order),
      max_refcount_(header.refcount_order == 6 ? ~uint64_t{0}
                                               : (uint64_t{1} << header.refcount_bits()) - 1),
      table_offset_(header.refcount_table_offset),
      table_(std::move(table)),
      blocks_(header.cluster_size(), kBlockBudgetBytes) {}

Result<Refcounts> Refcounts::load(ImageFile& file, const Header& header) {
  // parse_header checked the table's placement and its size limit.
  const uint64_t bytes = uint64_t{header.refcount_table_clusters} * header.cluster_size();
  std::vector<std::byte> raw(bytes);
  TRY(file.read(header.refcount_table_offset, raw));
  std::vector<uint64_t> table(bytes / 8);
  for (size_t i = 0; i < table.size(); ++i) table[i] = load_be64(raw.data() + i * 8);
  return Refcounts(file, header, std::move(table));
}

uint64_t Refcounts::table_clusters() const {
  return (table_.size() * 8) >> cluster_bits_;
}

Result<uint64_t> Refcounts::block_offset(uint64_t table_index) const {
  if (table_index >= table_.size()) return uint64_t{0};
  const uint64_t entry = table_[table_index];
  if (entry == 0) return uint64_t{0};
  const uint64_t cluster_size = uint64_t{1} << cluster_bits_;
  if ((entry & kTableEntryReserved) != 0 || entry % cluster_size != 0 ||
      entry >= kMaxHostOffset || entry >= file_->size_bytes()) {
    return fail(Errc::Corrupt,
                fmt::format("qcow2 image {}: refcount table entry {} ({:#x}) is unaligned or "
                            "outside the file",
                            file_->path(), table_index, entry));
  }
  return entry;
}

uint64_t Refcounts::decode(std::span<const std::byte> block, uint64_t index) const {
  const uint32_t bits = uint32_t{1} << refcount_order_;
  if (bits < 8) {
    const uint64_t bit = index * bits;
    const auto byte = static_cast<uint8_t>(block[bit / 8]);
    return (byte >> (bit % 8)) & ((1u << bits) - 1);
  }
  const size_t width = bits / 8;
  uint64_t value = 0;
  for (size_t i = 0; i < width; ++i) {
    value = (value << 8) | static_cast<uint8_t>(block[index * width + i]);
  }
  return value;
}

std::pair<uint64_t, uint64_t> Refcounts::encode(std::span<std::byte> block, uint64_t index,
                                                uint64_t value) const {
  const uint32_t bits = uint32_t{1} << refcount_order_;
  if (bits < 8) {
    const uint64_t bit = index * bits;
    const uint32_t mask = ((1u << bits) - 1) << (bit % 8);
    auto byte = static_cast<uint32_t>(static_cast<uint8_t>(block[bit / 8]));
    byte = (byte & ~mask) | ((static_cast<uint32_t>(value) << (bit % 8)) & mask);
    block[bit / 8] = std::byte(static_cast<uint8_t>(byte));
    return {bit / 8, 1};
  }
  const size_t width = bits / 8;
  for (size_t i = width; i > 0; --i) {
    block[index * width + i - 1] = std::byte(static_cast<uint8_t>(value));
    value = width > 1 ? value >> 8 : 0;
  }
  return {index * width, width};
}

Result<uint64_t> Refcounts::get(uint64_t cluster_index) {
  const uint64_t offset = TRY(block_offset(cluster_index / entries_per_block_));
  if (offset == 0) return uint64_t{0};
  std::span<std::byte> block = TRY(blocks_.get(*file_, offset));
  return decode(block, cluster_index % entries_per_block_);
}

Result<void> Refcounts::set(uint64_t cluster_index, uint64_t value) {
  if (value > max_refcount_) {
    return fail(Errc::Unsupported,
                fmt::format("qcow2 image {}: refcount of cluster {} would exceed {}",
                            file_->path(), cluster_index, max_refcount_));
  }
  const uint64_t offset = TRY(ensure_block(cluster_index / entries_per_block_, cluster_index));
  std::span<std::byte> block = TRY(blocks_.get(*file_, offset));
  auto [at, length] = encode(block, cluster_index % entries_per_block_, value);
  return file_->write(offset + at, block.subspan(at, length));
}

Result<void> Refcounts::increment(uint64_t cluster_index) {
  const uint64_t value = TRY(get(cluster_index));
  return set(cluster_index, value + 1 == 0 ? value : value + 1);
}

Result<void> Refcounts::decrement(uint64_t cluster_index) {
  const uint64_t value = TRY(get(cluster_index));
  if (value == 0) {
    return fail(Errc::Corrupt, fmt::format("qcow2 image {}: freeing cluster {} whose refcount "
                                           "is already 0",
                                           file_->path(), cluster_index));
  }
  TRY(set(cluster_index, value - 1));
  if (value == 1) free_hint_ = std::min(free_hint_, cluster_index);
  return ok();
}

Result<uint64_t> Refcounts::ensure_block(uint64_t table_index, uint64_t avoid_cluster) {
  if (table_index >= table_.size()) TRY(grow_table(table_index));
  const uint64_t existing = TRY(block_offset(table_index));
  if (existing != 0) return existing;
  // No block: every cluster it covers has refcount 0, so any of them is
  // free. Prefer one past the end of the file, in case a damaged image uses
  // clusters it forgot to count; never the header's.
  if (table_index == 0) {
    return fail(Errc::Corrupt, fmt::format("qcow2 image {}: no refcount block covers the header",
                                           file_->path()));
  }
  const uint64_t cluster_size = uint64_t{1} << cluster_bits_;
  const uint64_t covered_first = table_index * entries_per_block_;
  const uint64_t covered_end = covered_first + entries_per_block_;
  const uint64_t file_clusters = (file_->size_bytes() + cluster_size - 1) / cluster_size;
  uint64_t cluster = file_clusters < covered_end ? std::max(covered_first, file_clusters)
                                                 : covered_first;
  if (cluster == avoid_cluster) cluster = cluster + 1 < covered_end ? cluster + 1 : cluster - 1;
  const uint64_t offset = cluster << cluster_bits_;
  if (offset >= kMaxHostOffset) {
    return fail(Errc::OutOfRange, fmt::format("qcow2 image {}: no room for a refcount block",
                                              file_->path()));
  }
  std::vector<std::byte> block(cluster_size);
  (void)encode(block, cluster % entries_per_block_, 1);
  TRY(file_->write(offset, block));
  TRY(file_->sync());
  std::byte entry[8];
  store_be64(entry, offset);
  TRY(file_->write(table_offset_ + table_index * 8, entry));
  table_[table_index] = offset;
  blocks_.put(offset, block);
  return offset;
}

Result<void> Refcounts::grow_table(uint64_t table_index) {
  const uint64_t cluster_size = uint64_t{1} << cluster_bits_;
  const uint64_t per_cluster = cluster_size / 8;
  uint64_t new_entries = std::max<uint64_t>(table_index + 1, table_.size() * 2);
  new_entries = (new_entries + per_cluster - 1) / per_cluster * per_cluster;
  if (new_entries * 8 > kMaxRefcountTableBytes) {
    return fail(Errc::Unsupported,
                fmt::format("qcow2 image {}: the refcount table would exceed {} MiB",
                            file_->path(), kMaxRefcountTableBytes >> 20));
  }
  const uint64_t table_clusters = new_entries / per_cluster;
  // The new table and its blocks go past both the old table's reach and the
  // end of the file, where nothing lives.
  const uint64_t file_clusters = (file_->size_bytes() + cluster_size - 1) / cluster_size;
  const uint64_t first = std::max<uint64_t>(table_.size() * entries_per_block_, file_clusters);
  const uint64_t first_index = first / entries_per_block_;
  uint64_t block_count = 0;
  while (true) {
    const uint64_t last = first + table_clusters + block_count;  // one past the end
    const uint64_t needed = (last - 1) / entries_per_block_ - first_index + 1;
    if (needed == block_count) break;
    block_count = needed;
  }
  if (first_index + block_count > new_entries ||
      ((first + table_clusters + block_count) << cluster_bits_) >= kMaxHostOffset) {
    return fail(Errc::OutOfRange, fmt::format("qcow2 image {}: no room to grow the refcount "
                                              "table",
                                              file_->path()));
  }

  // Refcount blocks covering the new table and themselves.
  const uint64_t table_at = first;
  const uint64_t blocks_at = first + table_clusters;
  const uint64_t end = blocks_at + block_count;
  std::vector<std::byte> block(cluster_size);
  for (uint64_t j = 0; j < block_count; ++j) {
    std::fill(block.begin(), block.end(), std::byte{0});
    const uint64_t covered_first = (first_index + j) * entries_per_block_;
    for (uint64_t c = std::max(covered_first, table_at);
         c < std::min(covered_first + entries_per_block_, end); ++c) {
      (void)encode(block, c % entries_per_block_, 1);
    }
    TRY(file_->write((blocks_at + j) << cluster_bits_, block));
    blocks_.put((blocks_at + j) << cluster_bits_, block);
  }
  std::vector<uint64_t> table = table_;
  table.resize(new_entries, 0);
  for (uint64_t j = 0; j < block_count; ++j) table[first_index + j] = (blocks_at + j) << cluster_bits_;
  std::vector<std::byte> raw(new_entries * 8);
  for (uint64_t i = 0; i < new_entries; ++i) store_be64(raw.data() + i * 8, table[i]);
  TRY(file_->write(table_at << cluster_bits_, raw));
  TRY(file_->sync());

  // Switch the header to the new table: offset and cluster count together.
  std::byte fields[12];
  store_be64(fields, table_at << cluster_bits_);
  store_be32(fields + 8, static_cast<uint32_t>(table_clusters));
  TRY(file_->write(kRefcountTableOffsetField, fields));
  TRY(file_->sync());

  const uint64_t old_offset = table_offset_;
  const uint64_t old_clusters = this->table_clusters();
  table_ = std::move(table);
  table_offset_ = table_at << cluster_bits_;
  // The old table's clusters are free now; a crash before this only leaks them.
  for (uint64_t i = 0; i < old_clusters; ++i) {
    TRY(decrement((old_offset >> cluster_bits_) + i));
  }
  return ok();
}

Result<void> Refcounts::write_back() {
  return blocks_.write_back([this](uint64_t offset, std::span<const std::byte> block) {
    return file_->write(offset, block);
  });
}

Result<uint64_t> Refcounts::allocate(uint64_t count) {
  const uint64_t limit = kMaxHostOffset >> cluster_bits_;
  uint64_t start = free_hint_;
  uint64_t run = 0;
  uint64_t first_free = UINT64_MAX;
  for (uint64_t cluster = free_hint_; run < count; ++cluster) {
    if (cluster >= limit) {
      return fail(Errc::OutOfRange, fmt::format("qcow2 image {}: no free cluster below 64 PiB",
                                                file_->path()));
    }
    TRY(ensure_block(cluster / entries_per_block_, UINT64_MAX));
    // Past the end of the file nothing is in use whatever a (damaged)
    // refcount says, which also bounds the scan by the file's size.
    const uint64_t file_clusters =
        (file_->size_bytes() + (uint64_t{1} << cluster_bits_) - 1) >> cluster_bits_;
    if (cluster >= file_clusters || TRY(get(cluster)) == 0) {
      if (run == 0) start = cluster;
      first_free = std::min(first_free, cluster);
      ++run;
    } else {
      run = 0;
    }
  }
  // The blocks are written by write_back(), not here: a write to the image
  // file while io_uring writes data into it stalls on the inode lock
  // (bench/RESULTS.md), and a 1 MiB guest write allocates 16 clusters.
  for (uint64_t i = 0; i < count;) {
    const uint64_t cluster = start + i;
    const uint64_t offset = TRY(ensure_block(cluster / entries_per_block_, cluster));
    std::span<std::byte> block = TRY(blocks_.get(*file_, offset));
    do {
      (void)encode(block, (start + i) % entries_per_block_, 1);
      ++i;
    } while (i < count && (start + i) % entries_per_block_ != 0);
    blocks_.mark_dirty(offset);
  }
  // Dirty blocks are never evicted; keep them well below the cache's size.
  if (blocks_.dirty_count() * 2 >= blocks_.capacity()) TRY(write_back());
  // Free clusters skipped for a longer run stay findable.
  free_hint_ = first_free == start ? start + count : first_free;
  return start << cluster_bits_;
}

}  // namespace keel::block::qcow2
