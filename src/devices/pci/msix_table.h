// The MSI-X table and pending bit array of one function, and delivery of
// its vectors. Spec: PCI Local Bus 3.0 §6.8.2 (table entries: message
// address, upper address, data, vector control with the mask bit; the PBA;
// §6.8.2.9 masking and pending), §6.8.3.5 (per-vector masking and function
// masking: a masked vector's messages are held pending and sent when
// unmasked).
// Implemented: dword and qword accesses to the table and PBA, per-vector
// and function masks, pending delivery on unmask, routing each vector
// through an InterruptFabric vector only while it is unmasked (so the
// driver's masked table programming costs no routing updates).
// save()/restore_entries() for snapshots.
// Missing: nothing known.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "base/result.h"
#include "devices/interrupt_fabric.h"

namespace keel::devices {

inline constexpr uint16_t kMsixVectorControlMask = 1;

// One table entry as a snapshot keeps it.
struct MsixEntryState {
  uint64_t address = 0;
  uint32_t data = 0;
  uint32_t control = kMsixVectorControlMask;
  bool pending = false;
  bool operator==(const MsixEntryState&) const = default;
};

class MsixTable {
 public:
  // Allocates size vectors (1-2048) from fabric, which must outlive the table.
  static Result<std::unique_ptr<MsixTable>> create(InterruptFabric& fabric, uint16_t size);
  MsixTable(const MsixTable&) = delete;
  MsixTable& operator=(const MsixTable&) = delete;

  uint16_t size() const { return static_cast<uint16_t>(entries_.size()); }
  uint64_t table_size_bytes() const { return uint64_t{size()} * 16; }
  uint64_t pba_size_bytes() const { return (uint64_t{size()} + 63) / 64 * 8; }

  // Guest accesses relative to the table's / PBA's start. Only aligned
  // 4- and 8-byte accesses inside them are honoured (§6.8.2); others read
  // all ones and are dropped, with a rate-limited log. The PBA is read-only.
  void read_table(uint64_t offset, std::span<std::byte> data);
  void write_table(uint64_t offset, std::span<const std::byte> data);
  void read_pba(uint64_t offset, std::span<std::byte> data);

  // The capability's Message Control changed (MSI-X Enable, Function Mask).
  void set_control(bool enabled, bool function_masked);
  bool enabled() const;

  // Sends vector's message, or holds it pending while masked. Any thread.
  // A vector out of range, or MSI-X disabled, drops the interrupt (Keel's
  // virtio devices have no INTx); returns false then.
  bool notify(uint16_t vector);

  // Power-on state: every entry zero and masked, nothing pending, disabled.
  void reset();

  // Snapshots: the entries and pending bits. Restoring into a table of a
  // different size is Corrupt. Restored entries are routed (and what is
  // pending sent) by the next set_control() that finds them unmasked, so
  // restore the entries first, then the capability's control bits.
  std::vector<MsixEntryState> save() const;
  Result<void> restore_entries(std::span<const MsixEntryState> entries);

 private:
  struct Entry {
    MsiMessage message;
    uint32_t control = kMsixVectorControlMask;
    bool pending = false;
    std::optional<MsiMessage> routed;  // what the fabric vector carries now
  };
  explicit MsixTable(std::vector<std::unique_ptr<MsiVector>> vectors);

  bool masked_locked(const Entry& entry) const {
    return !enabled_ || function_masked_ || (entry.control & kMsixVectorControlMask) != 0;
  }
  // Routes an unmasked entry and sends what is pending.
  void unmasked_locked(size_t index);
  uint32_t table_dword_locked(size_t index, size_t dword) const;
  void write_table_dword_locked(size_t index, size_t dword, uint32_t value);

  mutable std::mutex mutex_;  // a leaf lock: guards everything below
  std::vector<std::unique_ptr<MsiVector>> vectors_;
  std::vector<Entry> entries_;
  bool enabled_ = false;
  bool function_masked_ = false;
};

}  // namespace keel::devices
