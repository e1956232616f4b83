// PCI Express Enhanced Configuration Access Mechanism: configuration space
// as MMIO, one 4 KiB page per function. Spec: PCI Express Base 3.0 §7.2.2
// (address bits 27:20 bus, 19:15 device, 14:12 function, 11:0 register).
// Implemented: buses 0-255 (all but bus 0 absent), 1/2/4-byte accesses
// within a dword. Missing: nothing known; accesses that cross a dword or
// are 8 bytes wide, which §7.2.2 leaves undefined, read all ones.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "devices/io_handler.h"
#include "devices/pci/pci_bus.h"

namespace keel::devices {

class PciEcam : public IoHandler {
 public:
  static constexpr uint64_t kSizeBytes = uint64_t{256} << 20;  // 256 buses

  explicit PciEcam(std::shared_ptr<PciBus> bus) : bus_(std::move(bus)) {}

  // Offsets are relative to the ECAM base (the MCFG table's base address,
  // with start bus 0).
  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

 private:
  std::shared_ptr<PciBus> bus_;
};

}  // namespace keel::devices
