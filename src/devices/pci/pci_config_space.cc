// PCI configuration space store. Spec: PCI Local Bus 3.0 §6.1-§6.2.5, §6.7;
// PCI Express Base 3.0 §7.2.2. See pci_config_space.h for the status card.
#include "devices/pci/pci_config_space.h"

#include <algorithm>

#include <fmt/format.h>

#include <cstring>

#include "base/check.h"

namespace keel::devices {
namespace {

// The command bits a virtual device can honour; the rest (special cycles,
// memory write and invalidate, VGA snoop, fast back-to-back) are hardwired
// to zero as §6.2.2 allows for unimplemented features.
constexpr uint16_t kCommandWritable = kPciCommandIo | kPciCommandMemory | kPciCommandBusMaster |
                                      kPciCommandParityErrorResponse | kPciCommandSerr |
                                      kPciCommandInterruptDisable;
constexpr uint16_t kStatusWriteOneToClear =
    kPciStatusMasterDataParityError | kPciStatusSignaledTargetAbort |
    kPciStatusReceivedTargetAbort | kPciStatusReceivedMasterAbort | kPciStatusSignaledSystemError |
    kPciStatusDetectedParityError;

// BAR low bits (§6.2.5.1): bit 0 selects I/O space; for memory, bits 2:1
// give the type (00 32-bit, 10 64-bit) and bit 3 prefetchability.
constexpr uint32_t kBarIoSpace = 0x1;
constexpr uint32_t kBarMemType64 = 0x4;
constexpr uint32_t kBarPrefetchable = 0x8;
constexpr uint32_t kBarIoAddressMask = 0xfffffffc;
constexpr uint32_t kBarMemAddressMask = 0xfffffff0;
// x86 port space is 64 KiB, so an I/O BAR decodes 16 address bits; the upper
// ones are hardwired to zero, which §6.2.5.1 permits for such systems.
constexpr uint32_t kBarIoDecodeMask = 0x0000fffc;

constexpr uint64_t kIoBarMinBytes = 4;
constexpr uint64_t kIoBarMaxBytes = 256;
constexpr uint64_t kMemBarMinBytes = 16;
constexpr uint64_t kMem32BarMaxBytes = uint64_t{1} << 31;
constexpr uint64_t kMem64BarMaxBytes = uint64_t{1} << 63;

constexpr uint16_t kCapabilitiesEnd = 0x100;

uint16_t bar_offset(int index) {
  return static_cast<uint16_t>(kPciBar0Offset + 4 * index);
}

bool valid_bar_index(int index) {
  return index >= 0 && index < kPciBarCount;
}

template <typename Bytes>
void store(Bytes& bytes, uint16_t offset, size_t size_bytes, uint32_t value) {
  CHECK(size_bytes >= 1 && size_bytes <= 4 && offset + size_bytes <= bytes.size(),
        "PCI config store out of range");
  for (size_t i = 0; i < size_bytes; ++i) {
    bytes[offset + i] = static_cast<uint8_t>(value >> (8 * i));
  }
}

template <typename Bytes>
uint32_t load(const Bytes& bytes, uint16_t offset, size_t size_bytes) {
  CHECK(size_bytes >= 1 && size_bytes <= 4 && offset + size_bytes <= bytes.size(),
        "PCI config load out of range");
  uint32_t value = 0;
  for (size_t i = 0; i < size_bytes; ++i) value |= uint32_t{bytes[offset + i]} << (8 * i);
  return value;
}

}  // namespace

PciConfigSpace::PciConfigSpace(const PciHeader& header) {
  store(bytes_, kPciVendorIdOffset, 2, header.vendor_id);
  store(bytes_, kPciDeviceIdOffset, 2, header.device_id);
  store(bytes_, kPciRevisionIdOffset, 1, header.revision_id);
  store(bytes_, kPciProgIfOffset, 1, header.prog_if);
  store(bytes_, kPciSubclassOffset, 1, header.subclass);
  store(bytes_, kPciClassOffset, 1, header.class_code);
  store(bytes_, kPciHeaderTypeOffset, 1, 0x00);  // type 0, single function
  store(bytes_, kPciSubsystemVendorIdOffset, 2, header.subsystem_vendor_id);
  store(bytes_, kPciSubsystemIdOffset, 2, header.subsystem_id);
  store(bytes_, kPciInterruptPinOffset, 1, static_cast<uint8_t>(header.interrupt_pin));

  store(write_mask_, kPciCommandOffset, 2, kCommandWritable);
  store(clear_mask_, kPciStatusOffset, 2, kStatusWriteOneToClear);
  // Cache line size is read/write storage (§6.2.4); nothing here uses it.
  store(write_mask_, kPciCacheLineSizeOffset, 1, 0xff);
  // Interrupt line is scratch space for the OS's routing (§6.2.4).
  store(write_mask_, kPciInterruptLineOffset, 1, 0xff);
}

bool PciConfigSpace::valid_access(uint32_t offset, size_t size_bytes) {
  if (size_bytes != 1 && size_bytes != 2 && size_bytes != 4) return false;
  if (offset >= kPciConfigSpaceSizeBytes) return false;
  return (offset & 3u) + size_bytes <= 4;
}

void PciConfigSpace::read(uint32_t offset, std::span<std::byte> data) const {
  if (!valid_access(offset, data.size())) {
    std::memset(data.data(), 0xff, data.size());
    return;
  }
  std::lock_guard lock(mutex_);
  std::memcpy(data.data(), bytes_.data() + offset, data.size());
}

bool PciConfigSpace::write(uint32_t offset, std::span<const std::byte> data) {
  if (!valid_access(offset, data.size())) return false;
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < data.size(); ++i) {
    const size_t at = offset + i;
    const auto value = static_cast<uint8_t>(data[i]);
    uint8_t next =
        static_cast<uint8_t>((bytes_[at] & ~write_mask_[at]) | (value & write_mask_[at]));
    next = static_cast<uint8_t>(next & ~(value & clear_mask_[at]));
    bytes_[at] = next;
  }
  return true;
}

