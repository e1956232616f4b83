// virtio-pci modern transport. Spec: virtio 1.2 §4.1, §2.1, §2.2; see
// pci_transport.h for the status card.
#include "devices/virtio/pci_transport.h"

#include <array>
#include <cstring>

#include <fmt/format.h>

#include "base/log.h"
#include "devices/pci/msix_capability.h"

namespace keel::devices::virtio {
namespace {

using L = VirtioPciLayout;

// Common configuration offsets (§4.1.4.3).
constexpr uint64_t kDeviceFeatureSelect = 0x00;
constexpr uint64_t kDeviceFeature = 0x04;
constexpr uint64_t kDriverFeatureSelect = 0x08;
constexpr uint64_t kDriverFeature = 0x0c;
constexpr uint64_t kConfigMsixVector = 0x10;
constexpr uint64_t kNumQueues = 0x12;
constexpr uint64_t kDeviceStatus = 0x14;
constexpr uint64_t kConfigGeneration = 0x15;
constexpr uint64_t kQueueSelect = 0x16;
constexpr uint64_t kQueueSize = 0x18;
constexpr uint64_t kQueueMsixVector = 0x1a;
constexpr uint64_t kQueueEnable = 0x1c;
constexpr uint64_t kQueueNotifyOff = 0x1e;
constexpr uint64_t kQueueDesc = 0x20;
constexpr uint64_t kQueueDriver = 0x28;
constexpr uint64_t kQueueDevice = 0x30;

// Offsets inside a virtio capability (struct virtio_pci_cap, §4.1.4).
constexpr uint16_t kCapBar = 4;
constexpr uint16_t kCapOffset = 8;
constexpr uint16_t kCapLength = 12;
constexpr uint16_t kCapPciCfgData = 16;

// The queue features the transport handles for every device (Virtqueue).
constexpr uint64_t kTransportFeatures = kFeatureVersion1 | kFeatureIndirectDesc | kFeatureEventIdx;

PciHeader header_for(DeviceType type) {
  PciHeader header{
      .vendor_id = kVirtioPciVendorId,
      .device_id = static_cast<uint16_t>(kVirtioPciDeviceIdBase + static_cast<uint16_t>(type)),
      .revision_id = 1,  // §4.1.2.1: modern devices have revision 1 or more
      .class_code = 0xff,
      .subclass = 0x00,
      .prog_if = 0,
      .subsystem_vendor_id = kVirtioPciVendorId,
      .subsystem_id = 0x1100,
      .interrupt_pin = InterruptPin::None,
  };
  switch (type) {
    case DeviceType::Net: header.class_code = 0x02; break;      // network controller
    case DeviceType::Block: header.class_code = 0x01; break;    // mass storage
    case DeviceType::Console:
      header.class_code = 0x07;  // simple communication, other
      header.subclass = 0x80;
      break;
    default: break;
  }
  return header;
}

void put_u32(std::span<std::byte> out, size_t at, uint32_t value) {
  std::memcpy(out.data() + at, &value, 4);
}

uint64_t load_le(std::span<const std::byte> data) {
  uint64_t value = 0;
  std::memcpy(&value, data.data(), std::min<size_t>(data.size(), 8));
  return value;
}

bool overlaps(uint64_t offset, size_t size, uint64_t start, uint64_t length) {
  return offset < start + length && start < offset + size;
}

}  // namespace

class VirtioPci::Link : public Interrupt {
 public:
  explicit Link(VirtioPci& owner) : owner_(owner) {}
  void notify_queue(uint16_t queue) override { owner_.signal_queue(queue); }
  void notify_config() override { owner_.signal_config(); }
  void needs_reset() override { owner_.signal_needs_reset(); }

 private:
  VirtioPci& owner_;  // the transport resets the device before it goes
};

namespace {
class BarHandler : public IoHandler {
 public:
  explicit BarHandler(VirtioPci& owner) : owner_(owner) {}
  void read(uint64_t offset, std::span<std::byte> data) override { owner_.bar_read(offset, data); }
  void write(uint64_t offset, std::span<const std::byte> data) override {
    owner_.bar_write(offset, data);
  }

