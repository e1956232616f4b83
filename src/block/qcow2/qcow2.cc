// Qcow2Image: see qcow2.h for the status card and crash-safety rules.
#include "block/qcow2/qcow2.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/log.h"
#include "block/iov.h"
#include "block/qcow2/compress.h"

namespace keel::block::qcow2 {
namespace {

constexpr uint64_t kSectorBytes = 512;

}  // namespace

std::string resolve_backing_path(const std::string& image_path, const std::string& backing_name) {
  if (backing_name.empty() || backing_name.front() == '/') return backing_name;
  const size_t slash = image_path.rfind('/');
  if (slash == std::string::npos) return backing_name;
  return image_path.substr(0, slash + 1) + backing_name;
}

Qcow2Image::Qcow2Image(ImageFile file, ImageLock lock, Access access, Header header,
                       std::vector<uint64_t> l1, std::unique_ptr<IoRing> ring)
    : file_(std::move(file)),
      lock_(std::move(lock)),
      access_(access),
      header_(std::move(header)),
      size_bytes_(header_.size_bytes - header_.size_bytes % kSectorBytes),
      cluster_bits_(header_.cluster_bits),
      cluster_size_(header_.cluster_size()),
      l1_(std::move(l1)),
      l2_cache_(header_.cluster_size(), kL2CacheBudgetBytes),
      ring_(std::move(ring)) {}

Result<std::unique_ptr<Qcow2Image>> Qcow2Image::open(const std::string& path, Access access,
                                                     const BackingOpener& open_backing,
                                                     Locking locking) {
  const int flags = access == Access::ReadOnly ? O_RDONLY : O_RDWR;
  Fd fd = TRY_CONTEXT(Fd::open(path, flags), fmt::format("qcow2 image {}", path));
  ImageLock lock = TRY(ImageLock::acquire(fd, path, access, locking));
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) return fail_errno(fmt::format("qcow2 image {}: fstat", path));
  if (!S_ISREG(st.st_mode)) {
    return fail(Errc::InvalidArgument, fmt::format("qcow2 image {}: not a regular file", path));
  }
  ImageFile file(path, std::move(fd), static_cast<uint64_t>(st.st_size));

  std::vector<std::byte> leading(std::min<uint64_t>(file.size_bytes(), kHeaderReadBytes));
  TRY(file.read(0, leading));
  Header header = TRY(parse_header(leading, file.size_bytes(), path));
  leading = {};

  if (access == Access::ReadWrite) {
    if (header.corrupt()) {
      return fail(Errc::Corrupt,
                  fmt::format("qcow2 image {}: marked corrupt (incompatible bit 1); it may only "
                              "be opened read-only (repair it with qemu-img check -r all)",
                              path));
    }
    if (header.dirty()) {
      return fail(Errc::Unsupported,
                  fmt::format("qcow2 image {}: marked dirty (lazy refcounts, not closed "
                              "cleanly); its refcounts need a repair first (qemu-img check -r "
                              "all), or open it read-only",
                              path));
    }
    if (header.nb_snapshots > 0) {
      return fail(Errc::Unsupported,
                  fmt::format("qcow2 image {}: has {} internal snapshots; Keel opens such images "
                              "read-only only",
                              path, header.nb_snapshots));
    }
  }

  std::vector<uint64_t> l1(header.l1_size);
  if (!l1.empty()) {
    std::vector<std::byte> raw(l1.size() * 8);
    TRY(file.read(header.l1_table_offset, raw));
    for (size_t i = 0; i < l1.size(); ++i) l1[i] = load_be64(raw.data() + i * 8);
  }

  std::unique_ptr<IoRing> ring =
      TRY(IoRing::create(kQueueDepth, kMaxHostOps, fmt::format("qcow2 image {}", path)));
  std::unique_ptr<Qcow2Image> image(new Qcow2Image(std::move(file), std::move(lock), access, std::move(header),
                                                   std::move(l1), std::move(ring)));
  if (image->header_.size_bytes != image->size_bytes_) {
    LOG_WARN("qcow2 image {}: virtual size {} is not a multiple of 512; the guest sees {} bytes",
             path, image->header_.size_bytes, image->size_bytes_);
  }

  if (access == Access::ReadWrite) {
    image->refcounts_.emplace(TRY(Refcounts::load(image->file_, image->header_)));
    // Keel maintains no auto-clear feature (bitmaps), so the spec wants
    // their bits cleared before anything is written.
    if (image->header_.version >= 3 && image->header_.autoclear_features != 0) {
      std::byte zero[8] = {};
      TRY(image->file_.write(kAutoclearFeaturesField, zero));
      TRY(image->file_.sync());
      image->header_.autoclear_features = 0;
    }
    image->scratch_.resize(image->cluster_size_);
  }

