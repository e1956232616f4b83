// qcow2 metadata check; see check.h for the status card.
#include "block/qcow2/check.h"

#include <sys/stat.h>

#include <algorithm>
#include <unordered_set>

#include <fmt/format.h>

#include "base/fd.h"
#include "block/qcow2/header.h"
#include "block/qcow2/image_file.h"
#include "block/qcow2/qcow2.h"
#include "block/qcow2/refcount.h"

namespace keel::block::qcow2 {
namespace {

constexpr size_t kMaxMessages = 2000;
constexpr uint64_t kMaxSnapshotTableBytes = 64ull << 20;

class Checker {
 public:
  Checker(ImageFile& file, const Header& header)
      : file_(file),
        header_(header),
        cluster_size_(header.cluster_size()),
        file_clusters_((file.size_bytes() + cluster_size_ - 1) / cluster_size_),
        references_(file_clusters_, 0) {}

  Result<CheckReport> run() {
    report_.total_clusters = (header_.size_bytes + cluster_size_ - 1) / cluster_size_;
    reference(0, cluster_size_, "the header");
    TRY(check_l1(header_.l1_table_offset, header_.l1_size, true, "the active L1 table"));
    TRY(check_snapshots());
    reference(header_.refcount_table_offset,
              uint64_t{header_.refcount_table_clusters} * cluster_size_, "the refcount table");
    Refcounts refcounts = TRY(Refcounts::load(file_, header_));
    for (uint64_t i = 0; i < refcounts.table().size(); ++i) {
      auto block = refcounts.block_offset(i);
      if (!block) {
        problem(true, block.error().context());
        continue;
      }
      if (*block != 0) reference(*block, cluster_size_, fmt::format("refcount block {}", i));
    }
    for (uint64_t c = 0; c < file_clusters_; ++c) {
      auto stored = refcounts.get(c);
      if (!stored) {
        problem(true, stored.error().context());
        continue;
      }
      const uint64_t expected = references_[c];
      if (expected > 0) report_.image_end_offset = (c + 1) * cluster_size_;
      if (*stored < expected) {
        problem(true, fmt::format("ERROR cluster {} refcount={} reference={}", c, *stored,
                                  expected));
      } else if (*stored > expected) {
        problem(false, fmt::format("Leaked cluster {} refcount={} reference={}", c, *stored,
                                   expected));
        report_.leaked.push_back({c, *stored, expected});
      }
      if (copied_.contains(c) && *stored != 1) {
        problem(true, fmt::format("ERROR copied flag set on cluster {} with refcount={}", c,
                                  *stored));
      }
    }
    return std::move(report_);
  }

 private:
  void problem(bool corruption, std::string message) {
    ++(corruption ? report_.corruptions : report_.leaks);
    if (report_.messages.size() < kMaxMessages) report_.messages.push_back(std::move(message));
  }

  // Counts one reference on every cluster of [offset, offset + length).
  bool reference(uint64_t offset, uint64_t length, std::string_view what) {
    if (length == 0) return true;
    if (offset >= file_.size_bytes() || length > file_.size_bytes() - offset) {
      // A table's tail past the end of file reads as zeroes; data may not.
      if (offset >= file_.size_bytes()) {
        problem(true, fmt::format("ERROR {} at {:#x} is past the end of the file", what, offset));
        return false;
      }
      length = file_.size_bytes() - offset;
    }
    for (uint64_t c = offset / cluster_size_; c <= (offset + length - 1) / cluster_size_; ++c) {
      ++references_[c];
    }
    return true;
  }

  Result<void> check_l1(uint64_t offset, uint64_t entries, bool active, std::string_view what) {
    if (entries == 0) return ok();
    if (offset % cluster_size_ != 0 || entries * 8 > kMaxL1Bytes) {
      problem(true, fmt::format("ERROR {} at {:#x} ({} entries) is unaligned or too large", what,
                                offset, entries));
      return ok();
    }
    // One table reached twice is damage; walking it again could repeat
    // without end in a hostile image.
    if (!l1_tables_.insert(offset).second) {
      problem(true, fmt::format("ERROR {} at {:#x} is used twice", what, offset));
      return ok();
    }
    if (!reference(offset, entries * 8, what)) return ok();
    std::unordered_set<uint64_t> seen_l2;
    std::vector<std::byte> raw(entries * 8);
    TRY(file_.read(offset, raw));
    std::vector<std::byte> table(cluster_size_);
    for (uint64_t i = 0; i < entries; ++i) {
      const uint64_t entry = load_be64(raw.data() + i * 8);
      const uint64_t l2 = entry & kEntryOffsetMask;
      if (l2 == 0) continue;
      if (l2 % cluster_size_ != 0) {
        problem(true, fmt::format("ERROR {} entry {} ({:#x}) is unaligned", what, i, entry));
        continue;
      }
      if (!reference(l2, cluster_size_, fmt::format("the L2 table of {} entry {}", what, i))) {
        continue;
      }
      if (!seen_l2.insert(l2).second) {
        problem(true, fmt::format("ERROR {} entry {}: L2 table {:#x} appears twice", what, i, l2));
        continue;
      }
      if (active && (entry & kEntryCopied) != 0) copied_.insert(l2 / cluster_size_);
      TRY(file_.read(l2, table));
      check_l2(table, l2, active);
    }
    return ok();
  }