 private:
  VirtioPci& owner_;
};
}  // namespace

Result<std::shared_ptr<VirtioPci>> VirtioPci::create(std::shared_ptr<VirtioDevice> device,
                                                     const memory::GuestMemory& memory,
                                                     InterruptFabric& fabric,
                                                     EventLoop& event_loop) {
  if (!device) return fail(Errc::InvalidArgument, "virtio-pci: no device");
  const PciHeader header = header_for(device->type());
  std::shared_ptr<VirtioPci> pci(new VirtioPci(std::move(device), memory, fabric, event_loop, header));
  TRY_CONTEXT(pci->build(), fmt::format("virtio-pci {}", pci->device_->name()));
  return pci;
}

VirtioPci::VirtioPci(std::shared_ptr<VirtioDevice> device, const memory::GuestMemory& memory,
                     InterruptFabric& fabric, EventLoop& event_loop, const PciHeader& header)
    : device_(std::move(device)), memory_(memory), fabric_(fabric), event_loop_(event_loop),
      config_(header), device_features_(device_->features() | kTransportFeatures),
      device_config_size_(device_->config_size_bytes()) {}

Result<void> VirtioPci::build() {
  const std::vector<uint16_t> max_sizes = device_->queue_max_sizes();
  if (max_sizes.empty() || max_sizes.size() > 1024) {
    return fail(Errc::InvalidArgument, fmt::format("{} queues", max_sizes.size()));
  }
  if (device_config_size_ > L::kDeviceMaxSize) {
    return fail(Errc::InvalidArgument, fmt::format("config space of {} bytes", device_config_size_));
  }
  for (uint16_t max_size : max_sizes) {
    if (max_size == 0 || max_size > kMaxQueueSize || (max_size & (max_size - 1)) != 0) {
      return fail(Errc::InvalidArgument, fmt::format("queue size {}", max_size));
    }
    queues_.push_back(Queue::fresh(max_size));
    doorbells_.push_back(TRY(EventFd::create()));
  }
  queue_vectors_ = std::make_unique<std::atomic<uint16_t>[]>(queues_.size());
  for (size_t i = 0; i < queues_.size(); ++i) queue_vectors_[i].store(kVirtioNoVector);

  TRY(config_.add_bar(L::kBar, L::kBarSize, BarKind::Mem32));
  auto add_cap = [&](uint8_t type, uint64_t offset, uint64_t length,
                     std::optional<uint32_t> extra) -> Result<uint8_t> {
    std::array<std::byte, 18> body{};
    const size_t body_size = extra ? 18 : 14;
    body[0] = std::byte(body_size + 2);  // cap_len counts ID and Next too
    body[1] = std::byte(type);
    body[2] = std::byte(L::kBar);
    put_u32(body, 6, static_cast<uint32_t>(offset));
    put_u32(body, 10, static_cast<uint32_t>(length));
    if (extra) put_u32(body, 14, *extra);
    return config_.add_capability(kPciCapabilityVendor, std::span(body).first(body_size));
  };
  TRY(add_cap(kCapCommon, L::kCommonOffset, L::kCommonSize, std::nullopt));
  TRY(add_cap(kCapIsr, L::kIsrOffset, L::kIsrSize, std::nullopt));
  if (device_config_size_ > 0) {
    TRY(add_cap(kCapDevice, L::kDeviceOffset, device_config_size_, std::nullopt));
  }
  TRY(add_cap(kCapNotify, L::kNotifyOffset, queues_.size() * L::kNotifyMultiplier,
              L::kNotifyMultiplier));
  // §4.1.4.9: bar, offset, length and data are the driver's to write.
  pci_cfg_cap_offset_ = TRY(add_cap(kCapPciCfg, 0, 0, 0u));
  config_.set_u8(static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapBar), 0);
  config_.set_write_mask(static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapBar), 1, 0xff);
  config_.set_write_mask(static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapOffset), 4, 0xffffffff);
  config_.set_write_mask(static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapLength), 4, 0xffffffff);
  config_.set_write_mask(static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapPciCfgData), 4,
                         0xffffffff);

  const auto vectors = static_cast<uint16_t>(queues_.size() + 1);
  msix_ = TRY(MsixTable::create(fabric_, vectors));
  msix_cap_offset_ = TRY(add_msix_capability(
      config_, MsixCapability{.table_size = vectors,
                              .table_bar = L::kBar,
                              .table_offset = static_cast<uint32_t>(L::kMsixTableOffset),
                              .pba_bar = L::kBar,
                              .pba_offset = static_cast<uint32_t>(L::kMsixPbaOffset)}));
  if (msix_->table_size_bytes() > L::kMsixPbaOffset - L::kMsixTableOffset) {
    return fail(Errc::InvalidArgument, "MSI-X table does not fit its BAR region");
  }
  bar_handler_ = std::make_shared<BarHandler>(*this);
  link_ = std::make_shared<Link>(*this);
  return ok();
}

