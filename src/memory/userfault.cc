#include "memory/userfault.h"

#include <fmt/format.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

namespace keel::memory {
namespace {

Result<Fd> open_userfaultfd() {
  const int flags = O_CLOEXEC | O_NONBLOCK;
  int fd = static_cast<int>(::syscall(SYS_userfaultfd, flags));
  if (fd >= 0) return Fd(fd);
  const int syscall_errno = errno;
  // Without CAP_SYS_PTRACE and with vm.unprivileged_userfaultfd=0 the
  // syscall refuses kernel faults; /dev/userfaultfd's access mode decides.
  Result<Fd> device = Fd::open("/dev/userfaultfd", O_RDWR);
  if (device) {
    fd = ::ioctl(device->get(), USERFAULTFD_IOC_NEW, flags);
    if (fd >= 0) return Fd(fd);
  }
  return fail_errno("userfaultfd (for post-copy; root, vm.unprivileged_userfaultfd=1 or "
                    "/dev/userfaultfd needed)",
                    syscall_errno);
}

}  // namespace

Result<Userfault> Userfault::register_missing(std::span<std::byte> range) {
  const auto start = reinterpret_cast<uintptr_t>(range.data());
  if (start % kPageBytes != 0 || range.size() % kPageBytes != 0 || range.empty()) {
    return fail(Errc::InvalidArgument,
                fmt::format("userfaultfd: range {:#x}+{:#x} not page aligned", start,
                            range.size()));
  }
  Fd fd = TRY(open_userfaultfd());
  uffdio_api api{};
  api.api = UFFD_API;
  if (::ioctl(fd.get(), UFFDIO_API, &api) < 0) return fail_errno("UFFDIO_API");
  uffdio_register reg{};
  reg.range.start = start;
  reg.range.len = range.size();
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (::ioctl(fd.get(), UFFDIO_REGISTER, &reg) < 0) {
    return fail_errno(fmt::format("UFFDIO_REGISTER of {:#x} bytes", range.size()));
  }
  constexpr uint64_t kNeeded = (uint64_t{1} << _UFFDIO_COPY) | (uint64_t{1} << _UFFDIO_ZEROPAGE);
  if ((reg.ioctls & kNeeded) != kNeeded) {
    return fail(Errc::Unsupported, "userfaultfd: this memory has no UFFDIO_COPY/ZEROPAGE");
  }
  return Userfault(std::move(fd), range);
}

Result<std::optional<uint64_t>> Userfault::fault() {
  for (;;) {
    uffd_msg msg{};
    ssize_t got = ::read(fd_.get(), &msg, sizeof(msg));
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return std::optional<uint64_t>();
      return fail_errno("userfaultfd read");
    }
    if (got != sizeof(msg)) {
      return fail(Errc::Io, fmt::format("userfaultfd: a message of {} bytes", got));
    }
    if (msg.event != UFFD_EVENT_PAGEFAULT) continue;  // no other event was asked for
    const auto start = reinterpret_cast<uintptr_t>(range_.data());
    const uint64_t address = msg.arg.pagefault.address;
    if (address < start || address - start >= range_.size()) {
      return fail(Errc::Io, fmt::format("userfaultfd: a fault at {:#x} outside the range",
                                        address));
    }
    return std::optional<uint64_t>((address - start) / kPageBytes * kPageBytes);
  }
}

Result<void> Userfault::fill(uint64_t offset, uint64_t length, std::string_view what,
                             const std::function<int64_t(uint64_t done)>& step) {
  if (offset % kPageBytes != 0 || length % kPageBytes != 0 || offset > range_.size() ||
      length > range_.size() - offset) {
    return fail(Errc::InvalidArgument,
                fmt::format("{} {:#x}+{:#x}: outside the range", what, offset, length));
  }
  // Page by page past an EEXIST, so one page already there does not keep
  // the rest of the run out.
  uint64_t done = 0;
  while (done < length) {
    const int64_t filled = step(done);
    const int error = errno;
    if (filled == static_cast<int64_t>(length - done)) return ok();
    if (filled > 0) {
      done += static_cast<uint64_t>(filled);
      continue;
    }
    if (error == EEXIST) {
      done += kPageBytes;
      continue;
    }
    if (error == EAGAIN || error == EINTR) continue;
    return fail_errno(fmt::format("{} at {:#x}", what, offset + done), error);
  }
  return ok();
}

Result<void> Userfault::install(uint64_t offset, std::span<const std::byte> data) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(range_.data()) + offset;
  return fill(offset, data.size(), "UFFDIO_COPY", [&](uint64_t done) -> int64_t {
    uffdio_copy copy{};
    copy.dst = base + done;
    copy.src = reinterpret_cast<uintptr_t>(data.data()) + done;
    copy.len = data.size() - done;
    if (::ioctl(fd_.get(), UFFDIO_COPY, &copy) == 0) return static_cast<int64_t>(copy.len);
    return copy.copy;  // the bytes copied before the error, or -errno
  });
}

Result<void> Userfault::install_zero(uint64_t offset, uint64_t length) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(range_.data()) + offset;
  return fill(offset, length, "UFFDIO_ZEROPAGE", [&](uint64_t done) -> int64_t {
    uffdio_zeropage zero{};
    zero.range.start = base + done;
    zero.range.len = length - done;
    if (::ioctl(fd_.get(), UFFDIO_ZEROPAGE, &zero) == 0) return static_cast<int64_t>(length - done);
    return zero.zeropage;
  });
}

Result<void> Userfault::unregister() {
  uffdio_range range{};
  range.start = reinterpret_cast<uintptr_t>(range_.data());
  range.len = range_.size();
  if (::ioctl(fd_.get(), UFFDIO_UNREGISTER, &range) < 0) return fail_errno("UFFDIO_UNREGISTER");
  return ok();
}

}  // namespace keel::memory
