// IoBus: maps address ranges (a port range or a guest-physical MMIO range)
// to IoHandlers. One bus for port I/O, one for MMIO. Lookups happen on vCPU
// threads; registration happens at build time or under the machine's
// control thread, so the map is guarded by a shared mutex.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <shared_mutex>
#include <span>
#include <string>

#include "base/result.h"
#include "devices/io_handler.h"

namespace keel::devices {

class IoBus {
 public:
  explicit IoBus(std::string name) : name_(std::move(name)) {}

  // Fails if [base, base + length) overlaps a range already mapped.
  Result<void> map(uint64_t base, uint64_t length, std::shared_ptr<IoHandler> handler);
  Result<void> unmap(uint64_t base);

  // Dispatch an access; returns false if no handler covers all of it
  // (reads then see all ones, writes are dropped, as on a PC).
  bool read(uint64_t address, std::span<std::byte> data) const;
  bool write(uint64_t address, std::span<const std::byte> data) const;

 private:
  struct Range {
    uint64_t length;
    std::shared_ptr<IoHandler> handler;
  };
  // Finds the handler whose range holds [address, address + size).
  const Range* find(uint64_t address, uint64_t size, uint64_t* base) const;

  std::string name_;
  mutable std::shared_mutex mutex_;  // guards ranges_
  std::map<uint64_t, Range> ranges_;  // by base address
};

}  // namespace keel::devices
