#include "base/event_fd.h"

#include <sys/eventfd.h>
#include <unistd.h>

namespace keel {

Result<EventFd> EventFd::create(EventFdMode mode) {
  int flags = EFD_CLOEXEC | (mode == EventFdMode::NonBlocking ? EFD_NONBLOCK : 0);
  int fd = ::eventfd(0, flags);
  if (fd < 0) return fail_errno("eventfd");
  return EventFd(Fd(fd));
}

Result<void> EventFd::signal(uint64_t count) const {
  for (;;) {
    ssize_t n = ::write(fd_.get(), &count, sizeof(count));
    if (n == static_cast<ssize_t>(sizeof(count))) return ok();
    if (n < 0 && errno == EINTR) continue;
    return fail_errno("eventfd signal");
  }
}

Result<uint64_t> EventFd::consume() const {
  for (;;) {
    uint64_t count = 0;
    ssize_t n = ::read(fd_.get(), &count, sizeof(count));
    if (n == static_cast<ssize_t>(sizeof(count))) return count;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return uint64_t{0};
    return fail_errno("eventfd consume");
  }
}

}  // namespace keel
