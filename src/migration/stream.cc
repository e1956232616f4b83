#include "migration/stream.h"

#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>

#include "base/check.h"
#include "base/bytes.h"

namespace keel::migration {
namespace {

constexpr size_t kPreambleBytes = 16;     // magic, version, crc32 of both
constexpr size_t kFrameHeaderBytes = 12;  // type, flags, length, crc32
constexpr int kZstdLevel = 1;             // fast: the link, not the CPU, should be the limit

struct PagesHeader {
  uint64_t first_page;
  uint32_t page_count;
  uint32_t compression;
};
static_assert(sizeof(PagesHeader) == 16);

// A run of 1 to kMaxPagesPerFrame pages inside RAM of ram_pages, or
// Corrupt naming the frame.
Result<void> check_run(std::string_view frame, uint64_t first_page, uint64_t page_count,
                       uint64_t ram_pages) {
  if (page_count == 0 || page_count > kMaxPagesPerFrame || first_page > ram_pages ||
      page_count > ram_pages - first_page) {
    return fail(Errc::Corrupt,
                fmt::format("{} frame: pages {}+{} outside RAM of {} pages (at most {} a frame)",
                            frame, first_page, page_count, ram_pages, kMaxPagesPerFrame));
  }
  return ok();
}

bool known_frame(uint16_t type) {
  return type >= static_cast<uint16_t>(FrameType::Hello) &&
         type <= static_cast<uint16_t>(FrameType::PageRequest);
}

}  // namespace

std::string_view frame_type_name(FrameType type) {
  switch (type) {
    case FrameType::Hello:
      return "hello";
    case FrameType::Pages:
      return "pages";
    case FrameType::MachineState:
      return "machine state";
    case FrameType::End:
      return "end";
    case FrameType::Ack:
      return "ack";
    case FrameType::Abort:
      return "abort";
    case FrameType::DiskInfo:
      return "disk info";
    case FrameType::DiskChunk:
      return "disk chunk";
    case FrameType::PostcopyStart:
      return "post-copy start";
    case FrameType::PageRequest:
      return "page request";
  }
  return "unknown";
}

Result<void> StreamWriter::write_preamble() {
  ByteWriter out;
  out.put(kStreamMagic);
  out.put(kStreamVersion);
  out.put(snapshot_crc32(out.data()));
  return write_parts({out.data(), {}});
}

Result<void> StreamWriter::send(FrameType type, std::span<const std::byte> payload) {
  if (payload.size() > kMaxFramePayloadBytes) {
    return fail(Errc::InvalidArgument,
                fmt::format("migration stream: a {} frame of {} bytes (at most {})",
                            frame_type_name(type), payload.size(), kMaxFramePayloadBytes));
  }
  ByteWriter header;
  header.put(static_cast<uint16_t>(type));
  header.put(uint16_t{0});
  header.put(static_cast<uint32_t>(payload.size()));
  header.put(snapshot_crc32(payload, snapshot_crc32(header.data())));
  // Header and payload in one system call (the stop-and-copy sends many
  // frames while the guest waits).
  return write_parts({header.data(), payload});
}

// Both parts, a short write going on with the rest.
Result<void> StreamWriter::write_parts(std::array<std::span<const std::byte>, 2> parts) {
  size_t part = 0;
  while (part < 2) {
    iovec vectors[2];
    int count = 0;
    for (size_t i = part; i < 2; ++i) {
      vectors[count++] = {const_cast<std::byte*>(parts[i].data()), parts[i].size()};
    }
    msghdr message{};
    message.msg_iov = vectors;
    message.msg_iovlen = static_cast<size_t>(count);
    ssize_t n = socket_ ? ::sendmsg(fd_.get(), &message, MSG_NOSIGNAL)
                        : ::writev(fd_.get(), vectors, count);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == ENOTSOCK && socket_) {
        socket_ = false;  // a pipe or file (tests): plain writes
        continue;
      }
      return fail_errno(fmt::format("migration stream: send after {} bytes", bytes_sent_));
    }
    bytes_sent_ += static_cast<uint64_t>(n);
    size_t written = static_cast<size_t>(n);
    while (part < 2 && written >= parts[part].size()) {
      written -= parts[part].size();
      ++part;
    }
    if (part < 2) parts[part] = parts[part].subspan(written);
  }
  return ok();
}

