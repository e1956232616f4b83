// Configuration mechanism #1 and ECAM, reached through the port and MMIO
// buses as a guest would.
#include <gtest/gtest.h>

#include <array>
#include <cstddef>

#include "devices/pci/pci_host_bridge.h"
#include "pci_bus_fixture.h"

namespace keel::devices {
namespace {

using testing::FakePciDevice;
using testing::le_bytes;
using testing::to_u32;

class PciConfigAccessTest : public testing::PciBusFixture {};

TEST_F(PciConfigAccessTest, HostBridgeThroughBothMechanismsAndAllWidths) {
  for (int mechanism = 0; mechanism < 2; ++mechanism) {
    auto read = [&](uint32_t reg, size_t size) {
      return mechanism == 0 ? conf1_read(0, 0, 0, reg, size) : ecam_read(0, 0, 0, reg, size);
    };
    SCOPED_TRACE(mechanism == 0 ? "mechanism #1" : "ECAM");
    EXPECT_EQ(read(0x00, 4), 0x00081b36u);
    EXPECT_EQ(read(0x00, 2), 0x1b36u);
    EXPECT_EQ(read(0x02, 2), 0x0008u);
    EXPECT_EQ(read(0x00, 1), 0x36u);
    EXPECT_EQ(read(0x01, 1), 0x1bu);
    EXPECT_EQ(read(0x02, 1), 0x08u);
    EXPECT_EQ(read(0x03, 1), 0x00u);
    EXPECT_EQ(read(0x08, 4) >> 8, 0x060000u);  // class: bridge, host bridge
    EXPECT_EQ(read(0x0a, 2), 0x0600u);         // Linux's pci_sanity_check reads this
    EXPECT_EQ(read(0x0b, 1), 0x06u);
    EXPECT_EQ(read(0x0e, 1), 0x00u);  // type 0, single function
  }
}

TEST_F(PciConfigAccessTest, DeviceHeaderThroughBothMechanisms) {
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(bus_->add_device(device, 3));
  EXPECT_EQ(conf1_read(0, 3, 0, 0x00, 4), 0x10421af4u);
  EXPECT_EQ(ecam_read(0, 3, 0, 0x00, 4), 0x10421af4u);
  EXPECT_EQ(conf1_read(0, 3, 0, 0x2e, 2), 0x0002u);
  EXPECT_EQ(ecam_read(0, 3, 0, 0x3d, 1), 0x01u);
  // A write through one mechanism is seen through the other.
  conf1_write(0, 3, 0, 0x3c, 1, 10);
  EXPECT_EQ(ecam_read(0, 3, 0, 0x3c, 1), 10u);
  ecam_write(0, 3, 0, 0x3e, 2, 0xffff);  // min_gnt/max_lat: read-only
  ecam_write(0, 3, 0, 0x3c, 1, 11);
  EXPECT_EQ(conf1_read(0, 3, 0, 0x3c, 4), 0x0000010bu);
  // Extended space only through ECAM.
  EXPECT_EQ(ecam_read(0, 3, 0, 0x100, 4), 0u);
}

TEST_F(PciConfigAccessTest, AbsentFunctionsReadAllOnes) {
  for (auto [bus, device, function] : {std::array<uint32_t, 3>{0, 5, 0},
                                       {0, 0, 1},
                                       {0, 31, 7},
                                       {1, 0, 0},
                                       {255, 0, 0},
                                       {255, 31, 7}}) {
    SCOPED_TRACE(::testing::Message() << bus << ":" << device << "." << function);
    EXPECT_EQ(conf1_read(bus, device, function, 0x00, 4), 0xffffffffu);
    EXPECT_EQ(conf1_read(bus, device, function, 0x02, 2), 0xffffu);
    EXPECT_EQ(ecam_read(bus, device, function, 0x00, 4), 0xffffffffu);
    EXPECT_EQ(ecam_read(bus, device, function, 0x0e, 1), 0xffu);
    EXPECT_EQ(ecam_read(bus, device, function, 0xffc, 4), 0xffffffffu);
    conf1_write(bus, device, function, 0x04, 2, 0xffff);  // dropped
    ecam_write(bus, device, function, 0x04, 2, 0xffff);
  }
  // Function 1 of the host bridge is not an alias of function 0.
  ecam_write(0, 0, 1, 0x04, 2, kPciCommandMemory);
  EXPECT_EQ(ecam_read(0, 0, 0, 0x04, 2), 0u);
}

TEST_F(PciConfigAccessTest, AddressRegisterReadsBackAsLinuxProbesIt) {
  // Linux's pci_check_type1: a byte at 0xcfb, then 0x80000000 at 0xcf8 read back.
  const std::array<std::byte, 1> one{std::byte{0x01}};
  pio_.write(0xcfb, one);
  auto enable = le_bytes<4>(0x80000000);
  pio_.write(0xcf8, enable);
  std::array<std::byte, 4> data{};
  ASSERT_TRUE(pio_.read(0xcf8, data));
  EXPECT_EQ(to_u32(data), 0x80000000u);
  // Reserved bits 30:24 and 1:0 read as zero.
  auto noisy = le_bytes<4>(0xffffffff);
  pio_.write(0xcf8, noisy);
  pio_.read(0xcf8, data);
  EXPECT_EQ(to_u32(data), 0x80fffffcu);
  // Byte and word reads of 0xcf8-0xcfb are not the address register.
  std::array<std::byte, 2> word{};
  pio_.read(0xcf8, word);
  EXPECT_EQ(to_u32(word), 0xffffu);
  pio_.read(0xcfa, word);
  EXPECT_EQ(to_u32(word), 0xffffu);
  // Narrow writes there do not change it either.
  pio_.write(0xcf9, one);
  pio_.write(0xcf8, std::span<const std::byte>(word));
  EXPECT_EQ(config_io_->address_register(), 0x80fffffcu);
}

TEST_F(PciConfigAccessTest, DataPortByteLanes) {
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(bus_->add_device(device, 2));
  auto address = le_bytes<4>(conf1_address(0, 2, 0, 0x00));
  pio_.write(0xcf8, address);
  std::array<std::byte, 1> byte{};
  std::array<std::byte, 2> word{};
  pio_.read(0xcfd, byte);
  EXPECT_EQ(to_u32(byte), 0x1au);
  pio_.read(0xcfe, word);
  EXPECT_EQ(to_u32(word), 0x1042u);
  pio_.read(0xcfd, word);  // bytes 1-2 of the dword: still within it
  EXPECT_EQ(to_u32(word), 0x421au);
  std::array<std::byte, 4> dword{};
  EXPECT_FALSE(pio_.read(0xcfe, dword));  // runs past 0xcff: not ours
}

TEST_F(PciConfigAccessTest, EnableBitOffMakesDataPortInert) {
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(bus_->add_device(device, 1));
  // The address of 00:01.0 command register, without bit 31.
  auto address = le_bytes<4>(conf1_address(0, 1, 0, 0x04) & 0x7fffffff);
  pio_.write(0xcf8, address);
  auto all = le_bytes<4>(0xffffffff);
  pio_.write(0xcfc, all);
  std::array<std::byte, 4> data{};
  pio_.read(0xcfc, data);
  EXPECT_EQ(to_u32(data), 0xffffffffu);
  EXPECT_EQ(device->config().command(), 0u);
  EXPECT_TRUE(device->writes_seen.empty());
  EXPECT_TRUE(device->reads_seen.empty());
}

TEST_F(PciConfigAccessTest, HostileEcamAccessesAreHarmless) {
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(device->add_bar(0, 0x1000, BarKind::Mem32));
  ASSERT_TRUE(bus_->add_device(device, 1));
  std::array<std::byte, 8> wide{};
  wide.fill(std::byte{0xff});
  struct Access {
    uint32_t reg;
    size_t size;
  };
  for (Access access : {Access{0xfff, 4}, Access{0xffd, 4}, Access{0xfff, 2}, Access{0x10, 8},
                        Access{0x10, 3}, Access{0x12, 4}, Access{0x04, 8}}) {
    SCOPED_TRACE(::testing::Message() << std::hex << access.reg << " size " << access.size);
    std::array<std::byte, 8> out{};
    mmio_.read(ecam_address(0, 1, 0, access.reg), std::span(out).first(access.size));
    for (size_t i = 0; i < access.size; ++i) EXPECT_EQ(out[i], std::byte{0xff});
    mmio_.write(ecam_address(0, 1, 0, access.reg), std::span(wide).first(access.size));
  }
  // The very last bytes of the ECAM window (bus 255, 31.7, offset 0xfff).
  std::array<std::byte, 4> last{};
  EXPECT_FALSE(mmio_.read(layout::kPciEcamStart + layout::kPciEcamSize - 2, last));
  mmio_.read(layout::kPciEcamStart + layout::kPciEcamSize - 1, std::span(last).first(1));
  EXPECT_EQ(last[0], std::byte{0xff});
  EXPECT_EQ(device->config().command(), 0u);
  EXPECT_EQ(device->config().bar_address(0), 0u);
  EXPECT_TRUE(device->writes_seen.empty());
  // The handler itself, called past its window.
  PciEcam ecam(bus_);
  std::array<std::byte, 4> out{};
  ecam.read(PciEcam::kSizeBytes + 0x8000, out);
  EXPECT_EQ(to_u32(out), 0xffffffffu);
  ecam.write(PciEcam::kSizeBytes + 0x8004, wide);
  PciConfigIo config_io(bus_);
  config_io.read(1234, out);
  EXPECT_EQ(to_u32(out), 0xffffffffu);
  config_io.write(9, out);
}

TEST_F(PciConfigAccessTest, DeviceHooksSeeGuestAccesses) {
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(bus_->add_device(device, 4));
  ecam_read(0, 4, 0, 0x40, 2);
  ecam_write(0, 4, 0, 0x42, 2, 0x1234);
  conf1_write(0, 4, 0, 0x3c, 1, 9);
  using Access = std::pair<uint32_t, size_t>;
  EXPECT_EQ(device->reads_seen, (std::vector<Access>{{0x40, 2}}));
  EXPECT_EQ(device->writes_seen, (std::vector<Access>{{0x42, 2}, {0x3c, 1}}));
}

}  // namespace
}  // namespace keel::devices
