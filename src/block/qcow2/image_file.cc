#include "block/qcow2/image_file.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <vector>

#include <fmt/format.h>

#include "block/iov.h"

namespace keel::block::qcow2 {

Result<void> ImageFile::read(uint64_t offset, std::span<std::byte> data) const {
  const iovec v{data.data(), data.size()};
  return const_cast<ImageFile*>(this)->transfer(false, offset, std::span(&v, 1));
}

Result<void> ImageFile::readv(uint64_t offset, std::span<const iovec> iov) const {
  return const_cast<ImageFile*>(this)->transfer(false, offset, iov);
}

Result<void> ImageFile::write(uint64_t offset, std::span<const std::byte> data) {
  const iovec v{const_cast<std::byte*>(data.data()), data.size()};
  return transfer(true, offset, std::span(&v, 1));
}

Result<void> ImageFile::writev(uint64_t offset, std::span<const iovec> iov) {
  return transfer(true, offset, iov);
}

Result<void> ImageFile::transfer(bool is_write, uint64_t offset, std::span<const iovec> iov) {
  std::vector<iovec> rest(iov.begin(), iov.end());
  size_t index = 0;
  while (index < rest.size()) {
    if (rest[index].iov_len == 0) {
      ++index;
      continue;
    }
    const int count = static_cast<int>(std::min<size_t>(rest.size() - index, IOV_MAX));
    const ssize_t n = is_write
                          ? ::pwritev(fd_.get(), &rest[index], count, static_cast<off_t>(offset))
                          : ::preadv(fd_.get(), &rest[index], count, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno(fmt::format("qcow2 image {}: {} at {}", path_,
                                    is_write ? "pwritev" : "preadv", offset));
    }
    if (n == 0) {
      if (is_write) {
        return fail(Error(Errc::Io, fmt::format("qcow2 image {}: pwritev wrote nothing at {}",
                                                path_, offset), EIO));
      }
      // End of file: the rest reads as zeroes.
      iov_zero(std::span(rest).subspan(index));
      return ok();
    }
    offset += static_cast<uint64_t>(n);
    if (is_write) size_bytes_ = std::max(size_bytes_, offset);
    size_t moved = static_cast<size_t>(n);
    while (moved > 0 && index < rest.size()) {
      const size_t step = std::min(moved, rest[index].iov_len);
      rest[index].iov_base = static_cast<std::byte*>(rest[index].iov_base) + step;
      rest[index].iov_len -= step;
      moved -= step;
      if (rest[index].iov_len == 0) ++index;
    }
  }
  return ok();
}

Result<void> ImageFile::sync() {
  if (::fdatasync(fd_.get()) < 0) {
    return fail_errno(fmt::format("qcow2 image {}: fdatasync", path_));
  }
  return ok();
}

}  // namespace keel::block::qcow2
