// The seam between the PCI bus and one PCI function. Spec: PCI Local Bus 3.0
// §6 (configuration space), §6.2.5 (BARs).
// Implemented: the interface. Missing: multi-function devices (the bus only
// asks for function 0).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "devices/io_handler.h"
#include "devices/pci/pci_config_space.h"

namespace keel::devices {

// The PciBus calls these on vCPU threads with its bus lock held, so they
// must not call back into the PciBus. A device's own threads may use its
// PciConfigSpace directly (it locks internally).
class PciDevice {
 public:
  virtual ~PciDevice() = default;

  virtual PciConfigSpace& config() = 0;

  // Before a guest read of [offset, offset + size_bytes), for a device that
  // computes some bytes on demand (virtio's PCI configuration access window).
  virtual void before_config_read(uint32_t /*offset*/, size_t /*size_bytes*/) {}
  // After a guest write of [offset, offset + size_bytes) was applied through
  // the write masks, and after the bus updated the BAR mappings.
  virtual void config_written(uint32_t /*offset*/, size_t /*size_bytes*/) {}

  // The handler for BAR bar's region, mapped on the MMIO or port I/O bus at
  // the BAR's address while the matching decode bit is on; offsets it sees
  // are relative to the BAR's base. nullptr leaves the region unclaimed.
  virtual std::shared_ptr<IoHandler> bar_handler(int /*bar*/) { return nullptr; }

  // Back to the power-on state (a guest reset or a function-level reset).
  virtual void reset() {}
};

}  // namespace keel::devices
