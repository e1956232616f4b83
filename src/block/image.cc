#include "block/image.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "base/fd.h"
#include "base/log.h"
#include "block/qcow2/qcow2.h"
#include "block/raw/raw_file.h"

namespace keel::block {
namespace {

// qcow2 header magic (QEMU docs/interop/qcow2.txt): 'Q' 'F' 'I' 0xfb.
constexpr std::array<uint8_t, 4> kQcow2Magic = {'Q', 'F', 'I', 0xfb};

// Backing chains deeper than this are refused, as a bound on the files and
// memory one open may take (loops are caught below, by inode).
constexpr int kMaxChainDepth = 64;

// The files of the chain opened so far (device, inode). A backing file that
// is already among them is a loop; refusing it before opening it matters
// because a second open of a file the chain writes would fail on its own
// image lock, blaming "another process".
using ChainFiles = std::vector<std::pair<dev_t, ino_t>>;

Result<std::unique_ptr<BlockBackend>> open_at_depth(const std::string& path, ImageFormat format,
                                                    Access access, Locking locking, int depth,
                                                    ChainFiles& chain);

Result<std::unique_ptr<BlockBackend>> open_qcow2(const std::string& path, Access access,
                                                 Locking locking, int depth, ChainFiles& chain) {
  auto open_backing = [depth, locking, &chain](const std::string& backing_path,
                                               ImageFormat backing_format)
      -> Result<std::unique_ptr<BlockBackend>> {
    if (depth + 1 >= kMaxChainDepth) {
      return fail(Errc::Unsupported,
                  fmt::format("image {}: the backing chain is deeper than {} images (a loop?)",
                              backing_path, kMaxChainDepth));
    }
    // Backing images are never written: the overlay takes every write.
    return open_at_depth(backing_path, backing_format, Access::ReadOnly, locking, depth + 1,
                         chain);
  };
  std::unique_ptr<qcow2::Qcow2Image> image =
      TRY(qcow2::Qcow2Image::open(path, access, open_backing, locking));
  return std::unique_ptr<BlockBackend>(std::move(image));
}

Result<std::unique_ptr<BlockBackend>> open_at_depth(const std::string& path, ImageFormat format,
                                                    Access access, Locking locking, int depth,
                                                    ChainFiles& chain) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    const std::pair<dev_t, ino_t> id{st.st_dev, st.st_ino};
    if (std::find(chain.begin(), chain.end(), id) != chain.end()) {
      return fail(Errc::Unsupported,
                  fmt::format("image {}: the backing chain loops back to this file", path));
    }
    chain.push_back(id);
  }  // else the open below names the problem
  if (format == ImageFormat::Auto) format = TRY(probe_image_format(path));
  switch (format) {
    case ImageFormat::Qcow2:
      return open_qcow2(path, access, locking, depth, chain);
    case ImageFormat::Raw: {
      std::unique_ptr<RawFile> raw = TRY(RawFile::open(path, access, locking));
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
                                                 Access access, Locking locking) {
  ChainFiles chain;
  return open_at_depth(path, format, access, locking, 0, chain);
}

}  // namespace keel::block