Result<void> StreamReader::read_exact(std::span<std::byte> out, std::string_view what,
                                      int timeout_ms) {
  size_t done = 0;
  while (done < out.size()) {
    pollfd waiting{.fd = fd_.get(), .events = POLLIN, .revents = 0};
    int ready = ::poll(&waiting, 1, timeout_ms);
    if (ready < 0) {
      if (errno == EINTR) continue;
      return fail_errno(fmt::format("migration stream from {}: poll", peer_));
    }
    if (ready == 0) {
      return fail(Errc::Timeout, fmt::format("migration stream from {}: nothing for {} ms while "
                                             "reading the {}",
                                             peer_, timeout_ms, what));
    }
    ssize_t n = ::read(fd_.get(), out.data() + done, out.size() - done);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return fail_errno(fmt::format("migration stream from {}: read the {} after {} bytes", peer_,
                                    what, bytes_received_));
    }
    if (n == 0) {
      return fail(Errc::Io, fmt::format("migration stream from {}: the connection closed after {} "
                                        "bytes, in the {}",
                                        peer_, bytes_received_, what));
    }
    done += static_cast<size_t>(n);
    bytes_received_ += static_cast<uint64_t>(n);
  }
  return ok();
}

Result<void> StreamReader::read_preamble(int timeout_ms) {
  std::array<std::byte, kPreambleBytes> bytes;
  TRY(read_exact(bytes, "preamble", timeout_ms));
  ByteReader in(bytes);
  using Magic = std::array<char, 8>;
  auto magic = TRY(in.get<Magic>("magic"));
  auto version = TRY(in.get<uint32_t>("version"));
  auto crc = TRY(in.get<uint32_t>("preamble crc"));
  if (magic != kStreamMagic) {
    return fail(
        Errc::Corrupt,
        fmt::format("migration stream from {}: not a Keel migration stream (bad magic)", peer_));
  }
  if (crc != snapshot_crc32(std::span(bytes).first(12))) {
    return fail(Errc::Corrupt,
                fmt::format("migration stream from {}: preamble CRC mismatch", peer_));
  }
  if (version != kStreamVersion) {
    return fail(Errc::Unsupported,
                fmt::format("migration stream from {}: version {}, this keel-vmm speaks {}", peer_,
                            version, kStreamVersion));
  }
  return ok();
}

Result<Frame> StreamReader::next(int timeout_ms) {
  std::array<std::byte, kFrameHeaderBytes> header;
  TRY(read_exact(header, "frame header", timeout_ms));
  ByteReader in(header);
  auto type = TRY(in.get<uint16_t>("frame type"));
  auto flags = TRY(in.get<uint16_t>("frame flags"));
  auto length = TRY(in.get<uint32_t>("frame length"));
  auto crc = TRY(in.get<uint32_t>("frame crc"));
  const uint64_t offset = bytes_received_ - kFrameHeaderBytes;
  if (!known_frame(type)) {
    return fail(Errc::Corrupt, fmt::format("migration stream from {}: unknown frame type {} at "
                                           "byte {}",
                                           peer_, type, offset));
  }
  auto frame_type = static_cast<FrameType>(type);
  if (flags != 0) {
    return fail(Errc::Corrupt, fmt::format("migration stream from {}: {} frame at byte {} has "
                                           "flags {:#x}",
                                           peer_, frame_type_name(frame_type), offset, flags));
  }
  if (length > kMaxFramePayloadBytes) {
    return fail(Errc::Corrupt, fmt::format("migration stream from {}: {} frame at byte {} of {} "
                                           "bytes (at most {})",
                                           peer_, frame_type_name(frame_type), offset, length,
                                           kMaxFramePayloadBytes));
  }
  Frame frame{frame_type, std::vector<std::byte>(length)};
  TRY(read_exact(frame.payload, fmt::format("{} frame", frame_type_name(frame_type)), timeout_ms));
  uint32_t actual = snapshot_crc32(frame.payload, snapshot_crc32(std::span(header).first(8)));
  if (actual != crc) {
    return fail(Errc::Corrupt,
                fmt::format("migration stream from {}: {} frame at byte {}: CRC "
                            "{:#010x}, expected {:#010x}",
                            peer_, frame_type_name(frame_type), offset, actual, crc));
  }
  return frame;
}

