// Device sections' payloads (docs/snapshot-format.md, "Device payloads"),
// as tagged records like the vCPU's. One encode/decode pair per device
// state struct; decoding checks every field and names the section.
#pragma once

#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "devices/pci/pci_bus.h"
#include "devices/rtc.h"
#include "devices/serial.h"
#include "devices/virtio/pci_transport.h"

namespace keel::migration {

inline constexpr std::string_view kSerialSectionName = "serial0";
inline constexpr std::string_view kRtcSectionName = "rtc";

std::vector<std::byte> encode_serial_state(const devices::SerialState& state);
Result<devices::SerialState> decode_serial_state(std::span<const std::byte> payload,
                                                 std::string_view label);

std::vector<std::byte> encode_rtc_state(const devices::RtcState& state);
Result<devices::RtcState> decode_rtc_state(std::span<const std::byte> payload,
                                           std::string_view label);

// A virtio-pci function's section is named by its PCI address,
// "pci-0000:00:03.0", so a restore matches each saved function to the
// device the config builds in the same slot.
std::string pci_section_name(devices::PciAddress address);
// The address in a name pci_section_name made; nullopt for other names.
std::optional<devices::PciAddress> parse_pci_section_name(std::string_view name);

std::vector<std::byte> encode_virtio_pci_state(const devices::virtio::VirtioPciState& state);
Result<devices::virtio::VirtioPciState> decode_virtio_pci_state(std::span<const std::byte> payload,
                                                               std::string_view label);

}  // namespace keel::migration
