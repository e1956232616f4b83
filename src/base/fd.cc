#include "base/fd.h"

#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

namespace keel {

Result<Fd> Fd::open(const std::string& path, int flags, mode_t mode) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  if (fd < 0) return fail_errno(fmt::format("open {}", path));
  return Fd(fd);
}

Result<Fd> Fd::duplicate() const {
  int fd = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return fail_errno(fmt::format("dup fd {}", fd_));
  return Fd(fd);
}

void Fd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

Result<void> Fd::pread_all(std::span<std::byte> data, uint64_t offset) const {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::pread(fd_, data.data() + done, data.size() - done,
                        static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno(fmt::format("pread {} bytes at {}", data.size() - done, offset + done));
    }
    if (n == 0) {
      return fail(Errc::OutOfRange,
                  fmt::format("pread: end of file at {} ({} bytes short)", offset + done,
                              data.size() - done));
    }
    done += static_cast<size_t>(n);
  }
  return ok();
}

Result<void> Fd::pwrite_all(std::span<const std::byte> data, uint64_t offset) const {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::pwrite(fd_, data.data() + done, data.size() - done,
                         static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno(fmt::format("pwrite {} bytes at {}", data.size() - done, offset + done));
    }
    done += static_cast<size_t>(n);
  }
  return ok();
}

Result<void> Fd::write_all(std::span<const std::byte> data) const {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd_, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno(fmt::format("write {} bytes to fd {}", data.size() - done, fd_));
    }
    done += static_cast<size_t>(n);
  }
  return ok();
}

Result<uint64_t> Fd::size_bytes() const {
  struct stat st {};
  if (::fstat(fd_, &st) < 0) return fail_errno(fmt::format("fstat fd {}", fd_));
  return static_cast<uint64_t>(st.st_size);
}

}  // namespace keel
