// BlockBackend: where a virtual disk's bytes live. Raw files (src/block/raw)
// and qcow2 images (src/block/qcow2) implement it; virtio-blk and keel-img
// use it without knowing which.
// Two faces:
// - Synchronous calls (read_at, write_at, flush, discard, write_zeroes) for
//   keel-img, image metadata and tests.
// - An asynchronous queue for virtio-blk: submit() many requests, then
//   kick(), wait for completion_fd() to become readable, reap() the
//   results. Raw files run it on io_uring so many requests are in flight.
// A backend is used by one thread at a time (virtio-blk: the device I/O
// loop); it does no locking of its own.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"

namespace keel::block {

enum class Access : uint8_t { ReadWrite, ReadOnly };
// Whether write_zeroes may deallocate the range (virtio-blk's unmap flag,
// qcow2 zero clusters) or must keep it allocated.
enum class Unmap : uint8_t { No, Yes };

enum class BlockOp : uint8_t { Read, Write, Flush, Discard, WriteZeroes, WriteZeroesUnmap };

// One asynchronous request. The iovecs and the memory they point to must
// stay valid until the request completes (virtio-blk points them straight
// at guest RAM).
struct BlockRequest {
  BlockOp op = BlockOp::Read;
  uint64_t offset = 0;        // bytes from the start of the disk
  uint64_t length_bytes = 0;  // Discard and WriteZeroes*; Read/Write use the iovecs
  std::span<const iovec> iov;
  uint64_t user_data = 0;     // handed back in the completion
};

struct BlockCompletion {
  uint64_t user_data = 0;
  // Bytes transferred (0 for flush/discard/write-zeroes) or -errno, as
  // io_uring reports it; a short read or write is an error (-EIO).
  int64_t result = 0;
};

class BlockBackend {
 public:
  virtual ~BlockBackend() = default;

  // The guest-visible size; a multiple of 512.
  virtual uint64_t size_bytes() const = 0;
  virtual Access access() const = 0;
  // "raw", "qcow2": for logs and the device tree.
  virtual std::string_view format_name() const = 0;

  // Synchronous I/O. The whole range must lie inside size_bytes()
  // (OutOfRange otherwise); a write on a read-only backend is
  // PermissionDenied. Returns the bytes transferred (all of them).
  virtual Result<size_t> read_at(uint64_t offset, std::span<const iovec> iov) = 0;
  virtual Result<size_t> write_at(uint64_t offset, std::span<const iovec> iov) = 0;
  virtual Result<void> flush() = 0;
  // Drops the range's data where the format can (reads may then return
  // zeroes or the old data); a no-op is a valid implementation.
  virtual Result<void> discard(uint64_t offset, uint64_t length_bytes) = 0;
  // Makes the range read as zeroes.
  virtual Result<void> write_zeroes(uint64_t offset, uint64_t length_bytes, Unmap unmap) = 0;
  // Changes size_bytes() to new_size_bytes (a multiple of 512): a disk
  // resized while the guest runs. No other call may run on the backend
  // meanwhile (virtio-blk holds its lock). Formats that cannot: Unsupported.
  virtual Result<void> resize(uint64_t new_size_bytes);

  // Asynchronous I/O. submit() validates and queues; an error means the
  // request was not queued (and will not complete). kick() hands queued
  // requests to the kernel in one go. Completions may arrive in any order.
  virtual Result<void> submit(const BlockRequest& request) = 0;
  virtual Result<void> kick() = 0;
  // Readable (level-triggered) while completions wait to be reaped.
  virtual int completion_fd() const = 0;
  // Appends finished requests to out; returns how many.
  virtual size_t reap(std::vector<BlockCompletion>& out) = 0;
  // Requests submitted and not yet reaped.
  virtual size_t in_flight() const = 0;

  // Disk handover in a live migration on shared storage
  // (docs/migration-protocol.md): lets go of the image's lock (false), or
  // takes it as the open would have (true; Busy naming the file while
  // another process holds it). Unsupported where the format caches
  // metadata (qcow2) that the new owner would have to read again.
  virtual Result<void> set_image_locked(bool locked);
};

// What a completion reports for a failed operation: -errno, or -EIO where
// the error carries none.
int64_t completion_errno(const Error& error);

}  // namespace keel::block
