// The seam between the vCPU exit path and devices: port I/O and MMIO alike.
// Offsets are relative to the start of the range the handler was mapped at.
// Handlers get the data of a guest access and must never trust its size or
// offset beyond what the bus checked (the whole access lies in their range).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace keel::devices {

class IoHandler {
 public:
  virtual ~IoHandler() = default;
  virtual void read(uint64_t offset, std::span<std::byte> data) = 0;
  virtual void write(uint64_t offset, std::span<const std::byte> data) = 0;
};

}  // namespace keel::devices
