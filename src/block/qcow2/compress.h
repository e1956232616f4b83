// Decompressing qcow2 compressed clusters. Spec: QEMU docs/interop/qcow2.txt,
// "Compressed Clusters Descriptor" and compression_type: zlib clusters are a
// raw deflate stream (RFC 1951, no zlib header), zstd clusters a zstd stream;
// either may be followed by unrelated bytes (the rest of the last sector).
#pragma once

#include <cstddef>
#include <span>
#include <string_view>

#include "base/result.h"
#include "block/qcow2/header.h"

namespace keel::block::qcow2 {

// Fills all of out from in; Corrupt (naming what) if the stream is damaged
// or ends before out is full.
Result<void> decompress_cluster(CompressionType type, std::span<const std::byte> in,
                                std::span<std::byte> out, std::string_view what);

// Raw deflate of in, for tests and (later) keel-img convert -c. Returns
// false if the output would not fit in out_size bytes.
Result<size_t> deflate_raw(std::span<const std::byte> in, std::span<std::byte> out);

}  // namespace keel::block::qcow2
