// Slots, BAR mapping that follows the guest's BAR and command writes, and
// firmware-style BAR assignment.
#include "devices/pci/pci_bus.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <thread>
#include <vector>

#include "devices/pci/pci_host_bridge.h"
#include "pci_bus_fixture.h"

namespace keel::devices {
namespace {

using testing::FakePciDevice;
using testing::kIoWindowBase;
using testing::kIoWindowSize;
using testing::kMmio64Base;

class PciBusTest : public testing::PciBusFixture {
 protected:
  // True if an access at address on bus reaches handler at expected_offset.
  static bool reaches(IoBus& bus, uint64_t address, testing::RecordingHandler& handler,
                      uint64_t expected_offset) {
    handler.reads.clear();
    std::array<std::byte, 4> data{};
    if (!bus.read(address, data)) return false;
    return handler.reads == std::vector<uint64_t>{expected_offset};
  }
};

TEST_F(PciBusTest, SlotsAndHostBridge) {
  EXPECT_NE(std::dynamic_pointer_cast<PciHostBridge>(bus_->device(0)), nullptr);
  auto first = std::make_shared<FakePciDevice>();
  auto second = std::make_shared<FakePciDevice>();
  EXPECT_EQ(bus_->add_device(first).value_or(99), 1);
  EXPECT_EQ(bus_->add_device(second, 7).value_or(99), 7);
  EXPECT_EQ(bus_->device(7), second);
  EXPECT_EQ(bus_->add_device(std::make_shared<FakePciDevice>()).value_or(99), 2);

  auto taken = bus_->add_device(std::make_shared<FakePciDevice>(), 7);
  ASSERT_FALSE(taken);
  EXPECT_EQ(taken.error().code(), Errc::Busy);
  EXPECT_FALSE(bus_->add_device(std::make_shared<FakePciDevice>(), 0));
  EXPECT_FALSE(bus_->add_device(std::make_shared<FakePciDevice>(), 32));
  EXPECT_FALSE(bus_->add_device(nullptr));

  auto removed = bus_->remove_device(7);
  ASSERT_TRUE(removed);
  EXPECT_EQ(*removed, second);
  EXPECT_EQ(ecam_read(0, 7, 0, 0, 4), 0xffffffffu);
  EXPECT_EQ(bus_->remove_device(7).error().code(), Errc::NotFound);
  EXPECT_FALSE(bus_->remove_device(0));  // the host bridge stays
  EXPECT_FALSE(bus_->remove_device(200));
  EXPECT_EQ(bus_->device(200), nullptr);

  // Fill the bus: 29 more fit, then none.
  int added = 0;
  while (bus_->add_device(std::make_shared<FakePciDevice>())) ++added;
  EXPECT_EQ(added, 32 - 3);
}

TEST_F(PciBusTest, ProgrammingABarAndDecodeMapsAndRemaps) {
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(device->add_bar(0, 0x1000, BarKind::Mem32));
  auto& handler = *device->handlers[0];
  ASSERT_TRUE(bus_->add_device(device, 3));

  // Sized and programmed with decode off: nothing mapped yet.
  ecam_write(0, 3, 0, 0x10, 4, 0xffffffff);
  EXPECT_EQ(ecam_read(0, 3, 0, 0x10, 4), 0xfffff000u);
  ecam_write(0, 3, 0, 0x10, 4, 0xc0001000);
  EXPECT_FALSE(bus_->mapped_bar_address(3, 0));
  EXPECT_FALSE(reaches(mmio_, 0xc0001010, handler, 0x10));

  ecam_write(0, 3, 0, kPciCommandOffset, 2, kPciCommandMemory);
  EXPECT_EQ(bus_->mapped_bar_address(3, 0), 0xc0001000u);
  EXPECT_TRUE(reaches(mmio_, 0xc0001010, handler, 0x10));
  EXPECT_TRUE(reaches(mmio_, 0xc0001ffc, handler, 0xffc));
  std::array<std::byte, 2> word{};
  handler.writes.clear();
  mmio_.write(0xc0001020, word);
  EXPECT_EQ(handler.writes, std::vector<uint64_t>{0x20});

  // Moving it while decode is on remaps.
  conf1_write(0, 3, 0, 0x10, 4, 0xc0100000);
  EXPECT_EQ(bus_->mapped_bar_address(3, 0), 0xc0100000u);
  EXPECT_FALSE(reaches(mmio_, 0xc0001010, handler, 0x10));
  EXPECT_TRUE(reaches(mmio_, 0xc0100008, handler, 0x8));

  // Decode off unmaps; on again maps at the same place.
  conf1_write(0, 3, 0, kPciCommandOffset, 2, 0);
  EXPECT_FALSE(bus_->mapped_bar_address(3, 0));
  EXPECT_FALSE(reaches(mmio_, 0xc0100008, handler, 0x8));
  conf1_write(0, 3, 0, kPciCommandOffset, 2, kPciCommandMemory | kPciCommandBusMaster);
  EXPECT_TRUE(reaches(mmio_, 0xc0100008, handler, 0x8));

  // I/O decode alone does not map a memory BAR.
  conf1_write(0, 3, 0, kPciCommandOffset, 2, kPciCommandIo);
  EXPECT_FALSE(reaches(mmio_, 0xc0100008, handler, 0x8));
}

TEST_F(PciBusTest, IoBarMapsOnThePortBus) {
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(device->add_bar(1, 64, BarKind::Io));
  auto& handler = *device->handlers[1];
  ASSERT_TRUE(bus_->add_device(device, 5));
  conf1_write(0, 5, 0, 0x14, 4, 0x2000);
  conf1_write(0, 5, 0, kPciCommandOffset, 2, kPciCommandMemory);
  EXPECT_FALSE(reaches(pio_, 0x2004, handler, 4));
  conf1_write(0, 5, 0, kPciCommandOffset, 2, kPciCommandIo);
  EXPECT_TRUE(reaches(pio_, 0x2004, handler, 4));
  EXPECT_FALSE(reaches(mmio_, 0x2004, handler, 4));
  EXPECT_EQ(conf1_read(0, 5, 0, 0x14, 4), 0x2001u);
}

TEST_F(PciBusTest, Mem64BarMapsAboveFourGiB) {
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(device->add_bar(2, 0x4000, BarKind::Mem64, Prefetchable::Yes));
  auto& handler = *device->handlers[2];
  ASSERT_TRUE(bus_->add_device(device, 6));
  ecam_write(0, 6, 0, 0x18, 4, 0x00004000);
  ecam_write(0, 6, 0, 0x1c, 4, 0x00000010);
  ecam_write(0, 6, 0, kPciCommandOffset, 2, kPciCommandMemory);
  EXPECT_EQ(bus_->mapped_bar_address(6, 2), 0x10'0000'4000u);
  EXPECT_TRUE(reaches(mmio_, 0x10'0000'4100, handler, 0x100));
  // Changing only the upper half moves it.
  ecam_write(0, 6, 0, 0x1c, 4, 0x00000011);
  EXPECT_TRUE(reaches(mmio_, 0x11'0000'4100, handler, 0x100));
  EXPECT_FALSE(reaches(mmio_, 0x10'0000'4100, handler, 0x100));
}

TEST_F(PciBusTest, BarAtAddressZeroIsNotMapped) {
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(device->add_bar(0, 0x1000, BarKind::Mem32));
  ASSERT_TRUE(device->add_bar(1, 16, BarKind::Io));
  ASSERT_TRUE(bus_->add_device(device, 1));
  ecam_write(0, 1, 0, kPciCommandOffset, 2, kPciCommandMemory | kPciCommandIo);
  EXPECT_FALSE(bus_->mapped_bar_address(1, 0));
  EXPECT_FALSE(bus_->mapped_bar_address(1, 1));
}

TEST_F(PciBusTest, OverlappingBarFailsTheMapNotTheVmm) {
  auto first = std::make_shared<FakePciDevice>();
  auto second = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(first->add_bar(0, 0x2000, BarKind::Mem32));
  ASSERT_TRUE(second->add_bar(0, 0x1000, BarKind::Mem32));
  ASSERT_TRUE(bus_->add_device(first, 1));
  ASSERT_TRUE(bus_->add_device(second, 2));
  ecam_write(0, 1, 0, 0x10, 4, 0xc0000000);
  ecam_write(0, 1, 0, kPciCommandOffset, 2, kPciCommandMemory);
  ecam_write(0, 2, 0, 0x10, 4, 0xc0001000);  // inside the first BAR
  ecam_write(0, 2, 0, kPciCommandOffset, 2, kPciCommandMemory);
  EXPECT_FALSE(bus_->mapped_bar_address(2, 0));
  EXPECT_TRUE(reaches(mmio_, 0xc0001000, *first->handlers[0], 0x1000));
  // Onto the ECAM window, and onto the top of the address space.
  ecam_write(0, 2, 0, 0x10, 4, 0xe0000000);
  EXPECT_FALSE(bus_->mapped_bar_address(2, 0));
  EXPECT_EQ(ecam_read(0, 0, 0, 0, 4), 0x00081b36u);  // ECAM still answers
  ecam_write(0, 2, 0, 0x10, 4, 0xfffff000);
  EXPECT_EQ(bus_->mapped_bar_address(2, 0), 0xfffff000u);
  // Moved somewhere free, it maps.
  ecam_write(0, 2, 0, 0x10, 4, 0xc0002000);
  EXPECT_EQ(bus_->mapped_bar_address(2, 0), 0xc0002000u);
  EXPECT_TRUE(reaches(mmio_, 0xc0002004, *second->handlers[0], 4));
  EXPECT_TRUE(reaches(mmio_, 0xc0001000, *first->handlers[0], 0x1000));
}

TEST_F(PciBusTest, Mem64BarAtTheTopOfTheAddressSpaceIsRefused) {
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(device->add_bar(0, 0x2000, BarKind::Mem64));
  ASSERT_TRUE(bus_->add_device(device, 1));
  // Ends exactly at 2^64, which the IoBus cannot represent: not mapped.
  ecam_write(0, 1, 0, 0x10, 4, 0xffffe000);
  ecam_write(0, 1, 0, 0x14, 4, 0xffffffff);
  ecam_write(0, 1, 0, kPciCommandOffset, 2, kPciCommandMemory);
  EXPECT_EQ(device->config().bar_address(0), 0xffff'ffff'ffff'e000u);
  EXPECT_FALSE(bus_->mapped_bar_address(1, 0));
  // Moved back into the window, it maps.
  ecam_write(0, 1, 0, 0x14, 4, 0x00000010);
  EXPECT_EQ(bus_->mapped_bar_address(1, 0), 0x10'ffff'e000u);
}

TEST_F(PciBusTest, RemovingADeviceUnmapsItsBars) {
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(device->add_bar(0, 0x1000, BarKind::Mem32));
  ASSERT_TRUE(bus_->add_device(device, 9));
  ecam_write(0, 9, 0, 0x10, 4, 0xc0004000);
  ecam_write(0, 9, 0, kPciCommandOffset, 2, kPciCommandMemory);
  ASSERT_TRUE(reaches(mmio_, 0xc0004000, *device->handlers[0], 0));
  ASSERT_TRUE(bus_->remove_device(9));
  EXPECT_FALSE(reaches(mmio_, 0xc0004000, *device->handlers[0], 0));
  // Plugged in again with its BAR programmed and decode on, it maps at once.
  ASSERT_TRUE(bus_->add_device(device, 10));
  EXPECT_TRUE(reaches(mmio_, 0xc0004000, *device->handlers[0], 0));
  // Added where its BAR collides with something mapped: refused, left unplugged.
  auto twin = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(twin->add_bar(0, 0x1000, BarKind::Mem32));
  twin->config().set_bar_address(0, 0xc0004000);
  twin->config().set_command(kPciCommandMemory);
  EXPECT_FALSE(bus_->add_device(twin, 11));
  EXPECT_EQ(bus_->device(11), nullptr);
  EXPECT_TRUE(reaches(mmio_, 0xc0004000, *device->handlers[0], 0));
}

TEST_F(PciBusTest, AssignBarsPlacesEverythingAlignedAndApart) {
  std::vector<std::shared_ptr<FakePciDevice>> devices;
  for (int i = 0; i < 4; ++i) {
    auto device = std::make_shared<FakePciDevice>();
    ASSERT_TRUE(device->add_bar(0, 0x1000, BarKind::Mem32));
    ASSERT_TRUE(device->add_bar(1, 32 << i, BarKind::Io));
    ASSERT_TRUE(device->add_bar(2, uint64_t{0x4000} << (3 * i), BarKind::Mem64, Prefetchable::Yes));
    ASSERT_TRUE(device->add_bar(4, uint64_t{0x100000} >> i, BarKind::Mem32));
    ASSERT_TRUE(bus_->add_device(device));
    devices.push_back(device);
  }
  ASSERT_TRUE(bus_->assign_bars());

  struct Placed {
    uint64_t base;
    uint64_t size;
    BarKind kind;
  };
  std::vector<Placed> placed;
  for (size_t i = 0; i < devices.size(); ++i) {
    PciConfigSpace& config = devices[i]->config();
    EXPECT_TRUE(config.memory_decode_enabled());
    EXPECT_TRUE(config.io_decode_enabled());
    EXPECT_FALSE(config.bus_master_enabled());  // left to the driver
    for (int bar : {0, 1, 2, 4}) {
      const PciBar info = *config.bar(bar);
      const uint64_t base = config.bar_address(bar);
      SCOPED_TRACE(::testing::Message()
                   << "device " << i << " BAR " << bar << " at " << std::hex << base);
      EXPECT_EQ(base % info.size_bytes, 0u);
      switch (info.kind) {
        case BarKind::Io:
          EXPECT_GE(base, kIoWindowBase);
          EXPECT_LE(base + info.size_bytes, kIoWindowBase + kIoWindowSize);
          break;
        case BarKind::Mem32:
          EXPECT_GE(base, layout::kPciMmio32Start);
          EXPECT_LE(base + info.size_bytes, layout::kPciMmio32Start + layout::kPciMmio32Size);
          break;
        case BarKind::Mem64:
          EXPECT_GE(base, kMmio64Base);
          EXPECT_LE(base + info.size_bytes, kMmio64Base + layout::kPciMmio64Size);
          break;
      }
      EXPECT_EQ(bus_->mapped_bar_address(static_cast<uint8_t>(i + 1), bar), base);
      EXPECT_TRUE(reaches(info.kind == BarKind::Io ? pio_ : mmio_, base + info.size_bytes - 4,
                          *devices[i]->handlers[bar], info.size_bytes - 4));
      placed.push_back({base, info.size_bytes, info.kind});
    }
  }
  for (size_t a = 0; a < placed.size(); ++a) {
    for (size_t b = a + 1; b < placed.size(); ++b) {
      if ((placed[a].kind == BarKind::Io) != (placed[b].kind == BarKind::Io)) continue;
      const bool apart = placed[a].base + placed[a].size <= placed[b].base ||
                         placed[b].base + placed[b].size <= placed[a].base;
      EXPECT_TRUE(apart) << std::hex << placed[a].base << " and " << placed[b].base;
    }
  }
  // The guest sees the same through config space: BAR 0 of the first device.
  EXPECT_EQ(ecam_read(0, 1, 0, 0x10, 4), devices[0]->config().bar_address(0));

  // Assigning again (say after a guest moved things) starts over cleanly.
  ecam_write(0, 1, 0, 0x10, 4, 0xc1230000);
  ASSERT_TRUE(bus_->assign_bars());
  EXPECT_NE(devices[0]->config().bar_address(0), 0xc1230000u);
}

TEST_F(PciBusTest, AssignBarsReportsAFullWindow) {
  IoBus mmio("mmio");
  IoBus pio("pio");
  PciBus small(mmio, pio,
               PciWindows{.mmio32_base = 0xc0000000,
                          .mmio32_size_bytes = 0x3000,
                          .io_base = 0x1000,
                          .io_size_bytes = 0x100});
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(device->add_bar(0, 0x2000, BarKind::Mem32));
  ASSERT_TRUE(device->add_bar(1, 0x1000, BarKind::Mem64));  // no 64-bit window: goes low
  ASSERT_TRUE(small.add_device(device));
  ASSERT_TRUE(small.assign_bars());
  EXPECT_EQ(device->config().bar_address(0), 0xc0000000u);
  EXPECT_EQ(device->config().bar_address(1), 0xc0002000u);

  auto another = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(another->add_bar(0, 0x1000, BarKind::Mem32));
  ASSERT_TRUE(small.add_device(another));
  auto full = small.assign_bars();
  ASSERT_FALSE(full);
  EXPECT_EQ(full.error().code(), Errc::OutOfRange);
}

TEST_F(PciBusTest, ConcurrentConfigAccessesAreSafe) {
  auto device = std::make_shared<FakePciDevice>();
  ASSERT_TRUE(device->add_bar(0, 0x1000, BarKind::Mem32));
  ASSERT_TRUE(bus_->add_device(device, 1));
  std::vector<std::thread> threads;
  threads.reserve(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([this, t] {
      for (int i = 0; i < 500; ++i) {
        const uint32_t base = 0xc0000000u + 0x1000u * static_cast<uint32_t>((t * 500 + i) % 64);
        ecam_write(0, 1, 0, 0x10, 4, base);
        ecam_write(0, 1, 0, kPciCommandOffset, 2, (i & 1) ? kPciCommandMemory : 0);
        (void)ecam_read(0, 1, 0, 0x00, 4);
        std::array<std::byte, 4> data{};
        mmio_.read(base, data);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  ecam_write(0, 1, 0, kPciCommandOffset, 2, 0);
  EXPECT_FALSE(bus_->mapped_bar_address(1, 0));
}

}  // namespace
}  // namespace keel::devices