VirtioPci::~VirtioPci() {
  std::lock_guard lock(mutex_);
  reset_locked();
  unregister_doorbells_locked();
}

std::shared_ptr<IoHandler> VirtioPci::bar_handler(int bar) {
  return bar == L::kBar ? bar_handler_ : nullptr;
}

uint64_t VirtioPci::offered_features() const { return device_features_; }

void VirtioPci::before_config_read(uint32_t offset, size_t size_bytes) {
  const uint16_t data_at = static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapPciCfgData);
  if (!overlaps(offset, size_bytes, data_at, 4)) return;
  // §4.1.4.9.1: pci_cfg_data shows the BAR bytes the window selects.
  const uint8_t bar = config_.get_u8(static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapBar));
  const uint32_t at = config_.get_u32(static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapOffset));
  const uint32_t length = config_.get_u32(static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapLength));
  std::array<std::byte, 4> bytes{};
  if (bar == L::kBar && (length == 1 || length == 2 || length == 4) && at % length == 0 &&
      at < L::kBarSize) {
    bar_read(at, std::span(bytes).first(length));
  }
  uint32_t value = 0;
  std::memcpy(&value, bytes.data(), 4);
  config_.set_u32(data_at, value);
}

void VirtioPci::config_written(uint32_t offset, size_t size_bytes) {
  const uint16_t data_at = static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapPciCfgData);
  if (overlaps(offset, size_bytes, data_at, 4)) {
    const uint8_t bar = config_.get_u8(static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapBar));
    const uint32_t at = config_.get_u32(static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapOffset));
    const uint32_t length =
        config_.get_u32(static_cast<uint16_t>(pci_cfg_cap_offset_ + kCapLength));
    if (bar == L::kBar && (length == 1 || length == 2 || length == 4) && at % length == 0 &&
        at < L::kBarSize) {
      std::array<std::byte, 4> bytes{};
      const uint32_t value = config_.get_u32(data_at);
      std::memcpy(bytes.data(), &value, 4);
      bar_write(at, std::span(bytes).first(length));
    } else {
      LOG_RATELIMITED(debug, "{}: PCI cfg window bar {} offset {:#x} length {} ignored",
                      device_->name(), bar, at, length);
    }
  }
  if (overlaps(offset, size_bytes, msix_cap_offset_ + 2u, 2)) update_msix_control();
  if (overlaps(offset, size_bytes, kPciCommandOffset, 2) ||
      overlaps(offset, size_bytes, kPciBar0Offset + 4u * L::kBar, 4)) {
    std::lock_guard lock(mutex_);
    update_doorbells_locked();
  }
}

void VirtioPci::update_msix_control() {
  msix_->set_control(msix_enabled(config_, msix_cap_offset_),
                     msix_function_masked(config_, msix_cap_offset_));
}

void VirtioPci::reset() {
  std::lock_guard lock(mutex_);
  reset_locked();
  msix_->reset();
}

