#include "machine/disk_mirror.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "block/image.h"

namespace keel::machine {
namespace {

bool all_zero(std::span<const std::byte> data) {
  // Compare with itself shifted by one after checking the first byte.
  return data.empty() ||
         (data[0] == std::byte{0} && std::memcmp(data.data(), data.data() + 1, data.size() - 1) == 0);
}

}  // namespace

DiskMirrorSource::DiskMirrorSource(std::vector<Disk> disks, uint32_t chunk_bytes)
    : chunk_bytes_(chunk_bytes) {
  for (Disk& disk : disks) {
    auto tracker = std::make_shared<block::DirtyTracker>(disk.blk->size_bytes(), chunk_bytes_);
    tracker->mark_all();
    disk.blk->set_write_tracker(tracker);
    disks_.push_back({std::move(disk), std::move(tracker)});
  }
}

DiskMirrorSource::~DiskMirrorSource() {
  for (Tracked& tracked : disks_) tracked.disk.blk->set_write_tracker(nullptr);
}

migration::DiskInfo DiskMirrorSource::info() const {
  migration::DiskInfo info{.chunk_bytes = chunk_bytes_, .disks = {}};
  for (const Tracked& tracked : disks_) {
    info.disks.push_back({tracked.disk.index, tracked.tracker->size_bytes()});
  }
  return info;
}

uint64_t DiskMirrorSource::dirty_bytes() const {
  uint64_t bytes = 0;
  for (const Tracked& tracked : disks_) bytes += tracked.tracker->dirty_bytes();
  return bytes;
}

Result<void> DiskMirrorSource::send_dirty(migration::StreamWriter& writer,
                                          const AfterChunk& after_chunk) {
  for (Tracked& tracked : disks_) {
    const block::DirtyTracker& tracker = *tracked.tracker;
    for (uint64_t chunk : tracker.dirty_chunks()) {
      buffer_.resize(tracker.chunk_length(chunk));
      TRY_CONTEXT(tracked.disk.blk->read_tracked_chunk(chunk, buffer_),
                  fmt::format("migrate: {}", tracked.disk.what));
      migration::DiskChunk record{
          .disk = tracked.disk.index,
          .encoding = all_zero(buffer_) ? migration::ChunkEncoding::Zeroes
                                        : migration::ChunkEncoding::Data,
          .offset = tracker.chunk_offset(chunk),
          .length_bytes = static_cast<uint32_t>(buffer_.size()),
          .data = buffer_};
      const uint64_t before = writer.bytes_sent();
      TRY(writer.send(migration::FrameType::DiskChunk, migration::encode_disk_chunk(record)));
      bytes_copied_ += buffer_.size();
      TRY(after_chunk(writer.bytes_sent() - before));
    }
  }
  return ok();
}

Result<DiskMirrorTarget> DiskMirrorTarget::open(const migration::DiskInfo& info,
                                                const VmConfig& config) {
  DiskMirrorTarget mirror;
  for (const migration::MirroredDisk& disk : info.disks) {
    if (disk.index >= config.disks.size()) {
      return fail(Errc::InvalidArgument,
                  fmt::format("disk info: the source copies disk {}, this config has {} disks",
                              disk.index, config.disks.size()));
    }
    const DiskConfig& target = config.disks[disk.index];
    if (target.read_only) {
      return fail(Errc::InvalidArgument,
                  fmt::format("disk info: the source copies disk {}, which is read-only here ('{}')",
                              disk.index, target.path));
    }
    const block::ImageFormat format =
        TRY_CONTEXT(block::parse_image_format(target.format), target.path);
    auto backend = TRY_CONTEXT(
        block::open_image(target.path, format, block::Access::ReadWrite, block::Locking::Lock),
        fmt::format("disk {} target", disk.index));
    if (backend->size_bytes() != disk.size_bytes) {
      return fail(Errc::InvalidArgument,
                  fmt::format("disk {} target '{}' is {} bytes, the source's disk {} bytes",
                              disk.index, target.path, backend->size_bytes(), disk.size_bytes));
    }
    auto missing = std::make_unique<block::DirtyTracker>(disk.size_bytes, info.chunk_bytes);
    missing->mark_all();
    mirror.targets_.push_back({disk.index, target.path, std::move(backend), std::move(missing)});
  }
  // A writable disk the source does not copy would be run as a copy
  // without its contents.
  for (size_t index = 0; index < config.disks.size(); ++index) {
    if (config.disks[index].read_only) continue;
    if (std::none_of(info.disks.begin(), info.disks.end(),
                     [index](const migration::MirroredDisk& disk) { return disk.index == index; })) {
      return fail(Errc::InvalidArgument,
                  fmt::format("disk info: the source does not copy disk {} ('{}'), which is "
                              "writable here",
                              index, config.disks[index].path));
    }
  }
  return mirror;
}

Result<void> DiskMirrorTarget::apply(const migration::DiskChunk& chunk) {
  auto target = std::find_if(targets_.begin(), targets_.end(),
                             [&chunk](const Target& t) { return t.index == chunk.disk; });
  if (target == targets_.end()) {
    return fail(Errc::Corrupt, fmt::format("disk chunk for disk {}, which disk info did not name",
                                           chunk.disk));
  }
  const block::DirtyTracker& layout = *target->missing;
  const uint64_t index = chunk.offset / layout.chunk_bytes();
  if (chunk.offset % layout.chunk_bytes() != 0 || index >= layout.chunk_count() ||
      chunk.length_bytes != layout.chunk_length(index)) {
    return fail(Errc::Corrupt, fmt::format("disk chunk: disk {} offset {} length {} is not a "
                                           "whole chunk of a {}-byte disk in {}-byte chunks",
                                           chunk.disk, chunk.offset, chunk.length_bytes,
                                           layout.size_bytes(), layout.chunk_bytes()));
  }
  if (chunk.encoding == migration::ChunkEncoding::Data) {
    // write_at takes iovecs of const data for the kernel to read.
    const iovec part{const_cast<std::byte*>(chunk.data.data()), chunk.data.size()};
    TRY_CONTEXT(target->backend->write_at(chunk.offset, std::span(&part, 1)), target->path);
  } else {
    // The target may be preallocated with anything: zeroes are written too.
    TRY_CONTEXT(target->backend->write_zeroes(chunk.offset, chunk.length_bytes, block::Unmap::Yes),
                target->path);
  }
  target->missing->clear(index);
  return ok();
}

Result<void> DiskMirrorTarget::finish() {
  for (Target& target : targets_) {
    if (uint64_t missing = target.missing->dirty_count(); missing != 0) {
      return fail(Errc::Corrupt,
                  fmt::format("disk {} ('{}'): {} of {} chunks never arrived", target.index,
                              target.path, missing, target.missing->chunk_count()));
    }
    TRY_CONTEXT(target.backend->flush(), target.path);
  }
  targets_.clear();  // closed and unlocked: the machine opens them again
  return ok();
}

}  // namespace keel::machine
