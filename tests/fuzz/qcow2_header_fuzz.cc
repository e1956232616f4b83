// libFuzzer target: an arbitrary file opened as a qcow2 image, read, and
// (opened again writable) written, discarded, zeroed, written compressed,
// mapped (block_status and map_at, as keel-img map and convert), grown and
// shrunk (keel-img resize), and flushed; and through the asynchronous face
// (io_uring, as virtio-blk uses it) with overlapping requests in flight. Whatever the bytes, Keel must
// return errors, never crash, hang or read out of bounds. Exercises the
// header and extension parser, L1/L2 lookups, compressed cluster decoding
// and packing, refcount tables and blocks, allocation and L1 growth.
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "base/fd.h"
#include "base/log.h"
#include "block/map.h"
#include "block/qcow2/check.h"
#include "block/qcow2/qcow2.h"
#include "block/raw/raw_file.h"

namespace {

using keel::Fd;
using keel::Result;
namespace block = keel::block;

Fd memfd_with(const uint8_t* data, size_t size) {
  Fd fd(::memfd_create("qcow2-fuzz", MFD_CLOEXEC));
  if (!fd.valid()) return fd;
  if (size > 0 && !fd.pwrite_all(std::as_bytes(std::span(data, size)), 0)) return Fd();
  return fd;
}

std::string path_of(const Fd& fd) { return "/proc/self/fd/" + std::to_string(fd.get()); }

void read_some(block::BlockBackend& disk, std::vector<std::byte>& buffer) {
  const uint64_t size = disk.size_bytes();
  // The start, a spread of places, and the end: bounded work whatever the
  // virtual size claims.
  for (uint64_t i = 0; i < 8; ++i) {
    const uint64_t at = (size / 8 * i) & ~uint64_t{511};
    const uint64_t length = std::min<uint64_t>(buffer.size(), size - at);
    iovec v{buffer.data(), length};
    (void)disk.read_at(at, std::span(&v, 1));
  }
}

// What keel-img map and convert ask: a bounded number of extents.
void map_some(block::qcow2::Qcow2Image& disk, const std::string& path) {
  const uint64_t size = disk.size_bytes();
  uint64_t at = 0;
  for (int i = 0; i < 64 && at < size; ++i) {
    auto extent = disk.block_status(at, size - at);
    if (!extent || extent->length_bytes == 0) break;
    at += extent->length_bytes;
  }
  at = 0;
  for (int i = 0; i < 64 && at < size; ++i) {
    auto entry = block::map_at(disk, path, at, size - at);
    if (!entry || entry->length == 0) break;
    at += entry->length;
  }
}

// Reads and writes in flight at once, overlapping each other (and so the
// clusters other requests allocate), then every completion reaped.
void async_some(block::BlockBackend& disk, std::vector<std::byte>& buffer) {
  const uint64_t size = disk.size_bytes();
  if (size < 512) return;
  // Four places, four requests each, 4 KiB apart and 16 KiB long.
  const uint64_t slice = buffer.size() / 16;
  std::vector<iovec> iovs(16);
  for (uint64_t i = 0; i < iovs.size(); ++i) {
    const uint64_t at = ((size / 4 * (i % 4) + i / 4 * 4096) % size) & ~uint64_t{511};
    const uint64_t length = std::min<uint64_t>(slice, size - at) & ~uint64_t{511};
    if (length == 0) continue;
    iovs[i] = iovec{buffer.data() + slice * i, length};
    block::BlockRequest request;
    request.op = i % 3 == 0 ? block::BlockOp::Read : block::BlockOp::Write;
    if (i == 7) request.op = block::BlockOp::Flush;
    request.offset = at;
    request.iov = std::span(&iovs[i], 1);
    request.user_data = i;
    (void)disk.submit(request);
  }
  (void)disk.kick();
  std::vector<block::BlockCompletion> done;
  for (int tries = 0; tries < 100 && disk.in_flight() > 0; ++tries) {
    pollfd pfd{disk.completion_fd(), POLLIN, 0};
    (void)::poll(&pfd, 1, 100);
    disk.reap(done);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  keel::log::init(keel::log::Level::Off, "qcow2_header_fuzz");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > (4 << 20)) return 0;
  Fd image = memfd_with(data, size);
  Fd backing = memfd_with(nullptr, 0);
  if (!image.valid() || !backing.valid() || ::ftruncate(backing.get(), 1 << 20) < 0) return 0;
  const std::string backing_path = path_of(backing);
  // Every backing name leads to one small raw file.
  block::qcow2::BackingOpener open_backing =
      [&](const std::string&, block::ImageFormat) -> Result<std::unique_ptr<block::BlockBackend>> {
    auto raw = TRY(block::RawFile::open(backing_path, block::Access::ReadOnly));
    return std::unique_ptr<block::BlockBackend>(std::move(raw));
  };
  std::vector<std::byte> buffer(256 << 10);

  if (auto disk = block::qcow2::Qcow2Image::open(path_of(image), block::Access::ReadOnly,
                                                 open_backing)) {
    read_some(**disk, buffer);
    async_some(**disk, buffer);
  }
  (void)block::qcow2::check_image(path_of(image));

  if (auto disk = block::qcow2::Qcow2Image::open(path_of(image), block::Access::ReadWrite,
                                                 open_backing)) {
    const uint64_t disk_size = (*disk)->size_bytes();
    for (uint64_t i = 0; i < 4 && disk_size >= 512; ++i) {
      const uint64_t at = (disk_size / 4 * i) & ~uint64_t{511};
      const uint64_t length = std::min<uint64_t>(70000, disk_size - at);
      iovec v{buffer.data(), length};
      (void)(*disk)->write_at(at, std::span(&v, 1));
    }
    if (disk_size >= (1 << 20)) {
      (void)(*disk)->write_zeroes(1000, 300000, block::Unmap::Yes);
      (void)(*disk)->discard(0, 1 << 20);
    }
    block::qcow2::Qcow2Image& qcow2 = **disk;
    // A compressed write into the first and the last cluster (one whole
    // cluster each; the header bounds the cluster size to 2 MiB).
    const uint64_t cluster = qcow2.header().cluster_size();
    if (disk_size >= cluster) {
      std::vector<std::byte> plain(cluster, std::byte{0x5a});
      (void)qcow2.write_compressed(0, plain);
      (void)qcow2.write_compressed((disk_size - 1) / cluster * cluster, plain);
    }
    map_some(qcow2, path_of(image));
    // Grow (a larger L1 table, perhaps moved) and shrink back; bounded so a
    // claimed exabyte disk does not make the fuzzer allocate its L1 table.
    if (disk_size <= (1ull << 30)) {
      (void)qcow2.resize(disk_size + (3 << 20));
      (void)qcow2.resize(disk_size / 2 / 512 * 512);
      map_some(qcow2, path_of(image));
    }
    async_some(qcow2, buffer);
    (void)qcow2.flush();
    read_some(qcow2, buffer);
  }
  return 0;
}
