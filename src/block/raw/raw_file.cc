// RawFile: see raw_file.h for the status card and decisions.
#include "block/raw/raw_file.h"

#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include <fmt/format.h>

#include "base/log.h"
#include "block/iov.h"

namespace keel::block {
namespace {

constexpr uint64_t kSectorBytes = 512;
// Zero-buffer fallback for write-zeroes: written in chunks of this size.
constexpr size_t kZeroChunkBytes = 64 << 10;

bool is_transfer(BlockOp op) { return op == BlockOp::Read || op == BlockOp::Write; }

}  // namespace

Result<void> RawFile::set_image_locked(bool locked) {
  // Nothing cached: the bytes are read from the file on every request.
  if (!locked) {
    lock_.release();
  } else if (!lock_.held()) {
    lock_ = TRY(ImageLock::acquire(file_, path_, access_));
  }
  return ok();
}

Result<std::unique_ptr<RawFile>> RawFile::open(const std::string& path, Access access,
                                               Locking locking) {
  int flags = access == Access::ReadOnly ? O_RDONLY : O_RDWR;
  Fd file = TRY(Fd::open(path, flags));
  ImageLock lock = TRY(ImageLock::acquire(file, path, access, locking));
  struct stat st {};
  if (::fstat(file.get(), &st) < 0) return fail_errno(fmt::format("raw image {}: fstat", path));
  uint64_t size_bytes = 0;
  if (S_ISREG(st.st_mode)) {
    size_bytes = static_cast<uint64_t>(st.st_size);
  } else if (S_ISBLK(st.st_mode)) {
    if (::ioctl(file.get(), BLKGETSIZE64, &size_bytes) < 0) {
      return fail_errno(fmt::format("raw image {}: BLKGETSIZE64", path));
    }
  } else {
    return fail(Errc::InvalidArgument,
                fmt::format("raw image {}: not a regular file or block device", path));
  }
  if (size_bytes % kSectorBytes != 0) {
    uint64_t rounded = size_bytes - size_bytes % kSectorBytes;
    LOG_WARN("raw image {}: size {} is not a multiple of 512; the guest sees {} bytes", path,
             size_bytes, rounded);
    size_bytes = rounded;
  }
  // The completion queue holds every request we let be in flight.
  std::unique_ptr<IoRing> ring =
      TRY(IoRing::create(kQueueDepth, kMaxInFlight, fmt::format("raw image {}", path)));
  return std::unique_ptr<RawFile>(new RawFile(path, std::move(file), std::move(lock), access,
                                              size_bytes, std::move(ring)));
}

RawFile::RawFile(std::string path, Fd file, ImageLock lock, Access access, uint64_t size_bytes,
                 std::unique_ptr<IoRing> ring)
    : path_(std::move(path)), file_(std::move(file)), lock_(std::move(lock)), access_(access),
      size_bytes_(size_bytes), ring_(std::move(ring)) {
  slots_.resize(kMaxInFlight);
  free_slots_.reserve(kMaxInFlight);
  for (uint32_t i = kMaxInFlight; i > 0; --i) free_slots_.push_back(i - 1);
}

RawFile::~RawFile() {
  // The kernel may still write into the callers' buffers; wait for every
  // request so none outlives the memory it points at.
  if (in_flight() == 0) return;
  LOG_WARN("raw image {}: destroyed with {} requests in flight; waiting", path_, in_flight());
  std::vector<BlockCompletion> dropped;
  while (in_flight() > 0) {
    if (!ring_->wait_one()) break;
    reap(dropped);
    dropped.clear();
  }
}

Result<void> RawFile::check_range(uint64_t offset, uint64_t length_bytes) const {
  if (offset > size_bytes_ || length_bytes > size_bytes_ - offset) {
    return fail(Errc::OutOfRange, fmt::format("raw image {}: {}+{} bytes past its size {}", path_,
                                              offset, length_bytes, size_bytes_));
  }
  return ok();
}

Result<void> RawFile::check_writable() const {
  if (access_ == Access::ReadOnly) {
    return fail(Errc::PermissionDenied, fmt::format("raw image {}: opened read-only", path_));
  }
  return ok();
}

Result<void> RawFile::transfer_all(BlockOp op, uint64_t offset, std::span<const iovec> iov,
                                   uint64_t skip_bytes) const {
  // A private copy we can advance through short transfers; the synchronous
  // face and the rare short asynchronous transfer are not the hot path.
  std::vector<iovec> rest;
  rest.reserve(iov.size());
  offset += skip_bytes;
  for (const iovec& v : iov) {
    if (skip_bytes >= v.iov_len) {
      skip_bytes -= v.iov_len;
      continue;
    }
    rest.push_back(iovec{static_cast<std::byte*>(v.iov_base) + skip_bytes, v.iov_len - skip_bytes});
    skip_bytes = 0;
  }
  size_t index = 0;
  while (index < rest.size()) {
    if (rest[index].iov_len == 0) {
      ++index;
      continue;
    }
    int count = static_cast<int>(std::min<size_t>(rest.size() - index, IOV_MAX));
    ssize_t n = op == BlockOp::Read
                    ? ::preadv(file_.get(), &rest[index], count, static_cast<off_t>(offset))
                    : ::pwritev(file_.get(), &rest[index], count, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno(fmt::format("raw image {}: {} at {}", path_,
                                    op == BlockOp::Read ? "preadv" : "pwritev", offset));
    }
    if (n == 0) {
      return fail(Error(Errc::Io, fmt::format("raw image {}: end of file at {}", path_, offset), EIO));
    }
    offset += static_cast<uint64_t>(n);
    auto done = static_cast<size_t>(n);
    while (done > 0) {
      size_t step = std::min(done, rest[index].iov_len);
      rest[index].iov_base = static_cast<std::byte*>(rest[index].iov_base) + step;
      rest[index].iov_len -= step;
      done -= step;
      if (rest[index].iov_len == 0) ++index;
    }
  }
  return ok();
}

Result<size_t> RawFile::read_at(uint64_t offset, std::span<const iovec> iov) {
  uint64_t length = iov_bytes(iov);
  TRY(check_range(offset, length));
  TRY(transfer_all(BlockOp::Read, offset, iov, 0));
  return static_cast<size_t>(length);
}

Result<size_t> RawFile::write_at(uint64_t offset, std::span<const iovec> iov) {
  TRY(check_writable());
  uint64_t length = iov_bytes(iov);
  TRY(check_range(offset, length));
  TRY(transfer_all(BlockOp::Write, offset, iov, 0));
  return static_cast<size_t>(length);
}

Result<void> RawFile::flush() {
  if (access_ == Access::ReadOnly) return ok();
  while (::fdatasync(file_.get()) < 0) {
    if (errno != EINTR) return fail_errno(fmt::format("raw image {}: fdatasync", path_));
  }
  return ok();
}

Result<void> RawFile::write_zero_buffers(uint64_t offset, uint64_t length_bytes) const {
  static const std::vector<std::byte> zeroes(kZeroChunkBytes);
  while (length_bytes > 0) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(length_bytes, kZeroChunkBytes));
    TRY(file_.pwrite_all(std::span(zeroes).first(chunk), offset));
    offset += chunk;
    length_bytes -= chunk;
  }
  return ok();
}

