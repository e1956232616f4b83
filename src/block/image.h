// Opening a disk image by format: the one place that maps a path and a
// format name to a BlockBackend. Formats: raw (src/block/raw) and qcow2
// (src/block/qcow2, QEMU docs/interop/qcow2.txt), whose backing images are
// opened through here too (read-only, at most 64 deep), each file locked.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "base/result.h"
#include "block/block_backend.h"
#include "block/image_lock.h"

namespace keel::block {

enum class ImageFormat : uint8_t { Auto, Raw, Qcow2 };

// "auto", "raw", "qcow2" (the names --disk and keel-img take).
Result<ImageFormat> parse_image_format(std::string_view name);
std::string_view image_format_name(ImageFormat format);

// What the first bytes of the file at path say it is: Qcow2 for the qcow2
// magic "QFI\xfb", Raw for anything else (including files shorter than the
// magic).
Result<ImageFormat> probe_image_format(const std::string& path);

// Opens path as format; Auto probes first. A probed qcow2 file is never
// opened as raw: the guest would see (and could rewrite) its metadata.
// Probing trusts the file, and a guest can write the qcow2 magic into a raw
// disk, so name the format of images a guest writes to.
// Every file of the chain is locked as QEMU locks it (block/image_lock.h):
// the backing files for reading, path for access; a file another process
// (or another open here) writes, or that a writer holds, is Errc::Busy
// naming it. ForceShare takes no locks.
Result<std::unique_ptr<BlockBackend>> open_image(const std::string& path, ImageFormat format,
                                                 Access access, Locking locking = Locking::Lock);

}  // namespace keel::block
