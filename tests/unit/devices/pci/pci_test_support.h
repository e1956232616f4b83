// Fakes shared by the PCI tests: a device with configurable BARs whose
// handlers record the offsets they see, and helpers for little-endian bytes.
#pragma once

#include <array>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "devices/io_handler.h"
#include "devices/pci/pci_config_space.h"
#include "devices/pci/pci_device.h"

namespace keel::devices::testing {

class RecordingHandler : public IoHandler {
 public:
  void read(uint64_t offset, std::span<std::byte> data) override {
    std::lock_guard lock(mutex);
    reads.push_back(offset);
    for (auto& b : data) b = std::byte{0x5a};
  }
  void write(uint64_t offset, std::span<const std::byte> data) override {
    std::lock_guard lock(mutex);
    writes.push_back(offset);
    last_write_size = data.size();
  }
  std::mutex mutex;
  std::vector<uint64_t> reads;
  std::vector<uint64_t> writes;
  size_t last_write_size = 0;
};

inline PciHeader test_header() {
  return PciHeader{.vendor_id = 0x1af4,
                   .device_id = 0x1042,
                   .revision_id = 0x01,
                   .class_code = 0x01,
                   .subclass = 0x00,
                   .prog_if = 0x00,
                   .subsystem_vendor_id = 0x1af4,
                   .subsystem_id = 0x0002,
                   .interrupt_pin = InterruptPin::IntA};
}

class FakePciDevice : public PciDevice {
 public:
  FakePciDevice() : config_(test_header()) {}

  // Defines the BAR and gives it a recording handler.
  [[nodiscard]] bool add_bar(int index, uint64_t size_bytes, BarKind kind,
                             Prefetchable prefetchable = Prefetchable::No) {
    if (!config_.add_bar(index, size_bytes, kind, prefetchable)) return false;
    handlers[index] = std::make_shared<RecordingHandler>();
    return true;
  }

  PciConfigSpace& config() override { return config_; }
  void before_config_read(uint32_t offset, size_t size_bytes) override {
    reads_seen.push_back({offset, size_bytes});
  }
  void config_written(uint32_t offset, size_t size_bytes) override {
    writes_seen.push_back({offset, size_bytes});
  }
  std::shared_ptr<IoHandler> bar_handler(int bar) override {
    auto it = handlers.find(bar);
    return it == handlers.end() ? nullptr : it->second;
  }

  std::map<int, std::shared_ptr<RecordingHandler>> handlers;
  std::vector<std::pair<uint32_t, size_t>> reads_seen;
  std::vector<std::pair<uint32_t, size_t>> writes_seen;

 private:
  PciConfigSpace config_;
};

template <size_t N>
uint32_t to_u32(const std::array<std::byte, N>& bytes) {
  uint32_t value = 0;
  for (size_t i = 0; i < N && i < 4; ++i) value |= std::to_integer<uint32_t>(bytes[i]) << (8 * i);
  return value;
}

template <size_t N>
std::array<std::byte, N> le_bytes(uint32_t value) {
  std::array<std::byte, N> bytes{};
  for (size_t i = 0; i < N; ++i) bytes[i] = std::byte((value >> (8 * i)) & 0xff);
  return bytes;
}

// Guest-style accesses straight to a config space.
inline uint32_t config_read(const PciConfigSpace& config, uint32_t offset, size_t size) {
  std::array<std::byte, 4> data{};
  config.read(offset, std::span(data).first(size));
  uint32_t value = 0;
  for (size_t i = 0; i < size; ++i) value |= std::to_integer<uint32_t>(data[i]) << (8 * i);
  return value;
}

inline bool config_write(PciConfigSpace& config, uint32_t offset, size_t size, uint32_t value) {
  auto data = le_bytes<4>(value);
  return config.write(offset, std::span<const std::byte>(data).first(size));
}

}  // namespace keel::devices::testing
