// The payloads of the vcpu and vm sections: KVM state as tagged records
// (docs/snapshot-format.md, "vCPU and VM payloads"). Each record holds one
// KVM uapi struct byte for byte; decoding checks every length and rejects
// unknown, duplicate and missing fields, naming the section.
#pragma once

#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "kvm/types.h"

namespace keel::migration {

std::vector<std::byte> encode_vcpu_state(const kvm::VcpuState& state);
Result<kvm::VcpuState> decode_vcpu_state(std::span<const std::byte> payload,
                                         std::string_view label);

std::vector<std::byte> encode_vm_state(const kvm::VmState& state);
Result<kvm::VmState> decode_vm_state(std::span<const std::byte> payload, std::string_view label);

}  // namespace keel::migration
