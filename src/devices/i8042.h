// i8042 keyboard controller, only as far as a guest uses it to reset the
// machine (command 0xFE on port 0x64: pulse the CPU reset line).
// Implemented: status and data reads (no keyboard attached), reset.
// Missing: keyboard and mouse (Keel guests have none).
#pragma once

#include <functional>

#include "devices/io_handler.h"

namespace keel::devices {

class I8042 : public IoHandler {
 public:
  explicit I8042(std::function<void()> reset) : reset_(std::move(reset)) {}
  // Mapped at port 0x60 with length 5: offset 0 is data, offset 4 is command/status.
  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

 private:
  std::function<void()> reset_;
};

}  // namespace keel::devices