Result<void> PciConfigSpace::add_bar(int index, uint64_t size_bytes, BarKind kind,
                                     Prefetchable prefetchable) {
  if (!valid_bar_index(index)) return fail(Errc::InvalidArgument, fmt::format("BAR {}", index));
  const int slots = kind == BarKind::Mem64 ? 2 : 1;
  if (index + slots > kPciBarCount) {
    return fail(Errc::InvalidArgument,
                fmt::format("64-bit BAR {} needs slot {}", index, index + 1));
  }
  const auto slot_bits = static_cast<uint8_t>(((1u << slots) - 1) << index);
  std::lock_guard lock(mutex_);
  if ((bar_slots_used_ & slot_bits) != 0) {
    return fail(Errc::Busy, fmt::format("BAR {} already defined", index));
  }
  if (size_bytes == 0 || (size_bytes & (size_bytes - 1)) != 0) {
    return fail(Errc::InvalidArgument,
                fmt::format("BAR size {:#x} is not a power of two", size_bytes));
  }
  uint64_t min_bytes = kMemBarMinBytes;
  uint64_t max_bytes = kMem64BarMaxBytes;
  if (kind == BarKind::Io) {
    min_bytes = kIoBarMinBytes;
    max_bytes = kIoBarMaxBytes;
    if (prefetchable == Prefetchable::Yes) {
      return fail(Errc::InvalidArgument, "an I/O BAR cannot be prefetchable");
    }
  } else if (kind == BarKind::Mem32) {
    max_bytes = kMem32BarMaxBytes;
  }
  if (size_bytes < min_bytes || size_bytes > max_bytes) {
    return fail(Errc::InvalidArgument, fmt::format("BAR {} size {:#x} outside [{:#x}, {:#x}]",
                                                   index, size_bytes, min_bytes, max_bytes));
  }

  // Sizing (§6.2.5.1): software writes all ones and reads back; the address
  // bits below the size are hardwired to zero, so only ~(size - 1) sticks.
  const uint64_t address_bits = ~(size_bytes - 1);
  const uint16_t offset = bar_offset(index);
  const uint32_t prefetch_bit = prefetchable == Prefetchable::Yes ? kBarPrefetchable : 0;
  switch (kind) {
    case BarKind::Io:
      store(bytes_, offset, 4, kBarIoSpace);
      store(write_mask_, offset, 4, static_cast<uint32_t>(address_bits) & kBarIoDecodeMask);
      break;
    case BarKind::Mem32:
      store(bytes_, offset, 4, prefetch_bit);
      store(write_mask_, offset, 4, static_cast<uint32_t>(address_bits) & kBarMemAddressMask);
      break;
    case BarKind::Mem64:
      store(bytes_, offset, 4, kBarMemType64 | prefetch_bit);
      store(write_mask_, offset, 4, static_cast<uint32_t>(address_bits) & kBarMemAddressMask);
      store(bytes_, static_cast<uint16_t>(offset + 4), 4, 0);
      store(write_mask_, static_cast<uint16_t>(offset + 4), 4,
            static_cast<uint32_t>(address_bits >> 32));
      break;
  }
  bars_[index] = PciBar{kind, size_bytes, prefetchable};
  bar_slots_used_ |= slot_bits;
  return ok();
}

std::optional<PciBar> PciConfigSpace::bar(int index) const {
  if (!valid_bar_index(index)) return std::nullopt;
  std::lock_guard lock(mutex_);
  return bars_[index];
}

PciConfigBytes PciConfigSpace::save() const {
  std::lock_guard lock(mutex_);
  PciConfigBytes saved;
  std::copy_n(bytes_.begin(), saved.size(), saved.begin());
  return saved;
}

