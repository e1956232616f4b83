#include "devices/io_bus.h"

#include <cstring>
#include <mutex>

#include <fmt/format.h>

namespace keel::devices {

Result<void> IoBus::map(uint64_t base, uint64_t length, std::shared_ptr<IoHandler> handler) {
  if (length == 0 || base + length < base) {
    return fail(Errc::InvalidArgument, fmt::format("{} bus: bad range {:#x}+{:#x}", name_, base, length));
  }
  std::unique_lock lock(mutex_);
  auto next = ranges_.lower_bound(base);
  if (next != ranges_.end() && next->first < base + length) {
    return fail(Errc::Busy, fmt::format("{} bus: {:#x}+{:#x} overlaps {:#x}", name_, base, length,
                                        next->first));
  }
  if (next != ranges_.begin()) {
    auto previous = std::prev(next);
    if (previous->first + previous->second.length > base) {
      return fail(Errc::Busy, fmt::format("{} bus: {:#x}+{:#x} overlaps {:#x}", name_, base,
                                          length, previous->first));
    }
  }
  ranges_.emplace(base, Range{length, std::move(handler)});
  return ok();
}

Result<void> IoBus::unmap(uint64_t base) {
  std::unique_lock lock(mutex_);
  if (ranges_.erase(base) == 0) {
    return fail(Errc::NotFound, fmt::format("{} bus: nothing mapped at {:#x}", name_, base));
  }
  return ok();
}

const IoBus::Range* IoBus::find(uint64_t address, uint64_t size, uint64_t* base) const {
  auto it = ranges_.upper_bound(address);
  if (it == ranges_.begin()) return nullptr;
  --it;
  uint64_t offset = address - it->first;
  if (offset >= it->second.length || size > it->second.length - offset) return nullptr;
  *base = it->first;
  return &it->second;
}

bool IoBus::read(uint64_t address, std::span<std::byte> data) const {
  std::shared_ptr<IoHandler> handler;
  uint64_t base = 0;
  {
    std::shared_lock lock(mutex_);
    const Range* range = find(address, data.size(), &base);
    if (range != nullptr) handler = range->handler;
  }
  if (!handler) {
    std::memset(data.data(), 0xff, data.size());
    return false;
  }
  handler->read(address - base, data);
  return true;
}

bool IoBus::write(uint64_t address, std::span<const std::byte> data) const {
  std::shared_ptr<IoHandler> handler;
  uint64_t base = 0;
  {
    std::shared_lock lock(mutex_);
    const Range* range = find(address, data.size(), &base);
    if (range != nullptr) handler = range->handler;
  }
  if (!handler) return false;
  handler->write(address - base, data);
  return true;
}

}  // namespace keel::devices