  const Header& h = image->header_;
  if (!h.backing_file.empty()) {
    if (h.backing_file.rfind("json:", 0) == 0 || h.backing_file.find("://") != std::string::npos) {
      return fail(Errc::Unsupported,
                  fmt::format("qcow2 image {}: backing file '{}' is not a plain file name", path,
                              h.backing_file));
    }
    ImageFormat format = ImageFormat::Auto;
    if (!h.backing_format.empty()) {
      auto parsed = parse_image_format(h.backing_format);
      if (!parsed || *parsed == ImageFormat::Auto) {
        return fail(Errc::Unsupported, fmt::format("qcow2 image {}: backing format '{}' (Keel "
                                                   "reads raw and qcow2)",
                                                   path, h.backing_format));
      }
      format = *parsed;
    }
    image->backing_path_ = resolve_backing_path(path, h.backing_file);
    image->backing_ = TRY_CONTEXT(open_backing(image->backing_path_, format),
                                  fmt::format("qcow2 image {}: backing file", path));
  }
  return image;
}

Failure Qcow2Image::corrupt(std::string_view detail) const {
  return fail(Errc::Corrupt, fmt::format("qcow2 image {}: {}", file_.path(), detail));
}

Result<void> Qcow2Image::check_range(uint64_t offset, uint64_t length_bytes) const {
  if (offset > size_bytes_ || length_bytes > size_bytes_ - offset) {
    return fail(Errc::OutOfRange, fmt::format("qcow2 image {}: {}+{} bytes past its size {}",
                                              file_.path(), offset, length_bytes, size_bytes_));
  }
  return ok();
}

Result<void> Qcow2Image::check_writable() const {
  if (access_ == Access::ReadOnly) {
    return fail(Errc::PermissionDenied,
                fmt::format("qcow2 image {}: opened read-only", file_.path()));
  }
  return ok();
}

Result<uint64_t> Qcow2Image::l2_offset(uint64_t l1_index) const {
  // parse_header made the L1 table map the whole virtual size.
  CHECK(l1_index < l1_.size(), "qcow2 L1 index past the table");
  const uint64_t offset = l1_[l1_index] & kEntryOffsetMask;
  if (offset == 0) return uint64_t{0};
  if (offset % cluster_size_ != 0 || offset >= file_.size_bytes()) {
    return corrupt(fmt::format("L1 entry {} ({:#x}) points at an unaligned offset or outside "
                               "the file",
                               l1_index, l1_[l1_index]));
  }
  return offset;
}

Result<Qcow2Image::Mapping> Qcow2Image::lookup(uint64_t guest_cluster) {
  const uint64_t l2_entries = header_.l2_entries();
  const uint64_t l1_index = guest_cluster / l2_entries;
  const uint64_t l2_index = guest_cluster % l2_entries;
  const uint64_t table_offset = TRY(l2_offset(l1_index));
  Mapping m;
  if (table_offset == 0) return m;
  std::span<std::byte> table = TRY(l2_cache_.get(file_, table_offset));
  const uint64_t entry = load_be64(table.data() + l2_index * 8);

  if ((entry & kEntryCompressed) != 0) {
    // "Compressed Clusters Descriptor": the offset in the low x bits, then
    // the count of additional 512-byte sectors.
    const uint32_t size_bits = cluster_bits_ - 8;
    const uint32_t shift = 62 - size_bits;
    const uint64_t host = entry & ((uint64_t{1} << shift) - 1);
    const uint64_t sectors = ((entry >> shift) & ((uint64_t{1} << size_bits) - 1)) + 1;
    if (host < cluster_size_ || host >= file_.size_bytes() || host >= kMaxHostOffset) {
      return corrupt(fmt::format("L2 table {:#x} entry {} ({:#x}): compressed data outside the "
                                 "file",
                                 table_offset, l2_index, entry));
    }
    m.kind = Kind::Compressed;
    m.host_offset = host;
    m.compressed_sectors = sectors;
    m.compressed_bytes = sectors * kSectorBytes - (host % kSectorBytes);
    return m;
  }
  const uint64_t host = entry & kEntryOffsetMask;
  const bool zero = header_.version >= 3 && (entry & kEntryZero) != 0;
  m.copied = (entry & kEntryCopied) != 0;
  m.host_offset = host;
  if (host == 0) {
    m.kind = zero ? Kind::Zero : Kind::Unallocated;
    return m;
  }
  if (host % cluster_size_ != 0 || (!zero && host >= file_.size_bytes())) {
    return corrupt(fmt::format("L2 table {:#x} entry {} ({:#x}) points at an unaligned offset "
                               "or outside the file",
                               table_offset, l2_index, entry));
  }
  m.kind = zero ? Kind::Zero : Kind::Normal;
  return m;
}