void PciConfigSpace::restore_writable(const PciConfigBytes& saved) {
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < saved.size(); ++i) {
    bytes_[i] = static_cast<uint8_t>((bytes_[i] & ~write_mask_[i]) | (saved[i] & write_mask_[i]));
  }
}

uint64_t PciConfigSpace::bar_address(int index) const {
  if (!valid_bar_index(index)) return 0;
  std::lock_guard lock(mutex_);
  const auto& bar = bars_[index];
  if (!bar) return 0;
  const uint16_t offset = bar_offset(index);
  const uint32_t low = load(bytes_, offset, 4);
  switch (bar->kind) {
    case BarKind::Io:
      return low & kBarIoAddressMask;
    case BarKind::Mem32:
      return low & kBarMemAddressMask;
    case BarKind::Mem64: {
      const uint64_t high = load(bytes_, static_cast<uint16_t>(offset + 4), 4);
      return (high << 32) | (low & kBarMemAddressMask);
    }
  }
  return 0;
}

void PciConfigSpace::set_bar_address(int index, uint64_t address) {
  CHECK(valid_bar_index(index), "set_bar_address: bad BAR index");
  std::lock_guard lock(mutex_);
  const auto& bar = bars_[index];
  CHECK(bar.has_value(), "set_bar_address: BAR not defined");
  const uint16_t offset = bar_offset(index);
  masked_store_locked(offset, 4, static_cast<uint32_t>(address));
  if (bar->kind == BarKind::Mem64) {
    masked_store_locked(static_cast<uint16_t>(offset + 4), 4, static_cast<uint32_t>(address >> 32));
  }
}

Result<uint8_t> PciConfigSpace::add_capability(uint8_t id, std::span<const std::byte> body) {
  std::lock_guard lock(mutex_);
  // Capabilities are dword aligned; the low two bits of every pointer are
  // reserved (§6.7).
  const size_t offset = (capability_end_ + 3u) & ~size_t{3};
  const size_t length = 2 + body.size();
  if (offset + length > kCapabilitiesEnd) {
    return fail(Errc::OutOfRange,
                fmt::format("capability {:#x} of {} bytes does not fit below {:#x}", id, length,
                            kCapabilitiesEnd));
  }
  bytes_[offset] = id;
  bytes_[offset + 1] = 0;  // the end of the list
  if (!body.empty()) std::memcpy(bytes_.data() + offset + 2, body.data(), body.size());
  const auto pointer = static_cast<uint8_t>(offset);
  if (last_capability_ == 0) {
    bytes_[kPciCapabilitiesPointerOffset] = pointer;
  } else {
    bytes_[last_capability_ + 1u] = pointer;
  }
  store(bytes_, kPciStatusOffset, 2, load(bytes_, kPciStatusOffset, 2) | kPciStatusCapabilities);
  last_capability_ = pointer;
  capability_end_ = static_cast<uint16_t>(offset + length);
  return pointer;
}

uint16_t PciConfigSpace::command() const {
  return get_u16(kPciCommandOffset);
}

void PciConfigSpace::set_command(uint16_t value) {
  std::lock_guard lock(mutex_);
  masked_store_locked(kPciCommandOffset, 2, value);
}

void PciConfigSpace::set_interrupt_status(bool asserted) {
  std::lock_guard lock(mutex_);
  uint32_t status = load(bytes_, kPciStatusOffset, 2);
  status = asserted ? (status | kPciStatusInterrupt) : (status & ~uint32_t{kPciStatusInterrupt});
  store(bytes_, kPciStatusOffset, 2, status);
}

void PciConfigSpace::set_write_mask(uint16_t offset, size_t size_bytes, uint32_t mask) {
  std::lock_guard lock(mutex_);
  store(write_mask_, offset, size_bytes, mask);
}

void PciConfigSpace::set_clear_mask(uint16_t offset, size_t size_bytes, uint32_t mask) {
  std::lock_guard lock(mutex_);
  store(clear_mask_, offset, size_bytes, mask);
}

uint32_t PciConfigSpace::get(uint16_t offset, size_t size_bytes) const {
  std::lock_guard lock(mutex_);
  return load(bytes_, offset, size_bytes);
}

void PciConfigSpace::set(uint16_t offset, size_t size_bytes, uint32_t value) {
  std::lock_guard lock(mutex_);
  store(bytes_, offset, size_bytes, value);
}

void PciConfigSpace::masked_store_locked(uint16_t offset, size_t size_bytes, uint32_t value) {
  const uint32_t mask = load(write_mask_, offset, size_bytes);
  const uint32_t old = load(bytes_, offset, size_bytes);
  store(bytes_, offset, size_bytes, (old & ~mask) | (value & mask));
}

}  // namespace keel::devices
