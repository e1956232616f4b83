#include "base/mmap.h"

#include <cstdint>

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

Result<Mmap> Mmap::anonymous_aligned(size_t size_bytes, size_t alignment, int extra_flags) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    return fail(Errc::InvalidArgument, fmt::format("mmap alignment {} is not a power of two",
                                                   alignment));
  }
  if (size_bytes > SIZE_MAX - alignment) {
    return fail(Errc::InvalidArgument, fmt::format("mmap of {} bytes is too large", size_bytes));
  }
  // Reserve alignment more than asked, then give back the unaligned head
  // and the tail beyond size_bytes.
  Mmap reserved = TRY(anonymous(size_bytes + alignment, extra_flags));
  const uintptr_t start = reinterpret_cast<uintptr_t>(reserved.address_);
  const uintptr_t aligned = (start + alignment - 1) & ~(uintptr_t{alignment} - 1);
  const size_t head = aligned - start;
  const size_t tail = alignment - head;
  void* address = std::exchange(reserved.address_, nullptr);
  reserved.size_bytes_ = 0;
  if (head > 0) ::munmap(address, head);
  if (tail > 0) ::munmap(reinterpret_cast<void*>(aligned + size_bytes), tail);
  return Mmap(reinterpret_cast<void*>(aligned), size_bytes);
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
