// The live migration stream (docs/migration-protocol.md): a preamble, then
// framed, checksummed records over a connected socket. This layer knows
// frames and their payloads; the pre-copy loop (migration/precopy.h) and
// the machine decide what to send when.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/fd.h"
#include "base/result.h"
#include "migration/dirty_bitmap.h"
#include "migration/snapshot_file.h"

namespace keel::migration {

// Version 2 added the zero encoding of a pages frame.
inline constexpr uint32_t kStreamVersion = 2;
inline constexpr std::array<char, 8> kStreamMagic = {'K', 'E', 'E', 'L', 'M', 'I', 'G', 'R'};
// A frame's payload is read whole into memory: bound it. A pages frame
// carries at most kMaxPagesPerFrame pages, so this leaves room.
inline constexpr uint32_t kMaxFramePayloadBytes = 8u << 20;
inline constexpr uint32_t kMaxPagesPerFrame = 256;  // 1 MiB of RAM

enum class FrameType : uint16_t {
  Hello = 1,         // source -> destination: RAM size, source CPU
  Pages = 2,         // a run of RAM pages, raw or zstd
  MachineState = 3,  // the paused machine (encode_machine_state)
  End = 4,           // source: everything is sent
  Ack = 5,           // destination: the machine was rebuilt, or why not
  Abort = 6,         // either side: giving up, with the reason
  // Local disks copied with the migration (migration/disk_records.h).
  DiskInfo = 7,   // source -> destination: which disks are copied, their sizes
  DiskChunk = 8,  // one chunk of a copied disk: data or zeroes
  // Post-copy (docs/migration-protocol.md, "Post-copy").
  PostcopyStart = 9,  // source -> destination: the pages still to come; run now
  PageRequest = 10,   // destination -> source: a run of pages the guest waits for
};
std::string_view frame_type_name(FrameType type);

struct Frame {
  FrameType type;
  std::vector<std::byte> payload;
};

// Writes the preamble and frames to a socket (or any fd). Socket writes use
// MSG_NOSIGNAL: a destination that went away is an error, never SIGPIPE.
class StreamWriter {
 public:
  explicit StreamWriter(const Fd& fd) : fd_(fd) {}
  Result<void> write_preamble();
  Result<void> send(FrameType type, std::span<const std::byte> payload);
  uint64_t bytes_sent() const { return bytes_sent_; }

 private:
  Result<void> write_parts(std::array<std::span<const std::byte>, 2> parts);
  const Fd& fd_;
  uint64_t bytes_sent_ = 0;
  bool socket_ = true;
};

// Reads and checks the preamble and frames: magic, version, each frame's
// type, length bound and CRC. A connection that ends mid-frame is an Io
// error naming how far it got. timeout_ms < 0 waits forever.
class StreamReader {
 public:
  StreamReader(const Fd& fd, std::string peer) : fd_(fd), peer_(std::move(peer)) {}
  Result<void> read_preamble(int timeout_ms = -1);
  Result<Frame> next(int timeout_ms = -1);
  // Whether a frame (or the end of the connection) can be read now, after
  // waiting up to timeout_ms for it.
  Result<bool> readable(int timeout_ms);
  uint64_t bytes_received() const { return bytes_received_; }

 private:
  Result<void> read_exact(std::span<std::byte> out, std::string_view what, int timeout_ms);
  const Fd& fd_;
  std::string peer_;
  uint64_t bytes_received_ = 0;
};

// Payloads.
struct Hello {
  uint64_t ram_bytes = 0;
  HostCpuSummary host;
};
std::vector<std::byte> encode_hello(const Hello& hello);
Result<Hello> decode_hello(std::span<const std::byte> payload);

// A pages frame's encoding. Zero carries no data: the destination zeroes
// the run (a page that became all zeros since it was last sent).
enum class Compression : uint32_t { None = 0, Zstd = 1, Zero = 2 };
// Pages [first_page, first_page + page_count) of ram (all of RAM in offset
// order), at most kMaxPagesPerFrame; with Zstd, compressed unless that does
// not make it smaller.
Result<std::vector<std::byte>> encode_pages(std::span<const std::byte> ram, uint64_t first_page,
                                            uint32_t page_count, Compression compression);
// A pages frame that zeroes [first_page, first_page + page_count), at most
// kMaxPagesPerFrame pages.
std::vector<std::byte> encode_zero_pages(uint64_t first_page, uint32_t page_count);
// Checks a pages payload against ram's size and writes its pages there;
// returns how many. Nothing is written for a payload that does not check.
Result<uint32_t> apply_pages(std::span<const std::byte> payload, std::span<std::byte> ram);
// A pages payload checked against RAM of ram_pages pages and unpacked:
// data holds page_count pages, or is empty for a zero run. A zstd payload
// is unpacked into a thread-local buffer, valid until the next call.
struct DecodedPages {
  uint64_t first_page = 0;
  uint32_t page_count = 0;
  bool zero = false;
  std::span<const std::byte> data;
};
Result<DecodedPages> decode_pages(std::span<const std::byte> payload, uint64_t ram_pages);
// True if the page (kPageBytes) holds only zero bytes.
bool is_zero_page(std::span<const std::byte> page);

// End: how many pages and dirty rounds the source sent, for the destination's log.
struct EndSummary {
  uint64_t pages_sent = 0;
  uint64_t rounds = 0;
};
std::vector<std::byte> encode_end(const EndSummary& end);
Result<EndSummary> decode_end(std::span<const std::byte> payload);

// PostcopyStart: the pages the destination does not hold yet (one bit a
// page, all of RAM), which the source sends from now on.
std::vector<std::byte> encode_postcopy_start(const DirtyBitmap& pending);
// Checks the bitmap is of ram_pages pages, with no bit set past them.
Result<DirtyBitmap> decode_postcopy_start(std::span<const std::byte> payload, uint64_t ram_pages);

// PageRequest: pages [first_page, first_page + page_count) of RAM.
struct PageRequest {
  uint64_t first_page = 0;
  uint32_t page_count = 0;
};
std::vector<std::byte> encode_page_request(const PageRequest& request);
// Checks the run is 1 to kMaxPagesPerFrame pages inside RAM of ram_pages.
Result<PageRequest> decode_page_request(std::span<const std::byte> payload, uint64_t ram_pages);

// Ack and Abort carry a status word and a message.
struct Verdict {
  bool ok = false;
  std::string message;
};
std::vector<std::byte> encode_verdict(const Verdict& verdict);
Result<Verdict> decode_verdict(std::span<const std::byte> payload);

}  // namespace keel::migration
