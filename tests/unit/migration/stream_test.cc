#include "migration/stream.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "migration/dirty_bitmap.h"
#include "migration/snapshot.h"

namespace keel::migration {
namespace {

// A stream written whole into a pipe-like buffer: a socket pair large
// enough for these small streams, read back on the same thread.
struct Pipe {
  Fd write;
  Fd read;
  static Pipe make() {
    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    int size = 4 << 20;
    ::setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
    ::setsockopt(fds[1], SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
    return Pipe{Fd(fds[0]), Fd(fds[1])};
  }
};

std::vector<std::byte> patterned_ram(size_t pages) {
  std::vector<std::byte> ram(pages * kPageBytes);
  for (size_t i = 0; i < ram.size(); ++i) {
    // Compressible in some pages (runs), noisy in others.
    ram[i] = static_cast<std::byte>((i / kPageBytes) % 2 ? (i * 2654435761u) >> 13 : i / 512);
  }
  return ram;
}

MachineState small_machine() {
  MachineState machine;
  machine.config_json = R"({"cpus":1})";
  machine.vcpus.resize(1);
  machine.vcpus[0].regs.rip = 0x1234;
  machine.vcpus[0].xsave.resize(kvm::kXsaveLegacyBytes);
  machine.vcpus[0].tsc_khz = 1'000'000;
  machine.devices.push_back({"serial", {std::byte{1}, std::byte{2}}});
  return machine;
}

TEST(StreamTest, RoundTripsEveryFrame) {
  Pipe pipe = Pipe::make();
  std::vector<std::byte> source = patterned_ram(16);
  StreamWriter writer(pipe.write);
  ASSERT_TRUE(writer.write_preamble());
  ASSERT_TRUE(writer.send(FrameType::Hello, encode_hello({source.size(), HostCpuSummary{}})));
  for (Compression compression : {Compression::None, Compression::Zstd}) {
    auto pages = encode_pages(source, 2, 6, compression);
    ASSERT_TRUE(pages) << pages.error().message();
    ASSERT_TRUE(writer.send(FrameType::Pages, *pages));
  }
  ASSERT_TRUE(writer.send(FrameType::MachineState, encode_machine_state(small_machine())));
  ASSERT_TRUE(writer.send(FrameType::End, encode_end({12, 3})));
  ASSERT_TRUE(writer.send(FrameType::Ack, encode_verdict({true, "ok"})));

  StreamReader reader(pipe.read, "test");
  ASSERT_TRUE(reader.read_preamble(1000));
  Frame hello = *reader.next(1000);
  ASSERT_EQ(hello.type, FrameType::Hello);
  EXPECT_EQ(decode_hello(hello.payload)->ram_bytes, source.size());
  std::vector<std::byte> target(source.size());
  for (int i = 0; i < 2; ++i) {
    Frame pages = *reader.next(1000);
    ASSERT_EQ(pages.type, FrameType::Pages);
    Result<uint32_t> applied = apply_pages(pages.payload, target);
    ASSERT_TRUE(applied) << applied.error().message();
    EXPECT_EQ(*applied, 6u);
  }
  EXPECT_EQ(
      std::memcmp(target.data() + 2 * kPageBytes, source.data() + 2 * kPageBytes, 6 * kPageBytes),
      0);
  EXPECT_EQ(target[0], std::byte{0}) << "pages outside the run stay untouched";
  Frame state = *reader.next(1000);
  ASSERT_EQ(state.type, FrameType::MachineState);
  Result<MachineState> machine = decode_machine_state(state.payload, "test");
  ASSERT_TRUE(machine) << machine.error().message();
  EXPECT_EQ(machine->config_json, small_machine().config_json);
  EXPECT_EQ(machine->vcpus.at(0).regs.rip, 0x1234u);
  ASSERT_EQ(machine->devices.size(), 1u);
  EXPECT_EQ(machine->devices[0].name, "serial");
  EndSummary end = *decode_end(reader.next(1000)->payload);
  EXPECT_EQ(end.pages_sent, 12u);
  EXPECT_EQ(end.rounds, 3u);
  Verdict ack = *decode_verdict(reader.next(1000)->payload);
  EXPECT_TRUE(ack.ok);
  EXPECT_EQ(ack.message, "ok");
  EXPECT_EQ(reader.bytes_received(), writer.bytes_sent());
}

TEST(StreamTest, CompressesCompressiblePages) {
  std::vector<std::byte> zeros(8 * kPageBytes);
  auto packed = encode_pages(zeros, 0, 8, Compression::Zstd);
  ASSERT_TRUE(packed);
  EXPECT_LT(packed->size(), kPageBytes);
  std::vector<std::byte> target(zeros.size(), std::byte{0xff});
  EXPECT_EQ(*apply_pages(*packed, target), 8u);
  EXPECT_EQ(target, zeros);
}

TEST(StreamTest, RefusesPagesOutsideRam) {
  std::vector<std::byte> ram = patterned_ram(4);
  EXPECT_FALSE(encode_pages(ram, 3, 2, Compression::None));
  EXPECT_FALSE(encode_pages(ram, 0, 0, Compression::None));
  auto pages = *encode_pages(ram, 2, 2, Compression::None);
  std::vector<std::byte> small(2 * kPageBytes);
  Result<uint32_t> applied = apply_pages(pages, small);
  ASSERT_FALSE(applied);
  EXPECT_EQ(applied.error().code(), Errc::Corrupt);
  // Raw data of the wrong length.
  pages.pop_back();
  std::vector<std::byte> target(ram.size());
  EXPECT_FALSE(apply_pages(pages, target));
}

TEST(StreamTest, ZeroPagesZeroTheRunAndNothingElse) {
  std::vector<std::byte> ram = patterned_ram(8);
  const std::vector<std::byte> before = ram;
  std::vector<std::byte> zero = encode_zero_pages(3, 2);
  EXPECT_EQ(zero.size(), 16u) << "a header and no data";
  Result<uint32_t> applied = apply_pages(zero, ram);
  ASSERT_TRUE(applied) << applied.error().message();
  EXPECT_EQ(*applied, 2u);
  for (size_t page = 0; page < 8; ++page) {
    std::span<const std::byte> now = std::span(ram).subspan(page * kPageBytes, kPageBytes);
    if (page == 3 || page == 4) {
      EXPECT_TRUE(is_zero_page(now)) << "page " << page;
    } else {
      EXPECT_EQ(std::memcmp(now.data(), before.data() + page * kPageBytes, kPageBytes), 0)
          << "page " << page << " was touched";
    }
  }
}

TEST(StreamTest, ZeroPagesWithDataOrOutsideRamAreCorrupt) {
  std::vector<std::byte> ram = patterned_ram(4);
  const std::vector<std::byte> before = ram;
  std::vector<std::byte> with_data = encode_zero_pages(0, 1);
  with_data.push_back(std::byte{0});
  Result<uint32_t> applied = apply_pages(with_data, ram);
  ASSERT_FALSE(applied);
  EXPECT_EQ(applied.error().code(), Errc::Corrupt);
  EXPECT_NE(applied.error().message().find("zero pages with 1 bytes"), std::string::npos)
      << applied.error().message();
  for (std::vector<std::byte> outside : {encode_zero_pages(3, 2), encode_zero_pages(4, 1)}) {
    applied = apply_pages(outside, ram);
    ASSERT_FALSE(applied);
    EXPECT_EQ(applied.error().code(), Errc::Corrupt);
  }
  EXPECT_EQ(ram, before) << "nothing of a bad frame reaches RAM";
}

TEST(StreamTest, RecognisesZeroPages) {
  std::vector<std::byte> page(kPageBytes);
  EXPECT_TRUE(is_zero_page(page));
  for (size_t offset : {size_t{0}, size_t{1}, size_t{kPageBytes / 2}, size_t{kPageBytes - 1}}) {
    page[offset] = std::byte{1};
    EXPECT_FALSE(is_zero_page(page)) << "a byte set at " << offset;
    page[offset] = std::byte{0};
  }
}

TEST(StreamTest, DamagedZstdLeavesRamUntouched) {
  std::vector<std::byte> zeros(4 * kPageBytes);
  auto packed = *encode_pages(zeros, 0, 4, Compression::Zstd);
  packed.resize(packed.size() - 3);
  std::vector<std::byte> target(zeros.size(), std::byte{0x5a});
  Result<uint32_t> applied = apply_pages(packed, target);
  ASSERT_FALSE(applied);
  EXPECT_EQ(applied.error().code(), Errc::Corrupt);
  EXPECT_EQ(target, std::vector<std::byte>(zeros.size(), std::byte{0x5a}));
}

// The whole stream of RoundTripsEveryFrame, as bytes.
std::vector<std::byte> sample_stream() {
  Pipe pipe = Pipe::make();
  std::vector<std::byte> ram = patterned_ram(4);
  StreamWriter writer(pipe.write);
  EXPECT_TRUE(writer.write_preamble());
  EXPECT_TRUE(writer.send(FrameType::Hello, encode_hello({ram.size(), HostCpuSummary{}})));
  EXPECT_TRUE(writer.send(FrameType::Pages, *encode_pages(ram, 0, 4, Compression::None)));
  EXPECT_TRUE(writer.send(FrameType::Pages, encode_zero_pages(1, 2)));
  EXPECT_TRUE(writer.send(FrameType::End, encode_end({4, 1})));
  std::vector<std::byte> bytes(writer.bytes_sent());
  EXPECT_EQ(::read(pipe.read.get(), bytes.data(), bytes.size()),
            static_cast<ssize_t>(bytes.size()));
  return bytes;
}

// Reads frames until an error or the End frame; the error, if any.
std::optional<Error> read_all(std::span<const std::byte> bytes) {
  Pipe pipe = Pipe::make();
  EXPECT_EQ(::write(pipe.write.get(), bytes.data(), bytes.size()),
            static_cast<ssize_t>(bytes.size()));
  pipe.write = Fd(-1);  // the source is gone: end of stream
  StreamReader reader(pipe.read, "test");
  if (Result<void> preamble = reader.read_preamble(1000); !preamble) return preamble.error();
  std::vector<std::byte> ram(4 * kPageBytes);
  while (true) {
    Result<Frame> frame = reader.next(1000);
    if (!frame) return frame.error();
    if (frame->type == FrameType::Pages) {
      if (Result<uint32_t> applied = apply_pages(frame->payload, ram); !applied) {
        return applied.error();
      }
    }
    if (frame->type == FrameType::End) return std::nullopt;
  }
}

TEST(StreamTest, SampleStreamReadsWhole) {
  EXPECT_FALSE(read_all(sample_stream()));
}

TEST(StreamTest, TruncatedStreamsAreRejected) {
  std::vector<std::byte> whole = sample_stream();
  for (size_t length :
       {size_t{0}, size_t{7}, size_t{16}, size_t{20}, whole.size() / 2, whole.size() - 1}) {
    std::optional<Error> error = read_all(std::span(whole).first(length));
    ASSERT_TRUE(error) << "a stream cut at " << length << " bytes was accepted";
    EXPECT_NE(error->context().find("closed"), std::string::npos) << error->message();
  }
}

TEST(StreamTest, CorruptedStreamsAreRejected) {
  std::vector<std::byte> whole = sample_stream();
  // Flip one bit in every byte position in turn: the preamble check, a
  // frame's CRC or its header checks must catch each.
  for (size_t offset = 0; offset < whole.size(); offset += 97) {
    std::vector<std::byte> damaged = whole;
    damaged[offset] ^= std::byte{0x10};
    EXPECT_TRUE(read_all(damaged)) << "a flipped bit at byte " << offset << " was accepted";
  }
}

TEST(StreamTest, RefusesAnotherVersion) {
  std::vector<std::byte> whole = sample_stream();
  // Version 1 had no zero pages: a version 1 source's stream is refused
  // by name rather than half understood.
  for (uint32_t version : {1u, 3u}) {
    whole[8] = static_cast<std::byte>(version);
    uint32_t crc = snapshot_crc32(std::span(whole).first(12));
    std::memcpy(whole.data() + 12, &crc, sizeof(crc));
    std::optional<Error> error = read_all(whole);
    ASSERT_TRUE(error);
    EXPECT_EQ(error->code(), Errc::Unsupported);
    EXPECT_NE(error->context().find(fmt::format("version {}, this keel-vmm speaks 2", version)),
              std::string::npos)
        << error->message();
  }
}

TEST(StreamTest, ReaderTimesOut) {
  Pipe pipe = Pipe::make();
  StreamReader reader(pipe.read, "test");
  Result<void> preamble = reader.read_preamble(10);
  ASSERT_FALSE(preamble);
  EXPECT_EQ(preamble.error().code(), Errc::Timeout);
}

TEST(StreamTest, WriterReportsAGonePeer) {
  Pipe pipe = Pipe::make();
  pipe.read = Fd(-1);
  StreamWriter writer(pipe.write);
  Result<void> sent = writer.write_preamble();  // no SIGPIPE: an error
  ASSERT_FALSE(sent);
}

TEST(StreamTest, MachineStateRejectsBadSections) {
  std::vector<std::byte> bytes = encode_machine_state(small_machine());
  EXPECT_TRUE(decode_machine_state(bytes, "test"));
  for (size_t cut = 1; cut < bytes.size(); cut += 13) {
    EXPECT_FALSE(decode_machine_state(std::span(bytes).first(cut), "test")) << cut;
  }
  MachineState twice = small_machine();
  twice.devices.push_back(twice.devices.front());
  Result<MachineState> duplicate = decode_machine_state(encode_machine_state(twice), "test");
  ASSERT_FALSE(duplicate);
  EXPECT_NE(duplicate.error().context().find("twice"), std::string::npos);
  EXPECT_FALSE(decode_machine_state({}, "test")) << "no config, no vcpus";
}

// The post-copy records over a real stream: the pending bitmap and a page
// request come back as sent.
TEST(StreamTest, PostcopyRecordsRoundTrip) {
  for (uint64_t ram_pages : {uint64_t{64}, uint64_t{1000}, uint64_t{16385}}) {
    Pipe pipe = Pipe::make();
    DirtyBitmap pending(ram_pages);
    pending.set(0);
    pending.set_range(ram_pages / 3, 17);
    pending.set(ram_pages - 1);
    StreamWriter writer(pipe.write);
    ASSERT_TRUE(writer.send(FrameType::PostcopyStart, encode_postcopy_start(pending)));
    ASSERT_TRUE(writer.send(FrameType::PageRequest,
                            encode_page_request({ram_pages - 5, 5})));
    StreamReader reader(pipe.read, "test");
    Result<Frame> start = reader.next(1000);
    ASSERT_TRUE(start) << start.error().message();
    ASSERT_EQ(start->type, FrameType::PostcopyStart);
    Result<DirtyBitmap> decoded = decode_postcopy_start(start->payload, ram_pages);
    ASSERT_TRUE(decoded) << decoded.error().message();
    EXPECT_EQ(decoded->count(), pending.count());
    for (uint64_t page = 0; page < ram_pages; ++page) {
      ASSERT_EQ(decoded->test(page), pending.test(page)) << "page " << page;
    }
    Result<Frame> request = reader.next(1000);
    ASSERT_TRUE(request) << request.error().message();
    ASSERT_EQ(request->type, FrameType::PageRequest);
    Result<PageRequest> asked = decode_page_request(request->payload, ram_pages);
    ASSERT_TRUE(asked) << asked.error().message();
    EXPECT_EQ(asked->first_page, ram_pages - 5);
    EXPECT_EQ(asked->page_count, 5u);
  }
}

TEST(StreamTest, PostcopyStartRejectsABadBitmap) {
  DirtyBitmap pending(100);
  pending.set(99);
  std::vector<std::byte> payload = encode_postcopy_start(pending);
  // Another RAM size.
  EXPECT_FALSE(decode_postcopy_start(payload, 101));
  EXPECT_FALSE(decode_postcopy_start(payload, 99));
  // Every truncation, and a byte too many.
  for (size_t size = 0; size < payload.size(); ++size) {
    EXPECT_FALSE(decode_postcopy_start(std::span(payload).first(size), 100)) << size;
  }
  std::vector<std::byte> longer = payload;
  longer.push_back(std::byte{0});
  EXPECT_FALSE(decode_postcopy_start(longer, 100));
  // A bit past the last page.
  std::vector<std::byte> past = payload;
  past.back() |= std::byte{0x80};
  Result<DirtyBitmap> decoded = decode_postcopy_start(past, 100);
  ASSERT_FALSE(decoded);
  EXPECT_NE(decoded.error().message().find("past page 100"), std::string::npos)
      << decoded.error().message();
  EXPECT_TRUE(decode_postcopy_start(payload, 100));
}

TEST(StreamTest, PageRequestsOutsideRamOrTruncatedAreCorrupt) {
  EXPECT_TRUE(decode_page_request(encode_page_request({0, kMaxPagesPerFrame}), 256));
  EXPECT_TRUE(decode_page_request(encode_page_request({255, 1}), 256));
  EXPECT_FALSE(decode_page_request(encode_page_request({256, 1}), 256));
  EXPECT_FALSE(decode_page_request(encode_page_request({255, 2}), 256));
  EXPECT_FALSE(decode_page_request(encode_page_request({0, 0}), 256));
  EXPECT_FALSE(decode_page_request(encode_page_request({0, kMaxPagesPerFrame + 1}), 1024));
  // A first page that would wrap around.
  EXPECT_FALSE(decode_page_request(encode_page_request({~uint64_t{0}, 2}), 256));
  std::vector<std::byte> payload = encode_page_request({3, 4});
  for (size_t size = 0; size < payload.size(); ++size) {
    EXPECT_FALSE(decode_page_request(std::span(payload).first(size), 256)) << size;
  }
  payload.push_back(std::byte{0});
  EXPECT_FALSE(decode_page_request(payload, 256));
}

// decode_pages unpacks without writing: a zero run carries no data.
TEST(StreamTest, DecodePagesGivesTheDataOrAZeroRun) {
  std::vector<std::byte> ram = patterned_ram(8);
  for (Compression compression : {Compression::None, Compression::Zstd}) {
    auto payload = encode_pages(ram, 3, 4, compression);
    ASSERT_TRUE(payload);
    Result<DecodedPages> pages = decode_pages(*payload, 8);
    ASSERT_TRUE(pages) << pages.error().message();
    EXPECT_EQ(pages->first_page, 3u);
    EXPECT_EQ(pages->page_count, 4u);
    EXPECT_FALSE(pages->zero);
    ASSERT_EQ(pages->data.size(), 4 * kPageBytes);
    EXPECT_EQ(std::memcmp(pages->data.data(), ram.data() + 3 * kPageBytes, 4 * kPageBytes), 0);
    EXPECT_FALSE(decode_pages(*payload, 6));  // outside a smaller RAM
  }
  Result<DecodedPages> zero = decode_pages(encode_zero_pages(5, 3), 8);
  ASSERT_TRUE(zero);
  EXPECT_TRUE(zero->zero);
  EXPECT_TRUE(zero->data.empty());
}

TEST(StreamTest, VerdictMessagesArePrintable) {
  Verdict verdict = *decode_verdict(encode_verdict({false, "bad\nthing\x1b"}));
  EXPECT_FALSE(verdict.ok);
  EXPECT_EQ(verdict.message, "bad?thing?");
}

}  // namespace
}  // namespace keel::migration
