// The PCI host bridge at 00:00.0. Spec: PCI Local Bus 3.0 §6.1 and
// appendix D (class 06h subclass 00h: host bridge).
// Implemented: a type-0 header with no BARs and no capabilities, which is
// all Linux needs to accept bus 0 (its mechanism #1 sanity check looks for a
// host bridge class). Missing: nothing known.
#pragma once

#include "devices/pci/pci_config_space.h"
#include "devices/pci/pci_device.h"

namespace keel::devices {

class PciHostBridge : public PciDevice {
 public:
  // The Red Hat / QEMU "PCIe host bridge" identity, which guests know.
  static constexpr uint16_t kVendorId = 0x1b36;
  static constexpr uint16_t kDeviceId = 0x0008;

  PciHostBridge();

  PciConfigSpace& config() override { return config_; }

 private:
  PciConfigSpace config_;
};

}  // namespace keel::devices