Result<bool> StreamReader::readable(int timeout_ms) {
  pollfd waiting{fd_.get(), POLLIN, 0};
  for (;;) {
    int ready = ::poll(&waiting, 1, timeout_ms);
    if (ready >= 0) return ready > 0;
    if (errno != EINTR) return fail_errno(fmt::format("migration stream from {}: poll", peer_));
  }
}

std::vector<std::byte> encode_hello(const Hello& hello) {
  ByteWriter out;
  out.put(hello.ram_bytes);
  out.put(kPageBytes);
  out.put(hello.host);
  return std::move(out.data());
}

Result<Hello> decode_hello(std::span<const std::byte> payload) {
  ByteReader in(payload);
  Hello hello;
  hello.ram_bytes = TRY_CONTEXT(in.get<uint64_t>("RAM size"), "hello frame");
  auto page_bytes = TRY_CONTEXT(in.get<uint32_t>("page size"), "hello frame");
  hello.host = TRY_CONTEXT(in.get<HostCpuSummary>("source CPU"), "hello frame");
  if (in.remaining() != 0) {
    return fail(Errc::Corrupt, fmt::format("hello frame: {} bytes too many", in.remaining()));
  }
  if (page_bytes != kPageBytes) {
    return fail(Errc::Unsupported,
                fmt::format("hello frame: pages of {} bytes, not {}", page_bytes, kPageBytes));
  }
  if (hello.ram_bytes == 0 || hello.ram_bytes % kPageBytes != 0) {
    return fail(Errc::Corrupt,
                fmt::format("hello frame: {} bytes of RAM, not a page multiple", hello.ram_bytes));
  }
  return hello;
}

Result<std::vector<std::byte>> encode_pages(std::span<const std::byte> ram, uint64_t first_page,
                                            uint32_t page_count, Compression compression) {
  const uint64_t ram_pages = ram.size() / kPageBytes;
  if (page_count == 0 || page_count > kMaxPagesPerFrame || first_page > ram_pages ||
      page_count > ram_pages - first_page) {
    return fail(Errc::InvalidArgument,
                fmt::format("pages {}+{} of {} (at most {} a frame)", first_page, page_count,
                            ram_pages, kMaxPagesPerFrame));
  }
  std::span<const std::byte> pages =
      ram.subspan(first_page * kPageBytes, uint64_t{page_count} * kPageBytes);
  ByteWriter out;
  out.put(PagesHeader{first_page, page_count, static_cast<uint32_t>(Compression::None)});
  std::vector<std::byte>& bytes = out.data();
  if (compression == Compression::Zstd) {
    bytes.resize(sizeof(PagesHeader) + ZSTD_compressBound(pages.size()));
    size_t packed =
        ZSTD_compress(bytes.data() + sizeof(PagesHeader), bytes.size() - sizeof(PagesHeader),
                      pages.data(), pages.size(), kZstdLevel);
    if (!ZSTD_isError(packed) && packed < pages.size()) {
      bytes.resize(sizeof(PagesHeader) + packed);
      uint32_t zstd = static_cast<uint32_t>(Compression::Zstd);
      std::memcpy(bytes.data() + offsetof(PagesHeader, compression), &zstd, sizeof(zstd));
      return std::move(bytes);
    }
    bytes.resize(sizeof(PagesHeader));  // incompressible: raw
  }
  out.put_bytes(pages);
  return std::move(out.data());
}

