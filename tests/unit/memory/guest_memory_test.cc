#include "memory/guest_memory.h"

#include <array>

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

TEST(GuestMemoryTest, BadSizesAreRejected) {
  EXPECT_FALSE(GuestMemory::create(0, kHoleStart, kHoleEnd));
  EXPECT_FALSE(GuestMemory::create(4097, kHoleStart, kHoleEnd));
}

}  // namespace
}  // namespace keel::memory
