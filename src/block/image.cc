#include "block/image.h"

#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "base/fd.h"
#include "base/log.h"
#include "block/qcow2/qcow2.h"
#include "block/raw/raw_file.h"

namespace keel::block {
namespace {

// qcow2 header magic (QEMU docs/interop/qcow2.txt): 'Q' 'F' 'I' 0xfb.
constexpr std::array<uint8_t, 4> kQcow2Magic = {'Q', 'F', 'I', 0xfb};

// Backing chains deeper than this are refused: a chain that loops back on
// itself would otherwise open files until the process runs out.
constexpr int kMaxChainDepth = 64;

Result<std::unique_ptr<BlockBackend>> open_at_depth(const std::string& path, ImageFormat format,
                                                    Access access, int depth);

Result<std::unique_ptr<BlockBackend>> open_qcow2(const std::string& path, Access access,
                                                 int depth) {
  auto open_backing = [depth](const std::string& backing_path,
                              ImageFormat backing_format) -> Result<std::unique_ptr<BlockBackend>> {
    if (depth + 1 >= kMaxChainDepth) {
      return fail(Errc::Unsupported,
                  fmt::format("image {}: the backing chain is deeper than {} images (a loop?)",
                              backing_path, kMaxChainDepth));
    }
    // Backing images are never written: the overlay takes every write.
    return open_at_depth(backing_path, backing_format, Access::ReadOnly, depth + 1);
  };
  std::unique_ptr<qcow2::Qcow2Image> image = TRY(qcow2::Qcow2Image::open(path, access, open_backing));
  return std::unique_ptr<BlockBackend>(std::move(image));
}

Result<std::unique_ptr<BlockBackend>> open_at_depth(const std::string& path, ImageFormat format,
                                                    Access access, int depth) {
  if (format == ImageFormat::Auto) format = TRY(probe_image_format(path));
  switch (format) {
    case ImageFormat::Qcow2:
      return open_qcow2(path, access, depth);
    case ImageFormat::Raw: {
      std::unique_ptr<RawFile> raw = TRY(RawFile::open(path, access));
      return std::unique_ptr<BlockBackend>(std::move(raw));
    }
    case ImageFormat::Auto:
      break;
  }
  return fail(Errc::InvalidArgument, fmt::format("image {}: no format", path));
}

}  // namespace

Result<ImageFormat> parse_image_format(std::string_view name) {
  if (name == "auto") return ImageFormat::Auto;
  if (name == "raw") return ImageFormat::Raw;
  if (name == "qcow2") return ImageFormat::Qcow2;
  return fail(Errc::InvalidArgument,
              fmt::format("image format '{}': expected auto, raw or qcow2", name));
}

std::string_view image_format_name(ImageFormat format) {
  switch (format) {
    case ImageFormat::Auto: return "auto";
    case ImageFormat::Raw: return "raw";
    case ImageFormat::Qcow2: return "qcow2";
  }
  return "unknown";
}

Result<ImageFormat> probe_image_format(const std::string& path) {
  Fd file = TRY(Fd::open(path, O_RDONLY));
  std::array<uint8_t, kQcow2Magic.size()> magic{};
  ssize_t n = 0;
  do {
    n = ::pread(file.get(), magic.data(), magic.size(), 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return fail_errno(fmt::format("image {}: read the first bytes", path));
  if (static_cast<size_t>(n) == magic.size() && magic == kQcow2Magic) return ImageFormat::Qcow2;
  return ImageFormat::Raw;
}

Result<std::unique_ptr<BlockBackend>> open_image(const std::string& path, ImageFormat format,
                                                 Access access) {
  return open_at_depth(path, format, access, 0);
}

}  // namespace keel::block
