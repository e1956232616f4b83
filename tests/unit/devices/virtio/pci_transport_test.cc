// The virtio-pci transport, driven the way Linux's virtio_pci_modern does:
// through the real PciBus (ECAM for configuration, the MMIO bus for BAR 0).
#include "devices/virtio/pci_transport.h"

#include "devices/pci/msix_capability.h"

#include <gtest/gtest.h>

#include "../pci/pci_bus_fixture.h"
#include "fake_device.h"
#include "fake_virtqueue.h"

namespace keel::devices::virtio {
namespace {

using devices::testing::PciBusFixture;
using testing::FakeDevice;
using testing::FakeFabric;
using L = VirtioPciLayout;

class VirtioPciTest : public PciBusFixture {
 protected:
  void SetUp() override {
    loop_ = std::move(*EventLoop::create());
    device_ = std::make_shared<FakeDevice>();
    auto created = VirtioPci::create(device_, memory_, fabric_, *loop_);
    ASSERT_TRUE(created) << created.error().message();
    pci_ = *created;
    slot_ = *bus_->add_device(pci_);
    ASSERT_TRUE(bus_->assign_bars());
    bar_ = *bus_->mapped_bar_address(slot_, 0);
    // Linux sets bus mastering (a command write) before using the device.
    cfg_write(kPciCommandOffset, 2, kPciCommandMemory | kPciCommandBusMaster);
  }

  // The bus (in the base fixture) outlives these members: unplug first.
  void TearDown() override {
    if (bus_->device(slot_)) (void)bus_->remove_device(slot_);
    pci_.reset();
  }

  uint32_t cfg_read(uint32_t reg, size_t size) { return conf1_read(0, slot_, 0, reg, size); }
  void cfg_write(uint32_t reg, size_t size, uint32_t value) {
    conf1_write(0, slot_, 0, reg, size, value);
  }
  uint64_t bar_read(uint64_t offset, size_t size) {
    std::array<std::byte, 8> data{};
    EXPECT_TRUE(mmio_.read(bar_ + offset, std::span(data).first(size)));
    uint64_t value = 0;
    std::memcpy(&value, data.data(), size);
    return value;
  }
  void bar_write(uint64_t offset, size_t size, uint64_t value) {
    std::array<std::byte, 8> data{};
    std::memcpy(data.data(), &value, size);
    EXPECT_TRUE(mmio_.write(bar_ + offset, std::span(data).first(size)));
  }
  uint8_t status() { return static_cast<uint8_t>(bar_read(0x14, 1)); }

  // Finds the vendor capability of cfg_type; returns its config offset.
  std::optional<uint32_t> find_virtio_cap(uint8_t type) {
    uint32_t at = cfg_read(kPciCapabilitiesPointerOffset, 1);
    for (int guard = 0; at != 0 && guard < 48; ++guard) {
      if (cfg_read(at, 1) == kPciCapabilityVendor && cfg_read(at + 3, 1) == type) return at;
      at = cfg_read(at + 1, 1);
    }
    return std::nullopt;
  }

