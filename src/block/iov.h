// Helpers for scatter-gather buffers (iovec lists) shared by the formats.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace keel::block {

uint64_t iov_bytes(std::span<const iovec> iov);

// Walks an iovec list front to back, handing out consecutive byte ranges of
// it as iovec lists of their own.
class IovCursor {
 public:
  explicit IovCursor(std::span<const iovec> iov) : iov_(iov) {}
  // Replaces out with the next length_bytes of the list (fewer if the list
  // ends first) and moves past them.
  void take(uint64_t length_bytes, std::vector<iovec>& out);

 private:
  std::span<const iovec> iov_;
  size_t index_ = 0;
  size_t offset_ = 0;  // into iov_[index_]
};

void iov_zero(std::span<const iovec> iov);
// Copies min(data.size(), iov_bytes(iov)) bytes from data into iov.
void iov_from_buffer(std::span<const iovec> iov, std::span<const std::byte> data);
// Copies min(data.size(), iov_bytes(iov)) bytes from iov into data.
void iov_to_buffer(std::span<const iovec> iov, std::span<std::byte> data);

}  // namespace keel::block
