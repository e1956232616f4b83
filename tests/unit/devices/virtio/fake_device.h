// Test support for the virtio-pci transport: an InterruptFabric that
// records routes, triggers and doorbells, and a VirtioDevice that records
// what the transport asks of it.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "devices/interrupt_fabric.h"
#include "devices/virtio/device.h"

namespace keel::devices::virtio::testing {

class FakeFabric : public InterruptFabric {
 public:
  struct Vector : MsiVector {
    Vector(FakeFabric& fabric, size_t index) : fabric_(fabric), index_(index) {}
    Result<void> set_message(const MsiMessage& message) override {
      std::lock_guard lock(fabric_.mutex);
      fabric_.messages[index_] = message;
      ++fabric_.route_updates;
      return ok();
    }
    void trigger() override {
      std::lock_guard lock(fabric_.mutex);
      ++fabric_.triggers[index_];
    }
    FakeFabric& fabric_;
    size_t index_;
  };

  Result<std::unique_ptr<MsiVector>> allocate_msi() override {
    std::lock_guard lock(mutex);
    return std::unique_ptr<MsiVector>(std::make_unique<Vector>(*this, allocated++));
  }
  Result<void> add_mmio_doorbell(const EventFd& event, uint64_t address, uint32_t length) override {
    std::lock_guard lock(mutex);
    doorbells[address] = {event.get(), length};
    return ok();
  }
  Result<void> remove_mmio_doorbell(const EventFd&, uint64_t address, uint32_t) override {
    std::lock_guard lock(mutex);
    doorbells.erase(address);
    return ok();
  }
  int triggered(size_t vector) {
    std::lock_guard lock(mutex);
    return triggers[vector];
  }

  std::mutex mutex;
  size_t allocated = 0;
  int route_updates = 0;
  std::map<size_t, MsiMessage> messages;
  std::map<size_t, int> triggers;
  std::map<uint64_t, std::pair<int, uint32_t>> doorbells;  // address -> (fd, length)
};

// Records every call; config space is 8 bytes, the first 4 writable.
class FakeDevice : public VirtioDevice {
 public:
  DeviceType type() const override { return DeviceType::Entropy; }
  std::string_view name() const override { return "fake"; }
  uint64_t features() const override { return 1u << 3; }
  std::vector<uint16_t> queue_max_sizes() const override { return {16, 8}; }
  size_t config_size_bytes() const override { return 8; }
  void read_config(uint32_t offset, std::span<std::byte> data) override {
    for (size_t i = 0; i < data.size(); ++i) data[i] = config[offset + i];
  }
  void write_config(uint32_t offset, std::span<const std::byte> data) override {
    for (size_t i = 0; i < data.size(); ++i) {
      if (offset + i < 4) config[offset + i] = data[i];
    }
  }
  Result<void> activate(ActivateContext context) override {
    if (fail_activation) return fail(Errc::InvalidArgument, "fake refuses");
    ++activations;
    features_accepted = context.features;
    queues_present.clear();
    queue_states.clear();
    for (auto& queue : context.queues) {
      queues_present.push_back(queue.has_value());
      queue_states.push_back(queue ? std::optional(queue->save()) : std::nullopt);
    }
    interrupt = context.interrupt;
    return ok();
  }
  // Snapshots: the queues as activated (tests move their positions in
  // queue_states) and extra as given.
  Result<VirtioDeviceState> save_state() const override {
    return VirtioDeviceState{.queues = queue_states, .extra = extra};
  }
  Result<void> restore_state(ActivateContext context, std::span<const std::byte> saved) override {
    extra.assign(saved.begin(), saved.end());
    ++restores;
    return activate(std::move(context));
  }
  void notify(uint16_t queue) override {
    std::lock_guard lock(mutex);
    notified.push_back(queue);
  }
  void reset() override {
    ++resets;
    interrupt.reset();
  }

  std::mutex mutex;  // guards notified
  std::vector<uint16_t> notified;
  std::array<std::byte, 8> config{std::byte{1}, std::byte{2}, std::byte{3}, std::byte{4},
                                  std::byte{5}, std::byte{6}, std::byte{7}, std::byte{8}};
  bool fail_activation = false;
  int activations = 0;
  int resets = 0;
  uint64_t features_accepted = 0;
  std::vector<bool> queues_present;
  std::vector<std::optional<VirtqueueState>> queue_states;
  std::vector<std::byte> extra;
  int restores = 0;
  std::shared_ptr<Interrupt> interrupt;
};

}  // namespace keel::devices::virtio::testing
