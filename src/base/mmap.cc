#include "base/mmap.h"

#include <fmt/format.h>

namespace keel {

Mmap& Mmap::operator=(Mmap&& other) noexcept {
  if (this != &other) {
    if (address_ != nullptr) ::munmap(address_, size_bytes_);
    address_ = std::exchange(other.address_, nullptr);
    size_bytes_ = std::exchange(other.size_bytes_, 0);
  }
  return *this;
}

Mmap::~Mmap() {
  if (address_ != nullptr) ::munmap(address_, size_bytes_);
}

Result<Mmap> Mmap::anonymous(size_t size_bytes, int extra_flags) {
  if (size_bytes == 0) return fail(Errc::InvalidArgument, "mmap of 0 bytes");
  void* address = ::mmap(nullptr, size_bytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | extra_flags, -1, 0);
  if (address == MAP_FAILED) {
    return fail_errno(fmt::format("mmap {} anonymous bytes", size_bytes));
  }
  return Mmap(address, size_bytes);
}

Result<Mmap> Mmap::file(const Fd& fd, size_t size_bytes, uint64_t offset, int prot, int flags) {
  if (size_bytes == 0) return fail(Errc::InvalidArgument, "mmap of 0 bytes");
  void* address = ::mmap(nullptr, size_bytes, prot, flags, fd.get(), static_cast<off_t>(offset));
  if (address == MAP_FAILED) {
    return fail_errno(fmt::format("mmap {} bytes of fd {} at {}", size_bytes, fd.get(), offset));
  }
  return Mmap(address, size_bytes);
}

}  // namespace keel
