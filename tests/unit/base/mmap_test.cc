#include "base/mmap.h"

#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

namespace keel {
namespace {

TEST(MmapTest, AnonymousIsZeroedAndWritable) {
  Mmap map = *Mmap::anonymous(1 << 20);
  ASSERT_EQ(map.size_bytes(), 1u << 20);
  EXPECT_EQ(map.data()[12345], std::byte{0});
  map.data()[12345] = std::byte{0x5a};
  EXPECT_EQ(map.bytes()[12345], std::byte{0x5a});
}

TEST(MmapTest, ZeroSizeIsRejected) {
  Result<Mmap> map = Mmap::anonymous(0);
  ASSERT_FALSE(map);
  EXPECT_EQ(map.error().code(), Errc::InvalidArgument);
}

TEST(MmapTest, AnonymousAlignedStartsOnTheAlignment) {
  constexpr size_t kAlignment = 2 << 20;
  for (size_t size : {size_t{4096}, size_t{3} << 20, size_t{5} << 20}) {
    Mmap map = *Mmap::anonymous_aligned(size, kAlignment);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(map.data()) % kAlignment, 0u) << size;
    ASSERT_EQ(map.size_bytes(), size);
    map.data()[0] = std::byte{1};
    map.data()[size - 1] = std::byte{2};
    EXPECT_EQ(map.bytes()[size - 1], std::byte{2});
  }
}

TEST(MmapTest, AnonymousAlignedRejectsAnAlignmentThatIsNoPowerOfTwo) {
  Result<Mmap> map = Mmap::anonymous_aligned(4096, 3 << 20);
  ASSERT_FALSE(map);
  EXPECT_EQ(map.error().code(), Errc::InvalidArgument);
  EXPECT_FALSE(Mmap::anonymous_aligned(4096, 0));
}

TEST(MmapTest, SharedFileMappingSeesFileWrites) {
  int raw = ::memfd_create("keel-mmap-test", MFD_CLOEXEC);
  ASSERT_GE(raw, 0);
  Fd fd(raw);
  ASSERT_EQ(::ftruncate(fd.get(), 4096), 0);
  Mmap map = *Mmap::file(fd, 4096, 0, PROT_READ | PROT_WRITE, MAP_SHARED);
  std::byte value{0x42};
  ASSERT_TRUE(fd.pwrite_all({&value, 1}, 10));
  EXPECT_EQ(map.data()[10], std::byte{0x42});
}

TEST(MmapTest, MoveLeavesSourceEmpty) {
  Mmap first = *Mmap::anonymous(4096);
  std::byte* address = first.data();
  Mmap second = std::move(first);
  EXPECT_FALSE(first.valid());  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(second.data(), address);
  first = std::move(second);
  EXPECT_EQ(first.data(), address);
}

}  // namespace
}  // namespace keel