  // FEATURES_OK with VERSION_1 plus extra_low, then queue 0 at the fake
  // virtqueue's layout with vector 1, config vector 0.
  void negotiate(uint32_t extra_low = 0) {
    bar_write(0x14, 1, kStatusAcknowledge | kStatusDriver);
    bar_write(0x08, 4, 0);
    bar_write(0x0c, 4, extra_low);
    bar_write(0x08, 4, 1);
    bar_write(0x0c, 4, 1);  // VERSION_1 (bit 32)
    bar_write(0x14, 1, kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk);
  }
  void setup_queue0(uint64_t desc = 0x0000, uint64_t driver = 0x1000, uint64_t device = 0x2000) {
    bar_write(0x10, 2, 0);  // config_msix_vector
    bar_write(0x16, 2, 0);  // queue_select
    bar_write(0x18, 2, 16);
    bar_write(0x1a, 2, 1);  // queue_msix_vector
    bar_write(0x20, 4, desc);
    bar_write(0x24, 4, 0);
    bar_write(0x28, 8, driver);
    bar_write(0x30, 8, device);
    bar_write(0x1c, 2, 1);
  }
  void driver_ok() {
    bar_write(0x14, 1, kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk | kStatusDriverOk);
  }
  void enable_msix() {
    const uint32_t msix = find_cap(kPciCapabilityMsix);
    cfg_write(msix + 2, 2, kMsixEnable);
  }
  uint32_t find_cap(uint8_t id) {
    uint32_t at = cfg_read(kPciCapabilitiesPointerOffset, 1);
    while (at != 0 && cfg_read(at, 1) != id) at = cfg_read(at + 1, 1);
    return at;
  }
  void program_vector(uint16_t vector, uint64_t address, uint32_t data, bool masked) {
    const uint64_t entry = L::kMsixTableOffset + 16ull * vector;
    bar_write(entry + 12, 4, 1);  // mask while programming, as Linux does
    bar_write(entry, 4, address & 0xffffffff);
    bar_write(entry + 4, 4, address >> 32);
    bar_write(entry + 8, 4, data);
    bar_write(entry + 12, 4, masked ? 1 : 0);
  }