void VirtioPci::bar_read(uint64_t offset, std::span<std::byte> data) {
  std::memset(data.data(), 0, data.size());
  const size_t size = data.size();
  if (offset >= L::kCommonOffset && offset + size <= L::kCommonOffset + L::kCommonSize) {
    common_read(offset - L::kCommonOffset, data);
  } else if (offset >= L::kIsrOffset && offset + size <= L::kIsrOffset + L::kIsrSize) {
    // §4.1.4.5.1: reading the ISR status resets it.
    if (offset == L::kIsrOffset) data[0] = std::byte(isr_.exchange(0));
  } else if (offset >= L::kDeviceOffset && offset + size <= L::kDeviceOffset + device_config_size_) {
    device_->read_config(static_cast<uint32_t>(offset - L::kDeviceOffset), data);
  } else if (offset >= L::kMsixTableOffset &&
             offset + size <= L::kMsixTableOffset + msix_->table_size_bytes()) {
    msix_->read_table(offset - L::kMsixTableOffset, data);
  } else if (offset >= L::kMsixPbaOffset &&
             offset + size <= L::kMsixPbaOffset + msix_->pba_size_bytes()) {
    msix_->read_pba(offset - L::kMsixPbaOffset, data);
  }
  // Anything else (the notify region, gaps) reads as zero.
}

void VirtioPci::bar_write(uint64_t offset, std::span<const std::byte> data) {
  const size_t size = data.size();
  if (offset >= L::kCommonOffset && offset + size <= L::kCommonOffset + L::kCommonSize) {
    common_write(offset - L::kCommonOffset, data);
  } else if (offset >= L::kDeviceOffset && offset + size <= L::kDeviceOffset + device_config_size_) {
    device_->write_config(static_cast<uint32_t>(offset - L::kDeviceOffset), data);
  } else if (offset >= L::kNotifyOffset &&
             offset + size <= L::kNotifyOffset + queues_.size() * L::kNotifyMultiplier) {
    notify_write(offset - L::kNotifyOffset, data);
  } else if (offset >= L::kMsixTableOffset &&
             offset + size <= L::kMsixTableOffset + msix_->table_size_bytes()) {
    msix_->write_table(offset - L::kMsixTableOffset, data);
  } else {
    LOG_RATELIMITED(debug, "{}: write of {} bytes at BAR offset {:#x} ignored", device_->name(),
                    size, offset);
  }
}

void VirtioPci::common_read(uint64_t offset, std::span<std::byte> data) {
  std::array<std::byte, L::kCommonSize> bytes{};
  auto put = [&](uint64_t at, uint64_t value, size_t width) {
    std::memcpy(bytes.data() + at, &value, width);
  };
  {
    std::lock_guard lock(mutex_);
    uint32_t feature_word = 0;
    if (device_feature_select_ < 2) {
      feature_word = static_cast<uint32_t>(offered_features() >> (32 * device_feature_select_));
    }
    put(kDeviceFeatureSelect, device_feature_select_, 4);
    put(kDeviceFeature, feature_word, 4);
    put(kDriverFeatureSelect, driver_feature_select_, 4);
    uint32_t driver_word = 0;
    if (driver_feature_select_ < 2) {
      driver_word = static_cast<uint32_t>(driver_features_ >> (32 * driver_feature_select_));
    }
    put(kDriverFeature, driver_word, 4);
    put(kConfigMsixVector, config_vector_.load(), 2);
    put(kNumQueues, queues_.size(), 2);
    put(kDeviceStatus, status_.load(), 1);
    put(kConfigGeneration, config_generation_.load(), 1);
    put(kQueueSelect, queue_select_, 2);
    if (queue_select_ < queues_.size()) {
      const Queue& queue = queues_[queue_select_];
      put(kQueueSize, queue.size, 2);
      put(kQueueMsixVector, queue.msix_vector, 2);
      put(kQueueEnable, queue.enabled ? 1 : 0, 2);
      put(kQueueNotifyOff, queue_select_, 2);
      put(kQueueDesc, queue.desc, 8);
      put(kQueueDriver, queue.driver, 8);
      put(kQueueDevice, queue.device, 8);
    }
    // §4.1.4.3.1: queue_size reads 0 for a queue that does not exist.
  }
  std::memcpy(data.data(), bytes.data() + offset, data.size());
}

