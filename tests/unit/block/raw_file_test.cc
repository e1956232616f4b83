#include "block/raw/raw_file.h"

#include <poll.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "base/fd.h"
#include "block/image.h"
#include "block/image_lock.h"
#include "temp_image.h"

namespace keel::block {
namespace {

using testing::TempImage;
using testing::transfer;

std::unique_ptr<RawFile> open_raw(const std::string& path, Access access = Access::ReadWrite) {
  auto raw = RawFile::open(path, access);
  EXPECT_TRUE(raw.has_value()) << raw.error().message();
  return std::move(*raw);
}

iovec iov_of(std::vector<std::byte>& buffer) { return iovec{buffer.data(), buffer.size()}; }

BlockRequest ranged(BlockOp op, uint64_t offset, uint64_t length_bytes, uint64_t user_data = 0) {
  BlockRequest request;
  request.op = op;
  request.offset = offset;
  request.length_bytes = length_bytes;
  request.user_data = user_data;
  return request;
}

// Waits on completion_fd and reaps until count completions arrived.
std::vector<BlockCompletion> wait_for(BlockBackend& backend, size_t count) {
  std::vector<BlockCompletion> done;
  for (int rounds = 0; done.size() < count && rounds < 1000; ++rounds) {
    pollfd pfd{backend.completion_fd(), POLLIN, 0};
    EXPECT_GE(::poll(&pfd, 1, 5000), 0);
    backend.reap(done);
  }
  EXPECT_EQ(done.size(), count);
  return done;
}

TEST(RawFileTest, OpensAndReportsSize) {
  TempImage image(64 << 10);
  auto raw = open_raw(image.path());
  EXPECT_EQ(raw->size_bytes(), 64u << 10);
  EXPECT_EQ(raw->access(), Access::ReadWrite);
  EXPECT_EQ(raw->format_name(), "raw");
  EXPECT_EQ(raw->in_flight(), 0u);
}

TEST(RawFileTest, SizeIsRoundedDownToSectors) {
  TempImage image(4096 + 100);
  auto raw = open_raw(image.path());
  EXPECT_EQ(raw->size_bytes(), 4096u);
}

TEST(RawFileTest, ResizeGrowsAndShrinksTheFileAndRangeChecksFollow) {
  TempImage image(64 << 10);
  auto raw = open_raw(image.path());
  ASSERT_TRUE(raw->resize(256 << 10).has_value());
  EXPECT_EQ(raw->size_bytes(), 256u << 10);
  struct stat info {};
  ASSERT_EQ(::stat(image.path().c_str(), &info), 0);
  EXPECT_EQ(info.st_size, 256 << 10);
  std::vector<std::byte> data(512, std::byte{0x5a});
  iovec iov{data.data(), data.size()};
  EXPECT_TRUE(raw->write_at((256 << 10) - 512, std::span(&iov, 1)).has_value())
      << "the grown tail is writable";
  ASSERT_TRUE(raw->resize(32 << 10).has_value());
  EXPECT_EQ(raw->size_bytes(), 32u << 10);
  EXPECT_FALSE(raw->read_at(32 << 10, std::span(&iov, 1)).has_value()) << "past the new end";
  auto odd = raw->resize((64 << 10) + 1);
  ASSERT_FALSE(odd.has_value());
  EXPECT_EQ(odd.error().code(), Errc::InvalidArgument);
  raw.reset();
  auto read_only = RawFile::open(image.path(), Access::ReadOnly);
  ASSERT_TRUE(read_only.has_value());
  auto refused = (*read_only)->resize(128 << 10);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code(), Errc::PermissionDenied);
  EXPECT_EQ((*read_only)->size_bytes(), 32u << 10);
}

TEST(RawFileTest, MissingFileNamesThePath) {
  auto raw = RawFile::open("/nonexistent/keel-disk.img", Access::ReadOnly);
  ASSERT_FALSE(raw.has_value());
  EXPECT_EQ(raw.error().code(), Errc::NotFound);
  EXPECT_NE(raw.error().message().find("/nonexistent/keel-disk.img"), std::string::npos);
}

TEST(RawFileTest, RefusesDirectoriesAndCharacterDevices) {
  EXPECT_FALSE(RawFile::open("/tmp", Access::ReadOnly).has_value());
  auto null_device = RawFile::open("/dev/null", Access::ReadOnly);
  ASSERT_FALSE(null_device.has_value());
  EXPECT_EQ(null_device.error().code(), Errc::InvalidArgument);
}

TEST(RawFileTest, SyncReadWriteAcrossIovecs) {
  TempImage image(64 << 10);
  auto raw = open_raw(image.path());
  std::vector<std::byte> a(512), b(1024);
  iovec iov[] = {iov_of(a), iov_of(b)};
  ASSERT_EQ(*raw->read_at(4096, iov), 1536u);
  EXPECT_EQ(0, std::memcmp(a.data(), image.contents().data() + 4096, 512));
  EXPECT_EQ(0, std::memcmp(b.data(), image.contents().data() + 4096 + 512, 1024));

  std::fill(a.begin(), a.end(), std::byte{0xaa});
  std::fill(b.begin(), b.end(), std::byte{0xbb});
  ASSERT_EQ(*raw->write_at(8192, iov), 1536u);
  ASSERT_TRUE(raw->flush().has_value());
  auto back = image.read_back(8192, 1536);
  EXPECT_EQ(back[0], std::byte{0xaa});
  EXPECT_EQ(back[511], std::byte{0xaa});
  EXPECT_EQ(back[512], std::byte{0xbb});
  EXPECT_EQ(back[1535], std::byte{0xbb});
}

TEST(RawFileTest, SyncOutOfRange) {
  TempImage image(8192);
  auto raw = open_raw(image.path());
  std::vector<std::byte> buffer(1024);
  iovec iov[] = {iov_of(buffer)};
  auto past_end = raw->read_at(8192 - 512, iov);
  ASSERT_FALSE(past_end.has_value());
  EXPECT_EQ(past_end.error().code(), Errc::OutOfRange);
  EXPECT_FALSE(raw->write_at(UINT64_MAX - 100, iov).has_value());
  EXPECT_FALSE(raw->discard(8192, 512).has_value());
  EXPECT_FALSE(raw->write_zeroes(4096, UINT64_MAX, Unmap::No).has_value());
  // The end itself is fine with zero length.
  EXPECT_TRUE(raw->discard(8192, 0).has_value());
}

TEST(RawFileTest, SyncDiscardAndWriteZeroes) {
  TempImage image(64 << 10);
  auto raw = open_raw(image.path());
  ASSERT_TRUE(raw->write_zeroes(4096, 8192, Unmap::No).has_value());
  ASSERT_TRUE(raw->write_zeroes(16384, 4096, Unmap::Yes).has_value());
  ASSERT_TRUE(raw->discard(32768, 4096).has_value());
  auto zeroes = image.read_back(4096, 8192);
  EXPECT_EQ(zeroes, std::vector<std::byte>(8192));
  EXPECT_EQ(image.read_back(16384, 4096), std::vector<std::byte>(4096));
  // Untouched neighbours keep their data.
  EXPECT_EQ(image.read_back(4095, 1)[0], image.contents()[4095]);
  EXPECT_EQ(image.read_back(12288, 1)[0], image.contents()[12288]);
  // The file keeps its size.
  EXPECT_EQ(*std::move(*Fd::open(image.path(), O_RDONLY)).size_bytes(), 64u << 10);
}

TEST(RawFileTest, ReadOnlyRefusesWrites) {
  TempImage image(8192);
  auto raw = open_raw(image.path(), Access::ReadOnly);
  std::vector<std::byte> buffer(512);
  iovec iov[] = {iov_of(buffer)};
  EXPECT_TRUE(raw->read_at(0, iov).has_value());
  auto write = raw->write_at(0, iov);
  ASSERT_FALSE(write.has_value());
  EXPECT_EQ(write.error().code(), Errc::PermissionDenied);
  EXPECT_EQ(raw->discard(0, 512).error().code(), Errc::PermissionDenied);
  EXPECT_EQ(raw->write_zeroes(0, 512, Unmap::No).error().code(), Errc::PermissionDenied);
  EXPECT_TRUE(raw->flush().has_value());

  BlockRequest request = transfer(BlockOp::Write, 0, iov, 1);
  auto submitted = raw->submit(request);
  ASSERT_FALSE(submitted.has_value());
  EXPECT_EQ(submitted.error().code(), Errc::PermissionDenied);
  EXPECT_EQ(raw->in_flight(), 0u);

  // Reads and flushes still go through the ring.
  request.op = BlockOp::Read;
  ASSERT_TRUE(raw->submit(request).has_value());
  ASSERT_TRUE(raw->submit(ranged(BlockOp::Flush, 0, 0, 2)).has_value());
  ASSERT_TRUE(raw->kick().has_value());
  for (const BlockCompletion& done : wait_for(*raw, 2)) {
    EXPECT_EQ(done.result, done.user_data == 1 ? 512 : 0);
  }
}

TEST(RawFileTest, AsyncReadWriteFlush) {
  TempImage image(64 << 10);
  auto raw = open_raw(image.path());
  std::vector<std::byte> out(4096, std::byte{0x5a});
  std::vector<std::byte> in(4096);
  iovec out_iov[] = {iov_of(out)};
  iovec in_iov[] = {iov_of(in)};

  ASSERT_TRUE(raw->submit(transfer(BlockOp::Write, 12288, out_iov, 7))
                  .has_value());
  ASSERT_TRUE(raw->kick().has_value());
  auto done = wait_for(*raw, 1);
  EXPECT_EQ(done[0].user_data, 7u);
  EXPECT_EQ(done[0].result, 4096);

  ASSERT_TRUE(raw->submit(ranged(BlockOp::Flush, 0, 0, 8)).has_value());
  ASSERT_TRUE(raw->submit(transfer(BlockOp::Read, 12288, in_iov, 9))
                  .has_value());
  EXPECT_EQ(raw->in_flight(), 2u);
  ASSERT_TRUE(raw->kick().has_value());
  done = wait_for(*raw, 2);
  for (const BlockCompletion& completion : done) {
    EXPECT_EQ(completion.result, completion.user_data == 8 ? 0 : 4096);
  }
  EXPECT_EQ(in, out);
  EXPECT_EQ(raw->in_flight(), 0u);
}

TEST(RawFileTest, AsyncDiscardAndWriteZeroes) {
  TempImage image(64 << 10);
  auto raw = open_raw(image.path());
  ASSERT_TRUE(raw->submit(ranged(BlockOp::Discard, 0, 4096, 1)).has_value());
  ASSERT_TRUE(raw->submit(ranged(BlockOp::WriteZeroes, 8192, 4096, 2)).has_value());
  ASSERT_TRUE(raw->submit(ranged(BlockOp::WriteZeroesUnmap, 16384, 8192, 3)).has_value());
  ASSERT_TRUE(raw->submit(ranged(BlockOp::WriteZeroes, 65536, 0, 4)).has_value());
  ASSERT_TRUE(raw->kick().has_value());
  for (const BlockCompletion& completion : wait_for(*raw, 4)) {
    EXPECT_EQ(completion.result, 0) << completion.user_data;
  }
  EXPECT_EQ(image.read_back(8192, 4096), std::vector<std::byte>(4096));
  EXPECT_EQ(image.read_back(16384, 8192), std::vector<std::byte>(8192));
  EXPECT_EQ(image.read_back(12288, 1)[0], image.contents()[12288]);
}

TEST(RawFileTest, AsyncOutOfRangeIsNotQueued) {
  TempImage image(8192);
  auto raw = open_raw(image.path());
  std::vector<std::byte> buffer(1024);
  iovec iov[] = {iov_of(buffer)};
  auto read = raw->submit(transfer(BlockOp::Read, 7680, iov));
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), Errc::OutOfRange);
  EXPECT_FALSE(raw->submit(ranged(BlockOp::Discard, UINT64_MAX - 511, 1024)).has_value());
  EXPECT_FALSE(raw->submit(ranged(BlockOp::WriteZeroes, 0, 8193)).has_value());
  EXPECT_EQ(raw->in_flight(), 0u);
}

