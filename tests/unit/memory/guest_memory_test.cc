#include "memory/guest_memory.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <array>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace keel::memory {
namespace {

constexpr uint64_t kHoleStart = 0x100000;  // 1 MiB: small enough to test splitting
constexpr uint64_t kHoleEnd = 0x400000;

TEST(GuestMemoryTest, SplitsAroundTheHole) {
  GuestMemory memory = *GuestMemory::create(0x300000, kHoleStart, kHoleEnd);
  ASSERT_EQ(memory.regions().size(), 2u);
  EXPECT_EQ(memory.regions()[0].start, GuestAddr(0));
  EXPECT_EQ(memory.regions()[0].size_bytes, kHoleStart);
  EXPECT_EQ(memory.regions()[1].start, GuestAddr(kHoleEnd));
  EXPECT_EQ(memory.regions()[1].size_bytes, 0x200000u);
  EXPECT_TRUE(memory.contains(GuestAddr(kHoleEnd + 0x1ff000), 0x1000));
  EXPECT_FALSE(memory.contains(GuestAddr(kHoleStart), 1));
}

TEST(GuestMemoryTest, SmallMemoryHasOneRegion) {
  GuestMemory memory = *GuestMemory::create(0x80000, kHoleStart, kHoleEnd);
  EXPECT_EQ(memory.regions().size(), 1u);
}

TEST(GuestMemoryTest, ObjectsRoundTrip) {
  GuestMemory memory = *GuestMemory::create(0x300000, kHoleStart, kHoleEnd);
  ASSERT_TRUE(memory.write_obj(GuestAddr(0x1000), uint64_t{0x1122334455667788}));
  EXPECT_EQ(*memory.read_obj<uint64_t>(GuestAddr(0x1000)), 0x1122334455667788u);
  ASSERT_TRUE(memory.write_obj(GuestAddr(kHoleEnd + 8), uint32_t{7}));
  EXPECT_EQ(*memory.read_obj<uint32_t>(GuestAddr(kHoleEnd + 8)), 7u);
}

TEST(GuestMemoryTest, OutOfRangeAccessesAreErrors) {
  GuestMemory memory = *GuestMemory::create(0x300000, kHoleStart, kHoleEnd);
  std::array<std::byte, 16> buffer{};
  // Straddling the end of low RAM into the hole.
  Result<void> straddle = memory.read(GuestAddr(kHoleStart - 8), buffer);
  ASSERT_FALSE(straddle);
  EXPECT_EQ(straddle.error().code(), Errc::OutOfRange);
  EXPECT_FALSE(memory.write(GuestAddr(kHoleEnd + 0x200000 - 8), buffer));
  // Wrap-around and absurd lengths from a hostile guest.
  EXPECT_FALSE(memory.host_span(GuestAddr(~uint64_t{0} - 4), 16));
  EXPECT_FALSE(memory.host_span(GuestAddr(0x1000), ~uint64_t{0}));
  EXPECT_FALSE(memory.read_obj<uint64_t>(GuestAddr(0xffffffff00000000)));
}

// Zero-length accesses (a zero-length descriptor's buffer) inside RAM
// succeed and touch nothing; outside RAM they are still errors. Under UBSan
// this also checks that no memcpy is made with an empty span's null data().
TEST(GuestMemoryTest, EmptyAccessesTouchNothing) {
  GuestMemory memory = *GuestMemory::create(0x300000, kHoleStart, kHoleEnd);
  ASSERT_TRUE(memory.write_obj<uint32_t>(GuestAddr(0x1000), 0xa5a5a5a5));
  std::span<std::byte> empty;
  EXPECT_TRUE(memory.read(GuestAddr(0x1000), empty));
  EXPECT_TRUE(memory.write(GuestAddr(0x1000), std::span<const std::byte>()));
  EXPECT_EQ(*memory.read_obj<uint32_t>(GuestAddr(0x1000)), 0xa5a5a5a5u);
  EXPECT_FALSE(memory.read(GuestAddr(kHoleStart + 0x1000), empty));
  EXPECT_FALSE(memory.write(GuestAddr(kHoleStart + 0x1000), std::span<const std::byte>()));
}

TEST(GuestMemoryTest, BadSizesAreRejected) {
  EXPECT_FALSE(GuestMemory::create(0, kHoleStart, kHoleEnd));
  EXPECT_FALSE(GuestMemory::create(4097, kHoleStart, kHoleEnd));
}

// Bytes of RAM that hold pages: of the memfd (st_blocks counts 512-byte
// units), or present in anonymous memory.
uint64_t allocated_bytes(const GuestMemory& memory) {
  if (memory.backing() == GuestMemory::Backing::SharedMemfd) {
    struct stat st {};
    EXPECT_EQ(::fstat(memory.fd().get(), &st), 0);
    return static_cast<uint64_t>(st.st_blocks) * 512;
  }
  const std::vector<ByteRange> ranges = memory.populated_ranges().value();
  uint64_t bytes = 0;
  for (const ByteRange& range : ranges) bytes += range.end - range.begin;
  return bytes;
}

bool covers(const std::vector<ByteRange>& ranges, uint64_t offset) {
  return std::any_of(ranges.begin(), ranges.end(), [&](const ByteRange& range) {
    return range.begin <= offset && offset < range.end;
  });
}

bool all_zero(const GuestMemory& memory, GuestAddr address, uint64_t length) {
  std::vector<std::byte> data(length, std::byte{0xee});
  EXPECT_TRUE(memory.read(address, data));
  for (std::byte b : data) {
    if (b != std::byte{0}) return false;
  }
  return true;
}

// The fresh-machine backends: what follows holds for each.
class GuestMemoryBackendTest : public ::testing::TestWithParam<MemoryBackend> {
 protected:
  GuestMemory create() { return *GuestMemory::create(0x300000, kHoleStart, kHoleEnd, GetParam()); }
};

INSTANTIATE_TEST_SUITE_P(Backends, GuestMemoryBackendTest,
                         ::testing::Values(MemoryBackend::Anonymous, MemoryBackend::Memfd),
                         [](const auto& test_info) {
                           return std::string(memory_backend_name(test_info.param));
                         });

TEST_P(GuestMemoryBackendTest, IsWhatWasAskedFor) {
  GuestMemory memory = create();
  if (GetParam() == MemoryBackend::Anonymous) {
    EXPECT_EQ(memory.backing(), GuestMemory::Backing::Anonymous);
    EXPECT_FALSE(memory.fd().valid()) << "anonymous RAM has no file to share";
    EXPECT_EQ(reinterpret_cast<uintptr_t>(memory.ram().data()) % (2 << 20), 0u)
        << "not 2 MiB aligned: hugepages could not back its start";
  } else {
    EXPECT_EQ(memory.backing(), GuestMemory::Backing::SharedMemfd);
    EXPECT_TRUE(memory.fd().valid());
  }
}

// What a snapshot writes and a migration's first pass sends: written pages,
// in both regions, by RAM offset; untouched RAM is left out.
TEST_P(GuestMemoryBackendTest, PopulatedRangesCoverWhatWasWritten) {
  GuestMemory memory = create();
  Result<std::vector<ByteRange>> fresh = memory.populated_ranges();
  ASSERT_TRUE(fresh) << fresh.error().message();
  EXPECT_TRUE(fresh->empty());

  ASSERT_TRUE(memory.write_obj(GuestAddr(0x5000), uint32_t{1}));
  ASSERT_TRUE(memory.write_obj(GuestAddr(kHoleEnd + 0x1ff000), uint32_t{2}));  // RAM's last page
  Result<std::vector<ByteRange>> ranges = memory.populated_ranges();
  ASSERT_TRUE(ranges) << ranges.error().message();
  EXPECT_TRUE(covers(*ranges, 0x5000));
  EXPECT_TRUE(covers(*ranges, 0x2ff000));
  uint64_t end = 0;
  for (const ByteRange& range : *ranges) {
    EXPECT_LT(range.begin, range.end);
    EXPECT_GE(range.begin, end) << "out of order or overlapping";
    EXPECT_EQ(range.begin % GuestMemory::kPageBytes, 0u);
    EXPECT_EQ(range.end % GuestMemory::kPageBytes, 0u);
    EXPECT_LE(range.end, memory.size_bytes());
    end = range.end;
  }
  // (With hugepages a touch may populate the whole 2 MiB around it, so no
  // exact list here; tests/unit/memory/populated_ranges_test.cc has one.)
}

// A discarded page is given back: it reads as zeros and counts as never
// touched, so neither a snapshot nor a migration reads it.
TEST_P(GuestMemoryBackendTest, ADiscardedPageIsNoLongerPopulated) {
  GuestMemory memory = create();
  std::vector<std::byte> ones(0x200000, std::byte{0x5a});  // all of one hugepage's worth
  ASSERT_TRUE(memory.write(GuestAddr(kHoleEnd), ones));
  ASSERT_TRUE(memory.discard(GuestAddr(kHoleEnd + 0x3000), 0x1000));
  Result<std::vector<ByteRange>> ranges = memory.populated_ranges();
  ASSERT_TRUE(ranges) << ranges.error().message();
  EXPECT_FALSE(covers(*ranges, kHoleStart + 0x3000));
  EXPECT_TRUE(covers(*ranges, kHoleStart + 0x2000));
  EXPECT_TRUE(covers(*ranges, kHoleStart + 0x4000));
  EXPECT_EQ(*memory.read_obj<uint32_t>(GuestAddr(kHoleEnd + 0x3000)), 0u);
}

TEST_P(GuestMemoryBackendTest, DiscardZeroesAndFreesPages) {
  GuestMemory memory = create();
  std::vector<std::byte> ones(0x40000, std::byte{0x5a});
  ASSERT_TRUE(memory.write(GuestAddr(0x80000), ones));       // low region
  ASSERT_TRUE(memory.write(GuestAddr(kHoleEnd + 0x10000), ones));  // high region
  const uint64_t before = allocated_bytes(memory);
  ASSERT_GE(before, 2 * ones.size());

  // The middle of the low block, and the high block whole.
  ASSERT_TRUE(memory.discard(GuestAddr(0x90000), 0x20000));
  ASSERT_TRUE(memory.discard(GuestAddr(kHoleEnd + 0x10000), 0x40000));
  // Measured before reading the holes back: a read fault on shmem
  // allocates the page again.
  EXPECT_LE(allocated_bytes(memory), before - 0x60000);
  EXPECT_TRUE(all_zero(memory, GuestAddr(0x90000), 0x20000));
  EXPECT_TRUE(all_zero(memory, GuestAddr(kHoleEnd + 0x10000), 0x40000));
  // Neighbours keep their bytes: the high region's file offset was used.
  EXPECT_EQ(*memory.read_obj<uint8_t>(GuestAddr(0x8ffff)), 0x5a);
  EXPECT_EQ(*memory.read_obj<uint8_t>(GuestAddr(0xb0000)), 0x5a);
  EXPECT_EQ(*memory.read_obj<uint8_t>(GuestAddr(0xbffff)), 0x5a);
  // The memory stays usable after a discard.
  ASSERT_TRUE(memory.write_obj(GuestAddr(0x90000), uint32_t{0x12345678}));
  EXPECT_EQ(*memory.read_obj<uint32_t>(GuestAddr(0x90000)), 0x12345678u);
}

TEST_P(GuestMemoryBackendTest, DiscardChecksItsRange) {
  GuestMemory memory = create();
  EXPECT_TRUE(memory.discard(GuestAddr(0x1000), 0));
  Result<void> unaligned = memory.discard(GuestAddr(0x1001), 0x1000);
  ASSERT_FALSE(unaligned);
  EXPECT_EQ(unaligned.error().code(), Errc::InvalidArgument);
  EXPECT_FALSE(memory.discard(GuestAddr(0x1000), 0x800));
  // Straddling low RAM and the hole, inside the hole, past the end, wrapping.
  Result<void> straddle = memory.discard(GuestAddr(kHoleStart - 0x1000), 0x2000);
  ASSERT_FALSE(straddle);
  EXPECT_EQ(straddle.error().code(), Errc::OutOfRange);
  EXPECT_FALSE(memory.discard(GuestAddr(kHoleStart), 0x1000));
  EXPECT_FALSE(memory.discard(GuestAddr(kHoleEnd + 0x1ff000), 0x2000));
  EXPECT_FALSE(memory.discard(GuestAddr(0x1000), ~uint64_t{0xfff}));
  EXPECT_FALSE(memory.discard(GuestAddr(~uint64_t{0xfff}), 0x1000));
}

TEST(GuestMemoryTest, PrivateFileMappingReadsTheFileAndNeverWritesIt) {
  // A file with a 4 KiB header, then two pages of "RAM": 'a's and 'b's.
  std::string path = ::testing::TempDir() + "keel-guest-memory-private";
  std::vector<std::byte> contents(3 * GuestMemory::kPageBytes, std::byte{'h'});
  std::fill(contents.begin() + 4096, contents.begin() + 8192, std::byte{'a'});
  std::fill(contents.begin() + 8192, contents.end(), std::byte{'b'});
  {
    Result<Fd> file = Fd::open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    ASSERT_TRUE(file);
    ASSERT_TRUE(file->pwrite_all(contents, 0));
  }
  Result<Fd> file = Fd::open(path, O_RDONLY);
  ASSERT_TRUE(file);
  Result<GuestMemory> memory = GuestMemory::map_private(*file, 4096, 8192, 1 << 30, 1ull << 32);
  ASSERT_TRUE(memory) << memory.error().message();
  EXPECT_EQ(memory->backing(), GuestMemory::Backing::PrivateFile);
  EXPECT_EQ(memory->size_bytes(), 8192u);
  EXPECT_EQ(memory->read_obj<char>(GuestAddr(0)).value(), 'a');
  EXPECT_EQ(memory->read_obj<char>(GuestAddr(4096)).value(), 'b');
  ASSERT_TRUE(memory->write_obj(GuestAddr(0), 'z'));
  EXPECT_EQ(memory->read_obj<char>(GuestAddr(0)).value(), 'z');
  std::vector<std::byte> after(contents.size());
  ASSERT_TRUE(file->pread_all(after, 0));
  EXPECT_EQ(after, contents) << "the guest's write reached the file";
  // Giving the page back drops the private copy: the file's bytes return
  // (the balloon and free page reporting accept any contents there).
  ASSERT_TRUE(memory->discard(GuestAddr(0), 4096));
  EXPECT_EQ(memory->read_obj<char>(GuestAddr(0)).value(), 'a');
  EXPECT_FALSE(memory->discard(GuestAddr(4096), 8192)) << "runs past RAM";
  EXPECT_FALSE(memory->discard(GuestAddr(100), 4096)) << "not aligned";

  EXPECT_FALSE(GuestMemory::map_private(*file, 100, 4096, 1 << 30, 1ull << 32));
  EXPECT_FALSE(GuestMemory::map_private(*file, 4096, 3 * 4096, 1 << 30, 1ull << 32))
      << "runs past the end of the file";
  ::unlink(path.c_str());
}

// Pages the VMM writes (device emulation) are invisible to KVM's dirty log:
// GuestMemory marks them itself while tracking is on, by RAM offset.
std::vector<uint64_t> take_dirty(const GuestMemory& memory) {
  std::vector<uint64_t> bitmap((memory.page_count() + 63) / 64, 0);
  memory.take_dirty_pages(bitmap);
  return bitmap;
}

std::vector<uint64_t> dirty_pages(const std::vector<uint64_t>& bitmap) {
  std::vector<uint64_t> pages;
  for (uint64_t page = 0; page < bitmap.size() * 64; ++page) {
    if ((bitmap[page / 64] >> (page % 64)) & 1) pages.push_back(page);
  }
  return pages;
}

TEST(GuestMemoryTest, MarksVmmWritesDirtyOnlyWhileTracking) {
  GuestMemory memory = *GuestMemory::create(0x300000, kHoleStart, kHoleEnd);
  ASSERT_TRUE(memory.write_obj(GuestAddr(0x1000), uint32_t{1}));
  EXPECT_TRUE(dirty_pages(take_dirty(memory)).empty()) << "tracking is off";

  memory.set_dirty_tracking(true);
  ASSERT_TRUE(memory.write_obj(GuestAddr(0x1000), uint32_t{1}));
  // A write straddling two pages marks both.
  ASSERT_TRUE(memory.write_obj(GuestAddr(0x3ffe), uint32_t{2}));
  // The high region's pages follow the low region's in RAM order.
  ASSERT_TRUE(memory.write_obj(GuestAddr(kHoleEnd + 0x2000), uint8_t{3}));
  const uint64_t high_first_page = kHoleStart / 4096;
  EXPECT_EQ(dirty_pages(take_dirty(memory)),
            (std::vector<uint64_t>{1, 3, 4, high_first_page + 2}));
  EXPECT_TRUE(dirty_pages(take_dirty(memory)).empty()) << "taking clears the marks";

  // Reads never mark.
  ASSERT_TRUE(memory.read_obj<uint32_t>(GuestAddr(0x5000)));
  EXPECT_TRUE(dirty_pages(take_dirty(memory)).empty());

  memory.set_dirty_tracking(false);
  ASSERT_TRUE(memory.write_obj(GuestAddr(0x1000), uint32_t{1}));
  EXPECT_TRUE(dirty_pages(take_dirty(memory)).empty());
}

TEST_P(GuestMemoryBackendTest, MarksHostSpansAndDiscardsDirty) {
  GuestMemory memory = create();
  memory.set_dirty_tracking(true);
  // Devices write guest buffers through host_span (iovecs for disk reads,
  // getrandom): every page handed out counts as written.
  ASSERT_TRUE(memory.host_span(GuestAddr(0x7000), 0x2001));
  ASSERT_TRUE(memory.discard(GuestAddr(0x20000), 0x1000));
  EXPECT_EQ(dirty_pages(take_dirty(memory)), (std::vector<uint64_t>{7, 8, 9, 0x20}));
  // A failed access marks nothing.
  EXPECT_FALSE(memory.host_span(GuestAddr(kHoleStart), 1));
  EXPECT_FALSE(memory.write_obj(GuestAddr(kHoleStart - 2), uint32_t{0}));
  EXPECT_TRUE(dirty_pages(take_dirty(memory)).empty());
}

// Indices the guest moves while the VMM reads them: one load, never a
// mix of old and new bytes (memcpy of a runtime length may read a u16 as
// two byte loads: 0x21ff -> 0x2200 seen as 0x22ff, which broke a
// virtio-console under load). The writer flips the value as fast as it can.
TEST(GuestMemoryTest, AtomicLoadsAreNeverTorn) {
  GuestMemory memory = *GuestMemory::create(0x300000, kHoleStart, kHoleEnd);
  const GuestAddr idx(0x2002);
  ASSERT_TRUE(memory.store_atomic(idx, uint16_t{0x21ff}));
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      (void)memory.store_atomic(idx, uint16_t{0x2200});
      (void)memory.store_atomic(idx, uint16_t{0x21ff});
    }
  });
  uint64_t torn = 0;
  for (int i = 0; i < 2'000'000; ++i) {
    uint16_t value = *memory.load_atomic<uint16_t>(idx);
    if (value != 0x21ff && value != 0x2200) ++torn;
  }
  stop.store(true);
  writer.join();
  EXPECT_EQ(torn, 0u);
}