Result<std::span<const std::byte>> Qcow2Image::decompressed(const Mapping& m) {
  if (decompressed_host_ == m.host_offset) return std::span<const std::byte>(decompressed_);
  decompressed_host_ = UINT64_MAX;
  // lookup() bounded the stream by the field widths (at most 2 clusters'
  // worth) and the file's end.
  const uint64_t available = std::min(m.compressed_bytes, file_.size_bytes() - m.host_offset);
  compressed_input_.resize(available);
  TRY(file_.read(m.host_offset, compressed_input_));
  decompressed_.resize(cluster_size_);
  TRY(decompress_cluster(header_.compression_type, compressed_input_, decompressed_,
                         fmt::format("{} at {:#x}", file_.path(), m.host_offset)));
  decompressed_host_ = m.host_offset;
  return std::span<const std::byte>(decompressed_);
}

Result<void> Qcow2Image::read_backing(uint64_t guest_offset, uint64_t length,
                                      std::span<const iovec> iov) {
  const uint64_t backing_size = backing_ ? backing_->size_bytes() : 0;
  if (guest_offset >= backing_size) {
    iov_zero(iov);
    return ok();
  }
  const uint64_t from_backing = std::min(length, backing_size - guest_offset);
  if (from_backing == length) {
    TRY(backing_->read_at(guest_offset, iov));
    return ok();
  }
  // Past the end of a shorter backing image the disk reads as zeroes.
  IovCursor cursor(iov);
  std::vector<iovec> part;
  cursor.take(from_backing, part);
  TRY(backing_->read_at(guest_offset, part));
  cursor.take(length - from_backing, part);
  iov_zero(part);
  return ok();
}

Result<void> Qcow2Image::read_mapped(const Mapping& m, uint64_t guest_offset, uint64_t length,
                                     std::span<const iovec> iov) {
  const uint64_t in_cluster = guest_offset & (cluster_size_ - 1);
  switch (m.kind) {
    case Kind::Unallocated: return read_backing(guest_offset, length, iov);
    case Kind::Zero: iov_zero(iov); return ok();
    case Kind::Normal: return file_.readv(m.host_offset + in_cluster, iov);
    case Kind::Compressed: {
      std::span<const std::byte> data = TRY(decompressed(m));
      iov_from_buffer(iov, data.subspan(in_cluster, length));
      return ok();
    }
  }
  return ok();
}

Result<uint64_t> Qcow2Image::read_run(uint64_t pos, uint64_t end, std::optional<Mapping>& next,
                                      Mapping& m) {
  const uint64_t cluster = pos >> cluster_bits_;
  m = next ? *next : TRY(lookup(cluster));
  next.reset();
  uint64_t length = std::min(cluster_size_ - (pos & (cluster_size_ - 1)), end - pos);
  // Runs of clusters that read the same way (contiguous data, backing,
  // zeroes) go in one request.
  if (m.kind != Kind::Compressed) {
    uint64_t following = cluster + 1;
    while (pos + length < end) {
      Mapping n = TRY(lookup(following));
      const bool same =
          n.kind == m.kind &&
          (m.kind != Kind::Normal ||
           n.host_offset == m.host_offset + ((following - cluster) << cluster_bits_));
      if (!same) {
        next = n;
        break;
      }
      length += std::min(cluster_size_, end - pos - length);
      ++following;
    }
  }
  return length;
}

Result<size_t> Qcow2Image::read_at(uint64_t offset, std::span<const iovec> iov) {
  TRY(quiesce());
  const uint64_t total = iov_bytes(iov);
  TRY(check_range(offset, total));
  IovCursor cursor(iov);
  std::vector<iovec>& piece = piece_;
  std::optional<Mapping> next;
  uint64_t pos = offset;
  const uint64_t end = offset + total;
  while (pos < end) {
    Mapping m;
    const uint64_t length = TRY(read_run(pos, end, next, m));
    cursor.take(length, piece);
    TRY(read_mapped(m, pos, length, piece));
    pos += length;
  }
  return static_cast<size_t>(total);
}

Result<bool> Qcow2Image::exclusively_owned(const Mapping& m) {
  if (m.kind != Kind::Normal) return false;
  if (m.copied) return true;
  return TRY(refcounts_->get(m.host_offset >> cluster_bits_)) == 1;
}