// More requests than the submission queue holds: submit() hands full
// queues to the kernel on its own, and every request completes.
TEST(RawFileTest, ManyInFlight) {
  constexpr size_t kRequests = 600;  // more than kQueueDepth
  TempImage image(kRequests * 512);
  auto raw = open_raw(image.path());
  std::vector<std::vector<std::byte>> buffers(kRequests, std::vector<std::byte>(512));
  std::vector<iovec> iovs(kRequests);
  for (size_t i = 0; i < kRequests; ++i) {
    iovs[i] = iov_of(buffers[i]);
    ASSERT_TRUE(raw->submit(transfer(BlockOp::Read, i * 512, std::span(&iovs[i], 1), i))
                    .has_value());
  }
  EXPECT_EQ(raw->in_flight(), kRequests);
  ASSERT_TRUE(raw->kick().has_value());
  auto done = wait_for(*raw, kRequests);
  std::vector<bool> seen(kRequests);
  for (const BlockCompletion& completion : done) {
    ASSERT_LT(completion.user_data, kRequests);
    EXPECT_FALSE(seen[completion.user_data]);
    seen[completion.user_data] = true;
    EXPECT_EQ(completion.result, 512);
    size_t i = completion.user_data;
    EXPECT_EQ(0, std::memcmp(buffers[i].data(), image.contents().data() + i * 512, 512));
  }
  EXPECT_EQ(raw->in_flight(), 0u);
}