Result<void> RawFile::discard(uint64_t offset, uint64_t length_bytes) {
  TRY(check_writable());
  TRY(check_range(offset, length_bytes));
  if (length_bytes == 0 || !punch_hole_works_) return ok();
  if (::fallocate(file_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  static_cast<off_t>(offset), static_cast<off_t>(length_bytes)) < 0) {
    if (errno == EOPNOTSUPP) {
      punch_hole_works_ = false;
      return ok();
    }
    return fail_errno(fmt::format("raw image {}: punch hole {}+{}", path_, offset, length_bytes));
  }
  return ok();
}

Result<void> RawFile::resize(uint64_t new_size_bytes) {
  TRY(check_writable());
  if (new_size_bytes % 512 != 0 || new_size_bytes > static_cast<uint64_t>(INT64_MAX)) {
    return fail(Errc::InvalidArgument,
                fmt::format("raw image {}: size {} is not a multiple of 512", path_, new_size_bytes));
  }
  if (::ftruncate(file_.get(), static_cast<off_t>(new_size_bytes)) < 0) {
    return fail_errno(fmt::format("raw image {}: ftruncate to {} bytes", path_, new_size_bytes));
  }
  size_bytes_ = new_size_bytes;
  return ok();
}

Result<void> RawFile::write_zeroes(uint64_t offset, uint64_t length_bytes, Unmap unmap) {
  TRY(check_writable());
  TRY(check_range(offset, length_bytes));
  if (length_bytes == 0) return ok();
  // A punched hole reads as zeroes (regular files and block devices alike).
  if (unmap == Unmap::Yes && punch_hole_works_) {
    if (::fallocate(file_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(offset), static_cast<off_t>(length_bytes)) == 0) {
      return ok();
    }
    if (errno != EOPNOTSUPP) {
      return fail_errno(fmt::format("raw image {}: punch hole {}+{}", path_, offset, length_bytes));
    }
    punch_hole_works_ = false;
  }
  if (zero_range_works_) {
    if (::fallocate(file_.get(), FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(offset), static_cast<off_t>(length_bytes)) == 0) {
      return ok();
    }
    if (errno != EOPNOTSUPP) {
      return fail_errno(fmt::format("raw image {}: zero range {}+{}", path_, offset, length_bytes));
    }
    zero_range_works_ = false;
  }
  return write_zero_buffers(offset, length_bytes);
}

