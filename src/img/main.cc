// keel-img: creates, inspects and checks disk images (raw and qcow2), in the
// spirit of qemu-img. Subcommands: create, info, check, convert, map,
// resize, rebase, commit (the last five in files of their own).
// Exit statuses: 0 success; 1 an error (the message names the file and the
// problem); 2 (usage) for bad arguments. check: 0 clean, 2 corruptions
// found, 3 leaked clusters only, 1 the check could not run (as qemu-img).
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/fd.h"
#include "base/log.h"
#include "block/image.h"
#include "block/image_lock.h"
#include "block/qcow2/check.h"
#include "block/qcow2/create.h"
#include "block/qcow2/header.h"
#include "block/qcow2/qcow2.h"
#include "img/commands.h"

namespace keel::img {
namespace {

using block::ImageFormat;
namespace qcow2 = block::qcow2;

constexpr int kExitError = 1;
constexpr int kMaxChain = 64;

std::string human_size(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double value = static_cast<double>(bytes);
  size_t unit = 0;
  while (value >= 1024 && unit + 1 < std::size(units)) {
    value /= 1024;
    ++unit;
  }
  if (unit == 0) return fmt::format("{} B", bytes);
  return fmt::format("{:.3g} {}", value, units[unit]);
}

// ---- create ----

struct CreateArgs {
  std::string format = "qcow2";
  std::string backing;
  std::string backing_format;
  std::string options;
  std::string file;
  std::string size;
};

Result<void> create(const CreateArgs& args) {
  const std::string what = fmt::format("create {}", args.file);
  uint64_t size = 0;
  bool have_size = !args.size.empty();
  if (have_size) size = TRY_CONTEXT(parse_size(args.size, "SIZE"), what);

  qcow2::CreateOptions options;
  TRY(parse_qcow2_options(args.options, options, what));
  // Replacing an image a VM has open would corrupt what the VM sees: take
  // the existing file's write lock first, as qemu-img create does.
  block::ImageLock lock;
  struct stat st {};
  if (::stat(args.file.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
    lock = TRY_CONTEXT(block::ImageLock::open(args.file, block::Access::ReadWrite), what);
  }

  if (args.format == "raw") {
    if (!args.backing.empty() || !args.options.empty()) {
      return fail(Errc::InvalidArgument,
                  fmt::format("{}: raw images take neither -b nor -o", what));
    }
    if (!have_size) return fail(Errc::InvalidArgument, fmt::format("{}: SIZE is required", what));
    Fd fd = TRY_CONTEXT(Fd::open(args.file, O_WRONLY | O_CREAT | O_TRUNC, 0644), what);
    if (::ftruncate(fd.get(), static_cast<off_t>(size)) < 0) {
      return fail_errno(fmt::format("{}: ftruncate to {} bytes", what, size));
    }
    return ok();
  }

  if (!args.backing.empty()) {
    // The backing file must open, from where the new image will look for it.
    const std::string resolved = qcow2::resolve_backing_path(args.file, args.backing);
    ImageFormat backing_format = ImageFormat::Auto;
    if (!args.backing_format.empty()) {
      backing_format = TRY_CONTEXT(block::parse_image_format(args.backing_format), what);
    }
    auto backing = TRY_CONTEXT(block::open_image(resolved, backing_format, block::Access::ReadOnly),
                               fmt::format("{}: backing file", what));
    if (!have_size) size = backing->size_bytes();
    // Record the format so opening never has to probe.
    options.backing_format = std::string(backing->format_name());
    options.backing_file = args.backing;
  } else if (!args.backing_format.empty()) {
    return fail(Errc::InvalidArgument, fmt::format("{}: -F needs -b", what));
  }
  if (!have_size && args.backing.empty()) {
    return fail(Errc::InvalidArgument, fmt::format("{}: SIZE is required without -b", what));
  }
  if (size % 512 != 0) size += 512 - size % 512;
  options.size_bytes = size;
  TRY(qcow2::create_image(args.file, options));
  std::printf("Formatting '%s', fmt=qcow2 cluster_size=%llu size=%llu%s%s\n", args.file.c_str(),
              static_cast<unsigned long long>(uint64_t{1} << options.cluster_bits),
              static_cast<unsigned long long>(size),
              options.backing_file.empty() ? "" : " backing_file=",
              options.backing_file.c_str());
  return ok();
}

// ---- info ----

struct ImageInfo {
  std::string filename;
  std::string format;
  uint64_t virtual_size = 0;
  uint64_t actual_size = 0;  // bytes allocated on the host
  std::optional<qcow2::Header> qcow2;
  std::string full_backing;  // resolved backing path
  std::string backing_format;
};

Result<ImageInfo> inspect(const std::string& path, ImageFormat format, block::Locking locking) {
  Fd fd = TRY_CONTEXT(Fd::open(path, O_RDONLY), fmt::format("image {}", path));
  // As qemu-img info: an image another process writes is refused unless -U.
  const block::ImageLock lock =
      TRY(block::ImageLock::acquire(fd, path, block::Access::ReadOnly, locking));
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) return fail_errno(fmt::format("image {}: fstat", path));
  ImageInfo info;
  info.filename = path;
  info.actual_size = static_cast<uint64_t>(st.st_blocks) * 512;
  if (format == ImageFormat::Auto) format = TRY(block::probe_image_format(path));
  info.format = std::string(block::image_format_name(format));
  const uint64_t size = TRY(fd.size_bytes());
  if (format == ImageFormat::Raw) {
    info.virtual_size = size;
    return info;
  }
  std::vector<std::byte> leading(std::min<uint64_t>(size, qcow2::kHeaderReadBytes));
  TRY(fd.pread_all(leading, 0));
  qcow2::Header header = TRY(qcow2::parse_header(leading, size, path));
  info.virtual_size = header.size_bytes;
  if (!header.backing_file.empty()) {
    info.full_backing = qcow2::resolve_backing_path(path, header.backing_file);
    info.backing_format = header.backing_format;
  }
  info.qcow2 = std::move(header);
  return info;
}

void print_text(const ImageInfo& info) {
  std::printf("image: %s\n", info.filename.c_str());
  std::printf("file format: %s\n", info.format.c_str());
  std::printf("virtual size: %s (%llu bytes)\n", human_size(info.virtual_size).c_str(),
              static_cast<unsigned long long>(info.virtual_size));
  std::printf("disk size: %s\n", human_size(info.actual_size).c_str());
  if (!info.qcow2) return;
  const qcow2::Header& h = *info.qcow2;
  std::printf("cluster_size: %llu\n", static_cast<unsigned long long>(h.cluster_size()));
  if (!h.backing_file.empty()) {
    if (info.full_backing != h.backing_file) {
      std::printf("backing file: %s (actual path: %s)\n", h.backing_file.c_str(),
                  info.full_backing.c_str());
    } else {
      std::printf("backing file: %s\n", h.backing_file.c_str());
    }
    if (!h.backing_format.empty()) std::printf("backing file format: %s\n", h.backing_format.c_str());
  }
  if (h.nb_snapshots > 0) std::printf("snapshots: %u\n", h.nb_snapshots);
  std::printf("Format specific information:\n");
  std::printf("    compat: %s\n", h.version == 2 ? "0.10" : "1.1");
  if (h.version >= 3) {
    std::printf("    compression type: %s\n",
                h.compression_type == qcow2::CompressionType::Zstd ? "zstd" : "zlib");
    std::printf("    lazy refcounts: %s\n", h.lazy_refcounts() ? "true" : "false");
  }
  std::printf("    refcount bits: %u\n", h.refcount_bits());
  std::printf("    corrupt: %s\n", h.corrupt() ? "true" : "false");
  std::printf("    dirty: %s\n", h.dirty() ? "true" : "false");
}

nlohmann::json to_json(const ImageInfo& info) {
  nlohmann::json j;
  j["filename"] = info.filename;
  j["format"] = info.format;
  j["virtual-size"] = info.virtual_size;
  j["actual-size"] = info.actual_size;
  if (!info.qcow2) return j;
  const qcow2::Header& h = *info.qcow2;
  j["cluster-size"] = h.cluster_size();
  j["dirty-flag"] = h.dirty();
  if (!h.backing_file.empty()) {
    j["backing-filename"] = h.backing_file;
    j["full-backing-filename"] = info.full_backing;
    if (!h.backing_format.empty()) j["backing-filename-format"] = h.backing_format;
  }
  nlohmann::json data;
  data["compat"] = h.version == 2 ? "0.10" : "1.1";
  if (h.version >= 3) {
    data["compression-type"] = h.compression_type == qcow2::CompressionType::Zstd ? "zstd" : "zlib";
    data["lazy-refcounts"] = h.lazy_refcounts();
  }
  data["refcount-bits"] = h.refcount_bits();
  data["corrupt"] = h.corrupt();
  data["snapshots"] = h.nb_snapshots;
  j["format-specific"] = {{"type", "qcow2"}, {"data", data}};
  return j;
}

Result<void> info(const std::string& file, bool json, bool backing_chain,
                  block::Locking locking) {
  std::vector<ImageInfo> chain;
  std::string path = file;
  ImageFormat format = ImageFormat::Auto;
  while (true) {
    if (chain.size() >= kMaxChain) {
      return fail(Errc::Unsupported,
                  fmt::format("image {}: backing chain deeper than {} (a loop?)", file, kMaxChain));
    }
    ImageInfo one = TRY(inspect(path, format, locking));
    const std::string next = one.full_backing;
    const std::string next_format = one.backing_format;
    chain.push_back(std::move(one));
    if (!backing_chain || next.empty()) break;
    path = next;
    format = ImageFormat::Auto;
    if (!next_format.empty()) format = TRY(block::parse_image_format(next_format));
  }
  if (json) {
    nlohmann::json out;
    if (backing_chain) {
      out = nlohmann::json::array();
      for (const ImageInfo& one : chain) out.push_back(to_json(one));
    } else {
      out = to_json(chain.front());
    }
    std::printf("%s\n", out.dump(4).c_str());
    return ok();
  }
  for (size_t i = 0; i < chain.size(); ++i) {
    if (i > 0) std::printf("\n");
    print_text(chain[i]);
  }
  return ok();
}

// ---- check ----

void print_report(const qcow2::CheckReport& report) {
  for (const std::string& message : report.messages) std::printf("%s\n", message.c_str());
  if (report.corruptions == 0 && report.leaks == 0) {
    std::printf("No errors were found on the image.\n");
  } else {
    if (report.leaks > 0) {
      std::printf("\n%llu leaked clusters were found on the image.\n"
                  "This means waste of disk space, but no harm to data.\n",
                  static_cast<unsigned long long>(report.leaks));
    }
    if (report.corruptions > 0) {
      std::printf("\n%llu errors were found on the image.\n"
                  "Data may be corrupted, or further writes to the image may corrupt it.\n",
                  static_cast<unsigned long long>(report.corruptions));
    }
  }
  if (report.total_clusters > 0) {
    std::printf("%llu/%llu = %.2f%% allocated\n",
                static_cast<unsigned long long>(report.allocated_clusters),
                static_cast<unsigned long long>(report.total_clusters),
                100.0 * static_cast<double>(report.allocated_clusters) /
                    static_cast<double>(report.total_clusters));
  }
  std::printf("Image end offset: %llu\n", static_cast<unsigned long long>(report.image_end_offset));
}

int status_of(const qcow2::CheckReport& report) {
  if (report.corruptions > 0) return 2;
  if (report.leaks > 0) return 3;
  return 0;
}

// repair: "" (check only), "leaks" or "all" (qemu-img check -r).
Result<int> check(const std::string& file, const std::string& repair) {
  const ImageFormat format = TRY(block::probe_image_format(file));
  if (format != ImageFormat::Qcow2) {
    std::printf("This image format (raw) does not support checks\n");
    return 0;
  }
  // check_image and repair_leaks read and write through descriptors of
  // their own; this one holds the lock: a repair must be the only user.
  const block::ImageLock lock = TRY(block::ImageLock::open(
      file, repair.empty() ? block::Access::ReadOnly : block::Access::ReadWrite));
  qcow2::CheckReport report = TRY(qcow2::check_image(file));
  if (repair == "all" && report.corruptions > 0) {
    return fail(Errc::Unsupported,
                fmt::format("check {}: {} corruptions found; Keel repairs leaked clusters only "
                            "(-r leaks); repair the rest with qemu-img check -r all",
                            file, report.corruptions));
  }
  if (repair.empty() || report.leaks == 0) {
    print_report(report);
    return status_of(report);
  }
  for (const qcow2::CheckReport::Leak& leak : report.leaked) {
    std::printf("Repairing cluster %llu refcount=%llu reference=%llu\n",
                static_cast<unsigned long long>(leak.cluster),
                static_cast<unsigned long long>(leak.refcount),
                static_cast<unsigned long long>(leak.references));
  }
  const uint64_t fixed = TRY(qcow2::repair_leaks(file, report));
  std::printf("The following inconsistencies were found and repaired:\n\n"
              "    %llu leaked clusters\n    0 corruptions\n\n"
              "Double checking the fixed image now...\n",
              static_cast<unsigned long long>(fixed));
  qcow2::CheckReport after = TRY(qcow2::check_image(file));
  print_report(after);
  return status_of(after);
}

int fail_with(const Error& error) {
  std::fprintf(stderr, "keel-img: %s\n", error.message().c_str());
  return kExitError;
}

}  // namespace
}  // namespace keel::img