TEST(RawFileTest, BusyWhenTheSlotTableIsFull) {
  TempImage image(4096);
  auto raw = open_raw(image.path());
  for (uint32_t i = 0; i < RawFile::kMaxInFlight; ++i) {
    ASSERT_TRUE(raw->submit(ranged(BlockOp::Flush, 0, 0, i)).has_value());
  }
  auto full = raw->submit(ranged(BlockOp::Flush, 0, 0));
  ASSERT_FALSE(full.has_value());
  EXPECT_EQ(full.error().code(), Errc::Busy);
  ASSERT_TRUE(raw->kick().has_value());
  wait_for(*raw, RawFile::kMaxInFlight);
}

TEST(RawFileTest, DestructorWaitsForInFlightRequests) {
  TempImage image(64 << 10);
  std::vector<std::byte> buffer(64 << 10);
  iovec iov[] = {iov_of(buffer)};
  {
    auto raw = open_raw(image.path());
    ASSERT_TRUE(raw->submit(transfer(BlockOp::Read, 0, iov)).has_value());
  }
  EXPECT_EQ(buffer, image.contents());
}

// A migration's disk handover: the source lets go of its lock, a second
// opener (the destination, opened without locks) takes it; the source
// cannot take it back until that one let go.
TEST(RawFileTest, HandsItsLockOver) {
  TempImage image(64 << 10);
  auto source = open_raw(image.path());
  EXPECT_EQ(ImageLock::open(image.path(), Access::ReadOnly).error().code(), Errc::Busy);
  auto destination = RawFile::open(image.path(), Access::ReadWrite, Locking::ForceShare);
  ASSERT_TRUE(destination) << destination.error().message();

  ASSERT_TRUE(source->set_image_locked(false));
  ASSERT_TRUE((*destination)->set_image_locked(true));
  Result<void> back = source->set_image_locked(true);
  ASSERT_FALSE(back);
  EXPECT_EQ(back.error().code(), Errc::Busy);
  EXPECT_NE(back.error().message().find(image.path()), std::string::npos) << back.error().message();

  ASSERT_TRUE((*destination)->set_image_locked(false));
  ASSERT_TRUE(source->set_image_locked(true));
  ASSERT_TRUE(source->set_image_locked(true));  // already held: no second lock
  EXPECT_EQ(ImageLock::open(image.path(), Access::ReadOnly).error().code(), Errc::Busy);
}