Result<uint64_t> Qcow2Image::writable_l2(uint64_t l1_index) {
  const uint64_t existing = TRY(l2_offset(l1_index));
  if (existing != 0) {
    if ((l1_[l1_index] & kEntryCopied) != 0) return existing;
    if (TRY(refcounts_->get(existing >> cluster_bits_)) == 1) return existing;
    // Only internal snapshots share L2 tables, and those images open
    // read-only; a shared table here means damaged refcounts.
    return corrupt(fmt::format("L2 table {:#x} (L1 entry {}) is shared", existing, l1_index));
  }
  // The zeroed table and its refcount reach the disk at write_back's sync,
  // and the L1 entry pointing at it only after that (write_back_tables), so
  // the entry never points at a cluster that is not a valid table. Syncing
  // here instead cost a whole-file fdatasync per new table (~0.25 s in the
  // middle of a 1 GiB allocating pass, bench/RESULTS.md).
  const uint64_t table = TRY(refcounts_->allocate(1));
  std::vector<std::byte> zeroes(cluster_size_);
  TRY(file_.write(table, zeroes));
  l1_[l1_index] = table | kEntryCopied;
  pending_l1_.push_back(l1_index);
  l2_cache_.put(table, zeroes);
  l2_cache_.mark_dirty(table);
  return table;
}

Result<void> Qcow2Image::set_l2_entry(uint64_t l2_table, uint64_t index, uint64_t entry) {
  // The table is written back later, after the clusters it points at (see
  // write_back); until then reads see the cached copy.
  std::span<std::byte> table = TRY(l2_cache_.get(file_, l2_table));
  store_be64(table.data() + index * 8, entry);
  l2_cache_.mark_dirty(l2_table);
  return ok();
}

void Qcow2Image::release(std::vector<Mapping>& to_free) {
  pending_free_.insert(pending_free_.end(), to_free.begin(), to_free.end());
  to_free.clear();
}

Result<void> Qcow2Image::write_back_if_due() {
  if (l2_cache_.dirty_count() * 2 >= l2_cache_.capacity() ||
      pending_free_.size() >= kMaxPendingFrees) {
    return write_back();
  }
  return ok();
}

Result<void> Qcow2Image::sync_file() {
  // Refcounts of new clusters reach the file before the sync that orders
  // whatever will point at them (refcount.h).
  if (refcounts_) TRY(refcounts_->write_back());
  return file_.sync();
}

Result<void> Qcow2Image::write_back_tables() {
  if (l2_cache_.dirty_count() == 0 && pending_l1_.empty()) return ok();
  // 1. New data clusters, new (zeroed) L2 tables and their refcounts reach
  // the disk (an entry changes in the cache only once its data write
  // completed)...
  TRY(sync_file());
  // 2. ...before the L2 entries that point at them, and the L1 entries that
  // point at new tables. A crash in between leaves an L1 entry pointing at a
  // table that is zeroes or holds entries whose clusters are on disk.
  TRY(l2_cache_.write_back([this](uint64_t offset, std::span<const std::byte> table) {
    return file_.write(offset, table);
  }));
  while (!pending_l1_.empty()) {
    const uint64_t l1_index = pending_l1_.back();
    std::byte entry[8];
    store_be64(entry, l1_[l1_index]);
    TRY(file_.write(header_.l1_table_offset + l1_index * 8, entry));
    pending_l1_.pop_back();
  }
  return ok();
}

Result<void> Qcow2Image::write_back() {
  TRY(write_back_tables());
  if (pending_free_.empty()) return ok();
  // 3. Entries that stopped pointing at clusters reach the disk before
  // those clusters' refcounts drop (and they are reused); no data operation
  // in flight may still read or write them.
  TRY(quiesce());
  TRY(sync_file());
  std::vector<Mapping> to_free = std::move(pending_free_);
  pending_free_.clear();
  // A host cluster compressed data was being packed into may be freed (and
  // reused) below: start the next compressed cluster afresh.
  compressed_next_ = 0;
  for (const Mapping& m : to_free) {
    if (m.kind == Kind::Compressed) {
      // A compressed cluster holds a reference on every host cluster its
      // sectors touch.
      const uint64_t start = m.host_offset & ~(kSectorBytes - 1);
      const uint64_t last = start + m.compressed_sectors * kSectorBytes - 1;
      for (uint64_t c = start >> cluster_bits_; c <= last >> cluster_bits_; ++c) {
        TRY(refcounts_->decrement(c));
      }
      if (decompressed_host_ == m.host_offset) decompressed_host_ = UINT64_MAX;
    } else if (m.host_offset != 0) {
      TRY(refcounts_->decrement(m.host_offset >> cluster_bits_));
    }
  }
  return ok();
}

