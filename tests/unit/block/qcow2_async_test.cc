// qcow2's asynchronous face (submit/kick/reap on io_uring): reads of every
// kind of cluster, allocating writes, many concurrent requests that share
// clusters being allocated checked against a reference, and error paths.
#include <poll.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "block/image.h"
#include "block/qcow2/check.h"
#include "block/qcow2/create.h"
#include "block/qcow2/qcow2.h"
#include "qcow2_support.h"
#include "temp_image.h"

namespace keel::block {
namespace {

using testing::create_qcow2;
using testing::have_program;
using testing::open_qcow2;
using testing::output_of;
using testing::pattern;
using testing::read_bytes;
using testing::run;
using testing::TempDir;
using testing::transfer;
using testing::write_bytes;
using testing::write_file;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;

// Requests submitted together, each with its own buffer; run() kicks, then
// polls the completion fd and reaps until every one is back.
class Batch {
 public:
  // Returns the request's index.
  size_t read(uint64_t offset, size_t length) {
    return add(BlockOp::Read, offset, std::vector<std::byte>(length, std::byte{0xee}), 0);
  }
  size_t write(uint64_t offset, std::vector<std::byte> data) {
    return add(BlockOp::Write, offset, std::move(data), 0);
  }
  size_t other(BlockOp op, uint64_t offset, uint64_t length) {
    return add(op, offset, {}, length);
  }

  void run(BlockBackend& disk) {
    iovs_.resize(entries_.size());
    for (size_t i = 0; i < entries_.size(); ++i) {
      Entry& e = entries_[i];
      iovs_[i] = iovec{e.data.data(), e.data.size()};
      BlockRequest request;
      request.op = e.op;
      request.offset = e.offset;
      request.length_bytes = e.length;
      if (e.op == BlockOp::Read || e.op == BlockOp::Write) request.iov = std::span(&iovs_[i], 1);
      request.user_data = i;
      auto submitted = disk.submit(request);
      ASSERT_TRUE(submitted.has_value()) << submitted.error().message();
    }
    ASSERT_TRUE(disk.kick().has_value());
    size_t done = 0;
    std::vector<BlockCompletion> completions;
    while (done < entries_.size()) {
      pollfd pfd{disk.completion_fd(), POLLIN, 0};
      ASSERT_EQ(::poll(&pfd, 1, 10000), 1) << done << " of " << entries_.size() << " done";
      completions.clear();
      done += disk.reap(completions);
      for (const BlockCompletion& c : completions) {
        ASSERT_LT(c.user_data, entries_.size());
        Entry& e = entries_[c.user_data];
        EXPECT_FALSE(e.completed) << "request " << c.user_data << " completed twice";
        e.completed = true;
        e.result = c.result;
      }
    }
    EXPECT_EQ(disk.in_flight(), 0u);
  }

  const std::vector<std::byte>& data(size_t i) const { return entries_[i].data; }
  int64_t result(size_t i) const { return entries_[i].result; }
  size_t size() const { return entries_.size(); }
  BlockOp op(size_t i) const { return entries_[i].op; }