void VirtioPci::common_write(uint64_t offset, std::span<const std::byte> data) {
  const size_t size = data.size();
  const uint64_t value = load_le(data);
  std::lock_guard lock(mutex_);
  const uint8_t status = status_.load();
  const bool features_locked = (status & kStatusFeaturesOk) != 0;
  const bool running = (status & kStatusDriverOk) != 0;
  Queue* queue = queue_select_ < queues_.size() ? &queues_[queue_select_] : nullptr;
  auto vector_or_none = [&](uint64_t vector) {
    return vector < msix_->size() ? static_cast<uint16_t>(vector) : kVirtioNoVector;
  };
  // 64-bit queue addresses may be written whole or as two dwords (§4.1.3.1).
  auto write_address = [&](uint64_t field, uint64_t& target) {
    if (size == 8 && offset == field) {
      target = value;
    } else if (size == 4 && offset == field) {
      target = (target & ~uint64_t{0xffffffff}) | value;
    } else if (size == 4 && offset == field + 4) {
      target = (target & 0xffffffff) | (value << 32);
    } else {
      return false;
    }
    return true;
  };
  if (queue != nullptr && !running &&
      (write_address(kQueueDesc, queue->desc) || write_address(kQueueDriver, queue->driver) ||
       write_address(kQueueDevice, queue->device))) {
    return;
  }
  switch (offset | (uint64_t{size} << 8)) {
    case kDeviceFeatureSelect | (4 << 8): device_feature_select_ = static_cast<uint32_t>(value); return;
    case kDriverFeatureSelect | (4 << 8): driver_feature_select_ = static_cast<uint32_t>(value); return;
    case kDriverFeature | (4 << 8):
      if (features_locked || driver_feature_select_ >= 2) return;  // §2.2: no changes after FEATURES_OK
      if (driver_feature_select_ == 0) {
        driver_features_ = (driver_features_ & ~uint64_t{0xffffffff}) | value;
      } else {
        driver_features_ = (driver_features_ & 0xffffffff) | (value << 32);
      }
      return;
    case kConfigMsixVector | (2 << 8): config_vector_.store(vector_or_none(value)); return;
    case kDeviceStatus | (1 << 8): status_write_locked(static_cast<uint8_t>(value)); return;
    case kQueueSelect | (2 << 8): queue_select_ = static_cast<uint16_t>(value); return;
    case kQueueSize | (2 << 8):
      if (queue != nullptr && !running) queue->size = static_cast<uint16_t>(value);
      return;
    case kQueueMsixVector | (2 << 8):
      if (queue != nullptr) {
        queue->msix_vector = vector_or_none(value);
        queue_vectors_[queue_select_].store(queue->msix_vector);
      }
      return;
    case kQueueEnable | (2 << 8):
      // §4.1.4.3.2: the driver must not write 0; only enabling counts.
      if (queue != nullptr && !running && value == 1) queue->enabled = true;
      return;
    default:
      LOG_RATELIMITED(debug, "{}: common config write of {} bytes at {:#x} ignored",
                      device_->name(), size, offset);
  }
}

void VirtioPci::status_write_locked(uint8_t value) {
  if (value == 0) {
    reset_locked();
    return;
  }
  const uint8_t old = status_.load();
  if ((value & kStatusFeaturesOk) != 0 && (old & kStatusFeaturesOk) == 0) {
    // §2.2.1/§3.1.1: accept FEATURES_OK only for a subset of what was
    // offered that includes VERSION_1 (Keel has no legacy interface).
    const uint64_t unknown = driver_features_ & ~offered_features();
    if (unknown != 0 || (driver_features_ & kFeatureVersion1) == 0) {
      LOG_RATELIMITED(warn, "{}: driver features {:#x} refused (unoffered bits {:#x}{})",
                      device_->name(), driver_features_, unknown,
                      (driver_features_ & kFeatureVersion1) == 0 ? ", no VERSION_1" : "");
      value = static_cast<uint8_t>(value & ~kStatusFeaturesOk);
    }
  }
  status_.store(static_cast<uint8_t>(value | (old & kStatusNeedsReset)));
  if ((value & kStatusFailed) != 0 && (old & kStatusFailed) == 0) {
    LOG_RATELIMITED(info, "{}: the driver gave up on the device (FAILED)", device_->name());
  }
  if ((value & kStatusDriverOk) != 0 && (old & kStatusDriverOk) == 0) {
    if ((value & kStatusFeaturesOk) == 0) {
      LOG_RATELIMITED(warn, "{}: DRIVER_OK without FEATURES_OK", device_->name());
      signal_needs_reset();
      return;
    }
    activate_locked();
  }
}

