// MSI-X table and PBA. Spec: PCI Local Bus 3.0 §6.8.2, §6.8.3.5.
#include "devices/pci/msix_table.h"

#include <cstring>

#include <fmt/format.h>

#include "base/log.h"

namespace keel::devices {
namespace {

constexpr size_t kEntryBytes = 16;

uint64_t load_le(std::span<const std::byte> data) {
  uint64_t value = 0;
  std::memcpy(&value, data.data(), data.size());
  return value;
}

void store_le(std::span<std::byte> data, uint64_t value) {
  std::memcpy(data.data(), &value, data.size());
}

bool aligned_access(uint64_t offset, size_t size_bytes, uint64_t limit) {
  return (size_bytes == 4 || size_bytes == 8) && offset % size_bytes == 0 && offset < limit &&
         size_bytes <= limit - offset;
}

}  // namespace

Result<std::unique_ptr<MsixTable>> MsixTable::create(InterruptFabric& fabric, uint16_t size) {
  if (size == 0 || size > 2048) {
    return fail(Errc::InvalidArgument, fmt::format("MSI-X table size {}", size));
  }
  std::vector<std::unique_ptr<MsiVector>> vectors;
  vectors.reserve(size);
  for (uint16_t i = 0; i < size; ++i) vectors.push_back(TRY(fabric.allocate_msi()));
  return std::unique_ptr<MsixTable>(new MsixTable(std::move(vectors)));
}

MsixTable::MsixTable(std::vector<std::unique_ptr<MsiVector>> vectors)
    : vectors_(std::move(vectors)), entries_(vectors_.size()) {}

void MsixTable::read_table(uint64_t offset, std::span<std::byte> data) {
  if (!aligned_access(offset, data.size(), table_size_bytes())) {
    LOG_RATELIMITED(debug, "msix: bad table read of {} bytes at {:#x}", data.size(), offset);
    std::memset(data.data(), 0xff, data.size());
    return;
  }
  std::lock_guard lock(mutex_);
  const size_t index = offset / kEntryBytes;
  const size_t dword = (offset % kEntryBytes) / 4;
  uint64_t value = table_dword_locked(index, dword);
  if (data.size() == 8) value |= uint64_t{table_dword_locked(index, dword + 1)} << 32;
  store_le(data, value);
}

void MsixTable::write_table(uint64_t offset, std::span<const std::byte> data) {
  if (!aligned_access(offset, data.size(), table_size_bytes())) {
    LOG_RATELIMITED(debug, "msix: bad table write of {} bytes at {:#x}", data.size(), offset);
    return;
  }
  std::lock_guard lock(mutex_);
  const size_t index = offset / kEntryBytes;
  const size_t dword = (offset % kEntryBytes) / 4;
  const uint64_t value = load_le(data);
  const bool was_masked = masked_locked(entries_[index]);
  write_table_dword_locked(index, dword, static_cast<uint32_t>(value));
  if (data.size() == 8) write_table_dword_locked(index, dword + 1, static_cast<uint32_t>(value >> 32));
  // A changed message on an unmasked entry is routed now (§6.8.3.5 leaves
  // the result undefined, but Linux does it when moving IRQ affinity).
  if (!masked_locked(entries_[index]) &&
      (was_masked || entries_[index].routed != entries_[index].message)) {
    unmasked_locked(index);
  }
}

uint32_t MsixTable::table_dword_locked(size_t index, size_t dword) const {
  const Entry& entry = entries_[index];
  switch (dword) {
    case 0: return static_cast<uint32_t>(entry.message.address);
    case 1: return static_cast<uint32_t>(entry.message.address >> 32);
    case 2: return entry.message.data;
    default: return entry.control;
  }
}

void MsixTable::write_table_dword_locked(size_t index, size_t dword, uint32_t value) {
  Entry& entry = entries_[index];
  switch (dword) {
    case 0:
      entry.message.address = (entry.message.address & ~uint64_t{0xffffffff}) | value;
      break;
    case 1:
      entry.message.address = (entry.message.address & 0xffffffff) | (uint64_t{value} << 32);
      break;
    case 2: entry.message.data = value; break;
    default: entry.control = value & kMsixVectorControlMask; break;  // other bits reserved
  }
}

void MsixTable::read_pba(uint64_t offset, std::span<std::byte> data) {
  if (!aligned_access(offset, data.size(), pba_size_bytes())) {
    LOG_RATELIMITED(debug, "msix: bad PBA read of {} bytes at {:#x}", data.size(), offset);
    std::memset(data.data(), 0xff, data.size());
    return;
  }
  std::lock_guard lock(mutex_);
  uint64_t value = 0;
  const size_t first = offset * 8;
  for (size_t bit = 0; bit < data.size() * 8; ++bit) {
    if (first + bit < entries_.size() && entries_[first + bit].pending) value |= uint64_t{1} << bit;
  }
  store_le(data, value);
}

void MsixTable::set_control(bool enabled, bool function_masked) {
  std::lock_guard lock(mutex_);
  std::vector<bool> was_masked(entries_.size());
  for (size_t i = 0; i < entries_.size(); ++i) was_masked[i] = masked_locked(entries_[i]);
  enabled_ = enabled;
  function_masked_ = function_masked;
  for (size_t i = 0; i < entries_.size(); ++i) {
    if (was_masked[i] && !masked_locked(entries_[i])) unmasked_locked(i);
  }
}

bool MsixTable::enabled() const {
  std::lock_guard lock(mutex_);
  return enabled_;
}

void MsixTable::unmasked_locked(size_t index) {
  Entry& entry = entries_[index];
  if (entry.routed != entry.message) {
    if (auto routed = vectors_[index]->set_message(entry.message); !routed) {
      LOG_RATELIMITED(warn, "msix: routing vector {}: {}", index, routed.error().message());
      return;
    }
    entry.routed = entry.message;
  }
  if (entry.pending) {
    entry.pending = false;
    vectors_[index]->trigger();
  }
}

bool MsixTable::notify(uint16_t vector) {
  std::lock_guard lock(mutex_);
  if (vector >= entries_.size() || !enabled_) return false;
  Entry& entry = entries_[vector];
  if (masked_locked(entry) || entry.routed != entry.message) {
    entry.pending = true;
    if (!masked_locked(entry)) unmasked_locked(vector);  // a route that failed before
    return true;
  }
  vectors_[vector]->trigger();
  return true;
}

void MsixTable::reset() {
  std::lock_guard lock(mutex_);
  for (Entry& entry : entries_) {
    // What the fabric carries stays as it is; only the guest's view resets.
    std::optional<MsiMessage> routed = entry.routed;
    entry = Entry{};
    entry.routed = routed;
  }
  enabled_ = false;
  function_masked_ = false;
}

std::vector<MsixEntryState> MsixTable::save() const {
  std::lock_guard lock(mutex_);
  std::vector<MsixEntryState> saved;
  saved.reserve(entries_.size());
  for (const Entry& entry : entries_) {
    saved.push_back({.address = entry.message.address,
                     .data = entry.message.data,
                     .control = entry.control,
                     .pending = entry.pending});
  }
  return saved;
}

Result<void> MsixTable::restore_entries(std::span<const MsixEntryState> entries) {
  std::lock_guard lock(mutex_);
  if (entries.size() != entries_.size()) {
    return fail(Errc::Corrupt, fmt::format("MSI-X table of {} entries, the snapshot has {}",
                                           entries_.size(), entries.size()));
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    const bool was_masked = masked_locked(entries_[i]);
    Entry& entry = entries_[i];
    entry.message = MsiMessage{.address = entries[i].address, .data = entries[i].data};
    entry.control = entries[i].control & kMsixVectorControlMask;
    entry.pending = entries[i].pending;
    if (!was_masked && !masked_locked(entry)) unmasked_locked(i);
  }
  return ok();
}

}  // namespace keel::devices