std::vector<std::byte> encode_zero_pages(uint64_t first_page, uint32_t page_count) {
  CHECK(page_count > 0 && page_count <= kMaxPagesPerFrame, "a zero-pages frame of 1-256 pages");
  ByteWriter out;
  out.put(PagesHeader{first_page, page_count, static_cast<uint32_t>(Compression::Zero)});
  return std::move(out.data());
}

bool is_zero_page(std::span<const std::byte> page) {
  static constexpr std::array<std::byte, kPageBytes> kZeros{};
  CHECK(page.size() == kPageBytes, "is_zero_page takes one page");
  return std::memcmp(page.data(), kZeros.data(), kPageBytes) == 0;
}

Result<DecodedPages> decode_pages(std::span<const std::byte> payload, uint64_t ram_pages) {
  ByteReader in(payload);
  auto header = TRY_CONTEXT(in.get<PagesHeader>("pages header"), "pages frame");
  TRY(check_run("pages", header.first_page, header.page_count, ram_pages));
  const size_t bytes = size_t{header.page_count} * kPageBytes;
  std::span<const std::byte> data = in.get_bytes(in.remaining(), "pages").value();
  DecodedPages pages{header.first_page, header.page_count, false, data};
  switch (static_cast<Compression>(header.compression)) {
    case Compression::None:
      if (data.size() != bytes) {
        return fail(Errc::Corrupt, fmt::format("pages frame: {} bytes for {} pages", data.size(),
                                               header.page_count));
      }
      return pages;
    case Compression::Zstd: {
      // Into a buffer first, so a damaged frame leaves RAM untouched.
      thread_local std::vector<std::byte> buffer;
      buffer.resize(bytes);
      size_t unpacked = ZSTD_decompress(buffer.data(), buffer.size(), data.data(), data.size());
      if (ZSTD_isError(unpacked)) {
        return fail(Errc::Corrupt,
                    fmt::format("pages frame {}+{}: bad zstd data ({})", header.first_page,
                                header.page_count, ZSTD_getErrorName(unpacked)));
      }
      if (unpacked != bytes) {
        return fail(Errc::Corrupt,
                    fmt::format("pages frame {}+{}: zstd data of {} bytes, "
                                "expected {}",
                                header.first_page, header.page_count, unpacked, bytes));
      }
      pages.data = buffer;
      return pages;
    }
    case Compression::Zero:
      if (!data.empty()) {
        return fail(Errc::Corrupt, fmt::format("pages frame {}+{}: zero pages with {} bytes of "
                                               "data",
                                               header.first_page, header.page_count, data.size()));
      }
      pages.zero = true;
      pages.data = {};
      return pages;
  }
  return fail(Errc::Corrupt,
              fmt::format("pages frame: unknown compression {}", header.compression));
}

Result<uint32_t> apply_pages(std::span<const std::byte> payload, std::span<std::byte> ram) {
  DecodedPages pages = TRY(decode_pages(payload, ram.size() / kPageBytes));
  std::span<std::byte> target =
      ram.subspan(pages.first_page * kPageBytes, size_t{pages.page_count} * kPageBytes);
  if (pages.zero) {
    std::memset(target.data(), 0, target.size());
  } else {
    std::memcpy(target.data(), pages.data.data(), target.size());
  }
  return pages.page_count;
}

std::vector<std::byte> encode_postcopy_start(const DirtyBitmap& pending) {
  ByteWriter out;
  out.put(pending.page_count());
  for (uint64_t word : pending.words()) out.put(word);
  return std::move(out.data());
}

