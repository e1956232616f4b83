// Fd: sole owner of a file descriptor. Nothing outside src/base calls close().
#pragma once

#include <fcntl.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>

#include "base/result.h"

namespace keel {

class Fd {
 public:
  Fd() noexcept = default;
  explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) reset(std::exchange(other.fd_, -1));
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }

  // open(2) with O_CLOEXEC always added; the error names the path.
  static Result<Fd> open(const std::string& path, int flags, mode_t mode = 0);
  // A second descriptor for the same open file (F_DUPFD_CLOEXEC).
  Result<Fd> duplicate() const;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Gives up ownership; the caller closes it (used when handing fds to the kernel).
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1) noexcept;

  // Full positional I/O: loops over short transfers and EINTR. A read that
  // hits end of file early is an OutOfRange error.
  Result<void> pread_all(std::span<std::byte> data, uint64_t offset) const;
  Result<void> pwrite_all(std::span<const std::byte> data, uint64_t offset) const;
  // Stream I/O: write loops until everything is written.
  Result<void> write_all(std::span<const std::byte> data) const;
  Result<uint64_t> size_bytes() const;

 private:
  int fd_ = -1;
};

}  // namespace keel
