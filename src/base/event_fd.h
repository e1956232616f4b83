// EventFd: a counter the kernel and our threads signal through; KVM uses it
// for irqfd (inject an interrupt) and ioeventfd (a guest write kicks us).
#pragma once

#include <cstdint>

#include "base/fd.h"
#include "base/result.h"

namespace keel {

enum class EventFdMode { Blocking, NonBlocking };

class EventFd {
 public:
  static Result<EventFd> create(EventFdMode mode = EventFdMode::NonBlocking);

  // Adds to the counter (wakes a reader).
  Result<void> signal(uint64_t count = 1) const;
  // Reads and clears the counter. In non-blocking mode returns 0 when unsignalled.
  Result<uint64_t> consume() const;

  int get() const { return fd_.get(); }

 private:
  explicit EventFd(Fd fd) : fd_(std::move(fd)) {}
  Fd fd_;
};

}  // namespace keel