int main(int argc, char** argv) {
  using namespace keel;
  log::init(log::Level::Warn, "keel-img");
  CLI::App app{
      "keel-img: create, inspect, check, convert, map, resize, rebase and commit disk images "
      "(raw, qcow2)"};
  app.require_subcommand(1);

  img::CreateArgs create_args;
  CLI::App* create = app.add_subcommand("create", "Create a new image (qcow2 by default)");
  create->add_option("-f,--format", create_args.format, "Image format: qcow2 or raw")
      ->check(CLI::IsMember({"qcow2", "raw"}));
  create->add_option("-b,--backing", create_args.backing,
                     "Backing file (qcow2 only; relative names are relative to FILE's directory)");
  create->add_option("-F,--backing-format", create_args.backing_format,
                     "Backing file format: raw or qcow2 (probed and recorded if not given)")
      ->check(CLI::IsMember({"qcow2", "raw"}));
  create->add_option("-o,--options", create_args.options,
                     "qcow2 options: cluster_size=N (512..2M, default 64k), compat=0.10|1.1");
  create->add_option("FILE", create_args.file, "The image to create (replaced if it exists)")
      ->required();
  create->add_option("SIZE", create_args.size,
                     "Virtual size in bytes, with an optional suffix k, M, G, T (default with -b: "
                     "the backing file's size)");

  std::string info_file;
  bool info_json = false;
  bool info_chain = false;
  CLI::App* info = app.add_subcommand("info", "Show an image's format, sizes and backing chain");
  info->add_flag("--json", info_json, "Print JSON (qemu-img info --output=json's field names)");
  info->add_flag("--backing-chain", info_chain, "Describe every image of the backing chain");
  bool info_force_share = false;
  info->add_flag("-U,--force-share", info_force_share,
                 "Read the image even if another process writes it (what it shows may be "
                 "changing)");
  info->add_option("FILE", info_file, "The image")->required();

  img::ConvertArgs convert_args;
  CLI::App* convert = app.add_subcommand(
      "convert",
      "Copy an image into a new raw or qcow2 file, reading through its whole backing chain (the "
      "copy has no backing file); ranges of zeroes are left sparse or unallocated");
  convert->add_option("-f,--format", convert_args.source_format,
                      "SOURCE's format: auto (probed), raw or qcow2")
      ->check(CLI::IsMember({"auto", "qcow2", "raw"}));
  convert->add_option("-O,--output-format", convert_args.output_format,
                      "DESTINATION's format: raw (default) or qcow2")
      ->check(CLI::IsMember({"qcow2", "raw"}));
  convert->add_flag("-c,--compress", convert_args.compress,
                    "Compress the qcow2 clusters (zlib, readable by qemu-img)");
  convert->add_option("-o,--options", convert_args.options,
                      "qcow2 options: cluster_size=N (512..2M, default 64k), compat=0.10|1.1");
  convert->add_flag("-p,--progress", convert_args.progress, "Show progress on stderr");
  convert->add_option("SOURCE", convert_args.source, "The image to copy")->required();
  convert->add_option("DESTINATION", convert_args.destination,
                      "The new image (replaced when the copy is complete; never SOURCE or a file "
                      "of its backing chain)")
      ->required();

  img::MapArgs map_args;
  CLI::App* map = app.add_subcommand(
      "map", "Show which ranges hold data or zeroes, in which file of the chain and where");
  map->add_option("--output", map_args.output,
                  "human (the ranges with data) or json (every range, as qemu-img map "
                  "--output=json)")
      ->check(CLI::IsMember({"human", "json"}));
  map->add_option("-f,--format", map_args.format, "FILE's format: auto, raw or qcow2")
      ->check(CLI::IsMember({"auto", "qcow2", "raw"}));
  bool map_force_share = false;
  map->add_flag("-U,--force-share", map_force_share,
                "Read the image even if another process writes it (what it shows may be changing)");
  map->add_option("FILE", map_args.file, "The image")->required();

  img::ResizeArgs resize_args;
  CLI::App* resize = app.add_subcommand(
      "resize", "Change an image's virtual size (grown space reads as zeroes; shrinking needs "
                "--shrink and drops the data past the new end)");
  resize->add_option("-f,--format", resize_args.format, "FILE's format: auto, raw or qcow2")
      ->check(CLI::IsMember({"auto", "qcow2", "raw"}));
  resize->add_flag("--shrink", resize_args.shrink, "Allow making the image smaller");
  resize->add_option("FILE", resize_args.file, "The image (changed in place)")->required();
  resize->add_option("SIZE", resize_args.size,
                     "The new size, or +SIZE / -SIZE relative to the current one; suffixes k, M, "
                     "G, T")
      ->required()
      ->allow_extra_args(false);

  img::RebaseArgs rebase_args;
  CLI::App* rebase = app.add_subcommand(
      "rebase",
      "Point a qcow2 image at another backing file; by default copies in the clusters that "
      "differ between the old and the new backing so the image reads the same");
  rebase->add_flag("-u,--unsafe", rebase_args.unsafe,
                   "Rewrite the backing file name only (the new file must hold the same data)");
  rebase->add_option("-b,--backing", rebase_args.backing,
                     "The new backing file (relative names are relative to FILE's directory); "
                     "\"\" for none, which copies the whole old chain into FILE")
      ->required();
  rebase->add_option("-F,--backing-format", rebase_args.backing_format,
                     "The new backing file's format: raw or qcow2 (probed and recorded if not "
                     "given)")
      ->check(CLI::IsMember({"qcow2", "raw"}));
  rebase->add_flag("-p,--progress", rebase_args.progress, "Show progress on stderr");
  rebase->add_option("FILE", rebase_args.file, "The qcow2 image (changed in place)")->required();

  img::CommitArgs commit_args;
  CLI::App* commit = app.add_subcommand(
      "commit",
      "Write a qcow2 overlay's changes into its backing file (grown if smaller), then empty the "
      "overlay");
  commit->add_flag("-d", commit_args.keep_overlay,
                   "Leave the overlay's clusters in place instead of emptying it");
  commit->add_flag("-p,--progress", commit_args.progress, "Show progress on stderr");
  commit->add_option("FILE", commit_args.file, "The overlay")->required();

  std::string check_file;
  CLI::App* check = app.add_subcommand(
      "check", "Check a qcow2 image's refcounts and tables (exit 0 clean, 2 corrupt, 3 leaks)");
  std::string check_repair;
  check->add_option("-r,--repair", check_repair,
                    "Repair: leaks (lower leaked clusters' refcounts; the image must not be in "
                    "use), or all (the same; refused if there are corruptions)")
      ->check(CLI::IsMember({"leaks", "all"}));
  check->add_option("FILE", check_file, "The image")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }

  if (*create) {
    Result<void> done = img::create(create_args);
    return done ? 0 : img::fail_with(done.error());
  }
  if (*info) {
    Result<void> done = img::info(info_file, info_json, info_chain,
                                  info_force_share ? block::Locking::ForceShare
                                                   : block::Locking::Lock);
    return done ? 0 : img::fail_with(done.error());
  }
  if (*convert) {
    Result<void> done = img::convert(convert_args);
    return done ? 0 : img::fail_with(done.error());
  }
  if (*resize) {
    Result<void> done = img::resize(resize_args);
    return done ? 0 : img::fail_with(done.error());
  }
  if (*rebase) {
    Result<void> done = img::rebase(rebase_args);
    return done ? 0 : img::fail_with(done.error());
  }
  if (*commit) {
    Result<void> done = img::commit(commit_args);
    return done ? 0 : img::fail_with(done.error());
  }
  if (*map) {
    if (map_force_share) map_args.locking = block::Locking::ForceShare;
    Result<void> done = img::map(map_args);
    return done ? 0 : img::fail_with(done.error());
  }
  Result<int> status = img::check(check_file, check_repair);
  return status ? *status : img::fail_with(status.error());
}
