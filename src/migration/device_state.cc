#include "migration/device_state.h"

#include "base/records.h"

#include <algorithm>
#include <charconv>

namespace keel::migration {
namespace {

// Record tags of the serial0 section. Never reuse one.
enum class SerialField : uint16_t { Registers = 1, Flags = 2, Input = 3 };
constexpr uint16_t kLastSerialField = 3;
constexpr size_t kMaxSerialInput = 64 * 1024;

// IER, LCR, MCR, SCR, FCR, DLL, DLM, MSR in that order.
using SerialRegisters = std::array<uint8_t, 8>;
constexpr uint8_t kThrEmptyPending = 1 << 0;
constexpr uint8_t kInterruptAsserted = 1 << 1;

// Record tags of the rtc section.
enum class RtcField : uint16_t { Index = 1, Cmos = 2 };
constexpr uint16_t kLastRtcField = 2;
using Cmos = std::array<uint8_t, 128>;

// Record tags of a virtio-pci function's section. Never reuse one.
enum class VirtioField : uint16_t {
  DeviceType = 1,
  PciConfig = 2,
  Registers = 3,
  Queues = 4,
  Msix = 5,
  QueuePositions = 6,  // only for an active device
  DeviceBytes = 7,     // only for an active device; absent when empty
};
constexpr uint16_t kLastVirtioField = 7;
constexpr size_t kMaxVirtioQueues = 1024;      // what VirtioPci accepts
constexpr size_t kMaxMsixEntries = 2048;       // PCI 3.0 §6.8.2.3
constexpr size_t kMaxDeviceBytes = 4 << 20;  // a fragmented balloon's ranges

struct VirtioRegisters {
  uint64_t driver_features;
  uint32_t device_feature_select;
  uint32_t driver_feature_select;
  uint16_t config_vector;
  uint16_t queue_select;
  uint8_t status;
  uint8_t isr;
  uint8_t config_generation;
  uint8_t reserved;
};
static_assert(sizeof(VirtioRegisters) == 24);

struct VirtioQueueRecord {
  uint64_t desc;
  uint64_t driver;
  uint64_t device;
  uint16_t size;
  uint16_t msix_vector;
  uint8_t enabled;
  std::array<uint8_t, 3> reserved;
};
static_assert(sizeof(VirtioQueueRecord) == 32);

struct MsixEntryRecord {
  uint64_t address;
  uint32_t data;
  uint32_t control;
  uint8_t pending;
  std::array<uint8_t, 7> reserved;
};
static_assert(sizeof(MsixEntryRecord) == 24);

constexpr uint8_t kPositionLive = 1 << 0;
constexpr uint8_t kPositionSignalledValid = 1 << 1;
struct QueuePositionRecord {
  uint16_t last_avail_idx;
  uint16_t used_idx;
  uint16_t signalled_used;
  uint8_t flags;
  uint8_t reserved;
};
static_assert(sizeof(QueuePositionRecord) == 8);

template <typename T>
bool all_zero(const T& bytes) {
  return std::all_of(bytes.begin(), bytes.end(), [](uint8_t b) { return b == 0; });
}

}  // namespace

std::vector<std::byte> encode_serial_state(const devices::SerialState& state) {
  RecordWriter out;
  out.value(SerialField::Registers, SerialRegisters{state.ier, state.lcr, state.mcr, state.scr,
                                                    state.fcr, state.dll, state.dlm, state.msr});
  out.value(SerialField::Flags,
            static_cast<uint8_t>((state.thr_empty_pending ? kThrEmptyPending : 0) |
                                 (state.interrupt_asserted ? kInterruptAsserted : 0)));
  out.bytes(SerialField::Input, std::as_bytes(std::span(state.input)));
  return out.take();
}

Result<devices::SerialState> decode_serial_state(std::span<const std::byte> payload,
                                                 std::string_view label) {
  Records records = TRY(Records::parse(payload, label, kLastSerialField));
  auto registers = TRY(records.required<SerialRegisters>(SerialField::Registers, "registers"));
  auto flags = TRY(records.required<uint8_t>(SerialField::Flags, "flags"));
  if ((flags & ~(kThrEmptyPending | kInterruptAsserted)) != 0) {
    return fail(Errc::Corrupt, fmt::format("{}: unknown flags {:#x}", label, flags));
  }
  devices::SerialState state{.ier = registers[0],
                             .lcr = registers[1],
                             .mcr = registers[2],
                             .scr = registers[3],
                             .fcr = registers[4],
                             .dll = registers[5],
                             .dlm = registers[6],
                             .msr = registers[7],
                             .thr_empty_pending = (flags & kThrEmptyPending) != 0,
                             .interrupt_asserted = (flags & kInterruptAsserted) != 0,
                             .input = {}};
  state.input = TRY(records.array<uint8_t>(SerialField::Input, "input", kMaxSerialInput));
  return state;
}

std::vector<std::byte> encode_rtc_state(const devices::RtcState& state) {
  RecordWriter out;
  out.value(RtcField::Index, state.index);
  out.value(RtcField::Cmos, state.cmos);
  return out.take();
}

Result<devices::RtcState> decode_rtc_state(std::span<const std::byte> payload,
                                           std::string_view label) {
  Records records = TRY(Records::parse(payload, label, kLastRtcField));
  devices::RtcState state;
  state.index = TRY(records.required<uint8_t>(RtcField::Index, "register index"));
  state.cmos = TRY(records.required<Cmos>(RtcField::Cmos, "CMOS RAM"));
  return state;
}

std::string pci_section_name(devices::PciAddress address) {
  return fmt::format("pci-0000:{:02x}:{:02x}.{}", address.bus, address.device, address.function);
}

std::optional<devices::PciAddress> parse_pci_section_name(std::string_view name) {
  constexpr std::string_view kPrefix = "pci-0000:";
  // "pci-0000:BB:DD.F", lower-case hex as pci_section_name writes it.
  if (name.size() != kPrefix.size() + 7 || !name.starts_with(kPrefix)) return std::nullopt;
  std::string_view rest = name.substr(kPrefix.size());
  if (rest[2] != ':' || rest[5] != '.') return std::nullopt;
  auto hex = [](std::string_view digits, unsigned& value) {
    if (!std::all_of(digits.begin(), digits.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); })) {
      return false;
    }
    auto [end, error] = std::from_chars(digits.data(), digits.data() + digits.size(), value, 16);
    return error == std::errc() && end == digits.data() + digits.size();
  };
  unsigned bus = 0, device = 0, function = 0;
  if (!hex(rest.substr(0, 2), bus) || !hex(rest.substr(3, 2), device) ||
      !hex(rest.substr(6, 1), function) || device > 31 || function > 7) {
    return std::nullopt;
  }
  return devices::PciAddress{.bus = static_cast<uint8_t>(bus),
                             .device = static_cast<uint8_t>(device),
                             .function = static_cast<uint8_t>(function)};
}

