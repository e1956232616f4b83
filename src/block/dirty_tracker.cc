#include "block/dirty_tracker.h"

#include <algorithm>
#include <bit>

#include "base/check.h"

namespace keel::block {

DirtyTracker::DirtyTracker(uint64_t size_bytes, uint64_t chunk_bytes)
    : size_bytes_(size_bytes),
      chunk_bytes_(chunk_bytes),
      chunk_count_(chunk_bytes == 0 ? 0 : (size_bytes + chunk_bytes - 1) / chunk_bytes),
      words_((chunk_count_ + 63) / 64, 0) {
  CHECK(chunk_bytes != 0 && chunk_bytes % 512 == 0, "DirtyTracker: chunk size");
}

uint64_t DirtyTracker::chunk_length(uint64_t chunk) const {
  if (chunk >= chunk_count_) return 0;
  return std::min(chunk_bytes_, size_bytes_ - chunk_offset(chunk));
}

void DirtyTracker::mark(uint64_t offset, uint64_t length_bytes) {
  if (length_bytes == 0 || offset >= size_bytes_) return;
  const uint64_t end = std::min(size_bytes_, offset + std::min(length_bytes, size_bytes_));
  std::lock_guard lock(mutex_);
  for (uint64_t chunk = offset / chunk_bytes_; chunk * chunk_bytes_ < end; ++chunk) {
    uint64_t& word = words_[chunk / 64];
    const uint64_t bit = uint64_t{1} << (chunk % 64);
    if ((word & bit) == 0) {
      word |= bit;
      ++dirty_count_;
    }
  }
}

void DirtyTracker::mark_all() {
  std::lock_guard lock(mutex_);
  std::fill(words_.begin(), words_.end(), ~uint64_t{0});
  if (chunk_count_ % 64 != 0) words_.back() = (uint64_t{1} << (chunk_count_ % 64)) - 1;
  dirty_count_ = chunk_count_;
}

bool DirtyTracker::clear(uint64_t chunk) {
  if (chunk >= chunk_count_) return false;
  std::lock_guard lock(mutex_);
  uint64_t& word = words_[chunk / 64];
  const uint64_t bit = uint64_t{1} << (chunk % 64);
  if ((word & bit) == 0) return false;
  word &= ~bit;
  --dirty_count_;
  return true;
}

uint64_t DirtyTracker::dirty_count() const {
  std::lock_guard lock(mutex_);
  return dirty_count_;
}

uint64_t DirtyTracker::dirty_bytes() const {
  std::vector<uint64_t> chunks = dirty_chunks();
  uint64_t bytes = 0;
  for (uint64_t chunk : chunks) bytes += chunk_length(chunk);
  return bytes;
}

std::vector<uint64_t> DirtyTracker::dirty_chunks() const {
  std::lock_guard lock(mutex_);
  std::vector<uint64_t> chunks;
  chunks.reserve(dirty_count_);
  for (uint64_t index = 0; index < words_.size(); ++index) {
    for (uint64_t word = words_[index]; word != 0; word &= word - 1) {
      chunks.push_back(index * 64 + static_cast<uint64_t>(std::countr_zero(word)));
    }
  }
  return chunks;
}

}  // namespace keel::block
