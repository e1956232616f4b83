#include "devices/pci/msix_capability.h"

#include <gtest/gtest.h>

#include "pci_test_support.h"

namespace keel::devices {
namespace {

using testing::config_read;
using testing::config_write;
using testing::test_header;

TEST(MsixCapabilityTest, LayoutAndWritableBits) {
  PciConfigSpace config(test_header());
  ASSERT_TRUE(config.add_bar(0, 0x4000, BarKind::Mem32));
  auto offset = add_msix_capability(config, {.table_size = 3,
                                             .table_bar = 0,
                                             .table_offset = 0x2000,
                                             .pba_bar = 0,
                                             .pba_offset = 0x3000});
  ASSERT_TRUE(offset);
  EXPECT_EQ(config_read(config, kPciCapabilitiesPointerOffset, 1), *offset);
  EXPECT_EQ(config_read(config, *offset, 4), 0x00020011u);  // N-1 = 2, next 0, ID 11h
  EXPECT_EQ(config_read(config, *offset + 4u, 4), 0x00002000u);
  EXPECT_EQ(config_read(config, *offset + 8u, 4), 0x00003000u);
  EXPECT_FALSE(msix_enabled(config, *offset));

  config_write(config, *offset + 2u, 2, 0xffff);
  EXPECT_EQ(config_read(config, *offset + 2u, 2), 0xc002u);  // table size stays read-only
  EXPECT_TRUE(msix_enabled(config, *offset));
  EXPECT_TRUE(msix_function_masked(config, *offset));
  config_write(config, *offset + 4u, 4, 0xffffffff);
  EXPECT_EQ(config_read(config, *offset + 4u, 4), 0x00002000u);
}

TEST(MsixCapabilityTest, RejectsBadLayouts) {
  PciConfigSpace config(test_header());
  ASSERT_TRUE(config.add_bar(0, 0x1000, BarKind::Mem32));
  ASSERT_TRUE(config.add_bar(1, 16, BarKind::Io));
  const MsixCapability good{
      .table_size = 4, .table_bar = 0, .table_offset = 0, .pba_bar = 0, .pba_offset = 0x800};
  auto with = [&](auto change) {
    MsixCapability msix = good;
    change(msix);
    return add_msix_capability(config, msix).has_value();
  };
  EXPECT_FALSE(with([](MsixCapability& m) { m.table_size = 0; }));
  EXPECT_FALSE(with([](MsixCapability& m) { m.table_size = 2049; }));
  EXPECT_FALSE(with([](MsixCapability& m) { m.table_bar = 1; }));  // I/O BAR
  EXPECT_FALSE(with([](MsixCapability& m) { m.table_bar = 2; }));  // undefined
  EXPECT_FALSE(with([](MsixCapability& m) { m.table_bar = 7; }));
  EXPECT_FALSE(with([](MsixCapability& m) { m.pba_offset = 0x804; }));
  EXPECT_FALSE(with([](MsixCapability& m) { m.table_offset = 0xff8; }));  // past the BAR
  EXPECT_FALSE(with([](MsixCapability& m) { m.table_size = 257; }));      // 4 KiB + 16
  EXPECT_EQ(config_read(config, kPciCapabilitiesPointerOffset, 1), 0u);
  EXPECT_TRUE(with([](MsixCapability&) {}));
}

}  // namespace
}  // namespace keel::devices