  memory::GuestMemory memory_ = testing::make_test_memory();
  FakeFabric fabric_;
  std::unique_ptr<EventLoop> loop_;
  std::shared_ptr<FakeDevice> device_;
  std::shared_ptr<VirtioPci> pci_;
  uint8_t slot_ = 0;
  uint64_t bar_ = 0;
};

TEST_F(VirtioPciTest, PresentsModernIdentity) {
  EXPECT_EQ(cfg_read(kPciVendorIdOffset, 2), 0x1af4u);
  EXPECT_EQ(cfg_read(kPciDeviceIdOffset, 2), 0x1044u);  // 0x1040 + entropy (4)
  EXPECT_GE(cfg_read(kPciRevisionIdOffset, 1), 1u);
  EXPECT_EQ(cfg_read(kPciSubsystemVendorIdOffset, 2), 0x1af4u);
  EXPECT_NE(cfg_read(kPciStatusOffset, 2) & kPciStatusCapabilities, 0u);
  EXPECT_EQ(fabric_.allocated, 3u);  // one vector per queue plus configuration
}

TEST_F(VirtioPciTest, CapabilitiesDescribeTheBar) {
  struct Expected {
    uint8_t type;
    uint32_t offset;
    uint32_t min_length;
  };
  for (Expected expected : {Expected{kCapCommon, 0x0000, 0x38}, Expected{kCapIsr, 0x1000, 1},
                            Expected{kCapDevice, 0x2000, 8}, Expected{kCapNotify, 0x3000, 8}}) {
    auto at = find_virtio_cap(expected.type);
    ASSERT_TRUE(at) << "cfg_type " << int(expected.type);
    EXPECT_EQ(cfg_read(*at + 4, 1), 0u) << "bar";
    EXPECT_EQ(cfg_read(*at + 8, 4), expected.offset);
    EXPECT_GE(cfg_read(*at + 12, 4), expected.min_length);
  }
  auto notify = find_virtio_cap(kCapNotify);
  EXPECT_EQ(cfg_read(*notify + 2, 1), 20u);       // cap_len
  EXPECT_EQ(cfg_read(*notify + 16, 4), 4u);       // notify_off_multiplier
  EXPECT_TRUE(find_virtio_cap(kCapPciCfg));
  const uint32_t msix = find_cap(kPciCapabilityMsix);
  ASSERT_NE(msix, 0u);
  EXPECT_EQ(cfg_read(msix + 2, 2) & 0x7ff, 2u);  // table size 3, encoded N-1
}

TEST_F(VirtioPciTest, OffersDeviceAndTransportFeatures) {
  bar_write(0x00, 4, 0);
  const uint64_t low = bar_read(0x04, 4);
  bar_write(0x00, 4, 1);
  const uint64_t high = bar_read(0x04, 4);
  const uint64_t features = low | (high << 32);
  EXPECT_EQ(features, (1u << 3) | kFeatureVersion1 | kFeatureIndirectDesc | kFeatureEventIdx);
  bar_write(0x00, 4, 7);
  EXPECT_EQ(bar_read(0x04, 4), 0u);
  EXPECT_EQ(bar_read(0x12, 2), 2u);  // num_queues
}

TEST_F(VirtioPciTest, AcceptsSubsetWithVersion1) {
  negotiate(1u << 3);
  EXPECT_NE(status() & kStatusFeaturesOk, 0);
}

TEST_F(VirtioPciTest, RefusesUnofferedFeaturesAndMissingVersion1) {
  negotiate(1u << 5);  // never offered
  EXPECT_EQ(status() & kStatusFeaturesOk, 0);
  bar_write(0x14, 1, 0);
  bar_write(0x14, 1, kStatusAcknowledge | kStatusDriver);
  bar_write(0x08, 4, 0);
  bar_write(0x0c, 4, 1u << 3);  // no VERSION_1
  bar_write(0x14, 1, kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk);
  EXPECT_EQ(status() & kStatusFeaturesOk, 0);
}

TEST_F(VirtioPciTest, DriverOkActivatesWithEnabledQueues) {
  negotiate(1u << 3);
  setup_queue0();
  driver_ok();
  EXPECT_EQ(device_->activations, 1);
  EXPECT_EQ(device_->features_accepted, (1u << 3) | kFeatureVersion1);
  EXPECT_EQ(device_->queues_present, (std::vector<bool>{true, false}));
  EXPECT_EQ(status() & kStatusNeedsReset, 0);
  // Queue fields read back; the second queue keeps its maximum size.
  bar_write(0x16, 2, 0);
  EXPECT_EQ(bar_read(0x18, 2), 16u);
  EXPECT_EQ(bar_read(0x28, 8), 0x1000u);
  EXPECT_EQ(bar_read(0x1e, 2), 0u);
  bar_write(0x16, 2, 1);
  EXPECT_EQ(bar_read(0x18, 2), 8u);
  EXPECT_EQ(bar_read(0x1e, 2), 1u);  // queue_notify_off
  bar_write(0x16, 2, 9);
  EXPECT_EQ(bar_read(0x18, 2), 0u);  // no such queue
}

TEST_F(VirtioPciTest, DoorbellIsRegisteredAtTheBarAndReachesTheDevice) {
  {
    std::lock_guard lock(fabric_.mutex);
    ASSERT_EQ(fabric_.doorbells.count(bar_ + L::kNotifyOffset), 1u);
    EXPECT_EQ(fabric_.doorbells[bar_ + L::kNotifyOffset].second, 2u);
    EXPECT_EQ(fabric_.doorbells.count(bar_ + L::kNotifyOffset + 4), 1u);
  }
  negotiate();
  setup_queue0();
  driver_ok();
  // A doorbell write that exited to userspace goes through the same eventfd.
  bar_write(L::kNotifyOffset, 2, 0);
  ASSERT_EQ(*loop_->run_once(1000), 1);
  std::lock_guard lock(device_->mutex);
  EXPECT_EQ(device_->notified, (std::vector<uint16_t>{0}));
}

TEST_F(VirtioPciTest, DoorbellsFollowTheBar) {
  const uint64_t moved = bar_ + 0x100000;
  cfg_write(kPciCommandOffset, 2, kPciCommandBusMaster);  // decode off
  {
    std::lock_guard lock(fabric_.mutex);
    EXPECT_TRUE(fabric_.doorbells.empty());
  }
  cfg_write(kPciBar0Offset, 4, static_cast<uint32_t>(moved));
  cfg_write(kPciCommandOffset, 2, kPciCommandMemory | kPciCommandBusMaster);
  std::lock_guard lock(fabric_.mutex);
  EXPECT_EQ(fabric_.doorbells.count(moved + L::kNotifyOffset), 1u);
  EXPECT_EQ(fabric_.doorbells.size(), 2u);
}

TEST_F(VirtioPciTest, QueueInterruptUsesItsVectorOnceUnmasked) {
  negotiate();
  setup_queue0();
  driver_ok();
  enable_msix();
  program_vector(1, 0xfee00000, 0x4041, /*masked=*/true);
  device_->interrupt->notify_queue(0);
  EXPECT_EQ(fabric_.triggered(1), 0);
  EXPECT_EQ(bar_read(L::kMsixPbaOffset, 8), 0b10u);  // vector 1 pending
  bar_write(L::kMsixTableOffset + 16 + 12, 4, 0);    // unmask
  EXPECT_EQ(fabric_.triggered(1), 1);
  EXPECT_EQ(bar_read(L::kMsixPbaOffset, 8), 0u);
  {
    std::lock_guard lock(fabric_.mutex);
    EXPECT_EQ(fabric_.messages[1], (MsiMessage{0xfee00000, 0x4041}));
  }
  device_->interrupt->notify_queue(0);
  EXPECT_EQ(fabric_.triggered(1), 2);
  EXPECT_EQ(bar_read(L::kMsixTableOffset + 16 + 8, 4), 0x4041u);
}

TEST_F(VirtioPciTest, FunctionMaskHoldsInterrupts) {
  negotiate();
  setup_queue0();
  driver_ok();
  program_vector(1, 0xfee00000, 0x30, false);
  const uint32_t msix = find_cap(kPciCapabilityMsix);
  cfg_write(msix + 2, 2, kMsixEnable | kMsixFunctionMask);
  device_->interrupt->notify_queue(0);
  EXPECT_EQ(fabric_.triggered(1), 0);
  cfg_write(msix + 2, 2, kMsixEnable);
  EXPECT_EQ(fabric_.triggered(1), 1);
}

TEST_F(VirtioPciTest, MaskedProgrammingCostsNoRouteUpdates) {
  enable_msix();
  program_vector(0, 0xfee00000, 0x31, /*masked=*/true);
  program_vector(1, 0xfee00000, 0x32, /*masked=*/true);
  std::lock_guard lock(fabric_.mutex);
  EXPECT_EQ(fabric_.route_updates, 0);
}

TEST_F(VirtioPciTest, ConfigChangeBumpsGenerationAndIsr) {
  negotiate();
  setup_queue0();
  driver_ok();
  enable_msix();
  program_vector(0, 0xfee00000, 0x50, false);
  const uint64_t generation = bar_read(0x15, 1);
  device_->interrupt->notify_config();
  EXPECT_EQ(bar_read(0x15, 1), (generation + 1) & 0xff);
  EXPECT_EQ(fabric_.triggered(0), 1);
  EXPECT_EQ(bar_read(L::kIsrOffset, 1), 2u);
  EXPECT_EQ(bar_read(L::kIsrOffset, 1), 0u);  // reading cleared it
}

TEST_F(VirtioPciTest, DeviceConfigSpaceIsForwarded) {
  EXPECT_EQ(bar_read(L::kDeviceOffset, 4), 0x04030201u);
  EXPECT_EQ(bar_read(L::kDeviceOffset + 4, 4), 0x08070605u);
  bar_write(L::kDeviceOffset, 2, 0xbbaa);
  EXPECT_EQ(bar_read(L::kDeviceOffset, 4), 0x0403bbaau);
  // Past the device's 8 bytes: nothing.
  EXPECT_EQ(bar_read(L::kDeviceOffset + 8, 4), 0u);
}

TEST_F(VirtioPciTest, WritingZeroResets) {
  negotiate();
  setup_queue0();
  driver_ok();
  ASSERT_EQ(device_->activations, 1);
  bar_write(0x14, 1, 0);
  EXPECT_EQ(status(), 0);
  EXPECT_EQ(device_->resets, 1);
  bar_write(0x16, 2, 0);
  EXPECT_EQ(bar_read(0x18, 2), 16u);
  EXPECT_EQ(bar_read(0x1c, 2), 0u);
  EXPECT_EQ(bar_read(0x1a, 2), kVirtioNoVector);
  EXPECT_EQ(bar_read(0x10, 2), kVirtioNoVector);
  // Set up again: the device activates a second time.
  negotiate();
  setup_queue0();
  driver_ok();
  EXPECT_EQ(device_->activations, 2);
}

TEST_F(VirtioPciTest, QueueOutsideRamNeedsReset) {
  negotiate();
  setup_queue0(/*desc=*/0x7fff'0000);
  enable_msix();
  program_vector(0, 0xfee00000, 0x60, false);
  driver_ok();
  EXPECT_EQ(device_->activations, 0);
  EXPECT_NE(status() & kStatusNeedsReset, 0);
  EXPECT_EQ(fabric_.triggered(0), 1);  // the configuration change notification
}

TEST_F(VirtioPciTest, BadQueueSizeNeedsReset) {
  negotiate();
  setup_queue0();
  bar_write(0x18, 2, 12);  // not a power of two
  driver_ok();
  EXPECT_EQ(device_->activations, 0);
  EXPECT_NE(status() & kStatusNeedsReset, 0);
}

TEST_F(VirtioPciTest, FailedActivationNeedsReset) {
  device_->fail_activation = true;
  negotiate();
  setup_queue0();
  driver_ok();
  EXPECT_NE(status() & kStatusNeedsReset, 0);
}

TEST_F(VirtioPciTest, QueueFieldsAreFrozenAfterDriverOk) {
  negotiate();
  setup_queue0();
  driver_ok();
  bar_write(0x16, 2, 0);
  bar_write(0x18, 2, 4);
  bar_write(0x20, 8, 0x8000);
  EXPECT_EQ(bar_read(0x18, 2), 16u);
  EXPECT_EQ(bar_read(0x20, 8), 0u);
}

TEST_F(VirtioPciTest, VectorOutOfRangeReadsNoVector) {
  bar_write(0x10, 2, 3);  // the table has vectors 0-2
  EXPECT_EQ(bar_read(0x10, 2), kVirtioNoVector);
  bar_write(0x16, 2, 0);
  bar_write(0x1a, 2, 0x1234);
  EXPECT_EQ(bar_read(0x1a, 2), kVirtioNoVector);
}

TEST_F(VirtioPciTest, OddAccessesAreHarmless) {
  bar_write(0x14, 2, 0xffff);  // status written with the wrong width
  EXPECT_EQ(status(), 0);
  bar_write(0x13, 2, 0xffff);
  bar_write(L::kIsrOffset + 1, 1, 1);
  bar_write(L::kMsixTableOffset + 2, 2, 0xffff);  // unaligned table write
  EXPECT_EQ(bar_read(L::kMsixTableOffset + 12, 4), 1u);  // still masked
  bar_write(L::kBarSize - 4, 4, 1);
  EXPECT_EQ(bar_read(L::kBarSize - 4, 4), 0u);
  EXPECT_EQ(device_->activations, 0);
}

TEST_F(VirtioPciTest, PciConfigurationAccessWindowReachesTheBar) {
  auto cap = find_virtio_cap(kCapPciCfg);
  ASSERT_TRUE(cap);
  cfg_write(*cap + 4, 1, 0);       // bar
  cfg_write(*cap + 8, 4, 0x12);    // num_queues
  cfg_write(*cap + 12, 4, 2);      // length
  EXPECT_EQ(cfg_read(*cap + 16, 4) & 0xffff, 2u);
  cfg_write(*cap + 8, 4, 0x14);    // device_status
  cfg_write(*cap + 12, 4, 1);
  cfg_write(*cap + 16, 4, kStatusAcknowledge);
  EXPECT_EQ(status(), kStatusAcknowledge);
}

TEST_F(VirtioPciTest, RemovalResetsAnActiveDevice) {
  negotiate();
  setup_queue0();
  driver_ok();
  ASSERT_TRUE(bus_->remove_device(slot_));
  pci_.reset();
  EXPECT_EQ(device_->resets, 1);
  std::lock_guard lock(fabric_.mutex);
  EXPECT_TRUE(fabric_.doorbells.empty());
}

// Snapshots: a driven function saved, a fresh one restored from it.
class VirtioPciSnapshotTest : public VirtioPciTest {
 protected:
  // Everything a driver leaves behind: features, queue 0 at a moved
  // position, vectors (1 unmasked and routed, 0 masked with one pending),
  // a configuration change, queue_select on 1, device bytes.
  VirtioPciState drive_and_save() {
    negotiate(1u << 3);
    setup_queue0();
    driver_ok();
    enable_msix();
    program_vector(1, 0xfee00000, 0x4041, /*masked=*/false);
    program_vector(0, 0xfee01000, 0x4042, /*masked=*/true);
    device_->interrupt->notify_config();  // pending on masked vector 0
    bar_write(0x16, 2, 1);
    device_->queue_states[0]->last_avail_idx = 7;
    device_->queue_states[0]->used_idx = 5;
    device_->extra = {std::byte{9}, std::byte{8}};
    Result<VirtioPciState> saved = pci_->save_state();
    EXPECT_TRUE(saved) << saved.error().message();
    return saved ? *saved : VirtioPciState{};
  }
  // Unplugs and destroys the driven function; a new one takes its place.
  std::shared_ptr<VirtioPci> fresh_function(std::shared_ptr<FakeDevice> device) {
    (void)bus_->remove_device(slot_);
    pci_.reset();
    auto created = VirtioPci::create(std::move(device), memory_, fabric_, *loop_);
    EXPECT_TRUE(created) << created.error().message();
    return created ? *created : nullptr;
  }
};

TEST_F(VirtioPciSnapshotTest, SaveMutateRestoreRoundTrip) {
  const VirtioPciState first = drive_and_save();
  EXPECT_EQ(first.status & kStatusDriverOk, kStatusDriverOk);
  ASSERT_TRUE(first.device.has_value());
  EXPECT_EQ(first.device->queues[0]->last_avail_idx, 7);
  EXPECT_FALSE(first.device->queues[1].has_value());
  EXPECT_TRUE(first.msix[0].pending);
  EXPECT_EQ(first.queue_select, 1);
  // Save, mutate, save differs.
  bar_write(0x16, 2, 0);
  Result<VirtioPciState> mutated = pci_->save_state();
  ASSERT_TRUE(mutated);
  EXPECT_NE(*mutated, first);

  auto device = std::make_shared<FakeDevice>();
  std::shared_ptr<VirtioPci> restored = fresh_function(device);
  ASSERT_NE(restored, nullptr);
  Result<void> applied = restored->restore_state(first);
  ASSERT_TRUE(applied) << applied.error().message();
  EXPECT_EQ(device->restores, 1);
  EXPECT_EQ(device->extra, (std::vector<std::byte>{std::byte{9}, std::byte{8}}));
  ASSERT_EQ(device->queues_present, (std::vector<bool>{true, false}));
  EXPECT_EQ(device->queue_states[0]->last_avail_idx, 7);
  EXPECT_EQ(device->queue_states[0]->used_idx, 5);
  EXPECT_EQ(device->queue_states[0]->config.size, 16u);
  Result<VirtioPciState> again = restored->save_state();
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, first);
  {
    // Doorbells at the saved BAR address, the unmasked vector routed.
    std::lock_guard lock(fabric_.mutex);
    EXPECT_EQ(fabric_.doorbells.count(bar_ + L::kNotifyOffset), 1u);
    EXPECT_EQ(fabric_.messages[fabric_.allocated - 3 + 1], (MsiMessage{0xfee00000, 0x4041}));
  }
  // On the bus at the saved address, the guest sees its registers.
  ASSERT_TRUE(bus_->add_device(restored, slot_));
  ASSERT_TRUE(bus_->refresh_mappings(slot_));
  EXPECT_EQ(bus_->mapped_bar_address(slot_, 0), bar_);
  EXPECT_EQ(status() & kStatusDriverOk, kStatusDriverOk);
  EXPECT_EQ(bar_read(0x16, 2), 1u);
  EXPECT_EQ(bar_read(L::kMsixPbaOffset, 8), 0b1u);  // vector 0 still pending
  // One kick per enabled queue reaches the device through the loop.
  restored->kick_queues();
  ASSERT_EQ(*loop_->run_once(1000), 1);
  {
    std::lock_guard lock(device->mutex);
    EXPECT_EQ(device->notified, (std::vector<uint16_t>{0}));
  }
  (void)bus_->remove_device(slot_);
}

TEST_F(VirtioPciSnapshotTest, InactiveFunctionKeepsNoDeviceState) {
  negotiate();
  Result<VirtioPciState> saved = pci_->save_state();
  ASSERT_TRUE(saved);
  EXPECT_FALSE(saved->device.has_value());
  auto device = std::make_shared<FakeDevice>();
  std::shared_ptr<VirtioPci> restored = fresh_function(device);
  ASSERT_TRUE(restored->restore_state(*saved));
  EXPECT_EQ(device->activations, 0);
  EXPECT_EQ(*restored->save_state(), *saved);
}

TEST_F(VirtioPciSnapshotTest, RestoreRefusesAStateThatDoesNotFit) {
  const VirtioPciState good = drive_and_save();
  auto device = std::make_shared<FakeDevice>();
  std::shared_ptr<VirtioPci> restored = fresh_function(device);
  auto refused = [&](VirtioPciState state, std::string_view why, Errc code = Errc::Corrupt) {
    Result<void> result = restored->restore_state(state);
    ASSERT_FALSE(result) << why;
    EXPECT_EQ(result.error().code(), code) << why << ": " << result.error().message();
    EXPECT_EQ(restored->status(), 0) << why;
  };
  VirtioPciState state = good;
  state.device_type = static_cast<uint16_t>(DeviceType::Block);
  refused(state, "another device type");
  state = good;
  state.queues.pop_back();
  refused(state, "fewer queues");
  state = good;
  state.queues[0].size = 32;
  refused(state, "a queue larger than its maximum");
  state = good;
  state.queues[1].msix_vector = 3;
  refused(state, "a vector past the table");
  state = good;
  state.config_vector = 3;
  refused(state, "a configuration vector past the table");
  state = good;
  state.status = kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk;
  refused(state, "device state without DRIVER_OK");
  state = good;
  state.driver_features |= 1ull << 40;
  refused(state, "features never offered");
  state = good;
  state.msix.pop_back();
  refused(state, "an MSI-X table of another size");
  state = good;
  state.device->queues.pop_back();
  refused(state, "positions for fewer queues");
  state = good;
  state.device->queues[1] = VirtqueueState{};
  refused(state, "a position for a disabled queue");
  state = good;
  state.queues[0].desc = memory_.size_bytes() + 0x1000;
  refused(state, "a queue outside RAM", Errc::OutOfRange);
  EXPECT_EQ(device->activations, 0);
  // A fitting state still applies, once; a second restore is Busy.
  ASSERT_TRUE(restored->restore_state(good));
  Result<void> twice = restored->restore_state(good);
  ASSERT_FALSE(twice);
  EXPECT_EQ(twice.error().code(), Errc::Busy);
}

}  // namespace
}  // namespace keel::devices::virtio
