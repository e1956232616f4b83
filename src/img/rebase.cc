// keel-img rebase: points a qcow2 image at another backing file (or none).
// Safe mode (the default) keeps what the image reads: every cluster the
// image leaves to its backing chain and whose bytes differ between the old
// chain and the new backing file is copied into the image first; only then
// is the header rewritten, so a crash in between leaves the old chain in
// place with a few redundant clusters. -u (unsafe) rewrites the name only,
// for when the backing file was moved or copied unchanged.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "block/image.h"
#include "block/image_lock.h"
#include "block/qcow2/create.h"
#include "block/qcow2/qcow2.h"
#include "img/commands.h"

namespace keel::img {
namespace {

namespace qcow2 = block::qcow2;

constexpr uint64_t kChunkBytes = 1 << 20;

// Reads [offset, offset + length) of image, zeroes past its end.
Result<void> read_padded(block::BlockBackend* image, uint64_t offset, std::span<std::byte> out) {
  std::fill(out.begin(), out.end(), std::byte{0});
  if (image == nullptr || offset >= image->size_bytes()) return ok();
  const uint64_t n = std::min<uint64_t>(out.size(), image->size_bytes() - offset);
  const iovec v{out.data(), n};
  TRY(image->read_at(offset, std::span(&v, 1)));
  return ok();
}

// Copies into image the clusters it leaves to its backing chain whose
// content differs in new_backing.
Result<void> copy_differences(qcow2::Qcow2Image& image, block::BlockBackend* new_backing,
                              Progress& progress) {
  const uint64_t size = image.size_bytes();
  const uint64_t cluster = image.header().cluster_size();
  std::vector<std::byte> old_view(std::max(kChunkBytes, cluster));
  std::vector<std::byte> new_view(old_view.size());
  for (uint64_t pos = 0; pos < size;) {
    const auto extent = TRY(image.block_status(pos, std::min<uint64_t>(size - pos, old_view.size())));
    const uint64_t length = extent.length_bytes;
    if (extent.status == qcow2::Qcow2Image::Status::Unallocated) {
      // What the image reads there now is the old chain's content.
      const iovec v{old_view.data(), length};
      TRY(image.read_at(pos, std::span(&v, 1)));
      TRY(read_padded(new_backing, pos, std::span(new_view).first(length)));
      // block_status extents start and end on clusters (or the disk's end).
      for (uint64_t at = 0; at < length; at += cluster) {
        const uint64_t n = std::min(cluster, length - at);
        if (std::memcmp(old_view.data() + at, new_view.data() + at, n) == 0) continue;
        const bool zero = std::all_of(old_view.begin() + static_cast<ptrdiff_t>(at),
                                      old_view.begin() + static_cast<ptrdiff_t>(at + n),
                                      [](std::byte b) { return b == std::byte{0}; });
        if (zero) {
          TRY(image.write_zeroes(pos + at, n, block::Unmap::Yes));
        } else {
          const iovec piece{old_view.data() + at, n};
          TRY(image.write_at(pos + at, std::span(&piece, 1)));
        }
      }
    }
    pos += length;
    progress.update(pos, size);
  }
  return image.flush();
}

}  // namespace

Result<void> rebase(const RebaseArgs& args) {
  const std::string what = fmt::format("rebase {}", args.file);
  const block::ImageFormat file_format = TRY(block::probe_image_format(args.file));
  if (file_format != block::ImageFormat::Qcow2) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: not a qcow2 image (only qcow2 has a backing file)", what));
  }
  block::ImageFormat backing_format = block::ImageFormat::Auto;
  if (!args.backing_format.empty()) {
    backing_format = TRY_CONTEXT(block::parse_image_format(args.backing_format), what);
  }
  if (args.backing.empty() && !args.backing_format.empty()) {
    return fail(Errc::InvalidArgument, fmt::format("{}: -F needs a backing file (-b)", what));
  }

  // The new backing file, from where the image will look for it.
  std::unique_ptr<block::BlockBackend> new_backing;
  std::string recorded_format = args.backing_format;
  if (!args.backing.empty()) {
    const std::string resolved = qcow2::resolve_backing_path(args.file, args.backing);
    auto opened = block::open_image(resolved, backing_format, block::Access::ReadOnly);
    if (opened) {
      new_backing = std::move(*opened);
      for (const std::string& file : chain_files(*new_backing, resolved)) {
        if (same_file(file, args.file)) {
          return fail(Errc::InvalidArgument,
                      fmt::format("{}: the new backing chain contains {} itself (a loop)", what,
                                  file));
        }
      }
      recorded_format = std::string(new_backing->format_name());
    } else if (!args.unsafe) {
      return fail(std::move(opened).error().wrap(fmt::format("{}: new backing file", what)));
    }
  }

  if (!args.unsafe) {
    auto image = TRY(open_qcow2(args.file, block::Access::ReadWrite));
    Progress progress(args.progress);
    TRY_CONTEXT(copy_differences(*image, new_backing.get(), progress), what);
    image.reset();  // written back and closed before the header changes
    progress.finish();
  }
  // The header is rewritten through a descriptor of set_backing_file's own.
  const block::ImageLock lock = TRY(block::ImageLock::open(args.file, block::Access::ReadWrite));
  return qcow2::set_backing_file(args.file, args.backing, args.backing.empty() ? "" : recorded_format);
}

}  // namespace keel::img
