// keel-img resize: changes a raw or qcow2 image's virtual size. Growing is
// always safe (the new part reads as zeroes); shrinking drops the data past
// the new end, so it needs --shrink, as qemu-img. qcow2 images follow the
// crash-safe order of Qcow2Image::resize (block/qcow2/qcow2.h).
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>

#include <fmt/format.h>

#include "base/fd.h"
#include "block/image.h"
#include "block/image_lock.h"
#include "img/commands.h"

namespace keel::img {
namespace {

// SIZE, +SIZE or -SIZE against the current size.
Result<uint64_t> new_size(const std::string& text, uint64_t current, std::string_view what) {
  if (!text.empty() && (text.front() == '+' || text.front() == '-')) {
    const uint64_t delta = TRY_CONTEXT(parse_size(text.substr(1), "SIZE"), std::string(what));
    if (text.front() == '+') {
      if (delta > UINT64_MAX - current) {
        return fail(Errc::InvalidArgument, fmt::format("{}: {} is too large", what, text));
      }
      return current + delta;
    }
    if (delta > current) {
      return fail(Errc::InvalidArgument, fmt::format("{}: {} is more than the image's size {}",
                                                     what, text, current));
    }
    return current - delta;
  }
  return TRY_CONTEXT(parse_size(text, "SIZE"), std::string(what));
}

Result<void> refuse_unasked_shrink(bool shrink, uint64_t current, uint64_t wanted,
                                   std::string_view what) {
  if (wanted >= current || shrink) return ok();
  return fail(Errc::InvalidArgument,
              fmt::format("{}: shrinking from {} to {} bytes drops the data past {}; pass --shrink "
                          "if that is what you want",
                          what, current, wanted, wanted));
}

Result<void> resize_to(const std::string& path, block::ImageFormat format, const std::string& size,
                       bool allow_shrink) {
  const std::string what = fmt::format("resize {}", path);
  if (format == block::ImageFormat::Auto) format = TRY(block::probe_image_format(path));
  if (format == block::ImageFormat::Raw) {
    Fd fd = TRY_CONTEXT(Fd::open(path, O_RDWR), what);
    const block::ImageLock lock = TRY(block::ImageLock::acquire(fd, path, block::Access::ReadWrite));
    const uint64_t current = TRY_CONTEXT(fd.size_bytes(), what);
    const uint64_t wanted = TRY(new_size(size, current, what));
    TRY(refuse_unasked_shrink(allow_shrink, current, wanted, what));
    if (::ftruncate(fd.get(), static_cast<off_t>(wanted)) < 0) {
      return fail_errno(fmt::format("{}: ftruncate to {} bytes", what, wanted));
    }
    if (::fsync(fd.get()) < 0) return fail_errno(fmt::format("{}: fsync", what));
    return ok();
  }
  auto image = TRY(open_qcow2(path, block::Access::ReadWrite));
  const uint64_t current = image->size_bytes();
  const uint64_t wanted = TRY(new_size(size, current, what));
  if (wanted % 512 != 0) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: {} bytes is not a multiple of 512 (qcow2 sizes are whole "
                            "sectors)",
                            what, wanted));
  }
  TRY(refuse_unasked_shrink(allow_shrink, current, wanted, what));
  return image->resize(wanted);
}

}  // namespace

Result<void> resize_image(const std::string& path, block::ImageFormat format, uint64_t size_bytes,
                          bool allow_shrink) {
  return resize_to(path, format, std::to_string(size_bytes), allow_shrink);
}

Result<void> resize(const ResizeArgs& args) {
  const block::ImageFormat format =
      TRY_CONTEXT(block::parse_image_format(args.format), fmt::format("resize {}", args.file));
  TRY(resize_to(args.file, format, args.size, args.shrink));
  std::printf("Image resized.\n");
  return ok();
}

}  // namespace keel::img
