// Mmap: owns a mapping's address and length. Nothing outside src/base calls munmap().
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>

#include "base/fd.h"
#include "base/result.h"

namespace keel {

class Mmap {
 public:
  Mmap() noexcept = default;
  Mmap(Mmap&& other) noexcept
      : address_(std::exchange(other.address_, nullptr)),
        size_bytes_(std::exchange(other.size_bytes_, 0)) {}
  Mmap& operator=(Mmap&& other) noexcept;
  Mmap(const Mmap&) = delete;
  Mmap& operator=(const Mmap&) = delete;
  ~Mmap();

  // Private anonymous read-write memory, zero-filled.
  static Result<Mmap> anonymous(size_t size_bytes, int extra_flags = MAP_NORESERVE);
  // The same starting at a multiple of alignment (a power of two), e.g.
  // 2 MiB so that transparent hugepages can back it from its first byte.
  static Result<Mmap> anonymous_aligned(size_t size_bytes, size_t alignment,
                                        int extra_flags = MAP_NORESERVE);
  // A shared or private mapping of an open file (memfd, image, snapshot).
  static Result<Mmap> file(const Fd& fd, size_t size_bytes, uint64_t offset, int prot,
                           int flags);

  std::byte* data() const { return static_cast<std::byte*>(address_); }
  size_t size_bytes() const { return size_bytes_; }
  std::span<std::byte> bytes() const { return {data(), size_bytes_}; }
  bool valid() const { return address_ != nullptr; }

 private:
  Mmap(void* address, size_t size_bytes) : address_(address), size_bytes_(size_bytes) {}

  void* address_ = nullptr;
  size_t size_bytes_ = 0;
};

}  // namespace keel
