// DirtyTracker: which chunks of a disk were written since they were last
// copied, for a live migration that copies a local disk while the guest
// writes it (docs/migration-protocol.md, "Local disks"). virtio-blk marks
// the range of every write, write-zeroes and discard when it completes;
// the copier clears a chunk just before it reads it, under the device's
// lock, so a write completing after that read marks the chunk again and
// it is sent once more.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

namespace keel::block {

class DirtyTracker {
 public:
  // chunk_bytes must be a non-zero multiple of 512; the last chunk may be
  // shorter than chunk_bytes.
  DirtyTracker(uint64_t size_bytes, uint64_t chunk_bytes);

  uint64_t size_bytes() const { return size_bytes_; }
  uint64_t chunk_bytes() const { return chunk_bytes_; }
  uint64_t chunk_count() const { return chunk_count_; }
  uint64_t chunk_offset(uint64_t chunk) const { return chunk * chunk_bytes_; }
  // chunk_bytes, or what is left of the disk for the last chunk.
  uint64_t chunk_length(uint64_t chunk) const;

  // Marks every chunk the byte range touches; the part past the disk's end
  // (a request the backend refused) is ignored.
  void mark(uint64_t offset, uint64_t length_bytes);
  void mark_all();
  // Clears one chunk; returns whether it was dirty.
  bool clear(uint64_t chunk);
  uint64_t dirty_count() const;
  uint64_t dirty_bytes() const;
  // The dirty chunks now, in order (they stay marked).
  std::vector<uint64_t> dirty_chunks() const;

 private:
  const uint64_t size_bytes_;
  const uint64_t chunk_bytes_;
  const uint64_t chunk_count_;
  mutable std::mutex mutex_;  // guards the two below
  std::vector<uint64_t> words_;
  uint64_t dirty_count_ = 0;
};

}  // namespace keel::block