Result<ActivateContext> VirtioPci::activation_context_locked(const VirtioDeviceState* saved) {
  ActivateContext context{
      .memory = &memory_,
      .features = driver_features_,
      .queues = {},
      .interrupt = link_,
      .event_loop = &event_loop_,
  };
  if (saved != nullptr && saved->queues.size() != queues_.size()) {
    return fail(Errc::Corrupt, fmt::format("{} saved queue positions for {} queues",
                                           saved->queues.size(), queues_.size()));
  }
  for (size_t index = 0; index < queues_.size(); ++index) {
    const Queue& queue = queues_[index];
    const std::optional<VirtqueueState>* position =
        saved != nullptr ? &saved->queues[index] : nullptr;
    if (!queue.enabled) {
      if (position != nullptr && position->has_value()) {
        return fail(Errc::Corrupt, fmt::format("queue {} is disabled but has a position", index));
      }
      context.queues.emplace_back();
      continue;
    }
    const QueueConfig config{.size = queue.size,
                             .desc_table = memory::GuestAddr(queue.desc),
                             .avail_ring = memory::GuestAddr(queue.driver),
                             .used_ring = memory::GuestAddr(queue.device),
                             .features = driver_features_};
    if (position == nullptr) {
      context.queues.emplace_back(
          TRY_CONTEXT(Virtqueue::create(memory_, config), fmt::format("queue {}", index)));
      continue;
    }
    if (!position->has_value()) {
      return fail(Errc::Corrupt, fmt::format("queue {} is enabled but has no position", index));
    }
    VirtqueueState state = **position;
    state.config = config;  // the registers say where the rings are
    context.queues.emplace_back(
        TRY_CONTEXT(Virtqueue::restore(memory_, state), fmt::format("queue {}", index)));
  }
  return context;
}

Result<void> VirtioPci::watch_doorbells_locked() {
  for (size_t index = 0; index < queues_.size(); ++index) {
    if (!queues_[index].enabled) continue;
    const auto queue = static_cast<uint16_t>(index);
    Result<EventLoop::WatchId> watch =
        event_loop_.add(doorbells_[index].get(), Ready::In, [this, queue](uint32_t) {
          (void)doorbells_[queue].consume();
          queue_notifications_.fetch_add(1, std::memory_order_relaxed);
          device_->notify(queue);
        });
    if (!watch) {
      unwatch_doorbells_locked();
      return fail(Error(watch.error()).wrap(fmt::format("watching queue {}", index)));
    }
    watches_.push_back(*watch);
  }
  return ok();
}

void VirtioPci::unwatch_doorbells_locked() {
  for (EventLoop::WatchId id : watches_) event_loop_.remove(id);
  watches_.clear();
}

void VirtioPci::activate_locked() {
  Result<ActivateContext> context = activation_context_locked(nullptr);
  if (!context) {
    LOG_RATELIMITED(warn, "{}: {}", device_->name(), context.error().message());
    signal_needs_reset();
    return;
  }
  if (Result<void> watched = watch_doorbells_locked(); !watched) {
    LOG_RATELIMITED(error, "{}: {}", device_->name(), watched.error().message());
    signal_needs_reset();
    return;
  }
  if (Result<void> activated = device_->activate(std::move(*context)); !activated) {
    LOG_RATELIMITED(warn, "{}: activation failed: {}", device_->name(),
                    activated.error().message());
    unwatch_doorbells_locked();
    device_->reset();
    signal_needs_reset();
    return;
  }
  active_ = true;
  // Notifications that came before DRIVER_OK are in the eventfds already
  // and run as soon as the loop sees them (level-triggered).
}

