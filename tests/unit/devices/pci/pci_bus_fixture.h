// A bus wired as in a Keel machine: mechanism #1 on the port bus at 0xcf8,
// ECAM on the MMIO bus at 0xe0000000, with helpers for guest accesses.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <memory>
#include <span>

#include "devices/io_bus.h"
#include "devices/pci/pci_bus.h"
#include "devices/pci/pci_config_io.h"
#include "devices/pci/pci_ecam.h"
#include "machine/layout.h"
#include "pci_test_support.h"

namespace keel::devices::testing {

inline constexpr uint64_t kIoWindowBase = 0x1000;
inline constexpr uint64_t kIoWindowSize = 0xf000;
inline constexpr uint64_t kMmio64Base = uint64_t{64} << 30;

class PciBusFixture : public ::testing::Test {
 protected:
  PciBusFixture()
      : mmio_("mmio"),
        pio_("pio"),
        bus_(std::make_shared<PciBus>(mmio_, pio_,
                                      PciWindows{.mmio32_base = layout::kPciMmio32Start,
                                                 .mmio32_size_bytes = layout::kPciMmio32Size,
                                                 .mmio64_base = kMmio64Base,
                                                 .mmio64_size_bytes = layout::kPciMmio64Size,
                                                 .io_base = kIoWindowBase,
                                                 .io_size_bytes = kIoWindowSize})) {
    config_io_ = std::make_shared<PciConfigIo>(bus_);
    EXPECT_TRUE(pio_.map(layout::kPciConfigAddressPort, PciConfigIo::kSizeBytes, config_io_));
    EXPECT_TRUE(
        mmio_.map(layout::kPciEcamStart, layout::kPciEcamSize, std::make_shared<PciEcam>(bus_)));
  }

  static uint32_t conf1_address(uint32_t bus, uint32_t device, uint32_t function, uint32_t reg) {
    return 0x80000000u | (bus << 16) | (device << 11) | (function << 8) | (reg & 0xfc);
  }

  // Mechanism #1 as Linux does it: outl the address, then in/out at
  // 0xcfc + (reg & 3).
  uint32_t conf1_read(uint32_t bus, uint32_t device, uint32_t function, uint32_t reg, size_t size) {
    auto address = le_bytes<4>(conf1_address(bus, device, function, reg));
    pio_.write(0xcf8, address);
    std::array<std::byte, 4> data{};
    pio_.read(0xcfc + (reg & 3), std::span(data).first(size));
    return to_u32(data) & mask(size);
  }
  void conf1_write(uint32_t bus, uint32_t device, uint32_t function, uint32_t reg, size_t size,
                   uint32_t value) {
    auto address = le_bytes<4>(conf1_address(bus, device, function, reg));
    pio_.write(0xcf8, address);
    auto data = le_bytes<4>(value);
    pio_.write(0xcfc + (reg & 3), std::span<const std::byte>(data).first(size));
  }

  static uint64_t ecam_address(uint32_t bus, uint32_t device, uint32_t function, uint32_t reg) {
    return layout::kPciEcamStart +
           ((uint64_t{bus} << 20) | (device << 15) | (function << 12) | reg);
  }
  uint32_t ecam_read(uint32_t bus, uint32_t device, uint32_t function, uint32_t reg, size_t size) {
    std::array<std::byte, 4> data{};
    mmio_.read(ecam_address(bus, device, function, reg), std::span(data).first(size));
    return to_u32(data) & mask(size);
  }
  void ecam_write(uint32_t bus, uint32_t device, uint32_t function, uint32_t reg, size_t size,
                  uint32_t value) {
    auto data = le_bytes<4>(value);
    mmio_.write(ecam_address(bus, device, function, reg),
                std::span<const std::byte>(data).first(size));
  }

  static uint32_t mask(size_t size) { return size >= 4 ? 0xffffffffu : (1u << (8 * size)) - 1; }

  IoBus mmio_;
  IoBus pio_;
  std::shared_ptr<PciBus> bus_;
  std::shared_ptr<PciConfigIo> config_io_;
};

}  // namespace keel::devices::testing