Qcow2Image::~Qcow2Image() {
  // The kernel may still use the callers' buffers; nothing outlives them.
  if (Result<void> quiet = quiesce(); !quiet) {
    LOG_ERROR("qcow2 image {}: waiting for I/O on close: {}", file_.path(),
              quiet.error().message());
  }
  if (access_ == Access::ReadOnly) return;
  Result<void> written = write_back();
  if (written) written = sync_file();
  if (!written) {
    LOG_ERROR("qcow2 image {}: writing metadata back on close: {}", file_.path(),
              written.error().message());
  }
}

Result<void> Qcow2Image::write_in_cluster(uint64_t guest_offset, uint64_t length,
                                          std::span<const iovec> iov,
                                          std::vector<Mapping>& to_free) {
  const uint64_t cluster = guest_offset >> cluster_bits_;
  const uint64_t in_cluster = guest_offset & (cluster_size_ - 1);
  const Mapping m = TRY(lookup(cluster));
  if (TRY(exclusively_owned(m))) return file_.writev(m.host_offset + in_cluster, iov);

  const uint64_t l1_index = cluster / header_.l2_entries();
  const uint64_t table = TRY(writable_l2(l1_index));
  const uint64_t host = TRY(refcounts_->allocate(1));
  // Where the rest of the cluster reads as zeroes and the new cluster lies
  // past the file's end, only the new bytes need writing: past the end, and
  // in the hole a later write leaves there, the file reads as zeroes (QEMU
  // reads and checks such a short last cluster the same way). Filling the
  // rest with zeroes was 16 times the copying of a 4 KiB write into a fresh
  // 64 KiB cluster (bench/qcow2.sh, perf).
  const bool rest_reads_zero =
      m.kind == Kind::Zero || (m.kind == Kind::Unallocated && backing_ == nullptr);
  if (length == cluster_size_ || (rest_reads_zero && host >= file_.size_bytes())) {
    TRY(file_.writev(host + in_cluster, iov));
  } else {
    // Copy-on-write: the rest of the cluster keeps what it read as before.
    const uint64_t cluster_start = cluster << cluster_bits_;
    const uint64_t valid = std::min(cluster_size_, size_bytes_ - cluster_start);
    std::fill(scratch_.begin() + static_cast<ptrdiff_t>(valid), scratch_.end(), std::byte{0});
    const iovec whole{scratch_.data(), valid};
    TRY(read_mapped(m, cluster_start, valid, std::span(&whole, 1)));
    iov_to_buffer(iov, std::span(scratch_).subspan(in_cluster, length));
    TRY(file_.write(host, scratch_));
  }
  TRY(set_l2_entry(table, cluster % header_.l2_entries(), host | kEntryCopied));
  if (m.kind == Kind::Compressed || m.host_offset != 0) to_free.push_back(m);
  return ok();
}

Result<size_t> Qcow2Image::write_at(uint64_t offset, std::span<const iovec> iov) {
  TRY(quiesce());
  TRY(check_writable());
  const uint64_t total = iov_bytes(iov);
  TRY(check_range(offset, total));
  IovCursor cursor(iov);
  std::vector<iovec>& piece = piece_;
  std::vector<Mapping>& to_free = to_free_;
  to_free.clear();
  uint64_t pos = offset;
  const uint64_t end = offset + total;
  Result<void> result = ok();
  while (pos < end && result) {
    const uint64_t length = std::min(cluster_size_ - (pos & (cluster_size_ - 1)), end - pos);
    cursor.take(length, piece);
    result = write_in_cluster(pos, length, piece, to_free);
    pos += length;
  }
  // Release what was replaced even when a later cluster failed.
  release(to_free);
  if (!result) return fail(std::move(result).error());
  TRY(write_back_if_due());
  return static_cast<size_t>(total);
}

Result<void> Qcow2Image::flush() {
  TRY(quiesce());
  if (access_ == Access::ReadOnly) return ok();
  TRY(write_back());
  return sync_file();
}

Result<void> Qcow2Image::discard(uint64_t offset, uint64_t length_bytes) {
  TRY(quiesce());
  TRY(check_writable());
  TRY(check_range(offset, length_bytes));
  // Only whole clusters can be dropped; the rest keeps its data.
  const uint64_t first = (offset + cluster_size_ - 1) >> cluster_bits_;
  const uint64_t end = (offset + length_bytes) >> cluster_bits_;
  const bool tail = offset + length_bytes == size_bytes_;
  const uint64_t last = tail ? (size_bytes_ + cluster_size_ - 1) >> cluster_bits_ : end;
  std::vector<Mapping> to_free;
  Result<void> result = ok();
  for (uint64_t cluster = first; cluster < last && result; ++cluster) {
    auto step = [&]() -> Result<void> {
      const Mapping m = TRY(lookup(cluster));
      if (m.kind == Kind::Unallocated || (m.kind == Kind::Zero && m.host_offset == 0)) {
        return ok();  // nothing allocated to drop
      }
      uint64_t entry = 0;
      if (backing_) {
        // Unallocated would show the backing image's data, which the disk
        // never held here; v3 can say "zeroes", v2 has to keep the cluster.
        if (header_.version < 3) return ok();
        entry = kEntryZero;
      }
      const uint64_t table = TRY(writable_l2(cluster / header_.l2_entries()));
      TRY(set_l2_entry(table, cluster % header_.l2_entries(), entry));
      to_free.push_back(m);
      return ok();
    };
    result = step();
  }
  release(to_free);
  if (!result) return result;
  return write_back_if_due();
}

