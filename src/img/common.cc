#include <sys/stat.h>

#include <cstdio>
#include <exception>

#include <fmt/format.h>

#include "block/image.h"
#include "block/qcow2/header.h"
#include "img/commands.h"

namespace keel::img {

Result<uint64_t> parse_size(const std::string& text, std::string_view what) {
  if (text.empty()) return fail(Errc::InvalidArgument, fmt::format("{}: empty", what));
  if (text.front() < '0' || text.front() > '9') {
    return fail(Errc::InvalidArgument, fmt::format("{} '{}': not a number", what, text));
  }
  size_t used = 0;
  uint64_t value = 0;
  try {
    value = std::stoull(text, &used, 10);
  } catch (const std::exception&) {
    return fail(Errc::InvalidArgument, fmt::format("{} '{}': not a number", what, text));
  }
  const std::string suffix = text.substr(used);
  uint32_t shift = 0;
  if (suffix.empty() || suffix == "b" || suffix == "B") shift = 0;
  else if (suffix == "k" || suffix == "K") shift = 10;
  else if (suffix == "M") shift = 20;
  else if (suffix == "G") shift = 30;
  else if (suffix == "T") shift = 40;
  else if (suffix == "P") shift = 50;
  else {
    return fail(Errc::InvalidArgument,
                fmt::format("{} '{}': unknown suffix '{}' (k, M, G, T, P)", what, text, suffix));
  }
  if (shift > 0 && value > (UINT64_MAX >> shift)) {
    return fail(Errc::InvalidArgument, fmt::format("{} '{}': too large", what, text));
  }
  return value << shift;
}

Result<void> parse_qcow2_options(const std::string& text, block::qcow2::CreateOptions& options,
                                 std::string_view what) {
  std::string rest = text;
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    const std::string item = rest.substr(0, comma);
    rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
    const size_t equals = item.find('=');
    const std::string key = item.substr(0, equals);
    const std::string value = equals == std::string::npos ? "" : item.substr(equals + 1);
    if (key == "cluster_size") {
      const uint64_t bytes = TRY_CONTEXT(parse_size(value, "cluster_size"), std::string(what));
      if (bytes < 512 || bytes > (2u << 20) || (bytes & (bytes - 1)) != 0) {
        return fail(Errc::InvalidArgument,
                    fmt::format("{}: cluster_size {} must be a power of two from 512 to 2M", what,
                                value));
      }
      options.cluster_bits = static_cast<uint32_t>(__builtin_ctzll(bytes));
    } else if (key == "compat") {
      if (value == "0.10" || value == "v2") options.version = 2;
      else if (value == "1.1" || value == "v3") options.version = 3;
      else {
        return fail(Errc::InvalidArgument,
                    fmt::format("{}: compat '{}' (expected 0.10 or 1.1)", what, value));
      }
    } else {
      return fail(Errc::InvalidArgument,
                  fmt::format("{}: unknown option '{}' (cluster_size, compat)", what, key));
    }
  }
  return ok();
}

Result<std::unique_ptr<block::qcow2::Qcow2Image>> open_qcow2(const std::string& path,
                                                             block::Access access,
                                                             block::Access backing_access) {
  auto open_backing = [backing_access](const std::string& backing_path,
                                       block::ImageFormat format) {
    return block::open_image(backing_path, format, backing_access);
  };
  return block::qcow2::Qcow2Image::open(path, access, open_backing);
}

std::vector<std::string> chain_files(block::BlockBackend& image, const std::string& path) {
  std::vector<std::string> files{path};
  block::BlockBackend* layer = &image;
  while (auto* qcow2 = dynamic_cast<block::qcow2::Qcow2Image*>(layer)) {
    if (qcow2->backing() == nullptr) break;
    files.push_back(qcow2->backing_path());
    layer = qcow2->backing();
  }
  return files;
}

bool same_file(const std::string& a, const std::string& b) {
  struct stat first {};
  struct stat second {};
  if (::stat(a.c_str(), &first) != 0 || ::stat(b.c_str(), &second) != 0) return false;
  return first.st_dev == second.st_dev && first.st_ino == second.st_ino;
}

void Progress::update(uint64_t done, uint64_t total) {
  if (!enabled_) return;
  const int hundredths = total == 0 ? 10000 : static_cast<int>(done * 10000 / total);
  if (hundredths == last_hundredths_) return;
  last_hundredths_ = hundredths;
  std::fprintf(stderr, "    (%d.%02d/100%%)\r", hundredths / 100, hundredths % 100);
  std::fflush(stderr);
}

void Progress::finish() {
  if (!enabled_) return;
  update(1, 1);
  std::fprintf(stderr, "\n");
}

}  // namespace keel::img
