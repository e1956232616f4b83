// The configuration space of one PCI function. Spec: PCI Local Bus 3.0
// §6.1 (layout, type-0 header), §6.2.1 (identification), §6.2.2 (command),
// §6.2.3 (status), §6.2.4 (interrupt line/pin), §6.2.5.1 (BARs and their
// sizing), §6.7 (capabilities list); PCI Express Base 3.0 §7.2.2 for the
// 4 KiB extended space that ECAM reaches.
// Implemented: the type-0 header, per-byte write masks and write-1-to-clear
// bits, I/O, 32-bit and 64-bit memory BARs with sizing, the standard
// capability list (0x40-0xff), save()/restore_writable() for snapshots.
// Missing: extended capabilities (0x100-0xfff
// reads zero, which the PCIe spec's "Extended Capabilities in Configuration
// Space" defines as "none"), expansion ROM
// (its BAR reads zero: no ROM), type-1 (bridge) headers, multi-function
// devices.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>

#include "base/result.h"

namespace keel::devices {

inline constexpr size_t kPciConfigSpaceSizeBytes = 4096;  // PCIe extended space
inline constexpr size_t kPciLegacyConfigSizeBytes = 256;  // what mechanism #1 reaches
inline constexpr int kPciBarCount = 6;

// Type-0 header offsets (PCI 3.0 §6.1, figure 6-1).
inline constexpr uint16_t kPciVendorIdOffset = 0x00;
inline constexpr uint16_t kPciDeviceIdOffset = 0x02;
inline constexpr uint16_t kPciCommandOffset = 0x04;
inline constexpr uint16_t kPciStatusOffset = 0x06;
inline constexpr uint16_t kPciRevisionIdOffset = 0x08;
inline constexpr uint16_t kPciProgIfOffset = 0x09;  // class code: prog-if, subclass, base class
inline constexpr uint16_t kPciSubclassOffset = 0x0a;
inline constexpr uint16_t kPciClassOffset = 0x0b;
inline constexpr uint16_t kPciCacheLineSizeOffset = 0x0c;
inline constexpr uint16_t kPciHeaderTypeOffset = 0x0e;
inline constexpr uint16_t kPciBar0Offset = 0x10;
inline constexpr uint16_t kPciSubsystemVendorIdOffset = 0x2c;
inline constexpr uint16_t kPciSubsystemIdOffset = 0x2e;
inline constexpr uint16_t kPciExpansionRomOffset = 0x30;
inline constexpr uint16_t kPciCapabilitiesPointerOffset = 0x34;
inline constexpr uint16_t kPciInterruptLineOffset = 0x3c;
inline constexpr uint16_t kPciInterruptPinOffset = 0x3d;

// Command register bits (PCI 3.0 §6.2.2).
inline constexpr uint16_t kPciCommandIo = 1u << 0;
inline constexpr uint16_t kPciCommandMemory = 1u << 1;
inline constexpr uint16_t kPciCommandBusMaster = 1u << 2;
inline constexpr uint16_t kPciCommandParityErrorResponse = 1u << 6;
inline constexpr uint16_t kPciCommandSerr = 1u << 8;
inline constexpr uint16_t kPciCommandInterruptDisable = 1u << 10;

// Status register bits (PCI 3.0 §6.2.3). The error bits are write-1-to-clear.
inline constexpr uint16_t kPciStatusInterrupt = 1u << 3;
inline constexpr uint16_t kPciStatusCapabilities = 1u << 4;
inline constexpr uint16_t kPciStatusMasterDataParityError = 1u << 8;
inline constexpr uint16_t kPciStatusSignaledTargetAbort = 1u << 11;
inline constexpr uint16_t kPciStatusReceivedTargetAbort = 1u << 12;
inline constexpr uint16_t kPciStatusReceivedMasterAbort = 1u << 13;
inline constexpr uint16_t kPciStatusSignaledSystemError = 1u << 14;
inline constexpr uint16_t kPciStatusDetectedParityError = 1u << 15;

// What a snapshot keeps of a function's configuration space: the legacy
// 256 bytes (the header and capabilities; nothing above is writable).
using PciConfigBytes = std::array<uint8_t, kPciLegacyConfigSizeBytes>;

// Capability IDs (PCI Code and ID Assignment Specification, §2).
inline constexpr uint8_t kPciCapabilityMsi = 0x05;
inline constexpr uint8_t kPciCapabilityVendor = 0x09;
inline constexpr uint8_t kPciCapabilityPciExpress = 0x10;
inline constexpr uint8_t kPciCapabilityMsix = 0x11;

enum class BarKind : uint8_t { Io, Mem32, Mem64 };
enum class Prefetchable : uint8_t { No, Yes };
enum class InterruptPin : uint8_t { None = 0, IntA = 1, IntB = 2, IntC = 3, IntD = 4 };

// The identity a type-0 header presents (PCI 3.0 §6.2.1).
struct PciHeader {
  uint16_t vendor_id = 0;
  uint16_t device_id = 0;
  uint8_t revision_id = 0;
  uint8_t class_code = 0;  // base class, offset 0x0b
  uint8_t subclass = 0;    // offset 0x0a
  uint8_t prog_if = 0;     // offset 0x09
  uint16_t subsystem_vendor_id = 0;
  uint16_t subsystem_id = 0;
  InterruptPin interrupt_pin = InterruptPin::None;
};

struct PciBar {
  BarKind kind = BarKind::Mem32;
  uint64_t size_bytes = 0;
  Prefetchable prefetchable = Prefetchable::No;