void VirtioPci::reset_locked() {
  // Stop the doorbell callbacks first (remove() waits for a running one),
  // so the device sees no notify() during or after its reset.
  unwatch_doorbells_locked();
  if (active_) {
    device_->reset();
    active_ = false;
  }
  for (size_t i = 0; i < queues_.size(); ++i) {
    queues_[i] = Queue::fresh(queues_[i].max_size);
    queue_vectors_[i].store(kVirtioNoVector);
    (void)doorbells_[i].consume();
  }
  device_feature_select_ = 0;
  driver_feature_select_ = 0;
  driver_features_ = 0;
  queue_select_ = 0;
  config_vector_.store(kVirtioNoVector);
  isr_.store(0);
  status_.store(0);
}

Result<VirtioPciState> VirtioPci::save_state() {
  std::lock_guard lock(mutex_);
  VirtioPciState state{
      .device_type = static_cast<uint16_t>(device_->type()),
      .config = config_.save(),
      .status = status_.load(),
      .isr = isr_.load(),
      .config_generation = config_generation_.load(),
      .config_vector = config_vector_.load(),
      .queue_select = queue_select_,
      .device_feature_select = device_feature_select_,
      .driver_feature_select = driver_feature_select_,
      .driver_features = driver_features_,
      .queues = {},
      .msix = msix_->save(),
      .device = std::nullopt,
  };
  state.queues.assign(queues_.begin(), queues_.end());
  if (active_) state.device = TRY(device_->save_state());
  return state;
}

Result<void> VirtioPci::restore_state(const VirtioPciState& state) {
  std::lock_guard lock(mutex_);
  const std::string_view name = device_->name();
  auto corrupt = [name](const std::string& what) {
    return fail(Errc::Corrupt, fmt::format("{}: {}", name, what));
  };
  if (active_ || status_.load() != 0) {
    return fail(Errc::Busy, fmt::format("{}: restore into a function the guest uses", name));
  }
  if (state.device_type != static_cast<uint16_t>(device_->type())) {
    return corrupt(fmt::format("the saved function is virtio device type {}", state.device_type));
  }
  if (state.queues.size() != queues_.size()) {
    return corrupt(fmt::format("{} saved queues, the device has {}", state.queues.size(),
                               queues_.size()));
  }
  auto valid_vector = [this](uint16_t vector) {
    return vector == kVirtioNoVector || vector < msix_->size();
  };
  if (!valid_vector(state.config_vector)) {
    return corrupt(fmt::format("configuration vector {}", state.config_vector));
  }
  for (size_t i = 0; i < state.queues.size(); ++i) {
    const VirtioPciQueueState& queue = state.queues[i];
    if (queue.size > queues_[i].max_size || !valid_vector(queue.msix_vector)) {
      return corrupt(fmt::format("queue {}: size {} (at most {}), vector {}", i, queue.size,
                                 queues_[i].max_size, queue.msix_vector));
    }
  }
  const bool driver_ok = (state.status & kStatusDriverOk) != 0;
  if (state.device.has_value() && !driver_ok) {
    return corrupt(fmt::format("device state saved with status {:#x}", state.status));
  }
  if (state.driver_features & ~offered_features()) {
    return corrupt(fmt::format("driver features {:#x} were never offered", state.driver_features));
  }

  // Applied whole or not at all: a failure leaves the power-on state.
  if (Result<void> applied = restore_locked(state); !applied) {
    reset_locked();
    msix_->reset();
    return fail(Error(applied.error()).wrap(name));
  }
  return ok();
}