Result<DirtyBitmap> decode_postcopy_start(std::span<const std::byte> payload, uint64_t ram_pages) {
  ByteReader in(payload);
  auto page_count = TRY_CONTEXT(in.get<uint64_t>("page count"), "post-copy start frame");
  if (page_count != ram_pages) {
    return fail(Errc::Corrupt, fmt::format("post-copy start frame: a bitmap of {} pages for RAM "
                                           "of {} pages",
                                           page_count, ram_pages));
  }
  const uint64_t word_count = (ram_pages + 63) / 64;
  if (in.remaining() != word_count * sizeof(uint64_t)) {
    return fail(Errc::Corrupt,
                fmt::format("post-copy start frame: {} bytes of bitmap for {} pages (expected {})",
                            in.remaining(), ram_pages, word_count * sizeof(uint64_t)));
  }
  DirtyBitmap pending(ram_pages);
  std::span<uint64_t> words = pending.words();
  for (uint64_t i = 0; i < word_count; ++i) {
    words[i] = TRY_CONTEXT(in.get<uint64_t>("bitmap word"), "post-copy start frame");
  }
  if (ram_pages % 64 != 0 && (words[word_count - 1] >> (ram_pages % 64)) != 0) {
    return fail(Errc::Corrupt, fmt::format("post-copy start frame: bits set past page {}",
                                           ram_pages));
  }
  return pending;
}

std::vector<std::byte> encode_page_request(const PageRequest& request) {
  ByteWriter out;
  out.put(request.first_page);
  out.put(request.page_count);
  return std::move(out.data());
}

Result<PageRequest> decode_page_request(std::span<const std::byte> payload, uint64_t ram_pages) {
  ByteReader in(payload);
  PageRequest request;
  request.first_page = TRY_CONTEXT(in.get<uint64_t>("first page"), "page request frame");
  request.page_count = TRY_CONTEXT(in.get<uint32_t>("page count"), "page request frame");
  if (in.remaining() != 0) {
    return fail(Errc::Corrupt,
                fmt::format("page request frame: {} bytes too many", in.remaining()));
  }
  TRY(check_run("page request", request.first_page, request.page_count, ram_pages));
  return request;
}

std::vector<std::byte> encode_end(const EndSummary& end) {
  ByteWriter out;
  out.put(end.pages_sent);
  out.put(end.rounds);
  return std::move(out.data());
}

Result<EndSummary> decode_end(std::span<const std::byte> payload) {
  ByteReader in(payload);
  EndSummary end;
  end.pages_sent = TRY_CONTEXT(in.get<uint64_t>("pages sent"), "end frame");
  end.rounds = TRY_CONTEXT(in.get<uint64_t>("rounds"), "end frame");
  if (in.remaining() != 0) {
    return fail(Errc::Corrupt, fmt::format("end frame: {} bytes too many", in.remaining()));
  }
  return end;
}

std::vector<std::byte> encode_verdict(const Verdict& verdict) {
  ByteWriter out;
  out.put(uint32_t{verdict.ok ? 0u : 1u});
  out.put_string(verdict.message.substr(0, 4096));
  return std::move(out.data());
}

Result<Verdict> decode_verdict(std::span<const std::byte> payload) {
  ByteReader in(payload);
  auto status = TRY_CONTEXT(in.get<uint32_t>("status"), "ack frame");
  if (status > 1) return fail(Errc::Corrupt, fmt::format("ack frame: status {}", status));
  if (in.remaining() > 4096) {
    return fail(Errc::Corrupt, fmt::format("ack frame: a message of {} bytes", in.remaining()));
  }
  auto text = in.get_bytes(in.remaining(), "message").value();
  Verdict verdict{status == 0,
                  std::string(reinterpret_cast<const char*>(text.data()), text.size())};
  // The message reaches logs and the API: keep it printable.
  for (char& c : verdict.message) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  }
  return verdict;
}

}  // namespace keel::migration
