// PCI bus 0. Spec: PCI Local Bus 3.0 §3.2.2.3, §6.1, §6.2.2, §6.2.5.1;
// PCI Express Base 3.0 §7.2.2. See pci_bus.h for the status card.
#include "devices/pci/pci_bus.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "base/log.h"
#include "devices/pci/pci_host_bridge.h"

namespace keel::devices {
namespace {

void fill_ones(std::span<std::byte> data) {
  std::memset(data.data(), 0xff, data.size());
}

// Rounds value up to alignment (a power of two); nullopt on overflow.
std::optional<uint64_t> align_up(uint64_t value, uint64_t alignment) {
  const uint64_t aligned = (value + alignment - 1) & ~(alignment - 1);
  if (aligned < value) return std::nullopt;
  return aligned;
}

}  // namespace

PciBus::PciBus(IoBus& mmio_bus, IoBus& pio_bus, const PciWindows& windows)
    : mmio_bus_(mmio_bus), pio_bus_(pio_bus), windows_(windows) {
  slots_[kHostBridgeSlot].device = std::make_shared<PciHostBridge>();
}

Result<uint8_t> PciBus::add_device(std::shared_ptr<PciDevice> device, std::optional<uint8_t> slot) {
  if (!device) return fail(Errc::InvalidArgument, "pci: add_device without a device");
  std::lock_guard lock(mutex_);
  uint8_t chosen = 0;
  if (slot) {
    if (*slot >= kSlotCount)
      return fail(Errc::InvalidArgument, fmt::format("pci: no slot {}", *slot));
    if (slots_[*slot].device) return fail(Errc::Busy, fmt::format("pci: slot {} is taken", *slot));
    chosen = *slot;
  } else {
    auto free = std::find_if(slots_.begin(), slots_.end(),
                             [](const Slot& candidate) { return !candidate.device; });
    if (free == slots_.end()) return fail(Errc::Busy, "pci: no free slot on bus 0");
    chosen = static_cast<uint8_t>(free - slots_.begin());
  }
  slots_[chosen] = Slot{std::move(device), {}};
  if (auto mapped = update_mappings_locked(chosen); !mapped) {
    unmap_all_locked(slots_[chosen]);
    slots_[chosen] = Slot{};
    return fail(std::move(mapped).error().wrap(fmt::format("pci: add_device slot {}", chosen)));
  }
  return chosen;
}

Result<std::shared_ptr<PciDevice>> PciBus::remove_device(uint8_t slot) {
  if (slot == kHostBridgeSlot) return fail(Errc::InvalidArgument, "pci: the host bridge stays");
  if (slot >= kSlotCount) return fail(Errc::InvalidArgument, fmt::format("pci: no slot {}", slot));
  std::lock_guard lock(mutex_);
  Slot& entry = slots_[slot];
  if (!entry.device) return fail(Errc::NotFound, fmt::format("pci: slot {} is empty", slot));
  unmap_all_locked(entry);
  auto device = std::move(entry.device);
  entry = Slot{};
  return device;
}

std::shared_ptr<PciDevice> PciBus::device(uint8_t slot) const {
  if (slot >= kSlotCount) return nullptr;
  std::lock_guard lock(mutex_);
  return slots_[slot].device;
}

Result<void> PciBus::refresh_mappings(uint8_t slot) {
  std::lock_guard lock(mutex_);
  if (slot >= kSlotCount || slots_[slot].device == nullptr) {
    return fail(Errc::NotFound, fmt::format("pci: no device in slot {}", slot));
  }
  return update_mappings_locked(slot);
}

std::optional<uint64_t> PciBus::mapped_bar_address(uint8_t slot, int bar) const {
  if (slot >= kSlotCount || bar < 0 || bar >= kPciBarCount) return std::nullopt;
  std::lock_guard lock(mutex_);
  return slots_[slot].mapped[bar];
}

Result<void> PciBus::assign_bars() {
  struct Request {
    uint8_t slot;
    int bar;
    PciBar info;
  };
  std::lock_guard lock(mutex_);

  // Decode off and handlers unmapped first, so that no BAR's old place can
  // collide with another BAR's new one while they move.
  std::vector<Request> requests;
  for (uint8_t slot = 0; slot < kSlotCount; ++slot) {
    if (!slots_[slot].device) continue;
    PciConfigSpace& config = slots_[slot].device->config();
    config.set_command(config.command() & ~(kPciCommandIo | kPciCommandMemory));
    unmap_all_locked(slots_[slot]);
    for (int bar = 0; bar < kPciBarCount; ++bar) {
      if (auto info = config.bar(bar)) requests.push_back({slot, bar, *info});
    }
  }
  // Largest first: every later (smaller, power-of-two) BAR then starts
  // naturally aligned right where the previous one ended.
  std::stable_sort(requests.begin(), requests.end(), [](const Request& a, const Request& b) {
    return a.info.size_bytes > b.info.size_bytes;
  });

  struct Window {
    const char* name;
    uint64_t next;
    uint64_t end;
  };
  Window io{"I/O", windows_.io_base, windows_.io_base + windows_.io_size_bytes};
  Window mmio32{"32-bit MMIO", windows_.mmio32_base,
                windows_.mmio32_base + windows_.mmio32_size_bytes};
  Window mmio64{"64-bit MMIO", windows_.mmio64_base,
                windows_.mmio64_base + windows_.mmio64_size_bytes};
  std::array<uint16_t, kSlotCount> decode{};
  for (const Request& request : requests) {
    Window* window = &mmio32;
    if (request.info.kind == BarKind::Io) {
      window = &io;
    } else if (request.info.kind == BarKind::Mem64 && windows_.mmio64_size_bytes != 0) {
      window = &mmio64;
    }
    const uint64_t size = request.info.size_bytes;
    auto base = align_up(window->next, size);
    if (!base || *base >= window->end || window->end - *base < size) {
      return fail(Errc::OutOfRange,
                  fmt::format("pci: the {} window has no room for BAR {} of slot {} ({:#x} bytes)",
                              window->name, request.bar, request.slot, size));
    }
    slots_[request.slot].device->config().set_bar_address(request.bar, *base);
    window->next = *base + size;
    decode[request.slot] |= request.info.kind == BarKind::Io ? kPciCommandIo : kPciCommandMemory;
  }

  for (uint8_t slot = 0; slot < kSlotCount; ++slot) {
    if (!slots_[slot].device || decode[slot] == 0) continue;
    PciConfigSpace& config = slots_[slot].device->config();
    config.set_command(config.command() | decode[slot]);
    TRY_CONTEXT(update_mappings_locked(slot), "pci: assign_bars");
  }
  return ok();
}

void PciBus::config_read(PciAddress address, uint32_t offset, std::span<std::byte> data) {
  if (!PciConfigSpace::valid_access(offset, data.size())) {
    LOG_RATELIMITED(warn, "pci {:02x}:{:02x}.{}: ignoring config read of {} bytes at {:#x}",
                    address.bus, address.device, address.function, data.size(), offset);
    fill_ones(data);
    return;
  }
  std::lock_guard lock(mutex_);
  Slot* slot = find_locked(address);
  if (slot == nullptr) {
    fill_ones(data);
    return;
  }
  slot->device->before_config_read(offset, data.size());
  slot->device->config().read(offset, data);
}

void PciBus::config_write(PciAddress address, uint32_t offset, std::span<const std::byte> data) {
  if (!PciConfigSpace::valid_access(offset, data.size())) {
    LOG_RATELIMITED(warn, "pci {:02x}:{:02x}.{}: ignoring config write of {} bytes at {:#x}",
                    address.bus, address.device, address.function, data.size(), offset);
    return;
  }
  std::lock_guard lock(mutex_);
  Slot* slot = find_locked(address);
  if (slot == nullptr) return;
  if (!slot->device->config().write(offset, data)) return;
  // A failed mapping is already logged; the BAR then stays unmapped until
  // the guest moves it somewhere free, as with overlapping decoders on real
  // hardware (undefined there, harmless here).
  (void)update_mappings_locked(address.device);
  slot->device->config_written(offset, data.size());
}

PciBus::Slot* PciBus::find_locked(PciAddress address) {
  // Bus 0 only, function 0 only: the header type says single-function, so
  // an OS scans no further functions (§6.2.1).
  if (address.bus != 0 || address.device >= kSlotCount || address.function != 0) return nullptr;
  Slot& slot = slots_[address.device];
  return slot.device ? &slot : nullptr;
}

Result<void> PciBus::update_mappings_locked(uint8_t slot_index) {
  Slot& slot = slots_[slot_index];
  PciConfigSpace& config = slot.device->config();
  const uint16_t command = config.command();
  Result<void> result = ok();
  for (int bar = 0; bar < kPciBarCount; ++bar) {
    const auto info = config.bar(bar);
    if (!info) continue;
    const bool decode =
        (command & (info->kind == BarKind::Io ? kPciCommandIo : kPciCommandMemory)) != 0;
    const uint64_t address = config.bar_address(bar);
    // Address 0 means "not assigned": nothing sits at port 0 or physical
    // address 0 on a PC, and an OS enabling decode before programming every
    // BAR must not get a handler there.
    std::optional<uint64_t> wanted;
    if (decode && address != 0) wanted = address;
    if (wanted == slot.mapped[bar]) continue;

    IoBus& bus = bus_for(info->kind);
    if (slot.mapped[bar]) {
      if (auto unmapped = bus.unmap(*slot.mapped[bar]); !unmapped) {
        LOG_ERROR("pci slot {}: BAR {}: {}", slot_index, bar, unmapped.error().message());
      }
      slot.mapped[bar].reset();
    }
    if (!wanted) continue;
    auto handler = slot.device->bar_handler(bar);
    if (!handler) continue;
    if (auto mapped = bus.map(*wanted, info->size_bytes, std::move(handler)); !mapped) {
      LOG_RATELIMITED(warn, "pci slot {}: BAR {} not mapped at {:#x}: {}", slot_index, bar, *wanted,
                      mapped.error().message());
      if (result) result = std::move(mapped);
      continue;
    }
    slot.mapped[bar] = wanted;
  }
  return result;
}

void PciBus::unmap_all_locked(Slot& slot) {
  for (int bar = 0; bar < kPciBarCount; ++bar) {
    if (!slot.mapped[bar]) continue;
    const auto info = slot.device->config().bar(bar);
    IoBus& bus = bus_for(info ? info->kind : BarKind::Mem32);
    (void)bus.unmap(*slot.mapped[bar]);
    slot.mapped[bar].reset();
  }
}

}  // namespace keel::devices
