// PCI configuration mechanism #1: CONFIG_ADDRESS at port 0xcf8, CONFIG_DATA
// at 0xcfc-0xcff. Spec: PCI Local Bus 3.0 §3.2.2.3.2.
// Implemented: the 32-bit address register (enable bit 31, bus 23:16,
// device 15:11, function 10:8, register 7:2; reserved bits 30:24 and 1:0
// read as zero), byte/word/dword data accesses at 0xcfc + (register & 3).
// Missing: the AMD extension that puts register bits 11:8 in bits 27:24
// (Linux reaches registers above 0xff through ECAM instead), the reset
// control register at 0xcf9 (Keel resets through the ACPI reset register).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>

#include "devices/io_handler.h"
#include "devices/pci/pci_bus.h"

namespace keel::devices {

class PciConfigIo : public IoHandler {
 public:
  static constexpr uint64_t kSizeBytes = 8;  // mapped at port 0xcf8

  explicit PciConfigIo(std::shared_ptr<PciBus> bus) : bus_(std::move(bus)) {}

  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

  uint32_t address_register() const { return address_.load(std::memory_order_relaxed); }

 private:
  std::shared_ptr<PciBus> bus_;
  // CONFIG_ADDRESS. Shared by all vCPUs as on hardware, where the guest
  // serializes its address/data pairs with a lock of its own.
  std::atomic<uint32_t> address_{0};
};

}  // namespace keel::devices
