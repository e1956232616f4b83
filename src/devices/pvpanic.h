// pvpanic, QEMU's ISA flavour. Spec: QEMU docs/specs/pvpanic.rst; the
// DSDT's \_SB.PEVT (QEMU0001, src/boot/acpi/dsdt.cc) is how Linux's
// pvpanic-mmio driver finds the port.
// Implemented: a read gives the events the device supports (PANICKED,
// CRASH_LOADED); a write reports events, each supported bit once per
// write, to on_event. Unsupported bits are ignored.
// Missing: the PCI flavour (pvpanic-pci), the SHUTDOWN event of newer
// specs (Linux 6.1 does not send it).
#pragma once

#include <cstdint>
#include <functional>

#include "devices/io_handler.h"

namespace keel::devices {

class Pvpanic : public IoHandler {
 public:
  static constexpr uint8_t kPanicked = 1 << 0;     // the guest panicked
  static constexpr uint8_t kCrashLoaded = 1 << 1;  // it panicked and runs its crash kernel
  static constexpr uint8_t kSupported = kPanicked | kCrashLoaded;

  // on_event runs on the vCPU thread that wrote, with the supported bits.
  explicit Pvpanic(std::function<void(uint8_t events)> on_event)
      : on_event_(std::move(on_event)) {}

  // Mapped with length 1.
  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

 private:
  std::function<void(uint8_t)> on_event_;
};

}  // namespace keel::devices