std::vector<std::byte> encode_virtio_pci_state(const devices::virtio::VirtioPciState& state) {
  RecordWriter out;
  out.value(VirtioField::DeviceType, state.device_type);
  out.value(VirtioField::PciConfig, state.config);
  out.value(VirtioField::Registers,
            VirtioRegisters{.driver_features = state.driver_features,
                            .device_feature_select = state.device_feature_select,
                            .driver_feature_select = state.driver_feature_select,
                            .config_vector = state.config_vector,
                            .queue_select = state.queue_select,
                            .status = state.status,
                            .isr = state.isr,
                            .config_generation = state.config_generation,
                            .reserved = 0});
  std::vector<VirtioQueueRecord> queues;
  for (const devices::virtio::VirtioPciQueueState& queue : state.queues) {
    queues.push_back({.desc = queue.desc,
                      .driver = queue.driver,
                      .device = queue.device,
                      .size = queue.size,
                      .msix_vector = queue.msix_vector,
                      .enabled = queue.enabled ? uint8_t{1} : uint8_t{0},
                      .reserved = {}});
  }
  out.bytes(VirtioField::Queues, std::as_bytes(std::span(queues)));
  std::vector<MsixEntryRecord> msix;
  for (const devices::MsixEntryState& entry : state.msix) {
    msix.push_back({.address = entry.address,
                    .data = entry.data,
                    .control = entry.control,
                    .pending = entry.pending ? uint8_t{1} : uint8_t{0},
                    .reserved = {}});
  }
  out.bytes(VirtioField::Msix, std::as_bytes(std::span(msix)));
  if (state.device) {
    std::vector<QueuePositionRecord> positions;
    for (const std::optional<devices::virtio::VirtqueueState>& queue : state.device->queues) {
      QueuePositionRecord record{};
      if (queue) {
        record = {.last_avail_idx = queue->last_avail_idx,
                  .used_idx = queue->used_idx,
                  .signalled_used = queue->signalled_used,
                  .flags = static_cast<uint8_t>(
                      kPositionLive | (queue->signalled_used_valid ? kPositionSignalledValid : 0)),
                  .reserved = 0};
      }
      positions.push_back(record);
    }
    out.bytes(VirtioField::QueuePositions, std::as_bytes(std::span(positions)));
    if (!state.device->extra.empty()) out.bytes(VirtioField::DeviceBytes, state.device->extra);
  }
  return out.take();
}

