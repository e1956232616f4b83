// ImageLock: who may use an image file at the same time, in the scheme
// QEMU's file-posix driver uses (QEMU block/file-posix.c, raw_apply_lock_bytes
// and raw_check_lock_bytes), so that Keel and QEMU see each other's locks.
//
// Each permission has two lock bytes in the image file, taken as shared
// open-file-description locks (F_OFD_SETLK, F_RDLCK), which never change
// the file's contents:
//   byte 100 + p: "I use permission p",
//   byte 200 + p: "I do not let others use permission p",
// for p = 0 consistent read, 1 write, 2 write unchanged, 3 resize. An opener
// first takes its bytes, then asks (F_OFD_GETLK) whether any other open file
// description holds byte 200 + p for a permission it uses, or byte 100 + p
// for one it does not share; if so it lets go and fails. Taking before
// asking means two racing openers cannot both succeed.
//
// Keel's permissions are those QEMU takes for a qcow2 image (measured with
// qemu-io and /proc/locks, QEMU 7.2): a reader uses consistent read; a writer
// also write and resize; neither lets others write or resize. So readers
// share a file (a backing file under several overlays), a writer excludes
// every other writer and reader, and `qemu-img info` of an image keel-vmm
// writes fails as it does for a QEMU-held one.
//
// The locks belong to the open file description, not the process: two opens
// of one file in the same process conflict just as two processes do.
#pragma once

#include <cstdint>
#include <string>

#include "base/fd.h"
#include "base/result.h"
#include "block/block_backend.h"

namespace keel::block {

// Whether an open takes the locks. ForceShare is qemu-img's -U: look at an
// image whatever holds it (read-only; what it reads may be changing).
enum class Locking : uint8_t { Lock, ForceShare };

class ImageLock {
 public:
  // The lock bytes' offsets (QEMU's RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE).
  static constexpr uint64_t kPermissionBase = 100;
  static constexpr uint64_t kSharedBase = 200;

  // No lock.
  ImageLock() = default;
  ImageLock(ImageLock&&) noexcept = default;
  ImageLock& operator=(ImageLock&& other) noexcept;
  ImageLock(const ImageLock&) = delete;
  ImageLock& operator=(const ImageLock&) = delete;
  // Lets go of the lock bytes.
  ~ImageLock() { release(); }

  // Locks the open file fd refers to for access (fd must be open for
  // reading). A conflict is Errc::Busy: "PATH is in use by another process
  // (lock held: ...)". ForceShare returns no lock.
  static Result<ImageLock> acquire(const Fd& fd, const std::string& path, Access access,
                                   Locking locking = Locking::Lock);
  // Opens path only to hold its lock, for work done through descriptors of
  // its own (header rewrites, refcount repair, truncation).
  static Result<ImageLock> open(const std::string& path, Access access,
                                Locking locking = Locking::Lock);

  bool held() const { return fd_.valid(); }
  void release() noexcept;

 private:
  explicit ImageLock(Fd fd) : fd_(std::move(fd)) {}

  // A second descriptor of the locked open file description: the locks are
  // that description's, so they last until this lets go of them.
  Fd fd_;
};

}  // namespace keel::block
