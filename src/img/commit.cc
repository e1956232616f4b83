// keel-img commit: writes a qcow2 overlay's own clusters (data and zero
// clusters) into its backing file, growing the backing file first if the
// overlay is larger. Then, as qemu-img commit, the overlay is emptied (all
// its clusters dropped, so it reads the backing file everywhere); -d leaves
// it as it was, which reads the same. Order: the backing file is written
// and flushed before the overlay changes, so a crash part-way leaves the
// overlay hiding whatever the backing file got so far.
#include <cstdio>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "block/image.h"
#include "block/qcow2/qcow2.h"
#include "img/commands.h"

namespace keel::img {
namespace {

namespace qcow2 = block::qcow2;

constexpr uint64_t kChunkBytes = 1 << 20;

Result<void> copy_allocated(qcow2::Qcow2Image& overlay, block::BlockBackend& backing,
                            Progress& progress) {
  const uint64_t size = overlay.size_bytes();
  std::vector<std::byte> buffer(kChunkBytes);
  for (uint64_t pos = 0; pos < size;) {
    const auto extent = TRY(overlay.block_status(pos, std::min<uint64_t>(size - pos, kChunkBytes)));
    const uint64_t length = extent.length_bytes;
    using Status = qcow2::Qcow2Image::Status;
    switch (extent.status) {
      case Status::Unallocated: break;
      case Status::Zero: TRY(backing.write_zeroes(pos, length, block::Unmap::Yes)); break;
      case Status::Data:
      case Status::Compressed: {
        const iovec v{buffer.data(), length};
        TRY(overlay.read_at(pos, std::span(&v, 1)));
        TRY(backing.write_at(pos, std::span(&v, 1)));
        break;
      }
    }
    pos += length;
    progress.update(pos, size);
  }
  return backing.flush();
}

}  // namespace

Result<void> commit(const CommitArgs& args) {
  const std::string what = fmt::format("commit {}", args.file);
  if (TRY(block::probe_image_format(args.file)) != block::ImageFormat::Qcow2) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: not a qcow2 image (only an overlay can be committed)", what));
  }
  const block::Access overlay_access =
      args.keep_overlay ? block::Access::ReadOnly : block::Access::ReadWrite;
  auto overlay = TRY(open_qcow2(args.file, overlay_access));
  if (overlay->backing() == nullptr) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: the image has no backing file to commit into", what));
  }
  // Growing the backing file takes its write lock, which the overlay's read
  // lock on it would refuse: the chain is closed meanwhile.
  const std::string backing_path = overlay->backing_path();
  const block::ImageFormat backing_format =
      TRY(block::parse_image_format(std::string(overlay->backing()->format_name())));
  const uint64_t size = overlay->size_bytes();
  const bool grow = overlay->backing()->size_bytes() < size;
  overlay.reset();
  if (grow) TRY_CONTEXT(resize_image(backing_path, backing_format, size, false), what);
  // The backing file is written through the overlay's chain, opened with
  // the backing file's write lock (as QEMU reopens it read-write).
  overlay = TRY_CONTEXT(open_qcow2(args.file, overlay_access, block::Access::ReadWrite),
                        fmt::format("{}: backing file", what));
  if (overlay->backing() == nullptr) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: the image lost its backing file meanwhile", what));
  }
  block::BlockBackend& backing = *overlay->backing();
  Progress progress(args.progress);
  TRY_CONTEXT(copy_allocated(*overlay, backing, progress), what);
  if (!args.keep_overlay) TRY_CONTEXT(overlay->make_empty(), what);
  progress.finish();
  std::printf("Image committed.\n");
  return ok();
}

}  // namespace keel::img
