// Userfault: a userfaultfd over one range of this process's memory in
// missing mode (post-copy migration's destination, machine/postcopy.h).
// A page of the range that is absent (never touched, or dropped with
// MADV_DONTNEED) blocks whoever touches it, a guest through KVM included,
// until install() or install_zero() puts it there; fault() hands out the
// addresses waited for. Closing it (the destructor) lets every waiter go
// on with an ordinary fault.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string_view>

#include "base/fd.h"
#include "base/result.h"

namespace keel::memory {

class Userfault {
 public:
  static constexpr uint64_t kPageBytes = 4096;

  // range must be page aligned and private anonymous memory. Needs
  // userfaultfd(2) with kernel faults (root, or
  // vm.unprivileged_userfaultfd=1), or /dev/userfaultfd.
  static Result<Userfault> register_missing(std::span<std::byte> range);

  // The fd to poll for faults (non-blocking).
  int fd() const { return fd_.get(); }
  // The offset in the range of the page a thread waits for, or nothing if
  // no fault is pending now.
  Result<std::optional<uint64_t>> fault();
  // Copies data (whole pages) to offset; pages already there are left as
  // they are (another copy won the race). Wakes the threads waiting for them.
  Result<void> install(uint64_t offset, std::span<const std::byte> data);
  // Maps zero pages over [offset, offset + length), the same way.
  Result<void> install_zero(uint64_t offset, uint64_t length);
  // Ends missing mode over the range (every page is in): a thread waiting
  // in a fault goes on, and later faults are ordinary ones.
  Result<void> unregister();

 private:
  Userfault(Fd fd, std::span<std::byte> range) : fd_(std::move(fd)), range_(range) {}
  // Checks [offset, offset + length) and calls step(done) until it is
  // filled: step returns how many bytes it filled from offset + done, or
  // not more than 0 with errno set (EEXIST: that page is there, skipped).
  Result<void> fill(uint64_t offset, uint64_t length, std::string_view what,
                    const std::function<int64_t(uint64_t done)>& step);
  Fd fd_;
  std::span<std::byte> range_;
};

}  // namespace keel::memory
