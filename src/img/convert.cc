// keel-img convert: copies what an image reads (through its whole backing
// chain, so the copy stands alone) into a new raw or qcow2 file. Ranges
// that read as zeroes are not written: a sparse raw file, unallocated qcow2
// clusters. -c compresses every qcow2 cluster that shrinks (zlib, as
// qemu-img's default). The copy is written next to the destination under a
// temporary name and renamed over it when complete, so a failed convert
// leaves an existing destination as it was.
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "base/fd.h"
#include "block/image.h"
#include "block/image_lock.h"
#include "block/map.h"
#include "block/qcow2/qcow2.h"
#include "img/commands.h"

namespace keel::img {
namespace {

namespace qcow2 = block::qcow2;

constexpr uint64_t kChunkBytes = 1 << 20;
constexpr uint64_t kRawGranuleBytes = 4096;  // the holes a sparse raw copy keeps

bool all_zero(std::span<const std::byte> data) {
  return data.empty() ||
         (data[0] == std::byte{0} && std::memcmp(data.data(), data.data() + 1, data.size() - 1) == 0);
}

// The file being written; removed unless keep() was called.
class PartialFile {
 public:
  explicit PartialFile(std::string path) : path_(std::move(path)) {}
  PartialFile(const PartialFile&) = delete;
  PartialFile& operator=(const PartialFile&) = delete;
  ~PartialFile() {
    if (!kept_) ::unlink(path_.c_str());
  }
  const std::string& path() const { return path_; }
  void keep() { kept_ = true; }

 private:
  std::string path_;
  bool kept_ = false;
};

class Output {
 public:
  virtual ~Output() = default;
  // Smallest unit written: a range of zeroes this size is left out.
  virtual uint64_t granule() const = 0;
  // data starts on a granule; its length is whole granules, or ends the disk.
  virtual Result<void> write(uint64_t offset, std::span<const std::byte> data) = 0;
  virtual Result<void> finish() = 0;
};

class RawOutput final : public Output {
 public:
  static Result<std::unique_ptr<RawOutput>> create(const std::string& path, uint64_t size_bytes) {
    Fd fd = TRY_CONTEXT(Fd::open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644),
                        fmt::format("raw image {}", path));
    if (::ftruncate(fd.get(), static_cast<off_t>(size_bytes)) < 0) {
      return fail_errno(fmt::format("raw image {}: ftruncate to {} bytes", path, size_bytes));
    }
    return std::unique_ptr<RawOutput>(new RawOutput(path, std::move(fd)));
  }
  uint64_t granule() const override { return kRawGranuleBytes; }
  Result<void> write(uint64_t offset, std::span<const std::byte> data) override {
    TRY_CONTEXT(fd_.pwrite_all(data, offset), fmt::format("raw image {}", path_));
    return ok();
  }
  Result<void> finish() override {
    if (::fsync(fd_.get()) < 0) return fail_errno(fmt::format("raw image {}: fsync", path_));
    return ok();
  }

 private:
  RawOutput(std::string path, Fd fd) : path_(std::move(path)), fd_(std::move(fd)) {}
  std::string path_;
  Fd fd_;
};

class Qcow2Output final : public Output {
 public:
  static Result<std::unique_ptr<Qcow2Output>> create(const std::string& path,
                                                      const qcow2::CreateOptions& options,
                                                      bool compress) {
    TRY(qcow2::create_image(path, options));
    auto image = TRY(open_qcow2(path, block::Access::ReadWrite));
    return std::unique_ptr<Qcow2Output>(new Qcow2Output(std::move(image), compress));
  }
  uint64_t granule() const override { return image_->header().cluster_size(); }
  Result<void> write(uint64_t offset, std::span<const std::byte> data) override {
    if (!compress_) {
      const iovec v{const_cast<std::byte*>(data.data()), data.size()};
      TRY(image_->write_at(offset, std::span(&v, 1)));
      return ok();
    }
    const uint64_t cluster = granule();
    for (uint64_t at = 0; at < data.size(); at += cluster) {
      const uint64_t n = std::min<uint64_t>(cluster, data.size() - at);
      std::span<const std::byte> piece = data.subspan(at, n);
      if (n < cluster) {  // the disk's last, partial cluster: pad it
        padded_.assign(cluster, std::byte{0});
        std::copy(piece.begin(), piece.end(), padded_.begin());
        piece = padded_;
      }
      TRY(image_->write_compressed(offset + at, piece));
    }
    return ok();
  }
  Result<void> finish() override {
    TRY(image_->flush());
    image_.reset();
    return ok();
  }