  void check_l2(std::span<const std::byte> table, uint64_t l2, bool active) {
    const uint32_t cluster_bits = header_.cluster_bits;
    for (uint64_t j = 0; j < cluster_size_ / 8; ++j) {
      const uint64_t entry = load_be64(table.data() + j * 8);
      const std::string what = fmt::format("L2 table {:#x} entry {}", l2, j);
      if ((entry & kEntryCompressed) != 0) {
        const uint32_t size_bits = cluster_bits - 8;
        const uint32_t shift = 62 - size_bits;
        const uint64_t host = entry & ((uint64_t{1} << shift) - 1);
        const uint64_t sectors = ((entry >> shift) & ((uint64_t{1} << size_bits) - 1)) + 1;
        const uint64_t start = host & ~uint64_t{511};
        reference(start, sectors * 512, what);
        if (active) ++report_.allocated_clusters;
        if ((entry & kEntryCopied) != 0) {
          problem(true, fmt::format("ERROR {}: compressed cluster with the copied flag", what));
        }
        continue;
      }
      const uint64_t host = entry & kEntryOffsetMask;
      if (host == 0) continue;
      if (host % cluster_size_ != 0) {
        problem(true, fmt::format("ERROR {} ({:#x}) is unaligned", what, entry));
        continue;
      }
      if (!reference(host, cluster_size_, what)) continue;
      if (active && (entry & kEntryZero) == 0) ++report_.allocated_clusters;
      if (active && (entry & kEntryCopied) != 0) copied_.insert(host / cluster_size_);
    }
  }

  Result<void> check_snapshots() {
    if (header_.nb_snapshots == 0) return ok();
    // Entries: 40 fixed bytes, extra data, id, name, padded to 8.
    uint64_t at = header_.snapshots_offset;
    const uint64_t start = at;
    for (uint32_t i = 0; i < header_.nb_snapshots; ++i) {
      std::byte fixed[40];
      if (at + sizeof fixed > file_.size_bytes() || at - start > kMaxSnapshotTableBytes) {
        problem(true, fmt::format("ERROR snapshot table entry {} runs past the end of the file",
                                  i));
        return ok();
      }
      TRY(file_.read(at, fixed));
      const uint64_t l1_offset = load_be64(fixed);
      const uint32_t l1_size = load_be32(fixed + 8);
      const uint32_t id_bytes = (static_cast<uint32_t>(fixed[12]) << 8) |
                                static_cast<uint32_t>(fixed[13]);
      const uint32_t name_bytes = (static_cast<uint32_t>(fixed[14]) << 8) |
                                  static_cast<uint32_t>(fixed[15]);
      const uint32_t extra_bytes = load_be32(fixed + 36);
      if (extra_bytes > (1u << 16)) {
        problem(true, fmt::format("ERROR snapshot {} has {} bytes of extra data", i, extra_bytes));
        return ok();
      }
      TRY(check_l1(l1_offset, l1_size, false, fmt::format("the L1 table of snapshot {}", i)));
      at += (40 + uint64_t{extra_bytes} + id_bytes + name_bytes + 7) & ~uint64_t{7};
    }
    reference(start, at - start, "the snapshot table");
    return ok();
  }

  ImageFile& file_;
  const Header& header_;
  uint64_t cluster_size_;
  uint64_t file_clusters_;
  std::vector<uint32_t> references_;
  std::unordered_set<uint64_t> copied_;  // clusters the active tables mark bit 63
  std::unordered_set<uint64_t> l1_tables_;  // L1 tables walked
  CheckReport report_;
};

// The image file and its parsed header.
struct OpenedImage {
  ImageFile file;
  Header header;
};

Result<OpenedImage> open_with_header(const std::string& path, int flags) {
  Fd fd = TRY_CONTEXT(Fd::open(path, flags), fmt::format("qcow2 image {}", path));
  const uint64_t size = TRY(fd.size_bytes());
  ImageFile file(path, std::move(fd), size);
  std::vector<std::byte> leading(std::min<uint64_t>(size, kHeaderReadBytes));
  TRY(file.read(0, leading));
  Header header = TRY(parse_header(leading, size, path));
  return OpenedImage{std::move(file), std::move(header)};
}

}  // namespace

Result<CheckReport> check_image(const std::string& path) {
  OpenedImage opened = TRY(open_with_header(path, O_RDONLY));
  ImageFile& file = opened.file;
  const Header& header = opened.header;
  if (header.has_bitmaps) {
    return fail(Errc::Unsupported,
                fmt::format("qcow2 image {}: checking images with bitmaps is not supported", path));
  }
  Checker checker(file, header);
  return checker.run();
}

Result<uint64_t> repair_leaks(const std::string& path, const CheckReport& report) {
  if (report.leaked.empty()) return uint64_t{0};
  OpenedImage opened = TRY(open_with_header(path, O_RDWR));
  ImageFile& file = opened.file;
  Refcounts refcounts = TRY(Refcounts::load(file, opened.header));
  uint64_t fixed = 0;
  for (const CheckReport::Leak& leak : report.leaked) {
    // Only ever downwards: a refcount that is not above its references any
    // more is not this report's leak.
    if (TRY(refcounts.get(leak.cluster)) <= leak.references) continue;
    TRY(refcounts.set(leak.cluster, leak.references));
    ++fixed;
  }
  TRY(file.sync());
  return fixed;
}

}  // namespace keel::block::qcow2
