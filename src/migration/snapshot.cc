#include "migration/snapshot.h"

#include <sys/mman.h>

#include <algorithm>

#include <fmt/format.h>

#include "base/bytes.h"
#include "migration/kvm_state.h"

namespace keel::migration {
namespace {

constexpr std::string_view kConfigName = "config";
constexpr std::string_view kVmName = "vm";
constexpr std::string_view kMemoryName = "ram";
constexpr std::string_view kDisksName = "disks";

std::string vcpu_name(size_t index) { return fmt::format("vcpu{}", index); }

// Every section but guest RAM (and the end section) is machine state.
bool is_state_section(SectionType type) {
  return type == SectionType::MachineConfig || type == SectionType::Vcpu ||
         type == SectionType::Vm || type == SectionType::Device || type == SectionType::Disks;
}

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

std::vector<StateSection> machine_sections(const MachineState& machine) {
  std::vector<StateSection> sections;
  auto bytes_of = [](std::string_view text) {
    auto view = std::as_bytes(std::span(text));
    return std::vector<std::byte>(view.begin(), view.end());
  };
  sections.push_back({SectionType::MachineConfig, std::string(kConfigName),
                      bytes_of(machine.config_json)});
  for (size_t i = 0; i < machine.vcpus.size(); ++i) {
    sections.push_back({SectionType::Vcpu, vcpu_name(i), encode_vcpu_state(machine.vcpus[i])});
  }
  sections.push_back({SectionType::Vm, std::string(kVmName), encode_vm_state(machine.vm)});
  for (const DeviceState& device : machine.devices) {
    sections.push_back({SectionType::Device, device.name, device.data});
  }
  if (!machine.disks.empty()) {
    sections.push_back({SectionType::Disks, std::string(kDisksName), encode_disks(machine.disks)});
  }
  return sections;
}

Result<MachineState> decode_machine_sections(std::span<const StateSection> sections,
                                             std::string_view label) {
  auto find = [&sections](SectionType type, std::string_view name) -> const StateSection* {
    for (const StateSection& section : sections) {
      if (section.type == type && section.name == name) return &section;
    }
    return nullptr;
  };
  auto count = [&sections](SectionType type) {
    return std::count_if(sections.begin(), sections.end(),
                         [type](const StateSection& section) { return section.type == type; });
  };
  for (SectionType once : {SectionType::MachineConfig, SectionType::Vm, SectionType::Disks}) {
    if (count(once) > 1) {
      return fail(Errc::Corrupt, fmt::format("{}: more than one {} section", label,
                                             section_type_name(once)));
    }
  }
  for (const StateSection& section : sections) {
    if (!is_state_section(section.type)) {
      return fail(Errc::Corrupt, fmt::format("{}: section '{}' of type {} is not machine state",
                                             label, section.name,
                                             static_cast<unsigned>(section.type)));
    }
    if (find(section.type, section.name) != &section) {
      return fail(Errc::Corrupt, fmt::format("{}: {} section '{}' appears twice", label,
                                             section_type_name(section.type), section.name));
    }
  }
  MachineState machine;
  const StateSection* config = find(SectionType::MachineConfig, kConfigName);
  if (config == nullptr) return fail(Errc::Corrupt, fmt::format("{}: no config section", label));
  machine.config_json.assign(reinterpret_cast<const char*>(config->payload.data()),
                             config->payload.size());
  auto vcpu_count = static_cast<size_t>(count(SectionType::Vcpu));
  if (vcpu_count == 0) return fail(Errc::Corrupt, fmt::format("{}: no vcpu section", label));
  for (size_t i = 0; i < vcpu_count; ++i) {
    const StateSection* section = find(SectionType::Vcpu, vcpu_name(i));
    if (section == nullptr) {
      return fail(Errc::Corrupt, fmt::format("{}: {} vcpu sections but no '{}'", label,
                                             vcpu_count, vcpu_name(i)));
    }
    machine.vcpus.push_back(TRY(decode_vcpu_state(
        section->payload, fmt::format("{}: vcpu section '{}'", label, section->name))));
  }
  const StateSection* vm = find(SectionType::Vm, kVmName);
  if (vm == nullptr) return fail(Errc::Corrupt, fmt::format("{}: no vm section", label));
  machine.vm = TRY(decode_vm_state(vm->payload, fmt::format("{}: vm section", label)));
  for (const StateSection& section : sections) {
    if (section.type == SectionType::Device) {
      machine.devices.push_back({section.name, section.payload});
    } else if (section.type == SectionType::Disks) {
      machine.disks = TRY(decode_disks(section.payload, fmt::format("{}: disks section", label)));
    }
  }
  return machine;
}

std::vector<std::byte> encode_machine_state(const MachineState& machine) {
  ByteWriter out;
  for (const StateSection& section : machine_sections(machine)) {
    out.put(static_cast<uint16_t>(section.type));
    out.put(static_cast<uint16_t>(section.name.size()));
    out.put(static_cast<uint32_t>(section.payload.size()));
    out.put_string(section.name);
    out.put_bytes(section.payload);
  }
  return std::move(out.data());
}

Result<MachineState> decode_machine_state(std::span<const std::byte> bytes,
                                          std::string_view label) {
  std::vector<StateSection> sections;
  ByteReader in(bytes);
  while (in.remaining() > 0) {
    if (sections.size() >= kMaxSections) {
      return fail(Errc::Corrupt, fmt::format("{}: more than {} sections", label, kMaxSections));
    }
    auto type = TRY_CONTEXT(in.get<uint16_t>("section type"), std::string(label));
    auto name_bytes = TRY_CONTEXT(in.get<uint16_t>("section name length"), std::string(label));
    auto payload_bytes = TRY_CONTEXT(in.get<uint32_t>("section length"), std::string(label));
    if (name_bytes == 0 || name_bytes > kMaxSectionNameBytes) {
      return fail(Errc::Corrupt, fmt::format("{}: a section name of {} bytes (1 to {})", label,
                                             name_bytes, kMaxSectionNameBytes));
    }
    auto name = TRY_CONTEXT(in.get_bytes(name_bytes, "section name"), std::string(label));
    auto payload = TRY_CONTEXT(in.get_bytes(payload_bytes, "section payload"), std::string(label));
    sections.push_back({static_cast<SectionType>(type),
                        std::string(reinterpret_cast<const char*>(name.data()), name.size()),
                        std::vector<std::byte>(payload.begin(), payload.end())});
  }
  return decode_machine_sections(sections, label);
}

namespace {

// The machine's sections, then RAM as add_memory adds it.
template <typename AddMemory>
Result<void> write_snapshot_with(const std::string& path, const MachineState& machine,
                                 const HostCpuSummary& host, AddMemory add_memory) {
  SnapshotWriter writer = TRY(SnapshotWriter::create(path, host));
  for (const StateSection& section : machine_sections(machine)) {
    TRY(writer.add(section.type, section.name, section.payload));
  }
  TRY(add_memory(writer));
  return writer.finish();
}

}  // namespace

Result<void> write_snapshot(const std::string& path, const MachineState& machine,
                            std::span<const std::byte> memory,
                            std::span<const memory::ByteRange> populated,
                            const HostCpuSummary& host) {
  return write_snapshot_with(path, machine, host, [&](SnapshotWriter& writer) {
    return writer.add_memory_contents(SectionType::Memory, kMemoryName, memory, populated);
  });
}

Result<void> write_snapshot(const std::string& path, const MachineState& machine,
                            const Fd& memory, uint64_t memory_bytes, const HostCpuSummary& host) {
  return write_snapshot_with(path, machine, host, [&](SnapshotWriter& writer) {
    return writer.add_file_contents(SectionType::Memory, kMemoryName, memory, memory_bytes);
  });
}

Result<Snapshot> read_snapshot(const std::string& path) {
  SnapshotReader reader = TRY(SnapshotReader::open(path));
  std::vector<StateSection> sections;
  for (const SectionInfo& section : reader.sections()) {
    if (!is_state_section(section.type)) continue;  // RAM is mapped, not read; optional unknown sections are skipped
    sections.push_back({section.type, section.name, TRY(reader.payload(section))});
  }
  MachineState machine =
      TRY(decode_machine_sections(sections, fmt::format("snapshot {}", path)));
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