 private:
  Qcow2Output(std::unique_ptr<qcow2::Qcow2Image> image, bool compress)
      : image_(std::move(image)), compress_(compress) {}
  std::unique_ptr<qcow2::Qcow2Image> image_;
  bool compress_;
  std::vector<std::byte> padded_;
};

// Copies [begin, end) of source (granule-aligned, end may be the disk's end)
// to out, leaving out the granules that hold only zeroes.
Result<void> copy_range(block::BlockBackend& source, Output& out, uint64_t begin, uint64_t end,
                        std::vector<std::byte>& buffer) {
  const uint64_t granule = out.granule();
  for (uint64_t at = begin; at < end;) {
    const uint64_t n = std::min<uint64_t>(buffer.size(), end - at);
    const iovec v{buffer.data(), n};
    TRY(source.read_at(at, std::span(&v, 1)));
    std::span<const std::byte> data(buffer.data(), n);
    // Runs of granules with data go out in one write.
    uint64_t run_start = 0;
    uint64_t run_length = 0;
    for (uint64_t g = 0; g < n; g += granule) {
      const uint64_t length = std::min(granule, n - g);
      if (all_zero(data.subspan(g, length))) {
        if (run_length > 0) TRY(out.write(at + run_start, data.subspan(run_start, run_length)));
        run_length = 0;
        continue;
      }
      if (run_length == 0) run_start = g;
      run_length += length;
    }
    if (run_length > 0) TRY(out.write(at + run_start, data.subspan(run_start, run_length)));
    at += n;
  }
  return ok();
}

Result<void> sync_directory_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string directory = slash == std::string::npos ? "." : path.substr(0, slash + 1);
  Fd fd = TRY(Fd::open(directory, O_RDONLY | O_DIRECTORY));
  (void)::fsync(fd.get());  // best effort: the data itself is synced
  return ok();
}

}  // namespace

Result<void> convert(const ConvertArgs& args) {
  const std::string what = fmt::format("convert {} to {}", args.source, args.destination);
  const block::ImageFormat source_format =
      TRY_CONTEXT(block::parse_image_format(args.source_format), what);
  const block::ImageFormat output_format =
      TRY_CONTEXT(block::parse_image_format(args.output_format), what);
  if (output_format == block::ImageFormat::Auto) {
    return fail(Errc::InvalidArgument, fmt::format("{}: -O must name raw or qcow2", what));
  }
  const bool to_qcow2 = output_format == block::ImageFormat::Qcow2;
  if (args.compress && !to_qcow2) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: -c (compression) needs -O qcow2; raw has no compressed form", what));
  }
  qcow2::CreateOptions options;
  if (!args.options.empty()) {
    if (!to_qcow2) {
      return fail(Errc::InvalidArgument, fmt::format("{}: -o applies to -O qcow2 only", what));
    }
    TRY(parse_qcow2_options(args.options, options, what));
  }

  std::unique_ptr<block::BlockBackend> source =
      TRY(block::open_image(args.source, source_format, block::Access::ReadOnly));
  // Writing over a file the copy reads from would destroy the source.
  for (const std::string& file : chain_files(*source, args.source)) {
    if (same_file(file, args.destination)) {
      return fail(Errc::InvalidArgument,
                  fmt::format("{}: the destination is {}, which the source reads (itself or its "
                              "backing chain)",
                              what, file));
    }
  }
  struct stat st {};
  block::ImageLock destination_lock;
  if (::stat(args.destination.c_str(), &st) == 0) {
    if (!S_ISREG(st.st_mode)) {
      return fail(Errc::InvalidArgument,
                  fmt::format("{}: {} is not a regular file (keel-img writes image files only)",
                              what, args.destination));
    }
    // Replacing an image a VM has open would pull it from under the VM's
    // feet: hold its write lock until the copy is renamed over it.
    destination_lock = TRY_CONTEXT(
        block::ImageLock::open(args.destination, block::Access::ReadWrite), what);
  }

  const uint64_t size = source->size_bytes();
  PartialFile partial(args.destination + ".keel-img-partial");
  std::unique_ptr<Output> out;
  if (to_qcow2) {
    options.size_bytes = (size + 511) / 512 * 512;
    out = TRY_CONTEXT(Qcow2Output::create(partial.path(), options, args.compress), what);
  } else {
    out = TRY_CONTEXT(RawOutput::create(partial.path(), size), what);
  }

  std::vector<std::byte> buffer(std::max(kChunkBytes, out->granule()));
  Progress progress(args.progress);
  const uint64_t granule = out->granule();
  uint64_t copied_until = 0;
  for (uint64_t pos = 0; pos < size;) {
    const block::MapEntry entry = TRY(block::map_at(*source, args.source, pos, size - pos));
    const uint64_t end = pos + entry.length;
    if (!entry.zero) {
      const uint64_t begin = std::max(pos / granule * granule, copied_until);
      const uint64_t stop = std::min((end + granule - 1) / granule * granule, size);
      if (begin < stop) TRY_CONTEXT(copy_range(*source, *out, begin, stop, buffer), what);
      copied_until = std::max(copied_until, stop);
    }
    pos = end;
    progress.update(pos, size);
  }
  TRY_CONTEXT(out->finish(), what);
  out.reset();
  if (::rename(partial.path().c_str(), args.destination.c_str()) < 0) {
    return fail_errno(fmt::format("{}: rename {} to {}", what, partial.path(), args.destination));
  }
  partial.keep();
  progress.finish();
  return sync_directory_of(args.destination);
}

}  // namespace keel::img
