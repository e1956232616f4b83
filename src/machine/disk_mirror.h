// Local disks copied with a live migration (docs/migration-protocol.md,
// "Local disks"). The source's DiskMirrorSource tracks the guest's writes
// to each writable disk (block::DirtyTracker, marked by virtio-blk as
// writes complete) and sends every chunk marked dirty: all of them first
// (the bulk copy), then in each round what was written since, and in the
// stop-and-copy, with the devices quiesced, the rest. The destination's
// DiskMirrorTarget writes the chunks into its own images (the config's
// --disk paths, of the same virtual size) and, at the end, refuses a disk
// of which any chunk never arrived.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/result.h"
#include "block/block_backend.h"
#include "block/dirty_tracker.h"
#include "devices/virtio/blk.h"
#include "machine/vm_config.h"
#include "migration/disk_records.h"
#include "migration/stream.h"

namespace keel::machine {

inline constexpr uint32_t kDiskMirrorChunkBytes = 1u << 20;

class DiskMirrorSource {
 public:
  struct Disk {
    uint32_t index = 0;  // in the config's disk list
    std::string what;    // "disk 'PATH'", for errors
    devices::virtio::Blk* blk = nullptr;
  };
  // Called after each chunk sent with the bytes it took on the wire: the
  // sender's pacing, statistics and cancel check; an error stops the pass.
  using AfterChunk = std::function<Result<void>(uint64_t wire_bytes)>;

  // Starts tracking writes on every disk, each chunk marked dirty (nothing
  // is copied yet). The trackers go when this object does.
  explicit DiskMirrorSource(std::vector<Disk> disks, uint32_t chunk_bytes = kDiskMirrorChunkBytes);
  ~DiskMirrorSource();
  DiskMirrorSource(const DiskMirrorSource&) = delete;
  DiskMirrorSource& operator=(const DiskMirrorSource&) = delete;

  migration::DiskInfo info() const;
  // Sends every chunk dirty now (each cleared as it is read; a zero chunk
  // as a zeroes record).
  Result<void> send_dirty(migration::StreamWriter& writer, const AfterChunk& after_chunk);
  uint64_t dirty_bytes() const;
  uint64_t bytes_copied() const { return bytes_copied_; }

 private:
  struct Tracked {
    Disk disk;
    std::shared_ptr<block::DirtyTracker> tracker;
  };
  const uint32_t chunk_bytes_;
  std::vector<Tracked> disks_;
  std::vector<std::byte> buffer_;
  uint64_t bytes_copied_ = 0;
};

class DiskMirrorTarget {
 public:
  // Opens the config's disks info names (writable, not read-only ones),
  // locked, each of exactly the announced size; info must name every
  // writable disk of the config.
  static Result<DiskMirrorTarget> open(const migration::DiskInfo& info, const VmConfig& config);
  DiskMirrorTarget(DiskMirrorTarget&&) = default;
  DiskMirrorTarget& operator=(DiskMirrorTarget&&) = default;

  // Writes one chunk; it must be a whole chunk of an announced disk.
  Result<void> apply(const migration::DiskChunk& chunk);
  // Every chunk of every disk arrived at least once: flushed and closed
  // (the machine opens the images again). Corrupt, naming the disk and how
  // much is missing, otherwise.
  Result<void> finish();

 private:
  struct Target {
    uint32_t index = 0;
    std::string path;
    std::unique_ptr<block::BlockBackend> backend;
    std::unique_ptr<block::DirtyTracker> missing;  // chunks not received yet
  };
  DiskMirrorTarget() = default;
  std::vector<Target> targets_;
};

}  // namespace keel::machine