TEST(GuestMemoryTest, AtomicAccessesCheckAlignmentAndRange) {
  GuestMemory memory = *GuestMemory::create(0x300000, kHoleStart, kHoleEnd);
  memory.set_dirty_tracking(true);
  ASSERT_TRUE(memory.store_atomic(GuestAddr(kHoleEnd + 0x1004), uint32_t{0xabcd}));
  EXPECT_EQ(*memory.load_atomic<uint32_t>(GuestAddr(kHoleEnd + 0x1004)), 0xabcdu);
  EXPECT_EQ(*memory.read_obj<uint32_t>(GuestAddr(kHoleEnd + 0x1004)), 0xabcdu);
  EXPECT_EQ(dirty_pages(take_dirty(memory)), (std::vector<uint64_t>{kHoleStart / 4096 + 1}))
      << "a store marks its page dirty";

  Result<uint16_t> misaligned = memory.load_atomic<uint16_t>(GuestAddr(0x1001));
  ASSERT_FALSE(misaligned);
  EXPECT_EQ(misaligned.error().code(), Errc::OutOfRange);
  EXPECT_FALSE(memory.store_atomic(GuestAddr(0x1002), uint32_t{1}));
  EXPECT_FALSE(memory.load_atomic<uint64_t>(GuestAddr(kHoleStart)));  // the hole
  EXPECT_FALSE(memory.load_atomic<uint64_t>(GuestAddr(0xfffffffffffffff8)));
}

