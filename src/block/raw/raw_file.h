// RawFile: a disk image that is the disk's bytes, one for one (a regular
// file or a host block device). Spec: none beyond POSIX and io_uring.
// Implemented: the synchronous face on preadv/pwritev loops, fdatasync,
// fallocate (PUNCH_HOLE for discard, ZERO_RANGE for write-zeroes, with
// fallbacks); the asynchronous face on io_uring (an IoRing, as qcow2's data
// path uses: readv, writev, fsync DATASYNC, fallocate) with completions
// signalled on an eventfd.
// Missing: O_DIRECT, registered buffers/files, polled completions.
//
// Decisions:
// - A regular file whose size is not a multiple of 512 is rounded down to
//   one (and a warning logged): the tail is invisible to the guest, never
//   written, and the file is never extended.
// - A short asynchronous read or write (a signal, or the file shrank under
//   us) is finished synchronously in reap() with the same preadv/pwritev
//   loop as the synchronous face; end of file there reports -EIO.
// - Discard where the file system cannot punch holes is a no-op (reads
//   then return the old data, which the BlockBackend contract allows);
//   write-zeroes without ZERO_RANGE support writes zero buffers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/fd.h"
#include "block/block_backend.h"
#include "block/image_lock.h"
#include "block/io_ring.h"

namespace keel::block {

class RawFile final : public BlockBackend {
 public:
  // io_uring submission queue entries; more requests than this may be in
  // flight (submit() hands a full queue to the kernel and carries on).
  static constexpr uint32_t kQueueDepth = 256;
  // Requests in flight at once; submit() beyond it is Busy.
  static constexpr uint32_t kMaxInFlight = 1024;

  // Takes the file's image lock for access (block/image_lock.h) unless
  // locking is ForceShare.
  static Result<std::unique_ptr<RawFile>> open(const std::string& path, Access access,
                                               Locking locking = Locking::Lock);
  ~RawFile() override;
  RawFile(const RawFile&) = delete;
  RawFile& operator=(const RawFile&) = delete;

  uint64_t size_bytes() const override { return size_bytes_; }
  Access access() const override { return access_; }
  std::string_view format_name() const override { return "raw"; }
  Result<void> set_image_locked(bool locked) override;
  const std::string& path() const { return path_; }
  // For lseek(SEEK_DATA/SEEK_HOLE) (block/map.h); I/O goes through the calls below.
  int fd() const { return file_.get(); }

  Result<size_t> read_at(uint64_t offset, std::span<const iovec> iov) override;
  Result<size_t> write_at(uint64_t offset, std::span<const iovec> iov) override;
  Result<void> flush() override;
  Result<void> discard(uint64_t offset, uint64_t length_bytes) override;
  Result<void> write_zeroes(uint64_t offset, uint64_t length_bytes, Unmap unmap) override;
  // ftruncate: growing reads as zeroes, shrinking drops the tail.
  Result<void> resize(uint64_t new_size_bytes) override;

  Result<void> submit(const BlockRequest& request) override;
  Result<void> kick() override;
  int completion_fd() const override { return ring_->completion_fd(); }
  size_t reap(std::vector<BlockCompletion>& out) override;
  size_t in_flight() const override { return kMaxInFlight - free_slots_.size(); }

 private:
  // One request the kernel has (or will have); the SQE's user_data is its index.
  struct Slot {
    BlockRequest request;
    uint64_t expected_bytes = 0;  // Read/Write: the iovecs' total
  };

  RawFile(std::string path, Fd file, ImageLock lock, Access access, uint64_t size_bytes,
          std::unique_ptr<IoRing> ring);

  Result<void> check_range(uint64_t offset, uint64_t length_bytes) const;
  Result<void> check_writable() const;
  // preadv/pwritev of iov, which starts at offset, until every byte moved;
  // skips the first skip_bytes (what an asynchronous transfer already did).
  Result<void> transfer_all(BlockOp op, uint64_t offset, std::span<const iovec> iov,
                            uint64_t skip_bytes) const;
  Result<void> write_zero_buffers(uint64_t offset, uint64_t length_bytes) const;
  // What a completion of slot with the kernel's result res reports.
  int64_t finish(const Slot& slot, int32_t res);

  std::string path_;
  Fd file_;
  ImageLock lock_;
  Access access_;
  uint64_t size_bytes_;
  std::unique_ptr<IoRing> ring_;
  std::vector<Slot> slots_;
  std::vector<uint32_t> free_slots_;  // a stack of indices into slots_
  bool zero_range_works_ = true;      // cleared at the first EOPNOTSUPP
  bool punch_hole_works_ = true;
};

}  // namespace keel::block