Result<void> Qcow2Image::write_zeroes(uint64_t offset, uint64_t length_bytes, Unmap unmap) {
  TRY(quiesce());
  TRY(check_writable());
  TRY(check_range(offset, length_bytes));
  std::vector<Mapping> to_free;
  std::vector<std::byte> zeroes;
  uint64_t pos = offset;
  const uint64_t end = offset + length_bytes;
  Result<void> result = ok();
  while (pos < end && result) {
    const uint64_t cluster = pos >> cluster_bits_;
    const uint64_t cluster_start = cluster << cluster_bits_;
    const uint64_t length = std::min(cluster_size_ - (pos - cluster_start), end - pos);
    // The last cluster of a disk whose size is not a cluster multiple counts
    // as whole when the request runs to the end of the disk.
    const bool whole = pos == cluster_start &&
                       (length == cluster_size_ || pos + length == size_bytes_);
    auto step = [&]() -> Result<void> {
      const Mapping m = TRY(lookup(cluster));
      if (m.kind == Kind::Zero || (m.kind == Kind::Unallocated && !backing_)) return ok();
      const uint64_t l2_index = cluster % header_.l2_entries();
      if (whole && header_.version >= 3) {
        uint64_t entry = kEntryZero;
        if (unmap == Unmap::No && TRY(exclusively_owned(m))) {
          entry |= m.host_offset | kEntryCopied;  // keep the allocation
        } else if (m.kind != Kind::Unallocated) {
          to_free.push_back(m);
        }
        const uint64_t table = TRY(writable_l2(cluster / header_.l2_entries()));
        return set_l2_entry(table, l2_index, entry);
      }
      if (whole && !backing_ && unmap == Unmap::Yes) {
        const uint64_t table = TRY(writable_l2(cluster / header_.l2_entries()));
        TRY(set_l2_entry(table, l2_index, 0));
        to_free.push_back(m);
        return ok();
      }
      if (zeroes.empty()) zeroes.resize(cluster_size_);
      const iovec v{zeroes.data(), length};
      return write_in_cluster(pos, length, std::span(&v, 1), to_free);
    };
    result = step();
    pos += length;
  }
  release(to_free);
  if (!result) return result;
  return write_back_if_due();
}

Result<void> Qcow2Image::write_compressed(uint64_t offset, std::span<const std::byte> data) {
  TRY(quiesce());
  TRY(check_writable());
  if (offset % cluster_size_ != 0 || data.size() != cluster_size_) {
    return fail(Errc::InvalidArgument,
                fmt::format("qcow2 image {}: a compressed write takes one whole cluster (offset "
                            "{}, {} bytes)",
                            file_.path(), offset, data.size()));
  }
  if (offset >= size_bytes_) {
    return fail(Errc::OutOfRange, fmt::format("qcow2 image {}: compressed write at {} is past its "
                                              "size {}",
                                              file_.path(), offset, size_bytes_));
  }
  const uint64_t valid = std::min(cluster_size_, size_bytes_ - offset);
  const iovec plain{const_cast<std::byte*>(data.data()), valid};
  const uint64_t cluster = offset >> cluster_bits_;
  const Mapping m = TRY(lookup(cluster));
  const bool fresh = m.kind == Kind::Unallocated || (m.kind == Kind::Zero && m.host_offset == 0);
  if (!fresh || header_.compression_type != CompressionType::Zlib) {
    TRY(write_at(offset, std::span(&plain, 1)));
    return ok();
  }
  // Data that does not shrink by a sector at least is stored as is.
  compressed_output_.resize(cluster_size_ - kSectorBytes);
  auto produced = deflate_raw(data, compressed_output_);
  if (!produced) {
    TRY(write_at(offset, std::span(&plain, 1)));
    return ok();
  }
  const uint64_t bytes = *produced;
  // Pack into the host cluster the previous compressed cluster ended in
  // while it fits ("Compressed Clusters Descriptor": any byte offset; every
  // host cluster a stream touches holds one reference for it).
  uint64_t host = compressed_next_;
  if (host != 0 && (host & (cluster_size_ - 1)) != 0 &&
      (host & (cluster_size_ - 1)) + bytes <= cluster_size_ &&
      TRY(refcounts_->get(host >> cluster_bits_)) < refcounts_->max_refcount()) {
    TRY(refcounts_->increment(host >> cluster_bits_));
  } else {
    host = TRY(refcounts_->allocate(1));
  }
  TRY(file_.write(host, std::span(compressed_output_).first(bytes)));
  compressed_next_ = host + bytes;
  const uint32_t size_bits = cluster_bits_ - 8;
  const uint32_t shift = 62 - size_bits;
  const uint64_t extra_sectors = ((host + bytes - 1) / kSectorBytes) - host / kSectorBytes;
  const uint64_t entry = kEntryCompressed | (extra_sectors << shift) | host;
  const uint64_t table = TRY(writable_l2(cluster / header_.l2_entries()));
  TRY(set_l2_entry(table, cluster % header_.l2_entries(), entry));
  return write_back_if_due();
}