Result<devices::virtio::VirtioPciState> decode_virtio_pci_state(std::span<const std::byte> payload,
                                                               std::string_view label) {
  Records records = TRY(Records::parse(payload, label, kLastVirtioField));
  auto corrupt = [label](const std::string& what) {
    return fail(Errc::Corrupt, fmt::format("{}: {}", label, what));
  };
  devices::virtio::VirtioPciState state;
  state.device_type = TRY(records.required<uint16_t>(VirtioField::DeviceType, "device type"));
  state.config = TRY(records.required<devices::PciConfigBytes>(VirtioField::PciConfig,
                                                              "PCI configuration space"));
  auto registers = TRY(records.required<VirtioRegisters>(VirtioField::Registers, "registers"));
  if (registers.reserved != 0) return corrupt("registers: reserved byte set");
  state.driver_features = registers.driver_features;
  state.device_feature_select = registers.device_feature_select;
  state.driver_feature_select = registers.driver_feature_select;
  state.config_vector = registers.config_vector;
  state.queue_select = registers.queue_select;
  state.status = registers.status;
  state.isr = registers.isr;
  state.config_generation = registers.config_generation;

  auto queues = TRY(records.array<VirtioQueueRecord>(VirtioField::Queues, "queues",
                                                     kMaxVirtioQueues));
  for (size_t i = 0; i < queues.size(); ++i) {
    const VirtioQueueRecord& queue = queues[i];
    if (queue.enabled > 1 || !all_zero(queue.reserved)) {
      return corrupt(fmt::format("queue {}: enabled {} or reserved bytes set", i, queue.enabled));
    }
    state.queues.push_back({.size = queue.size,
                            .msix_vector = queue.msix_vector,
                            .enabled = queue.enabled == 1,
                            .desc = queue.desc,
                            .driver = queue.driver,
                            .device = queue.device});
  }
  auto msix = TRY(records.array<MsixEntryRecord>(VirtioField::Msix, "MSI-X table",
                                                 kMaxMsixEntries));
  for (size_t i = 0; i < msix.size(); ++i) {
    const MsixEntryRecord& entry = msix[i];
    if (entry.pending > 1 || !all_zero(entry.reserved) ||
        (entry.control & ~uint32_t{devices::kMsixVectorControlMask}) != 0) {
      return corrupt(fmt::format("MSI-X entry {}: control {:#x}, pending {} or reserved bytes set",
                                 i, entry.control, entry.pending));
    }
    state.msix.push_back({.address = entry.address,
                          .data = entry.data,
                          .control = entry.control,
                          .pending = entry.pending == 1});
  }
  if (records.has(static_cast<uint16_t>(VirtioField::QueuePositions))) {
    auto positions = TRY(records.array<QueuePositionRecord>(VirtioField::QueuePositions,
                                                            "queue positions", kMaxVirtioQueues));
    if (positions.size() != state.queues.size()) {
      return corrupt(fmt::format("{} queue positions for {} queues", positions.size(),
                                 state.queues.size()));
    }
    devices::virtio::VirtioDeviceState device;
    for (size_t i = 0; i < positions.size(); ++i) {
      const QueuePositionRecord& position = positions[i];
      if ((position.flags & ~(kPositionLive | kPositionSignalledValid)) != 0 ||
          position.reserved != 0) {
        return corrupt(fmt::format("queue {} position: flags {:#x} or reserved byte set", i,
                                   position.flags));
      }
      if ((position.flags & kPositionLive) == 0) {
        if (position.flags != 0 || position.last_avail_idx != 0 || position.used_idx != 0 ||
            position.signalled_used != 0) {
          return corrupt(fmt::format("queue {}: a position for a queue that is not live", i));
        }
        device.queues.emplace_back();
        continue;
      }
      devices::virtio::VirtqueueState queue;
      queue.last_avail_idx = position.last_avail_idx;
      queue.used_idx = position.used_idx;
      queue.signalled_used = position.signalled_used;
      queue.signalled_used_valid = (position.flags & kPositionSignalledValid) != 0;
      device.queues.emplace_back(queue);
    }
    if (records.has(static_cast<uint16_t>(VirtioField::DeviceBytes))) {
      device.extra = TRY(records.array<std::byte>(VirtioField::DeviceBytes, "device bytes",
                                                  kMaxDeviceBytes));
    }
    state.device = std::move(device);
  } else if (records.has(static_cast<uint16_t>(VirtioField::DeviceBytes))) {
    return corrupt("device bytes without queue positions");
  }
  return state;
}

}  // namespace keel::migration