  bool operator==(const PciBar&) const = default;
};

// Two kinds of callers: the guest, through read()/write() (reached from the
// PciBus on vCPU threads; every offset and size is checked), and the device
// that owns the space, through the builder and get_/set_ calls (offsets are
// our own constants, so a bad one is a bug and CHECKs). An internal mutex
// makes both safe to use from any thread.
class PciConfigSpace {
 public:
  // A type-0 header with header's identity. Writable from the start: the
  // command bits Keel implements, cache line size, interrupt line; the
  // status error bits are write-1-to-clear. Everything else is read-only.
  explicit PciConfigSpace(const PciHeader& header);
  PciConfigSpace(const PciConfigSpace&) = delete;
  PciConfigSpace& operator=(const PciConfigSpace&) = delete;

  // True for 1-, 2- or 4-byte accesses inside the space that stay within
  // one dword: what a PCI configuration transaction can carry (byte enables
  // select bytes of one dword, PCI 3.0 §3.2.2.3.2; PCIe §7.2.2 leaves
  // DW-crossing ECAM accesses undefined).
  static bool valid_access(uint32_t offset, size_t size_bytes);

  // Guest accesses. An invalid access reads all ones and writes nothing;
  // write() returns whether it was applied.
  void read(uint32_t offset, std::span<std::byte> data) const;
  bool write(uint32_t offset, std::span<const std::byte> data);

  // Defines BAR index (0-5) of size_bytes, a power of two: Io 4-256 bytes
  // (PCI 3.0 §6.2.5.1 limits an I/O BAR to 256 bytes), Mem32 16 bytes-2 GiB,
  // Mem64 from 16 bytes, taking slots index and index + 1. The address reads
  // zero until assigned; writing all ones reads back the size mask.
  Result<void> add_bar(int index, uint64_t size_bytes, BarKind kind,
                       Prefetchable prefetchable = Prefetchable::No);
  // The BAR defined at index; nullopt for an unused slot and for the upper
  // half of a 64-bit BAR.
  std::optional<PciBar> bar(int index) const;
  // The base address the guest (or assign_bars) programmed; 0 if undefined.
  uint64_t bar_address(int index) const;
  // Programs a defined BAR as firmware would (the low bits are dropped).
  void set_bar_address(int index, uint64_t address);

  // Appends a capability (PCI 3.0 §6.7) to the list: body is what follows
  // the ID and Next bytes. Placed dword-aligned from 0x40 on, read-only
  // until the device calls set_write_mask. Returns the capability's offset
  // (its ID byte); OutOfRange when it no longer fits below 0x100.
  Result<uint8_t> add_capability(uint8_t id, std::span<const std::byte> body);

  uint16_t command() const;
  // Sets the command register through its write mask, as firmware would.
  void set_command(uint16_t value);
  bool io_decode_enabled() const { return (command() & kPciCommandIo) != 0; }
  bool memory_decode_enabled() const { return (command() & kPciCommandMemory) != 0; }
  bool bus_master_enabled() const { return (command() & kPciCommandBusMaster) != 0; }
  uint16_t status() const { return get_u16(kPciStatusOffset); }
  // The INTx status bit (PCI 3.0 §6.2.3 bit 3), kept by a device using INTx.
  void set_interrupt_status(bool asserted);

  // Device-side raw access, bypassing the write masks.
  uint8_t get_u8(uint16_t offset) const { return static_cast<uint8_t>(get(offset, 1)); }
  uint16_t get_u16(uint16_t offset) const { return static_cast<uint16_t>(get(offset, 2)); }
  uint32_t get_u32(uint16_t offset) const { return get(offset, 4); }
  void set_u8(uint16_t offset, uint8_t value) { set(offset, 1, value); }
  void set_u16(uint16_t offset, uint16_t value) { set(offset, 2, value); }
  void set_u32(uint16_t offset, uint32_t value) { set(offset, 4, value); }
  // Snapshots: the first 256 bytes as they are now, and the reverse, which
  // takes from saved only the bits the guest could have written (BAR
  // addresses, the command register, capability control bits): identity,
  // layout and read-only bits stay this function's own, so a hostile
  // snapshot cannot change what the device is.
  PciConfigBytes save() const;
  void restore_writable(const PciConfigBytes& saved);

  // Which bits of the size_bytes (1-4) little-endian bytes at offset the
  // guest may write / may clear by writing 1.
  void set_write_mask(uint16_t offset, size_t size_bytes, uint32_t mask);
  void set_clear_mask(uint16_t offset, size_t size_bytes, uint32_t mask);

 private:
  using Bytes = std::array<uint8_t, kPciConfigSpaceSizeBytes>;

  uint32_t get(uint16_t offset, size_t size_bytes) const;
  void set(uint16_t offset, size_t size_bytes, uint32_t value);
  // Applies value through the write mask (no write-1-to-clear); caller locks.
  void masked_store_locked(uint16_t offset, size_t size_bytes, uint32_t value);

  mutable std::mutex mutex_;  // guards every member below
  Bytes bytes_{};
  Bytes write_mask_{};
  Bytes clear_mask_{};  // write-1-to-clear bits
  std::array<std::optional<PciBar>, kPciBarCount> bars_{};
  uint8_t bar_slots_used_ = 0;      // bit i: BAR slot i taken (a Mem64 takes two)
  uint8_t last_capability_ = 0;     // offset of the list's tail, 0 when empty
  uint16_t capability_end_ = 0x40;  // first byte after the tail
};

}  // namespace keel::devices
