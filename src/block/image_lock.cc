#include "block/image_lock.h"

#include <fcntl.h>

#include <array>
#include <cerrno>
#include <string_view>

#include <fmt/format.h>

namespace keel::block {
namespace {

// QEMU's BLK_PERM_* bits, in lock-byte order.
enum Permission : uint8_t { kConsistentRead = 0, kWrite = 1, kWriteUnchanged = 2, kResize = 3 };
constexpr int kPermissionCount = 4;
constexpr std::array<std::string_view, kPermissionCount> kPermissionNames = {
    "consistent read", "write", "write unchanged", "resize"};

constexpr uint8_t bit(Permission p) { return static_cast<uint8_t>(1u << p); }

struct Permissions {
  uint8_t used;
  uint8_t shared;
};

Permissions permissions_for(Access access) {
  // Neither readers nor writers let others write or resize: a format's
  // metadata must not change under it (QEMU's bdrv_default_perms_for_storage).
  const uint8_t shared = bit(kConsistentRead) | bit(kWriteUnchanged);
  if (access == Access::ReadOnly) return {bit(kConsistentRead), shared};
  return {static_cast<uint8_t>(bit(kConsistentRead) | bit(kWrite) | bit(kResize)), shared};
}

int ofd_lock(int fd, short type, uint64_t offset) {
  struct flock lock {};
  lock.l_type = type;
  lock.l_whence = SEEK_SET;
  lock.l_start = static_cast<off_t>(offset);
  lock.l_len = 1;
  int result = 0;
  do {
    result = ::fcntl(fd, F_OFD_SETLK, &lock);
  } while (result < 0 && errno == EINTR);
  return result;
}

// Whether another open file description holds a lock on the byte at offset.
Result<bool> held_elsewhere(int fd, uint64_t offset, const std::string& path) {
  struct flock lock {};
  lock.l_type = F_WRLCK;  // conflicts with any lock another description holds
  lock.l_whence = SEEK_SET;
  lock.l_start = static_cast<off_t>(offset);
  lock.l_len = 1;
  if (::fcntl(fd, F_OFD_GETLK, &lock) < 0) {
    return fail_errno(fmt::format("image {}: test lock byte {}", path, offset));
  }
  return lock.l_type != F_UNLCK;
}

}  // namespace

ImageLock& ImageLock::operator=(ImageLock&& other) noexcept {
  if (this != &other) {
    release();
    fd_ = std::move(other.fd_);
  }
  return *this;
}

void ImageLock::release() noexcept {
  if (!fd_.valid()) return;
  for (int p = 0; p < kPermissionCount; ++p) {
    (void)ofd_lock(fd_.get(), F_UNLCK, kPermissionBase + static_cast<uint64_t>(p));
    (void)ofd_lock(fd_.get(), F_UNLCK, kSharedBase + static_cast<uint64_t>(p));
  }
  fd_.reset();
}

Result<ImageLock> ImageLock::acquire(const Fd& fd, const std::string& path, Access access,
                                     Locking locking) {
  if (locking == Locking::ForceShare) return ImageLock();
  ImageLock lock(TRY_CONTEXT(fd.duplicate(), fmt::format("image {}: lock", path)));
  const Permissions perms = permissions_for(access);
  for (int p = 0; p < kPermissionCount; ++p) {
    const uint8_t mask = static_cast<uint8_t>(1u << p);
    const uint64_t p_offset = static_cast<uint64_t>(p);
    if ((perms.used & mask) != 0 && ofd_lock(lock.fd_.get(), F_RDLCK, kPermissionBase + p_offset) < 0) {
      return fail_errno(fmt::format("image {}: lock byte {}", path, kPermissionBase + p_offset));
    }
    if ((perms.shared & mask) == 0 && ofd_lock(lock.fd_.get(), F_RDLCK, kSharedBase + p_offset) < 0) {
      return fail_errno(fmt::format("image {}: lock byte {}", path, kSharedBase + p_offset));
    }
  }
  for (int p = 0; p < kPermissionCount; ++p) {
    const uint8_t mask = static_cast<uint8_t>(1u << p);
    const uint64_t p_offset = static_cast<uint64_t>(p);
    const std::string_view name = kPermissionNames[static_cast<size_t>(p)];
    if ((perms.used & mask) != 0 && TRY(held_elsewhere(lock.fd_.get(), kSharedBase + p_offset, path))) {
      return fail(Errc::Busy,
                  fmt::format("{} is in use by another process (lock held: it does not let "
                              "others take the \"{}\" permission, byte {})",
                              path, name, kSharedBase + p_offset));
    }
    if ((perms.shared & mask) == 0 &&
        TRY(held_elsewhere(lock.fd_.get(), kPermissionBase + p_offset, path))) {
      return fail(Errc::Busy,
                  fmt::format("{} is in use by another process (lock held: it has the \"{}\" "
                              "permission, byte {})",
                              path, name, kPermissionBase + p_offset));
    }
  }
  return lock;
}

Result<ImageLock> ImageLock::open(const std::string& path, Access access, Locking locking) {
  if (locking == Locking::ForceShare) return ImageLock();
  // Every lock byte is a read lock, which needs a descriptor open for reading.
  const Fd fd = TRY_CONTEXT(Fd::open(path, O_RDONLY), fmt::format("image {}: lock", path));
  return acquire(fd, path, access, locking);
}

}  // namespace keel::block
