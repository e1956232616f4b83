#include "devices/io_bus.h"

#include <array>
#include <vector>

#include <gtest/gtest.h>

namespace keel::devices {
namespace {

class RecordingHandler : public IoHandler {
 public:
  void read(uint64_t offset, std::span<std::byte> data) override {
    reads.push_back(offset);
    for (auto& b : data) b = std::byte{0xab};
  }
  void write(uint64_t offset, std::span<const std::byte> data) override {
    writes.push_back(offset);
    last_size = data.size();
  }
  std::vector<uint64_t> reads, writes;
  size_t last_size = 0;
};

TEST(IoBusTest, DispatchesWithOffsets) {
  IoBus bus("pio");
  auto handler = std::make_shared<RecordingHandler>();
  ASSERT_TRUE(bus.map(0x3f8, 8, handler));
  std::array<std::byte, 1> byte{};
  EXPECT_TRUE(bus.read(0x3fd, byte));
  EXPECT_EQ(byte[0], std::byte{0xab});
  std::array<std::byte, 2> word{};
  EXPECT_TRUE(bus.write(0x3fe, word));
  EXPECT_EQ(handler->reads, std::vector<uint64_t>{5});
  EXPECT_EQ(handler->writes, std::vector<uint64_t>{6});
  EXPECT_EQ(handler->last_size, 2u);
}

TEST(IoBusTest, UnclaimedAndStraddlingAccessesMiss) {
  IoBus bus("pio");
  auto handler = std::make_shared<RecordingHandler>();
  ASSERT_TRUE(bus.map(0x3f8, 8, handler));
  std::array<std::byte, 4> data{};
  EXPECT_FALSE(bus.read(0x3fe, data));  // runs past the end of the range
  EXPECT_EQ(data[0], std::byte{0xff});
  EXPECT_FALSE(bus.read(0x3f0, data));
  EXPECT_FALSE(bus.write(0x400, data));
  EXPECT_TRUE(handler->reads.empty());
  EXPECT_TRUE(handler->writes.empty());
}

TEST(IoBusTest, OverlapsAreRefused) {
  IoBus bus("mmio");
  auto handler = std::make_shared<RecordingHandler>();
  ASSERT_TRUE(bus.map(0x1000, 0x1000, handler));
  EXPECT_FALSE(bus.map(0x1800, 0x1000, handler));
  EXPECT_FALSE(bus.map(0x0800, 0x1000, handler));
  EXPECT_FALSE(bus.map(0x0, 0, handler));
  EXPECT_FALSE(bus.map(~uint64_t{0} - 2, 16, handler));
  EXPECT_TRUE(bus.map(0x2000, 0x1000, handler));
  EXPECT_TRUE(bus.unmap(0x1000));
  EXPECT_FALSE(bus.unmap(0x1000));
  EXPECT_TRUE(bus.map(0x0800, 0x800, handler));
}

}  // namespace
}  // namespace keel::devices
