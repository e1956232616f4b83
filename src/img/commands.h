// keel-img's subcommands, one file each (create, info and check live in
// main.cc with the command line), and what they share.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "block/block_backend.h"
#include "block/image.h"
#include "block/qcow2/create.h"
#include "block/qcow2/qcow2.h"

namespace keel::img {

// "10G", "512k", "1048576": bytes, with an optional binary suffix.
Result<uint64_t> parse_size(const std::string& text, std::string_view what);
// -o's "cluster_size=N,compat=1.1" into options.
Result<void> parse_qcow2_options(const std::string& text, block::qcow2::CreateOptions& options,
                                 std::string_view what);

// Opens a qcow2 image as a Qcow2Image (for what only qcow2 can do: resize,
// compressed writes, cluster status), its backing chain read-only except
// the first backing file, opened for backing_access (commit writes it).
// Every file is locked (block/image_lock.h).
Result<std::unique_ptr<block::qcow2::Qcow2Image>> open_qcow2(
    const std::string& path, block::Access access,
    block::Access backing_access = block::Access::ReadOnly);

// The image's own path, then its backing files' paths, top to bottom.
std::vector<std::string> chain_files(block::BlockBackend& image, const std::string& path);
// Whether both paths name one existing file (the same inode).
bool same_file(const std::string& a, const std::string& b);

struct ConvertArgs {
  std::string source_format = "auto";
  std::string output_format = "raw";  // qemu-img's default too
  bool compress = false;
  std::string options;
  bool progress = false;
  std::string source;
  std::string destination;
};
Result<void> convert(const ConvertArgs& args);

struct MapArgs {
  std::string output = "human";  // or "json"
  std::string format = "auto";
  block::Locking locking = block::Locking::Lock;  // -U: ForceShare
  std::string file;
};
Result<void> map(const MapArgs& args);

struct ResizeArgs {
  std::string format = "auto";
  bool shrink = false;
  std::string file;
  std::string size;  // SIZE, +SIZE or -SIZE
};
Result<void> resize(const ResizeArgs& args);
// The work of resize, without its message (commit grows a backing file).
Result<void> resize_image(const std::string& path, block::ImageFormat format, uint64_t size_bytes,
                          bool allow_shrink);

struct RebaseArgs {
  bool unsafe = false;
  std::string backing;         // the new backing file; empty: none
  std::string backing_format;  // empty: probe
  bool progress = false;
  std::string file;
};
Result<void> rebase(const RebaseArgs& args);

struct CommitArgs {
  bool keep_overlay = false;  // -d: leave the overlay's clusters in place
  bool progress = false;
  std::string file;
};
Result<void> commit(const CommitArgs& args);

// "    (12.50/100%)\r" on stderr, as qemu-img -p, when enabled.
class Progress {
 public:
  explicit Progress(bool enabled) : enabled_(enabled) {}
  void update(uint64_t done, uint64_t total);
  void finish();

 private:
  bool enabled_;
  int last_hundredths_ = -1;
};

}  // namespace keel::img
