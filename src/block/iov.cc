#include "block/iov.h"

#include <algorithm>
#include <cstring>

namespace keel::block {

uint64_t iov_bytes(std::span<const iovec> iov) {
  uint64_t total = 0;
  for (const iovec& v : iov) total += v.iov_len;
  return total;
}

void IovCursor::take(uint64_t length_bytes, std::vector<iovec>& out) {
  out.clear();
  while (length_bytes > 0 && index_ < iov_.size()) {
    const iovec& v = iov_[index_];
    const size_t available = v.iov_len - offset_;
    const size_t n = static_cast<size_t>(std::min<uint64_t>(available, length_bytes));
    if (n > 0) out.push_back(iovec{static_cast<std::byte*>(v.iov_base) + offset_, n});
    length_bytes -= n;
    offset_ += n;
    if (offset_ == v.iov_len) {
      ++index_;
      offset_ = 0;
    }
  }
}

void iov_zero(std::span<const iovec> iov) {
  for (const iovec& v : iov) std::memset(v.iov_base, 0, v.iov_len);
}

void iov_from_buffer(std::span<const iovec> iov, std::span<const std::byte> data) {
  size_t done = 0;
  for (const iovec& v : iov) {
    if (done == data.size()) break;
    const size_t n = std::min(v.iov_len, data.size() - done);
    std::memcpy(v.iov_base, data.data() + done, n);
    done += n;
  }
}

void iov_to_buffer(std::span<const iovec> iov, std::span<std::byte> data) {
  size_t done = 0;
  for (const iovec& v : iov) {
    if (done == data.size()) break;
    const size_t n = std::min(v.iov_len, data.size() - done);
    std::memcpy(data.data() + done, v.iov_base, n);
    done += n;
  }
}

}  // namespace keel::block