TEST(ImageTest, ParsesFormatNames) {
  EXPECT_EQ(*parse_image_format("auto"), ImageFormat::Auto);
  EXPECT_EQ(*parse_image_format("raw"), ImageFormat::Raw);
  EXPECT_EQ(*parse_image_format("qcow2"), ImageFormat::Qcow2);
  EXPECT_EQ(parse_image_format("vmdk").error().code(), Errc::InvalidArgument);
  EXPECT_EQ(image_format_name(ImageFormat::Qcow2), "qcow2");
}

TEST(ImageTest, ProbesRawAndQcow2) {
  TempImage raw_image(4096);
  auto raw = open_image(raw_image.path(), ImageFormat::Auto, Access::ReadOnly);
  ASSERT_TRUE(raw.has_value()) << raw.error().message();
  EXPECT_EQ((*raw)->format_name(), "raw");

  TempImage qcow2_image(4096);
  {
    Fd file = std::move(*Fd::open(qcow2_image.path(), O_WRONLY));
    const uint8_t magic[] = {'Q', 'F', 'I', 0xfb, 0, 0, 0, 3};
    ASSERT_TRUE(file.pwrite_all(std::as_bytes(std::span(magic)), 0).has_value());
  }
  EXPECT_EQ(*probe_image_format(qcow2_image.path()), ImageFormat::Qcow2);
  // Probed as qcow2, it is parsed as qcow2 (and this header is broken),
  // never opened as raw.
  auto qcow2 = open_image(qcow2_image.path(), ImageFormat::Auto, Access::ReadOnly);
  ASSERT_FALSE(qcow2.has_value());
  EXPECT_EQ(qcow2.error().code(), Errc::Corrupt);
  EXPECT_NE(qcow2.error().message().find("qcow2"), std::string::npos);

  // A file shorter than the magic is raw.
  TempImage tiny(2);
  EXPECT_EQ(*probe_image_format(tiny.path()), ImageFormat::Raw);
  EXPECT_FALSE(open_image("/nonexistent/disk", ImageFormat::Auto, Access::ReadOnly).has_value());
}

}  // namespace
}  // namespace keel::block
