#include "devices/pci/pci_config_space.h"

#include <gtest/gtest.h>

#include <array>
#include <cstddef>

#include "pci_test_support.h"

namespace keel::devices {
namespace {

using testing::config_read;
using testing::config_write;
using testing::test_header;

TEST(PciConfigSpaceTest, HeaderFieldsAtTheirOffsets) {
  PciConfigSpace config(test_header());
  EXPECT_EQ(config_read(config, kPciVendorIdOffset, 2), 0x1af4u);
  EXPECT_EQ(config_read(config, kPciDeviceIdOffset, 2), 0x1042u);
  EXPECT_EQ(config_read(config, 0x00, 4), 0x10421af4u);
  EXPECT_EQ(config_read(config, kPciRevisionIdOffset, 1), 0x01u);
  EXPECT_EQ(config_read(config, 0x08, 4),
            0x01000001u);  // class 01, subclass 00, prog-if 00, rev 01
  EXPECT_EQ(config_read(config, kPciHeaderTypeOffset, 1), 0x00u);
  EXPECT_EQ(config_read(config, kPciSubsystemVendorIdOffset, 2), 0x1af4u);
  EXPECT_EQ(config_read(config, kPciSubsystemIdOffset, 2), 0x0002u);
  EXPECT_EQ(config_read(config, kPciInterruptPinOffset, 1), 1u);
  EXPECT_EQ(config_read(config, kPciCapabilitiesPointerOffset, 1), 0u);
  EXPECT_EQ(config_read(config, kPciStatusOffset, 2) & kPciStatusCapabilities, 0u);
  EXPECT_EQ(config_read(config, kPciExpansionRomOffset, 4), 0u);
  EXPECT_EQ(config_read(config, 0x100, 4), 0u);  // no extended capabilities
  // Unaligned but within one dword.
  EXPECT_EQ(config_read(config, 0x01, 2), 0x421au);
  EXPECT_EQ(config_read(config, 0x03, 1), 0x10u);
}

TEST(PciConfigSpaceTest, ReadOnlyFieldsIgnoreWrites) {
  PciConfigSpace config(test_header());
  std::array<uint32_t, 16> before{};
  for (uint32_t i = 0; i < 16; ++i) before[i] = config_read(config, 4 * i, 4);
  for (uint32_t offset : {0x00u, 0x08u, 0x0cu, 0x10u, 0x24u, 0x2cu, 0x30u, 0x34u}) {
    EXPECT_TRUE(config_write(config, offset, 4, 0xffffffff));
  }
  config_write(config, kPciInterruptPinOffset, 1, 0x04);
  config_write(config, kPciHeaderTypeOffset, 1, 0x80);
  EXPECT_EQ(config_read(config, 0x00, 4), before[0]);
  EXPECT_EQ(config_read(config, 0x08, 4), before[2]);
  EXPECT_EQ(config_read(config, kPciHeaderTypeOffset, 1), 0u);
  EXPECT_EQ(config_read(config, 0x10, 4), 0u);  // no BAR defined
  EXPECT_EQ(config_read(config, 0x24, 4), 0u);
  EXPECT_EQ(config_read(config, 0x2c, 4), before[11]);
  EXPECT_EQ(config_read(config, 0x30, 4), 0u);
  EXPECT_EQ(config_read(config, 0x34, 4), 0u);
  EXPECT_EQ(config_read(config, kPciInterruptPinOffset, 1), 1u);
  // Cache line size (0x0c) is storage; latency timer, header type, BIST are not.
  EXPECT_EQ(config_read(config, 0x0c, 4), 0x000000ffu);
}

TEST(PciConfigSpaceTest, CommandKeepsOnlyImplementedBits) {
  PciConfigSpace config(test_header());
  EXPECT_TRUE(config_write(config, kPciCommandOffset, 2, 0xffff));
  const uint16_t expected = kPciCommandIo | kPciCommandMemory | kPciCommandBusMaster |
                            kPciCommandParityErrorResponse | kPciCommandSerr |
                            kPciCommandInterruptDisable;
  EXPECT_EQ(config.command(), expected);
  EXPECT_TRUE(config.io_decode_enabled());
  EXPECT_TRUE(config.memory_decode_enabled());
  EXPECT_TRUE(config.bus_master_enabled());
  config_write(config, kPciCommandOffset, 1, 0x00);  // low byte only
  EXPECT_EQ(config.command(), kPciCommandSerr | kPciCommandInterruptDisable);
  config.set_command(kPciCommandMemory | 0x0080);  // 0x80 is hardwired
  EXPECT_EQ(config.command(), kPciCommandMemory);
}

TEST(PciConfigSpaceTest, InterruptLineIsWritable) {
  PciConfigSpace config(test_header());
  config_write(config, kPciInterruptLineOffset, 1, 11);
  EXPECT_EQ(config_read(config, kPciInterruptLineOffset, 1), 11u);
  // A dword write across line, pin, min_gnt, max_lat only changes the line.
  config_write(config, kPciInterruptLineOffset, 4, 0xffffff05);
  EXPECT_EQ(config_read(config, kPciInterruptLineOffset, 4), 0x00000105u);
}

TEST(PciConfigSpaceTest, StatusErrorBitsAreWriteOneToClear) {
  PciConfigSpace config(test_header());
  const uint16_t errors = kPciStatusMasterDataParityError | kPciStatusSignaledTargetAbort |
                          kPciStatusReceivedTargetAbort | kPciStatusReceivedMasterAbort |
                          kPciStatusSignaledSystemError | kPciStatusDetectedParityError;
  config.set_u16(kPciStatusOffset, errors | kPciStatusCapabilities | kPciStatusInterrupt);
  // Writing zeros changes nothing.
  config_write(config, kPciStatusOffset, 2, 0);
  EXPECT_EQ(config.status(), errors | kPciStatusCapabilities | kPciStatusInterrupt);
  // Writing 1 clears just that bit; read-only bits survive a 1.
  config_write(config, kPciStatusOffset, 2,
               kPciStatusReceivedMasterAbort | kPciStatusCapabilities | kPciStatusInterrupt);
  EXPECT_EQ(config.status(), (errors & ~kPciStatusReceivedMasterAbort) | kPciStatusCapabilities |
                                 kPciStatusInterrupt);
  // A dword write at 0x04 writes command and status together.
  config_write(config, kPciCommandOffset, 4, 0xffff0002);
  EXPECT_EQ(config.status(), kPciStatusCapabilities | kPciStatusInterrupt);
  EXPECT_EQ(config.command(), kPciCommandMemory);
  // Writing 1s to the command register did not clear anything in it.
  config.set_interrupt_status(false);
  EXPECT_EQ(config.status(), kPciStatusCapabilities);
}

TEST(PciConfigSpaceTest, IoBarSizing) {
  PciConfigSpace config(test_header());
  ASSERT_TRUE(config.add_bar(0, 32, BarKind::Io));
  EXPECT_EQ(config_read(config, 0x10, 4), 0x00000001u);
  config_write(config, 0x10, 4, 0xffffffff);
  // 32 bytes: bits 4:0 hardwired, bit 0 = I/O; a 16-bit port decoder.
  EXPECT_EQ(config_read(config, 0x10, 4), 0x0000ffe1u);
  config_write(config, 0x10, 4, 0x0000c040);
  EXPECT_EQ(config_read(config, 0x10, 4), 0x0000c041u);
  EXPECT_EQ(config.bar_address(0), 0xc040u);
  EXPECT_EQ(config.bar(0), (PciBar{BarKind::Io, 32, Prefetchable::No}));
}

TEST(PciConfigSpaceTest, Mem32BarSizingWithPrefetchableBit) {
  PciConfigSpace config(test_header());
  ASSERT_TRUE(config.add_bar(1, 0x1000, BarKind::Mem32, Prefetchable::Yes));
  ASSERT_TRUE(config.add_bar(2, 0x100000, BarKind::Mem32));
  EXPECT_EQ(config_read(config, 0x14, 4), 0x00000008u);
  config_write(config, 0x14, 4, 0xffffffff);
  config_write(config, 0x18, 4, 0xffffffff);
  EXPECT_EQ(config_read(config, 0x14, 4), 0xfffff008u);
  EXPECT_EQ(config_read(config, 0x18, 4), 0xfff00000u);
  // Byte-wise sizing, as some OSes do for the low byte.
  config_write(config, 0x14, 4, 0);
  config_write(config, 0x15, 1, 0xff);
  EXPECT_EQ(config_read(config, 0x14, 4), 0x0000f008u);
  config_write(config, 0x14, 4, 0xc0001234);
  EXPECT_EQ(config.bar_address(1), 0xc0001000u);
}

TEST(PciConfigSpaceTest, Mem64BarSizingUsesBothHalves) {
  PciConfigSpace config(test_header());
  ASSERT_TRUE(config.add_bar(2, 0x4000, BarKind::Mem64, Prefetchable::Yes));
  ASSERT_TRUE(config.add_bar(4, uint64_t{8} << 30, BarKind::Mem64));
  EXPECT_EQ(config_read(config, 0x18, 4), 0x0000000cu);  // 64-bit, prefetchable
  EXPECT_EQ(config_read(config, 0x20, 4), 0x00000004u);
  EXPECT_FALSE(config.bar(3).has_value());  // upper half of BAR 2
  EXPECT_FALSE(config.bar(5).has_value());
  for (uint32_t offset = 0x18; offset <= 0x24; offset += 4) config_write(config, offset, 4, ~0u);
  EXPECT_EQ(config_read(config, 0x18, 4), 0xffffc00cu);
  EXPECT_EQ(config_read(config, 0x1c, 4), 0xffffffffu);
  // 8 GiB: nothing sticks in the low half, bit 33 and up in the high half.
  EXPECT_EQ(config_read(config, 0x20, 4), 0x00000004u);
  EXPECT_EQ(config_read(config, 0x24, 4), 0xfffffffeu);
  config_write(config, 0x18, 4, 0x00008000);
  config_write(config, 0x1c, 4, 0x00000010);
  EXPECT_EQ(config.bar_address(2), 0x1000008000u);
  config.set_bar_address(4, 0x4'0000'0000);
  EXPECT_EQ(config.bar_address(4), 0x4'0000'0000u);
  EXPECT_EQ(config_read(config, 0x20, 4), 0x00000004u);
  EXPECT_EQ(config_read(config, 0x24, 4), 0x00000004u);
}

TEST(PciConfigSpaceTest, BadBarDefinitionsAreErrors) {
  PciConfigSpace config(test_header());
  EXPECT_FALSE(config.add_bar(-1, 0x1000, BarKind::Mem32));
  EXPECT_FALSE(config.add_bar(6, 0x1000, BarKind::Mem32));
  EXPECT_FALSE(config.add_bar(5, 0x1000, BarKind::Mem64));  // needs slot 6
  EXPECT_FALSE(config.add_bar(0, 0x1800, BarKind::Mem32));  // not a power of two
  EXPECT_FALSE(config.add_bar(0, 0, BarKind::Mem32));
  EXPECT_FALSE(config.add_bar(0, 8, BarKind::Mem32));  // below 16
  EXPECT_FALSE(config.add_bar(0, uint64_t{4} << 30, BarKind::Mem32));
  EXPECT_FALSE(config.add_bar(0, 512, BarKind::Io));  // above 256
  EXPECT_FALSE(config.add_bar(0, 2, BarKind::Io));
  EXPECT_FALSE(config.add_bar(0, 16, BarKind::Io, Prefetchable::Yes));
  ASSERT_TRUE(config.add_bar(0, 0x1000, BarKind::Mem64));
  auto taken = config.add_bar(1, 0x1000, BarKind::Mem32);
  ASSERT_FALSE(taken);
  EXPECT_EQ(taken.error().code(), Errc::Busy);
  EXPECT_FALSE(config.add_bar(0, 0x1000, BarKind::Mem32));
  EXPECT_TRUE(config.add_bar(2, 0x1000, BarKind::Mem32));
  EXPECT_EQ(config.bar_address(6), 0u);
  EXPECT_FALSE(config.bar(-3).has_value());
}

TEST(PciConfigSpaceTest, CapabilityChainWalk) {
  PciConfigSpace config(test_header());
  const std::array<std::byte, 3> odd{std::byte{1}, std::byte{2}, std::byte{3}};
  const std::array<std::byte, 14> vendor{std::byte{16}};
  auto first = config.add_capability(kPciCapabilityVendor, odd);
  auto second = config.add_capability(kPciCapabilityMsix, {});
  auto third = config.add_capability(kPciCapabilityVendor, vendor);
  ASSERT_TRUE(first && second && third);
  EXPECT_EQ(*first, 0x40);
  EXPECT_EQ(*second, 0x48);  // 0x40 + 5 bytes, rounded up to a dword
  EXPECT_EQ(*third, 0x4c);
  EXPECT_NE(config_read(config, kPciStatusOffset, 2) & kPciStatusCapabilities, 0u);

  // Walk it the way an OS does: pointer at 0x34, low two bits masked.
  std::vector<std::pair<uint32_t, uint32_t>> found;  // offset, id
  uint32_t pointer = config_read(config, kPciCapabilitiesPointerOffset, 1) & ~3u;
  while (pointer != 0 && found.size() < 48) {
    found.push_back({pointer, config_read(config, pointer, 1)});
    pointer = config_read(config, pointer + 1, 1) & ~3u;
  }
  const std::vector<std::pair<uint32_t, uint32_t>> expected{
      {0x40, kPciCapabilityVendor}, {0x48, kPciCapabilityMsix}, {0x4c, kPciCapabilityVendor}};
  EXPECT_EQ(found, expected);
  EXPECT_EQ(config_read(config, 0x42, 2), 0x0201u);
  EXPECT_EQ(config_read(config, 0x44, 1), 0x03u);
  EXPECT_EQ(config_read(config, 0x4e, 1), 16u);
  // Capabilities are read-only unless the device says otherwise.
  config_write(config, 0x40, 4, 0xffffffff);
  EXPECT_EQ(config_read(config, 0x40, 4), 0x02014809u);
  config.set_write_mask(0x44, 1, 0x0f);
  config_write(config, 0x44, 1, 0xff);
  EXPECT_EQ(config_read(config, 0x44, 1), 0x0fu);
}

TEST(PciConfigSpaceTest, CapabilitiesStopBelowExtendedSpace) {
  PciConfigSpace config(test_header());
  const std::array<std::byte, 62> big{};
  int added = 0;
  while (config.add_capability(kPciCapabilityVendor, big)) ++added;
  EXPECT_EQ(added, 3);  // 0x40, 0x80, 0xc0: each takes 64 bytes
  auto overflow = config.add_capability(kPciCapabilityVendor, big);
  ASSERT_FALSE(overflow);
  EXPECT_EQ(overflow.error().code(), Errc::OutOfRange);
  const std::array<std::byte, 300> huge{};
  EXPECT_FALSE(PciConfigSpace(test_header()).add_capability(kPciCapabilityVendor, huge));
  EXPECT_EQ(config_read(config, 0xc1, 1), 0u);  // the chain still ends
}

TEST(PciConfigSpaceTest, HostileAccessesAreHarmless) {
  PciConfigSpace config(test_header());
  ASSERT_TRUE(config.add_bar(0, 0x1000, BarKind::Mem32));
  std::vector<uint32_t> before;
  for (uint32_t offset = 0; offset < kPciConfigSpaceSizeBytes; offset += 4) {
    before.push_back(config_read(config, offset, 4));
  }
  std::array<std::byte, 8> wide{};
  wide.fill(std::byte{0});
  struct Access {
    uint32_t offset;
    size_t size;
  };
  for (Access access : {Access{0xfff, 4}, Access{0xffe, 4}, Access{0xfff, 2}, Access{0x1000, 1},
                        Access{0xffffffff, 4}, Access{0x02, 4}, Access{0x03, 2}, Access{0x10, 3},
                        Access{0x10, 8}, Access{0x10, 0}, Access{0x11, 4}}) {
    std::array<std::byte, 8> out{};
    config.read(access.offset, std::span(out).first(access.size));
    for (size_t i = 0; i < access.size; ++i) EXPECT_EQ(out[i], std::byte{0xff});
    EXPECT_FALSE(config.write(access.offset, std::span(wide).first(access.size)));
  }
  EXPECT_EQ(config_read(config, 0xfff, 1), 0u);  // a byte at the very end is fine
  EXPECT_TRUE(config_write(config, 0xffc, 4, 0xffffffff));
  for (uint32_t offset = 0; offset < kPciConfigSpaceSizeBytes; offset += 4) {
    EXPECT_EQ(config_read(config, offset, 4), before[offset / 4]) << offset;
  }
}

// Snapshots: a restore takes what the guest could write (BAR address,
// command) and nothing else, so hostile bytes cannot change the identity.
TEST(PciConfigSpaceTest, RestoreTakesOnlyGuestWritableBits) {
  PciConfigSpace config(test_header());
  ASSERT_TRUE(config.add_bar(0, 0x1000, BarKind::Mem32));
  config_write(config, kPciBar0Offset, 4, 0xfebf1000);
  config_write(config, kPciCommandOffset, 2, kPciCommandMemory | kPciCommandBusMaster);
  const PciConfigBytes saved = config.save();
  EXPECT_EQ(saved[kPciVendorIdOffset], 0xf4);

  PciConfigSpace fresh(test_header());
  ASSERT_TRUE(fresh.add_bar(0, 0x1000, BarKind::Mem32));
  PciConfigBytes hostile = saved;
  hostile[kPciVendorIdOffset] = 0x00;        // identity: read-only
  hostile[kPciBar0Offset] = 0xff;            // below the BAR's size: read-only
  hostile[kPciInterruptPinOffset] = 0x04;    // read-only
  fresh.restore_writable(hostile);
  EXPECT_EQ(fresh.bar_address(0), 0xfebf1000u);
  EXPECT_TRUE(fresh.memory_decode_enabled());
  EXPECT_TRUE(fresh.bus_master_enabled());
  EXPECT_EQ(config_read(fresh, kPciVendorIdOffset, 2), 0x1af4u);
  EXPECT_EQ(config_read(fresh, kPciInterruptPinOffset, 1), 1u);
  EXPECT_EQ(fresh.save(), saved);
}

}  // namespace
}  // namespace keel::devices
