#include "devices/i8042.h"

#include <cstring>

namespace keel::devices {

void I8042::read(uint64_t, std::span<std::byte> data) {
  // Status: output buffer empty, input buffer empty, self-test passed bit clear.
  std::memset(data.data(), 0, data.size());
}

void I8042::write(uint64_t offset, std::span<const std::byte> data) {
  constexpr uint64_t kCommandPort = 4;
  constexpr uint8_t kPulseResetLine = 0xfe;
  if (offset == kCommandPort && !data.empty() && static_cast<uint8_t>(data[0]) == kPulseResetLine) {
    reset_();
  }
}

}  // namespace keel::devices
