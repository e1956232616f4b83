#include "block/qcow2/create.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "base/fd.h"
#include "block/qcow2/header.h"

namespace keel::block::qcow2 {

Result<void> create_image(const std::string& path, const CreateOptions& o) {
  const std::string what = fmt::format("qcow2 image {}", path);
  if (o.cluster_bits < kMinClusterBits || o.cluster_bits > kMaxClusterBits) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: cluster size {} (must be a power of two from 512 to 2 MiB)",
                            what, uint64_t{1} << o.cluster_bits));
  }
  if (o.version != 2 && o.version != 3) {
    return fail(Errc::InvalidArgument, fmt::format("{}: version {} (2 or 3)", what, o.version));
  }
  if (o.size_bytes % 512 != 0) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: size {} is not a multiple of 512", what, o.size_bytes));
  }
  if (o.backing_file.size() > kMaxBackingNameBytes) {
    return fail(Errc::InvalidArgument, fmt::format("{}: backing file name longer than {} bytes",
                                                   what, kMaxBackingNameBytes));
  }
  if (o.backing_format.size() > 64) {
    return fail(Errc::InvalidArgument, fmt::format("{}: backing format name too long", what));
  }
  const uint64_t cluster_size = uint64_t{1} << o.cluster_bits;
  const uint64_t l1_entries = l1_entries_for(o.size_bytes, o.cluster_bits);
  if (l1_entries * 8 > kMaxL1Bytes) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: size {} needs an L1 table over {} MiB; use larger clusters",
                            what, o.size_bytes, kMaxL1Bytes >> 20));
  }
  const uint64_t l1_clusters = std::max<uint64_t>(1, (l1_entries * 8 + cluster_size - 1) /
                                                         cluster_size);
  // 16-bit refcounts; the table and its blocks cover the metadata itself.
  const uint64_t per_block = cluster_size / 2;
  uint64_t table_clusters = 1;
  uint64_t block_count = 1;
  while (true) {
    const uint64_t total = 1 + table_clusters + block_count + l1_clusters;
    const uint64_t blocks = (total + per_block - 1) / per_block;
    const uint64_t tables = (blocks * 8 + cluster_size - 1) / cluster_size;
    if (blocks == block_count && tables == table_clusters) break;
    block_count = blocks;
    table_clusters = tables;
  }
  const uint64_t table_at = 1;
  const uint64_t blocks_at = table_at + table_clusters;
  const uint64_t l1_at = blocks_at + block_count;
  const uint64_t total = l1_at + l1_clusters;
  if (table_clusters * cluster_size > kMaxRefcountTableBytes) {
    return fail(Errc::InvalidArgument, fmt::format("{}: too large for its cluster size", what));
  }

  std::vector<std::byte> image(total * cluster_size);
  std::byte* h = image.data();
  store_be32(h, kMagic);
  store_be32(h + 4, o.version);
  store_be32(h + 20, o.cluster_bits);
  store_be64(h + 24, o.size_bytes);
  store_be32(h + 36, static_cast<uint32_t>(l1_entries));
  store_be64(h + 40, l1_at * cluster_size);
  store_be64(h + 48, table_at * cluster_size);
  store_be32(h + 56, static_cast<uint32_t>(table_clusters));
  uint64_t at = kV2HeaderBytes;
  if (o.version == 3) {
    store_be32(h + 96, 4);  // refcount_order: 16-bit refcounts
    store_be32(h + 100, kV3HeaderBytes);
    at = kV3HeaderBytes;
  }
  if (!o.backing_file.empty()) {
    if (!o.backing_format.empty() && o.version == 3) {
      store_be32(h + at, kExtBackingFormat);
      store_be32(h + at + 4, static_cast<uint32_t>(o.backing_format.size()));
      std::memcpy(h + at + 8, o.backing_format.data(), o.backing_format.size());
      at += 8 + ((o.backing_format.size() + 7) & ~size_t{7});
    }
    if (o.version == 3) at += 8;  // the end-of-extensions marker (zeroes)
    if (at + o.backing_file.size() > cluster_size) {
      return fail(Errc::InvalidArgument,
                  fmt::format("{}: backing file name does not fit the header cluster", what));
    }
    store_be64(h + 8, at);
    store_be32(h + 16, static_cast<uint32_t>(o.backing_file.size()));
    std::memcpy(h + at, o.backing_file.data(), o.backing_file.size());
  }
  for (uint64_t i = 0; i < block_count; ++i) {
    store_be64(h + table_at * cluster_size + i * 8, (blocks_at + i) * cluster_size);
  }
  for (uint64_t c = 0; c < total; ++c) {
    std::byte* block = h + (blocks_at + c / per_block) * cluster_size;
    store_be16(block + (c % per_block) * 2, 1);
  }

  Fd file = TRY_CONTEXT(Fd::open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644), what);
  TRY_CONTEXT(file.pwrite_all(image, 0), what);
  if (::fsync(file.get()) < 0) return fail_errno(fmt::format("{}: fsync", what));
  return ok();
}