// The point of the anonymous backend: under the host's THP setting for
// anonymous memory (enabled=madvise or always) its RAM gets hugepages,
// where a memfd needs shmem_enabled, which Debian leaves at never.
std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// AnonHugePages in kB over the VMAs of /proc/self/smaps that overlap
// [begin, end).
uint64_t anon_huge_kib(uintptr_t begin, uintptr_t end) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  uint64_t total = 0;
  while (std::getline(smaps, line)) {
    uintptr_t vma_begin = 0;
    uintptr_t vma_end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &vma_begin, &vma_end) == 2 &&
        line.find(':') > line.find(' ')) {
      inside = vma_begin < end && begin < vma_end;
      continue;
    }
    uint64_t kib = 0;
    if (inside && std::sscanf(line.c_str(), "AnonHugePages: %lu kB", &kib) == 1) total += kib;
  }
  return total;
}

TEST(GuestMemoryHugepagesTest, AnonymousRamGetsTransparentHugepages) {
  const std::string enabled = read_text("/sys/kernel/mm/transparent_hugepage/enabled");
  if (enabled.empty()) GTEST_SKIP() << "this kernel has no transparent hugepages";
  if (enabled.find("[never]") != std::string::npos) {
    GTEST_SKIP() << "the host's /sys/kernel/mm/transparent_hugepage/enabled is never: " << enabled;
  }
  constexpr uint64_t kRam = 16 << 20;
  GuestMemory memory = *GuestMemory::create(kRam, kRam, kRam, MemoryBackend::Anonymous);
  // The guest's first touch of each page, as KVM would fault it in.
  for (uint64_t offset = 0; offset < kRam; offset += GuestMemory::kPageBytes) {
    memory.ram()[offset] = std::byte{1};
  }
  const auto begin = reinterpret_cast<uintptr_t>(memory.ram().data());
  const uint64_t huge_kib = anon_huge_kib(begin, begin + kRam);
  // Every 2 MiB of it could be a hugepage; the kernel may fall back to small
  // pages for some when memory is fragmented, but not for all.
  EXPECT_GT(huge_kib, 0u) << "THP enabled is " << enabled
                          << "but the guest RAM mapping has no AnonHugePages";
  std::printf("guest RAM: %lu of %lu KiB in transparent hugepages (THP enabled: %s)\n",
              static_cast<unsigned long>(huge_kib), static_cast<unsigned long>(kRam >> 10),
              enabled.substr(0, enabled.find('\n')).c_str());
}

}  // namespace
}  // namespace keel::memory