 private:
  struct Entry {
    BlockOp op;
    uint64_t offset;
    std::vector<std::byte> data;
    uint64_t length;
    bool completed = false;
    int64_t result = 0;
  };
  size_t add(BlockOp op, uint64_t offset, std::vector<std::byte> data, uint64_t length) {
    entries_.push_back(Entry{op, offset, std::move(data), length});
    return entries_.size() - 1;
  }
  std::vector<Entry> entries_;
  std::vector<iovec> iovs_;
};

void expect_check_clean(const std::string& image) {
  auto report = qcow2::check_image(image);
  ASSERT_TRUE(report.has_value()) << report.error().message();
  EXPECT_EQ(report->corruptions, 0u) << (report->messages.empty() ? "" : report->messages[0]);
  EXPECT_EQ(report->leaks, 0u) << (report->messages.empty() ? "" : report->messages[0]);
  if (have_program("qemu-img")) {
    const std::string command = "qemu-img check " + image;
    EXPECT_EQ(run(command), 0) << output_of(command + " 2>&1");
  }
}

// Every kind of cluster read through the ring equals the synchronous face:
// data, unallocated over a backing file (and past its shorter end), zero
// clusters, compressed clusters, unallocated without data anywhere.
TEST(Qcow2AsyncTest, ReadsEveryKindOfClusterAsTheSynchronousFaceDoes) {
  TempDir dir;
  write_file(dir.file("base.raw"), pattern(3 * kMiB, 1));  // shorter than the overlay
  create_qcow2(dir.file("top.qcow2"), 4 * kMiB, 16, "base.raw", "raw");
  auto image = open_qcow2(dir.file("top.qcow2"));
  ASSERT_TRUE(image);
  ASSERT_TRUE(write_bytes(*image, 100 * kKiB, pattern(300 * kKiB, 2)).has_value());
  ASSERT_TRUE(image->write_zeroes(640 * kKiB, 256 * kKiB, Unmap::Yes).has_value());
  std::vector<std::byte> compressible(64 * kKiB, std::byte{7});
  ASSERT_TRUE(image->write_compressed(1 * kMiB, compressible).has_value());
  ASSERT_TRUE(image->write_compressed(1 * kMiB + 64 * kKiB, pattern(64 * kKiB, 3)).has_value());
  ASSERT_TRUE(write_bytes(*image, 3 * kMiB + 4 * kKiB, pattern(8 * kKiB, 4)).has_value());
  const std::vector<std::byte> expected = read_bytes(*image, 0, 4 * kMiB);

  // Uneven pieces, all in flight at once, so runs start and end inside
  // clusters of every kind.
  Batch batch;
  std::vector<std::pair<uint64_t, size_t>> pieces;
  for (uint64_t at = 0; at < 4 * kMiB;) {
    const size_t length = static_cast<size_t>(std::min<uint64_t>(4 * kMiB - at, 69 * 512));
    pieces.emplace_back(at, batch.read(at, length));
    at += length;
  }
  batch.run(*image);
  for (const auto& [at, index] : pieces) {
    ASSERT_EQ(batch.result(index), static_cast<int64_t>(batch.data(index).size())) << at;
    ASSERT_TRUE(std::equal(batch.data(index).begin(), batch.data(index).end(),
                           expected.begin() + static_cast<ptrdiff_t>(at)))
        << "read at " << at << " differs";
  }
}

// 1 MiB writes into a fresh image allocate through the ring; the image
// reads back, and both checks find it clean.
TEST(Qcow2AsyncTest, AllocatingWritesReadBackAndLeaveACleanImage) {
  TempDir dir;
  const std::string path = dir.file("a.qcow2");
  create_qcow2(path, 16 * kMiB, 16);
  std::vector<std::byte> reference(16 * kMiB);
  {
    auto image = open_qcow2(path);
    ASSERT_TRUE(image);
    Batch batch;
    for (uint64_t i = 0; i < 16; ++i) {
      // Odd sector offsets: each write fills clusters partly at both ends.
      const uint64_t at = i * kMiB + (i % 2) * 3 * 512;
      const uint64_t length = std::min<uint64_t>(kMiB, 16 * kMiB - at);
      auto data = pattern(length, static_cast<uint8_t>(i + 10));
      std::copy(data.begin(), data.end(), reference.begin() + static_cast<ptrdiff_t>(at));
      batch.write(at, std::move(data));
    }
    batch.other(BlockOp::Flush, 0, 0);
    batch.run(*image);
    for (size_t i = 0; i < batch.size(); ++i) {
      EXPECT_EQ(batch.result(i), static_cast<int64_t>(batch.data(i).size())) << i;
    }
    EXPECT_EQ(read_bytes(*image, 0, 16 * kMiB), reference);
  }
  expect_check_clean(path);
  auto again = open_qcow2(path, Access::ReadOnly);
  ASSERT_TRUE(again);
  EXPECT_EQ(read_bytes(*again, 0, 16 * kMiB), reference);
}

// Many requests in flight at once, writes sharing the clusters other
// writes are allocating (byte-disjoint, so the result is exact), reads of
// the bytes between them, zeroing, flushes, and groups of writes to the
// very same bytes (each sector must then hold one writer's data, whole).
// Checked against a reference after every batch and at the end.
void overlapping_requests(uint32_t cluster_bits, bool with_backing, unsigned seed) {
  TempDir dir;
  const uint64_t size = 4 * kMiB;
  const std::string path = dir.file("c.qcow2");
  std::vector<std::byte> reference(size);
  if (with_backing) {
    reference = pattern(size, 42);
    write_file(dir.file("base.raw"), reference);
    create_qcow2(path, size, cluster_bits, "base.raw", "raw");
  } else {
    create_qcow2(path, size, cluster_bits);
  }
  std::mt19937 random(seed);
  {
    auto image = open_qcow2(path);
    ASSERT_TRUE(image);
    for (int round = 0; round < 24; ++round) {
      SCOPED_TRACE(round);
      Batch batch;
      std::vector<std::pair<uint64_t, uint64_t>> used;  // byte ranges this batch writes
      auto free_range = [&](uint64_t at, uint64_t length) {
        for (const auto& [a, l] : used) {
          if (at < a + l && a < at + length) return false;
        }
        return true;
      };
      auto pick = [&](uint64_t max_sectors) {
        const uint64_t length = (random() % max_sectors + 1) * 512;
        const uint64_t at = (random() % ((size - length) / 512 + 1)) * 512;
        return std::make_pair(at, length);
      };
      struct Planned {
        size_t index;
        uint64_t at;
      };
      std::vector<Planned> writes;
      std::vector<Planned> zeroes;
      for (int i = 0; i < 40; ++i) {
        auto [at, length] = pick(i % 4 == 0 ? 300 : 24);
        if (!free_range(at, length)) continue;
        used.emplace_back(at, length);
        if (i % 13 == 5) {
          zeroes.push_back({batch.other(BlockOp::WriteZeroesUnmap, at, length), at});
          std::fill_n(reference.begin() + static_cast<ptrdiff_t>(at), length, std::byte{0});
          continue;
        }
        auto data = pattern(length, static_cast<uint8_t>(random()));
        std::copy(data.begin(), data.end(), reference.begin() + static_cast<ptrdiff_t>(at));
        writes.push_back({batch.write(at, std::move(data)), at});
      }
      // Contested: three writes to the same bytes.
      auto [contested_at, contested_length] = pick(40);
      std::vector<size_t> contested;
      if (free_range(contested_at, contested_length)) {
        used.emplace_back(contested_at, contested_length);
        for (int k = 0; k < 3; ++k) {
          contested.push_back(batch.write(contested_at,
                                          pattern(contested_length, static_cast<uint8_t>(200 + k))));
        }
      }
      if (round % 3 == 0) batch.other(BlockOp::Flush, 0, 0);
      std::vector<Planned> reads;
      for (int i = 0; i < 30; ++i) {
        auto [at, length] = pick(i % 3 == 0 ? 256 : 16);
        if (!free_range(at, length)) continue;
        reads.push_back({batch.read(at, length), at});
      }
      batch.run(*image);
      for (size_t i = 0; i < batch.size(); ++i) {
        const int64_t expected =
            batch.op(i) == BlockOp::Read || batch.op(i) == BlockOp::Write
                ? static_cast<int64_t>(batch.data(i).size())
                : 0;
        ASSERT_EQ(batch.result(i), expected) << "request " << i;
      }
      for (const Planned& r : reads) {
        const auto& got = batch.data(r.index);
        ASSERT_TRUE(std::equal(got.begin(), got.end(),
                               reference.begin() + static_cast<ptrdiff_t>(r.at)))
            << "read at " << r.at << " of " << got.size() << " bytes differs";
      }
      if (!contested.empty()) {
        auto now = read_bytes(*image, contested_at, contested_length);
        for (uint64_t sector = 0; sector < contested_length; sector += 512) {
          bool whole = false;
          for (size_t index : contested) {
            whole = whole || std::equal(now.begin() + static_cast<ptrdiff_t>(sector),
                                        now.begin() + static_cast<ptrdiff_t>(sector + 512),
                                        batch.data(index).begin() +
                                            static_cast<ptrdiff_t>(sector));
          }
          ASSERT_TRUE(whole) << "sector " << sector << " of the contested range is torn";
        }
        std::copy(now.begin(), now.end(), reference.begin() + static_cast<ptrdiff_t>(contested_at));
      }
      ASSERT_EQ(read_bytes(*image, 0, size), reference) << "the image differs after the batch";
    }
  }
  expect_check_clean(path);
  auto again = open_qcow2(path, Access::ReadOnly);
  ASSERT_TRUE(again);
  EXPECT_EQ(read_bytes(*again, 0, size), reference);
}

TEST(Qcow2AsyncTest, OverlappingRequestsSmallClustersOverABackingFile) {
  overlapping_requests(12, true, 1);
}

TEST(Qcow2AsyncTest, OverlappingRequestsLargeClustersNoBacking) {
  overlapping_requests(16, false, 2);
}

TEST(Qcow2AsyncTest, OverlappingRequestsLargeClustersOverABackingFile) {
  overlapping_requests(16, true, 3);
}

// Requests the image refuses are not queued; data the kernel cannot move
// fails the request with its errno and leaves the image as it was, the new
// clusters of a failed allocating write freed again.
TEST(Qcow2AsyncTest, ErrorPaths) {
  TempDir dir;
  const std::string path = dir.file("e.qcow2");
  create_qcow2(path, 2 * kMiB, 16);
  {
    auto image = open_qcow2(path);
    ASSERT_TRUE(image);
    ASSERT_TRUE(write_bytes(*image, 0, pattern(64 * kKiB, 5)).has_value());

    std::vector<std::byte> buffer(4096);
    iovec v{buffer.data(), buffer.size()};
    auto refused = image->submit(transfer(BlockOp::Read, 2 * kMiB - 512, std::span(&v, 1)));
    ASSERT_FALSE(refused.has_value());
    EXPECT_EQ(refused.error().code(), Errc::OutOfRange);
    std::vector<iovec> many(IOV_MAX + 1, iovec{buffer.data(), 512});
    EXPECT_EQ(image->submit(transfer(BlockOp::Write, 0, many)).error().code(),
              Errc::InvalidArgument);
    EXPECT_EQ(image->in_flight(), 0u);

    // Buffers at an address nobody maps: EFAULT from the kernel, for a write
    // in place, an allocating write and a read.
    iovec bad{reinterpret_cast<void*>(uintptr_t{4096}), 4096};
    for (uint64_t at : {uint64_t{0}, 128 * kKiB}) {
      ASSERT_TRUE(image->submit(transfer(BlockOp::Write, at, std::span(&bad, 1), at)).has_value());
    }
    ASSERT_TRUE(image->submit(transfer(BlockOp::Read, 0, std::span(&bad, 1), 7)).has_value());
    ASSERT_TRUE(image->kick().has_value());
    std::vector<BlockCompletion> done;
    while (done.size() < 3) {
      pollfd pfd{image->completion_fd(), POLLIN, 0};
      ASSERT_EQ(::poll(&pfd, 1, 10000), 1);
      image->reap(done);
    }
    for (const BlockCompletion& c : done) EXPECT_EQ(c.result, -EFAULT) << c.user_data;
    EXPECT_EQ(read_bytes(*image, 0, 64 * kKiB), pattern(64 * kKiB, 5));
    EXPECT_EQ(read_bytes(*image, 128 * kKiB, 64 * kKiB), std::vector<std::byte>(64 * kKiB));
    auto status = image->block_status(128 * kKiB, 64 * kKiB);
    ASSERT_TRUE(status.has_value());
    EXPECT_EQ(status->status, qcow2::Qcow2Image::Status::Unallocated);
  }
  expect_check_clean(path);

  // A read-only image refuses writes at submit.
  auto read_only = open_qcow2(path, Access::ReadOnly);
  ASSERT_TRUE(read_only);
  std::vector<std::byte> buffer(512);
  iovec v{buffer.data(), buffer.size()};
  EXPECT_EQ(read_only->submit(transfer(BlockOp::Write, 0, std::span(&v, 1))).error().code(),
            Errc::PermissionDenied);
}

// The synchronous face waits for the asynchronous one: a read_at right
// after submit sees the data of an allocating write still in flight.
TEST(Qcow2AsyncTest, SynchronousCallsWaitForRequestsInFlight) {
  TempDir dir;
  const std::string path = dir.file("s.qcow2");
  create_qcow2(path, 4 * kMiB, 16);
  auto image = open_qcow2(path);
  ASSERT_TRUE(image);
  auto data = pattern(kMiB, 9);
  iovec v{data.data(), data.size()};
  ASSERT_TRUE(image->submit(transfer(BlockOp::Write, kMiB, std::span(&v, 1))).has_value());
  ASSERT_TRUE(image->kick().has_value());
  EXPECT_EQ(read_bytes(*image, kMiB, kMiB), data);
  std::vector<BlockCompletion> done;
  pollfd pfd{image->completion_fd(), POLLIN, 0};
  ASSERT_EQ(::poll(&pfd, 1, 10000), 1);
  ASSERT_EQ(image->reap(done), 1u);
  EXPECT_EQ(done[0].result, static_cast<int64_t>(kMiB));
}

}  // namespace
}  // namespace keel::block
