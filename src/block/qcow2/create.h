// Creating empty qcow2 images (keel-img create, tests), and rewriting the
// backing file an image names (keel-img rebase).
// Spec: QEMU docs/interop/qcow2.txt. Layout: the header cluster (header,
// backing format extension, backing file name), the refcount table, its
// refcount blocks, then the L1 table; 16-bit refcounts, no features set.
#pragma once

#include <cstdint>
#include <string>

#include "base/result.h"

namespace keel::block::qcow2 {

struct CreateOptions {
  uint64_t size_bytes = 0;     // the virtual size; a multiple of 512
  uint32_t cluster_bits = 16;  // 9..21
  uint32_t version = 3;        // 2 (QEMU's compat=0.10) or 3 (compat=1.1)
  std::string backing_file;    // recorded as given (relative to the image's directory)
  std::string backing_format;  // "raw", "qcow2" or empty (probe when opened)
};

// Writes a new image at path, replacing any file there.
Result<void> create_image(const std::string& path, const CreateOptions& options);

// Records backing_file (as given; empty: none) and backing_format (empty:
// not recorded) in the image at path. The header cluster is rebuilt with
// every other header extension kept (spec: "Header extensions"), written in
// one write and synced. Only the name changes: making the content right for
// the new backing file is the caller's work, done before this.
Result<void> set_backing_file(const std::string& path, const std::string& backing_file,
                              const std::string& backing_format);

}  // namespace keel::block::qcow2