Result<void> VirtioPci::restore_locked(const VirtioPciState& state) {
  config_.restore_writable(state.config);
  TRY(msix_->restore_entries(state.msix));
  update_msix_control();  // routes the unmasked vectors, sends what is pending
  device_feature_select_ = state.device_feature_select;
  driver_feature_select_ = state.driver_feature_select;
  driver_features_ = state.driver_features;
  queue_select_ = state.queue_select;
  for (size_t i = 0; i < queues_.size(); ++i) {
    const VirtioPciQueueState& saved = state.queues[i];
    static_cast<VirtioPciQueueState&>(queues_[i]) = saved;
    queue_vectors_[i].store(saved.msix_vector);
  }
  config_vector_.store(state.config_vector);
  config_generation_.store(state.config_generation);
  isr_.store(state.isr);
  status_.store(state.status);
  update_doorbells_locked();
  if (!state.device) return ok();
  ActivateContext context = TRY(activation_context_locked(&*state.device));
  TRY(watch_doorbells_locked());
  if (Result<void> restored = device_->restore_state(std::move(context), state.device->extra);
      !restored) {
    unwatch_doorbells_locked();
    device_->reset();
    return fail(std::move(restored).error());
  }
  active_ = true;
  return ok();
}

void VirtioPci::kick_queues() {
  std::lock_guard lock(mutex_);
  if (!active_) return;
  for (size_t i = 0; i < queues_.size(); ++i) {
    if (queues_[i].enabled) (void)doorbells_[i].signal();
  }
}

void VirtioPci::notify_write(uint64_t offset, std::span<const std::byte> /*data*/) {
  // A doorbell write that reached userspace: the ioeventfd was not
  // registered (yet) or did not match the access width.
  const uint64_t queue = offset / L::kNotifyMultiplier;
  {
    std::lock_guard lock(mutex_);
    if (!doorbell_base_) update_doorbells_locked();
  }
  if (queue < doorbells_.size()) (void)doorbells_[queue].signal();
}

void VirtioPci::update_doorbells_locked() {
  std::optional<uint64_t> base;
  const uint64_t bar_address = config_.bar_address(L::kBar);
  if (config_.memory_decode_enabled() && bar_address != 0) base = bar_address + L::kNotifyOffset;
  if (base == doorbell_base_) return;
  unregister_doorbells_locked();
  if (!base) return;
  for (size_t i = 0; i < doorbells_.size(); ++i) {
    // Linux writes the 16-bit queue index (vp_notify); other widths exit
    // and reach notify_write().
    if (auto added = fabric_.add_mmio_doorbell(doorbells_[i], *base + i * L::kNotifyMultiplier, 2);
        !added) {
      LOG_RATELIMITED(warn, "{}: doorbell for queue {}: {}", device_->name(), i,
                      added.error().message());
    }
  }
  doorbell_base_ = base;
}

void VirtioPci::unregister_doorbells_locked() {
  if (!doorbell_base_) return;
  for (size_t i = 0; i < doorbells_.size(); ++i) {
    (void)fabric_.remove_mmio_doorbell(doorbells_[i], *doorbell_base_ + i * L::kNotifyMultiplier,
                                       2);
  }
  doorbell_base_.reset();
}

void VirtioPci::signal_queue(uint16_t queue) {
  if (queue >= queues_.size()) return;
  isr_.fetch_or(1);
  const uint16_t vector = queue_vectors_[queue].load();
  if (vector == kVirtioNoVector) return;
  interrupts_.fetch_add(1, std::memory_order_relaxed);
  (void)msix_->notify(vector);
}

void VirtioPci::signal_config() {
  config_generation_.fetch_add(1);
  isr_.fetch_or(2);
  const uint16_t vector = config_vector_.load();
  if (vector == kVirtioNoVector) return;
  interrupts_.fetch_add(1, std::memory_order_relaxed);
  (void)msix_->notify(vector);
}

VirtioDevice::Counters VirtioPci::counters() const {
  VirtioDevice::Counters all = {
      {"queue_notifications", queue_notifications_.load(std::memory_order_relaxed)},
      {"interrupts", interrupts_.load(std::memory_order_relaxed)},
  };
  for (const auto& counter : device_->counters()) all.push_back(counter);
  return all;
}

void VirtioPci::signal_needs_reset() {
  const uint8_t old = status_.fetch_or(kStatusNeedsReset);
  // §2.1.2: with DRIVER_OK set, the device must also send a configuration
  // change notification.
  if ((old & kStatusNeedsReset) == 0 && (old & kStatusDriverOk) != 0) signal_config();
}

}  // namespace keel::devices::virtio
