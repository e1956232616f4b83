#include "block/qcow2/compress.h"

#include <zlib.h>
#include <zstd.h>

#include <climits>

#include <fmt/format.h>

namespace keel::block::qcow2 {
namespace {

Failure damaged(std::string_view what, std::string_view detail) {
  return fail(Errc::Corrupt, fmt::format("qcow2 image {}: compressed cluster: {}", what, detail));
}

Result<void> inflate_raw(std::span<const std::byte> in, std::span<std::byte> out,
                         std::string_view what) {
  z_stream stream{};
  // Negative window bits: a raw deflate stream; 15 accepts any window size.
  if (inflateInit2(&stream, -15) != Z_OK) return fail(Errc::Io, "zlib inflateInit2 failed");
  // Both sizes are at most a few MiB (parse_header bounds the cluster size).
  stream.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  stream.avail_in = static_cast<uInt>(in.size());
  stream.next_out = reinterpret_cast<Bytef*>(out.data());
  stream.avail_out = static_cast<uInt>(out.size());
  const int rc = inflate(&stream, Z_FINISH);
  const uInt left = stream.avail_out;
  inflateEnd(&stream);
  if (left == 0 && (rc == Z_STREAM_END || rc == Z_OK || rc == Z_BUF_ERROR)) return ok();
  if (rc == Z_STREAM_END || rc == Z_BUF_ERROR) {
    return damaged(what, fmt::format("deflate data ends {} bytes short of a cluster", left));
  }
  return damaged(what, fmt::format("bad deflate data (zlib error {})", rc));
}

Result<void> unzstd(std::span<const std::byte> in, std::span<std::byte> out,
                    std::string_view what) {
  ZSTD_DCtx* context = ZSTD_createDCtx();
  if (context == nullptr) return fail(Errc::Io, "ZSTD_createDCtx failed");
  // zstd may otherwise allocate a window as large as a frame claims.
  (void)ZSTD_DCtx_setParameter(context, ZSTD_d_windowLogMax, 23);
  ZSTD_inBuffer input{in.data(), in.size(), 0};
  ZSTD_outBuffer output{out.data(), out.size(), 0};
  Result<void> result = ok();
  while (output.pos < output.size) {
    const size_t before_in = input.pos;
    const size_t before_out = output.pos;
    const size_t rc = ZSTD_decompressStream(context, &output, &input);
    if (ZSTD_isError(rc)) {
      result = damaged(what, fmt::format("bad zstd data ({})", ZSTD_getErrorName(rc)));
      break;
    }
    if (input.pos == before_in && output.pos == before_out) {
      result = damaged(what, fmt::format("zstd data ends {} bytes short of a cluster",
                                         output.size - output.pos));
      break;
    }
  }
  ZSTD_freeDCtx(context);
  return result;
}

}  // namespace

Result<void> decompress_cluster(CompressionType type, std::span<const std::byte> in,
                                std::span<std::byte> out, std::string_view what) {
  switch (type) {
    case CompressionType::Zlib: return inflate_raw(in, out, what);
    case CompressionType::Zstd: return unzstd(in, out, what);
  }
  return fail(Errc::Unsupported, "compression type");
}

Result<size_t> deflate_raw(std::span<const std::byte> in, std::span<std::byte> out) {
  z_stream stream{};
  if (deflateInit2(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) !=
      Z_OK) {
    return fail(Errc::Io, "zlib deflateInit2 failed");
  }
  stream.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  stream.avail_in = static_cast<uInt>(in.size());
  stream.next_out = reinterpret_cast<Bytef*>(out.data());
  stream.avail_out = static_cast<uInt>(out.size());
  const int rc = deflate(&stream, Z_FINISH);
  const size_t produced = out.size() - stream.avail_out;
  deflateEnd(&stream);
  if (rc != Z_STREAM_END) return fail(Errc::OutOfRange, "compressed data does not fit");
  return produced;
}

}  // namespace keel::block::qcow2