Result<Qcow2Image::Extent> Qcow2Image::block_status(uint64_t offset, uint64_t max_length) {
  TRY(quiesce());
  TRY(check_range(offset, max_length));
  Extent extent;
  if (max_length == 0) return extent;
  const uint64_t end = offset + max_length;
  const uint64_t first = offset >> cluster_bits_;
  const Mapping m = TRY(lookup(first));
  auto status_of = [](Kind kind) {
    switch (kind) {
      case Kind::Unallocated: return Status::Unallocated;
      case Kind::Zero: return Status::Zero;
      case Kind::Normal: return Status::Data;
      case Kind::Compressed: return Status::Compressed;
    }
    return Status::Unallocated;
  };
  extent.status = status_of(m.kind);
  const uint64_t in_cluster = offset & (cluster_size_ - 1);
  if (m.kind == Kind::Normal || m.kind == Kind::Zero) {
    extent.host_offset = m.host_offset == 0 ? 0 : m.host_offset + in_cluster;
  }
  uint64_t length = std::min(cluster_size_ - in_cluster, max_length);
  const uint64_t l2_entries = header_.l2_entries();
  for (uint64_t cluster = first + 1; offset + length < end; ++cluster) {
    // A run of unallocated clusters skips whole L2 ranges without tables.
    if (m.kind == Kind::Unallocated && cluster % l2_entries == 0 &&
        TRY(l2_offset(cluster / l2_entries)) == 0) {
      length += std::min(l2_entries << cluster_bits_, end - offset - length);
      cluster += l2_entries - 1;
      continue;
    }
    const Mapping n = TRY(lookup(cluster));
    if (n.kind != m.kind || m.kind == Kind::Compressed) break;
    // Allocated runs continue only where the host clusters do.
    if ((n.host_offset == 0) != (m.host_offset == 0)) break;
    if (m.host_offset != 0 && n.host_offset != m.host_offset + ((cluster - first) << cluster_bits_)) {
      break;
    }
    length += std::min(cluster_size_, end - offset - length);
  }
  extent.length_bytes = length;
  return extent;
}

Result<void> Qcow2Image::write_size_and_l1(uint64_t size_bytes, uint64_t l1_entries,
                                           uint64_t l1_offset) {
  // size (24), crypt_method (32), l1_size (36), l1_table_offset (40): one
  // write inside the first sector, so the three change together.
  std::byte fields[24];
  store_be64(fields, size_bytes);
  store_be32(fields + 8, header_.crypt_method);
  store_be32(fields + 12, static_cast<uint32_t>(l1_entries));
  store_be64(fields + 16, l1_offset);
  TRY(file_.write(24, fields));
  TRY(sync_file());
  header_.size_bytes = size_bytes;
  header_.l1_size = static_cast<uint32_t>(l1_entries);
  header_.l1_table_offset = l1_offset;
  size_bytes_ = size_bytes;
  return ok();
}

Result<void> Qcow2Image::resize(uint64_t new_size_bytes) {
  TRY(quiesce());
  TRY(check_writable());
  if (new_size_bytes % kSectorBytes != 0) {
    return fail(Errc::InvalidArgument,
                fmt::format("qcow2 image {}: size {} is not a multiple of 512", file_.path(),
                            new_size_bytes));
  }
  if (new_size_bytes == size_bytes_) return ok();
  TRY(write_back());
  if (new_size_bytes > size_bytes_) return grow(new_size_bytes);
  return shrink(new_size_bytes);
}