Result<void> RawFile::submit(const BlockRequest& request) {
  uint64_t length = request.length_bytes;
  if (is_transfer(request.op)) {
    length = iov_bytes(request.iov);
    if (request.iov.size() > IOV_MAX) {
      return fail(Errc::InvalidArgument,
                  fmt::format("raw image {}: {} iovecs (at most {})", path_, request.iov.size(),
                              IOV_MAX));
    }
  }
  if (request.op != BlockOp::Read && request.op != BlockOp::Flush) TRY(check_writable());
  if (request.op != BlockOp::Flush) TRY(check_range(request.offset, length));
  if (free_slots_.empty()) {
    return fail(Errc::Busy, fmt::format("raw image {}: {} requests in flight", path_, kMaxInFlight));
  }

  io_uring_sqe* sqe = ring_->next_sqe();
  if (sqe == nullptr) {
    return fail(Errc::Busy, fmt::format("raw image {}: io_uring submission failed", path_));
  }
  uint32_t index = free_slots_.back();
  free_slots_.pop_back();
  Slot& slot = slots_[index];
  slot.request = request;
  slot.expected_bytes = length;

  auto offset = static_cast<off_t>(request.offset);
  auto len = static_cast<off_t>(length);
  switch (request.op) {
    case BlockOp::Read:
      io_uring_prep_readv(sqe, file_.get(), request.iov.data(),
                          static_cast<unsigned>(request.iov.size()), static_cast<__u64>(offset));
      break;
    case BlockOp::Write:
      io_uring_prep_writev(sqe, file_.get(), request.iov.data(),
                           static_cast<unsigned>(request.iov.size()), static_cast<__u64>(offset));
      break;
    case BlockOp::Flush:
      if (access_ == Access::ReadOnly) {
        io_uring_prep_nop(sqe);
      } else {
        io_uring_prep_fsync(sqe, file_.get(), IORING_FSYNC_DATASYNC);
      }
      break;
    case BlockOp::Discard:
    case BlockOp::WriteZeroesUnmap:
      io_uring_prep_fallocate(sqe, file_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                              len);
      break;
    case BlockOp::WriteZeroes:
      io_uring_prep_fallocate(sqe, file_.get(), FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset,
                              len);
      break;
  }
  // Zero-length ranges and operations a previous request found unsupported
  // still go through the ring as NOPs, so their completion takes the one
  // path every request takes; finish() then does the fallback.
  bool known_unsupported =
      (request.op == BlockOp::WriteZeroes && !zero_range_works_) ||
      ((request.op == BlockOp::Discard || request.op == BlockOp::WriteZeroesUnmap) &&
       !punch_hole_works_);
  if (!is_transfer(request.op) && request.op != BlockOp::Flush &&
      (length == 0 || known_unsupported)) {
    io_uring_prep_nop(sqe);
  }
  io_uring_sqe_set_data64(sqe, index);
  return ok();
}

Result<void> RawFile::kick() { return ring_->kick(); }

int64_t RawFile::finish(const Slot& slot, int32_t res) {
  const BlockRequest& request = slot.request;
  auto errno_of = [](const Result<void>& result) -> int64_t {
    return result ? 0 : completion_errno(result.error());
  };
  switch (request.op) {
    case BlockOp::Read:
    case BlockOp::Write: {
      if (res < 0) return res;
      auto done = static_cast<uint64_t>(res);
      if (done < slot.expected_bytes) {
        Result<void> rest = transfer_all(request.op, request.offset, request.iov, done);
        if (!rest) {
          LOG_RATELIMITED(warn, "{}", rest.error().message());
          return errno_of(rest);
        }
      }
      return static_cast<int64_t>(slot.expected_bytes);
    }
    case BlockOp::Flush:
      return res < 0 ? res : 0;
    case BlockOp::Discard:
      if (res == -EOPNOTSUPP) {
        punch_hole_works_ = false;
        return 0;
      }
      return res < 0 ? res : 0;
    case BlockOp::WriteZeroes:
    case BlockOp::WriteZeroesUnmap: {
      if (res >= 0 && slot.expected_bytes == 0) return 0;
      bool unmap = request.op == BlockOp::WriteZeroesUnmap;
      bool tried = unmap ? punch_hole_works_ : zero_range_works_;
      if (tried && res != -EOPNOTSUPP) return res < 0 ? res : 0;
      if (tried) (unmap ? punch_hole_works_ : zero_range_works_) = false;
      // The ring ran a NOP or the file system said no: the synchronous
      // path tries what is left (ZERO_RANGE, then zero buffers).
      return errno_of(write_zeroes(request.offset, slot.expected_bytes,
                                   unmap ? Unmap::Yes : Unmap::No));
    }
  }
  return -EIO;
}

size_t RawFile::reap(std::vector<BlockCompletion>& out) {
  return ring_->drain([&](uint64_t index, int32_t res) {
    CHECK(index < slots_.size(), "io_uring completion for an unknown slot");
    Slot& slot = slots_[index];
    out.push_back(BlockCompletion{slot.request.user_data, finish(slot, res)});
    slot.request.iov = {};
    free_slots_.push_back(static_cast<uint32_t>(index));
  });
}

}  // namespace keel::block
