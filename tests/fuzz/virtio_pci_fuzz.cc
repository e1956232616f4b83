// libFuzzer target for the virtio-pci transport (virtio 1.2 §4.1) and its
// MSI-X table: arbitrary bytes become a sequence of guest accesses to BAR 0
// and to configuration space (any offset, any width), device interrupts and
// event-loop turns, against a fake device and interrupt fabric. Sanitizers
// catch bad accesses; the checks catch broken transport promises.
// Implemented: every guest-reachable entry point of VirtioPci. Missing:
// concurrent accesses from several vCPU threads.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>

#include "base/log.h"
#include "devices/virtio/pci_transport.h"
#include "../unit/devices/virtio/fake_device.h"

namespace {

using keel::devices::virtio::VirtioPci;
using keel::devices::virtio::testing::FakeDevice;
using keel::devices::virtio::testing::FakeFabric;

constexpr size_t kOpBytes = 12;  // kind, size, offset (2), value (8)

void check(bool condition) {
  if (!condition) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static bool quiet = [] {
    keel::log::init(keel::log::Level::Off, "fuzz");
    return true;
  }();
  (void)quiet;
  auto memory = keel::memory::GuestMemory::create(64 << 10, 0xc000'0000, 0x1'0000'0000);
  auto loop = keel::EventLoop::create();
  if (!memory || !loop) return 0;
  FakeFabric fabric;
  auto device = std::make_shared<FakeDevice>();
  auto created = VirtioPci::create(device, *memory, fabric, **loop);
  check(created.has_value());
  std::shared_ptr<VirtioPci> pci = *created;

  for (size_t at = 0; at + kOpBytes <= size; at += kOpBytes) {
    const uint8_t kind = data[at] % 6;
    const size_t width = size_t{1} << (data[at + 1] % 4);  // 1, 2, 4 or 8
    uint16_t offset = 0;
    std::memcpy(&offset, data + at + 2, 2);
    std::byte value[8];
    std::memcpy(value, data + at + 4, 8);
    switch (kind) {
      case 0:
        pci->bar_write(offset % keel::devices::virtio::VirtioPciLayout::kBarSize,
                       std::span(value, width));
        break;
      case 1:
        pci->bar_read(offset % keel::devices::virtio::VirtioPciLayout::kBarSize,
                      std::span(value, width));
        break;
      case 2: {
        const uint32_t config_offset = offset % 4096;
        if (width <= 4 && pci->config().write(config_offset, std::span(value, width))) {
          pci->config_written(config_offset, width);
        }
        break;
      }
      case 3: {
        const uint32_t config_offset = offset % 4096;
        if (width <= 4) {
          pci->before_config_read(config_offset, width);
          pci->config().read(config_offset, std::span(value, width));
        }
        break;
      }
      case 4:
        if (device->interrupt) {
          if (offset % 3 == 0) device->interrupt->notify_queue(static_cast<uint16_t>(offset % 4));
          if (offset % 3 == 1) device->interrupt->notify_config();
          if (offset % 3 == 2) device->interrupt->needs_reset();
        }
        break;
      case 5: (void)(*loop)->run_once(0); break;
    }
    // A device is active only between an activation and a reset.
    check(device->activations - device->resets >= 0 && device->activations - device->resets <= 1);
  }
  pci.reset();
  check(device->activations == device->resets);
  return 0;
}