Result<void> Qcow2Image::grow(uint64_t new_size_bytes) {
  const uint64_t old_size = size_bytes_;
  const uint64_t needed = l1_entries_for(new_size_bytes, cluster_bits_);
  if (needed * 8 > kMaxL1Bytes) {
    return fail(Errc::InvalidArgument,
                fmt::format("qcow2 image {}: size {} needs an L1 table over {} MiB (cluster size "
                            "{})",
                            file_.path(), new_size_bytes, kMaxL1Bytes >> 20, cluster_size_));
  }
  if (needed <= l1_.size()) {
    TRY(write_size_and_l1(new_size_bytes, l1_.size(), header_.l1_table_offset));
  } else {
    // A new, larger table elsewhere, synced before the header points at it.
    const uint64_t old_offset = header_.l1_table_offset;
    const uint64_t old_clusters = (l1_.size() * 8 + cluster_size_ - 1) >> cluster_bits_;
    const uint64_t clusters = (needed * 8 + cluster_size_ - 1) >> cluster_bits_;
    const uint64_t table = TRY(refcounts_->allocate(clusters));
    std::vector<std::byte> raw(clusters << cluster_bits_);
    for (size_t i = 0; i < l1_.size(); ++i) store_be64(raw.data() + i * 8, l1_[i]);
    TRY(file_.write(table, raw));
    TRY(sync_file());
    TRY(write_size_and_l1(new_size_bytes, needed, table));
    l1_.resize(needed, 0);
    // The old table is unreferenced now; a crash before this only leaks it.
    for (uint64_t i = 0; i < old_clusters; ++i) {
      TRY(refcounts_->decrement((old_offset >> cluster_bits_) + i));
    }
  }
  // The grown part reads as zeroes, even where a larger backing image has
  // data (as QEMU does).
  const uint64_t backing_size = backing_ ? backing_->size_bytes() : 0;
  if (backing_size > old_size) {
    TRY(write_zeroes(old_size, std::min(backing_size, new_size_bytes) - old_size, Unmap::Yes));
  }
  return flush();
}

Result<void> Qcow2Image::drop_clusters_from(uint64_t first_cluster) {
  const uint64_t l2_entries = header_.l2_entries();
  std::vector<Mapping> to_free;
  Result<void> result = ok();
  for (uint64_t l1_index = first_cluster / l2_entries; l1_index < l1_.size() && result;
       ++l1_index) {
    auto step = [&]() -> Result<void> {
      if (TRY(l2_offset(l1_index)) == 0) return ok();
      for (uint64_t j = 0; j < l2_entries; ++j) {
        const uint64_t cluster = l1_index * l2_entries + j;
        if (cluster < first_cluster) continue;
        const Mapping m = TRY(lookup(cluster));
        if (m.kind == Kind::Unallocated) continue;
        const uint64_t table = TRY(writable_l2(l1_index));
        TRY(set_l2_entry(table, j, 0));
        if (m.kind == Kind::Compressed || m.host_offset != 0) to_free.push_back(m);
      }
      return ok();
    };
    result = step();
    // Dirty tables must not fill the cache (l2_cache.h).
    release(to_free);
    if (result) result = write_back_if_due();
  }
  TRY(result);
  return write_back();
}

Result<void> Qcow2Image::make_empty() {
  TRY(quiesce());
  TRY(check_writable());
  TRY(drop_clusters_from(0));
  return flush();
}

Result<void> Qcow2Image::shrink(uint64_t new_size_bytes) {
  // 1. The guest stops seeing the tail before anything in it is dropped.
  TRY(write_size_and_l1(new_size_bytes, l1_.size(), header_.l1_table_offset));
  // 2. Clusters wholly past the new end: their entries go, then their refcounts.
  TRY(drop_clusters_from((new_size_bytes + cluster_size_ - 1) >> cluster_bits_));
  // 3. L2 tables wholly past the end: the L1 entries, synced, then the tables.
  const uint64_t l1_needed = l1_entries_for(new_size_bytes, cluster_bits_);
  std::vector<uint64_t> dead_tables;
  for (uint64_t l1_index = l1_needed; l1_index < l1_.size(); ++l1_index) {
    const uint64_t table = TRY(l2_offset(l1_index));
    if (table == 0) continue;
    std::byte zero[8] = {};
    TRY(file_.write(header_.l1_table_offset + l1_index * 8, zero));
    l1_[l1_index] = 0;
    dead_tables.push_back(table);
  }
  if (dead_tables.empty()) return flush();
  TRY(sync_file());
  for (uint64_t table : dead_tables) {
    l2_cache_.erase(table);
    TRY(refcounts_->decrement(table >> cluster_bits_));
  }
  return flush();
}

}  // namespace keel::block::qcow2