Result<void> set_backing_file(const std::string& path, const std::string& backing_file,
                              const std::string& backing_format) {
  const std::string what = fmt::format("qcow2 image {}", path);
  if (backing_file.size() > kMaxBackingNameBytes) {
    return fail(Errc::InvalidArgument, fmt::format("{}: backing file name longer than {} bytes",
                                                   what, kMaxBackingNameBytes));
  }
  if (backing_format.size() > 64) {
    return fail(Errc::InvalidArgument, fmt::format("{}: backing format name too long", what));
  }
  Fd file = TRY_CONTEXT(Fd::open(path, O_RDWR), what);
  const uint64_t file_size = TRY_CONTEXT(file.size_bytes(), what);
  std::vector<std::byte> old(std::min<uint64_t>(file_size, kHeaderReadBytes));
  TRY_CONTEXT(file.pread_all(old, 0), what);
  const Header header = TRY(parse_header(old, file_size, path));
  if (header.corrupt()) {
    return fail(Errc::Corrupt, fmt::format("{}: marked corrupt; repair it first", what));
  }
  const uint64_t cluster_size = header.cluster_size();
  std::vector<std::byte> cluster(cluster_size);
  std::memcpy(cluster.data(), old.data(), header.header_length);
  // Keep every extension but the backing format. They run from the header's
  // end to an end marker, before the old backing file name if there is one
  // (a version 2 image may have its name right after the header).
  // (A file shorter than its first cluster ends the walk at its end.)
  const uint64_t limit = std::min<uint64_t>(
      header.backing_file_offset != 0 ? std::min(header.backing_file_offset, cluster_size)
                                      : cluster_size,
      old.size());
  uint64_t from = header.header_length;
  uint64_t at = header.header_length;
  while (from + 8 <= limit) {
    const uint32_t type = load_be32(old.data() + from);
    const uint32_t length = load_be32(old.data() + from + 4);
    if (type == kExtEnd) break;
    const uint64_t padded = (uint64_t{length} + 7) & ~uint64_t{7};
    if (padded > limit - from - 8) {
      return fail(Errc::Corrupt, fmt::format("{}: header extension {:#x} at {} runs past the "
                                             "header cluster",
                                             what, type, from));
    }
    if (type != kExtBackingFormat) {
      std::memcpy(cluster.data() + at, old.data() + from, 8 + padded);
      at += 8 + padded;
    }
    from += 8 + padded;
  }
  const uint64_t needed = at + 8 + ((backing_format.size() + 7) & ~size_t{7}) + 8 +
                          backing_file.size();
  if (needed > cluster_size) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: the backing file name does not fit the header cluster", what));
  }
  std::byte* h = cluster.data();
  if (!backing_file.empty() && !backing_format.empty()) {
    store_be32(h + at, kExtBackingFormat);
    store_be32(h + at + 4, static_cast<uint32_t>(backing_format.size()));
    std::memcpy(h + at + 8, backing_format.data(), backing_format.size());
    at += 8 + ((backing_format.size() + 7) & ~size_t{7});
  }
  at += 8;  // the end-of-extensions marker (zeroes)
  store_be64(h + 8, backing_file.empty() ? 0 : at);
  store_be32(h + 16, static_cast<uint32_t>(backing_file.size()));
  std::memcpy(h + at, backing_file.data(), backing_file.size());
  TRY_CONTEXT(file.pwrite_all(cluster, 0), what);
  if (::fsync(file.get()) < 0) return fail_errno(fmt::format("{}: fsync", what));
  return ok();
}

}  // namespace keel::block::qcow2
