#include "migration/snapshot.h"

#include <sys/mman.h>

#include <fmt/format.h>

#include "migration/kvm_state.h"

namespace keel::migration {
namespace {

constexpr std::string_view kConfigName = "config";
constexpr std::string_view kVmName = "vm";
constexpr std::string_view kMemoryName = "ram";
constexpr std::string_view kDisksName = "disks";

std::string vcpu_name(size_t index) { return fmt::format("vcpu{}", index); }

// A feature register whose every bit means "the CPU has this".
struct FeatureWord {
  uint32_t leaf;
  uint32_t subleaf;
  int reg;  // 0 eax, 1 ebx, 2 ecx, 3 edx
  // Derived by KVM from guest state, or set by the VMM itself rather than
  // taken from what KVM offers: not compared.
  uint32_t runtime_bits;
};
constexpr std::array<std::string_view, 4> kRegNames = {"EAX", "EBX", "ECX", "EDX"};
// 1.ECX: bit 24 TSC deadline (reported by a capability, not the CPUID),
// bit 27 OSXSAVE (mirrors CR4), bit 31 hypervisor present (the VMM sets it;
// KVM_GET_SUPPORTED_CPUID leaves it clear). 1.EDX: bit 9 APIC (mirrors the
// APIC base MSR), bit 28 HTT (the VMM's topology). 7.0.ECX bit 4: OSPKE
// (mirrors CR4).
constexpr std::array kFeatureWords = {
    FeatureWord{1, 0, 2, (1u << 24) | (1u << 27) | (1u << 31)},
    FeatureWord{1, 0, 3, (1u << 9) | (1u << 28)},
    FeatureWord{7, 0, 1, 0},
    FeatureWord{7, 0, 2, 1u << 4},
    FeatureWord{7, 0, 3, 0},
    FeatureWord{7, 1, 0, 0},
    FeatureWord{0xd, 1, 0, 0},
    FeatureWord{0x80000001, 0, 2, 0},
    FeatureWord{0x80000001, 0, 3, 0},
    FeatureWord{0x80000008, 0, 1, 0},
};

const kvm::CpuidEntry* find_leaf(const kvm::CpuidEntries& entries, uint32_t leaf,
                                 uint32_t subleaf) {
  for (const kvm::CpuidEntry& entry : entries) {
    if (entry.function != leaf) continue;
    if ((entry.flags & kvm::kCpuidFlagSignificantIndex) && entry.index != subleaf) continue;
    return &entry;
  }
  return nullptr;
}

uint32_t reg_of(const kvm::CpuidEntry& entry, int reg) {
  switch (reg) {
    case 0: return entry.eax;
    case 1: return entry.ebx;
    case 2: return entry.ecx;
    default: return entry.edx;
  }
}

}  // namespace

Result<void> write_snapshot(const std::string& path, const MachineState& machine,
                            const Fd& memory, uint64_t memory_bytes, const HostCpuSummary& host) {
  SnapshotWriter writer = TRY(SnapshotWriter::create(path, host));
  TRY(writer.add(SectionType::MachineConfig, kConfigName,
                 std::as_bytes(std::span(machine.config_json))));
  for (size_t i = 0; i < machine.vcpus.size(); ++i) {
    TRY(writer.add(SectionType::Vcpu, vcpu_name(i), encode_vcpu_state(machine.vcpus[i])));
  }
  TRY(writer.add(SectionType::Vm, kVmName, encode_vm_state(machine.vm)));
  for (const DeviceState& device : machine.devices) {
    TRY(writer.add(SectionType::Device, device.name, device.data));
  }
  if (!machine.disks.empty()) {
    TRY(writer.add(SectionType::Disks, kDisksName, encode_disks(machine.disks)));
  }
  TRY(writer.add_file_contents(SectionType::Memory, kMemoryName, memory, memory_bytes));
  return writer.finish();
}

Result<Snapshot> read_snapshot(const std::string& path) {
  SnapshotReader reader = TRY(SnapshotReader::open(path));
  MachineState machine;
  const SectionInfo* config = reader.all(SectionType::MachineConfig).front();
  std::vector<std::byte> config_bytes = TRY(reader.payload(*config));
  machine.config_json.assign(reinterpret_cast<const char*>(config_bytes.data()),
                             config_bytes.size());

  size_t vcpu_count = reader.all(SectionType::Vcpu).size();
  for (size_t i = 0; i < vcpu_count; ++i) {
    const SectionInfo* section = reader.find(SectionType::Vcpu, vcpu_name(i));
    if (section == nullptr) {
      return fail(Errc::Corrupt, fmt::format("snapshot {}: {} vcpu sections but no '{}'", path,
                                             vcpu_count, vcpu_name(i)));
    }
    std::vector<std::byte> payload = TRY(reader.payload(*section));
    machine.vcpus.push_back(
        TRY(decode_vcpu_state(payload, fmt::format("snapshot {}: {}", path, section->label()))));
  }
  const SectionInfo* vm = reader.all(SectionType::Vm).front();
  std::vector<std::byte> vm_bytes = TRY(reader.payload(*vm));
  machine.vm = TRY(decode_vm_state(vm_bytes, fmt::format("snapshot {}: {}", path, vm->label())));
  for (const SectionInfo* device : reader.all(SectionType::Device)) {
    machine.devices.push_back({device->name, TRY(reader.payload(*device))});
  }
  for (const SectionInfo* disks : reader.all(SectionType::Disks)) {
    std::vector<std::byte> payload = TRY(reader.payload(*disks));
    machine.disks =
        TRY(decode_disks(payload, fmt::format("snapshot {}: {}", path, disks->label())));
  }
  SectionInfo memory = *reader.all(SectionType::Memory).front();
  if (memory.payload_offset % kPageBytes != 0 || memory.payload_bytes % kPageBytes != 0) {
    return fail(Errc::Corrupt,
                fmt::format("snapshot {}: {} at offset {} with {} bytes is not page aligned", path,
                            memory.label(), memory.payload_offset, memory.payload_bytes));
  }
  return Snapshot{std::move(reader), std::move(machine), std::move(memory)};
}

Result<Mmap> Snapshot::map_memory() const {
  return Mmap::file(reader.fd(), memory.payload_bytes, memory.payload_offset,
                    PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE);
}

Result<void> check_cpu_compatible(const kvm::CpuidEntries& guest,
                                  const kvm::CpuidEntries& host_supported,
                                  const HostCpuSummary& source) {
  for (const FeatureWord& word : kFeatureWords) {
    const kvm::CpuidEntry* wanted = find_leaf(guest, word.leaf, word.subleaf);
    if (wanted == nullptr) continue;
    const kvm::CpuidEntry* offered = find_leaf(host_supported, word.leaf, word.subleaf);
    uint32_t missing = reg_of(*wanted, word.reg) & ~word.runtime_bits &
                       ~(offered ? reg_of(*offered, word.reg) : 0);
    if (missing != 0) {
      int bit = std::countr_zero(missing);
      return fail(Errc::Unsupported,
                  fmt::format("the snapshot's guest uses CPUID.{:#x}.{}:{} bit {}, which KVM on "
                              "this host does not offer (snapshot taken on {})",
                              word.leaf, word.subleaf, kRegNames[static_cast<size_t>(word.reg)],
                              bit, source.describe()));
    }
  }
  return ok();
}

}  // namespace keel::migration
