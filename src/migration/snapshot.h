// A whole machine in a snapshot file: its config, every vCPU, the VM-wide
// KVM state, device blobs and guest RAM (docs/snapshot-format.md). The
// machine pauses, fills a MachineState and calls write_snapshot; a new
// process calls read_snapshot, checks compatibility, maps the RAM lazily
// and restores into fresh KVM objects.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/fd.h"
#include "base/mmap.h"
#include "base/result.h"
#include "kvm/types.h"
#include "migration/disks.h"
#include "migration/snapshot_file.h"

namespace keel::migration {

struct DeviceState {
  std::string name;  // unique per machine, e.g. "virtio-blk0"
  std::vector<std::byte> data;
};

struct MachineState {
  std::string config_json;
  std::vector<kvm::VcpuState> vcpus;  // index = vCPU id
  kvm::VmState vm;
  std::vector<DeviceState> devices;
  std::vector<DiskIdentity> disks;  // written only when there are disks
};

// The machine as named sections, in the order a snapshot file holds them
// (guest RAM is not among them): what write_snapshot writes and what the
// migration stream sends as its machine state.
struct StateSection {
  SectionType type;
  std::string name;
  std::vector<std::byte> payload;
};
std::vector<StateSection> machine_sections(const MachineState& machine);
// Rebuilds a MachineState from sections, checking that the config, the VM
// and vcpu0..N-1 are there once each and that every payload decodes;
// label starts every error ("snapshot /x", "migration stream").
Result<MachineState> decode_machine_sections(std::span<const StateSection> sections,
                                             std::string_view label);

// The sections as one byte string (the migration stream's machine state
// frame, docs/migration-protocol.md): per section a u16 type, a u16 name
// length, a u32 payload length, the name, the payload.
std::vector<std::byte> encode_machine_state(const MachineState& machine);
Result<MachineState> decode_machine_state(std::span<const std::byte> bytes,
                                          std::string_view label);

// Writes the machine and guest RAM (memory, of which only the populated
// ranges are read: memory::GuestMemory::populated_ranges(); see
// SnapshotWriter::add_memory_contents) via a ".partial" file renamed into
// place.
Result<void> write_snapshot(const std::string& path, const MachineState& machine,
                            std::span<const std::byte> memory,
                            std::span<const memory::ByteRange> populated,
                            const HostCpuSummary& host = HostCpuSummary::of_this_host());

// The same with memory_bytes of RAM from the start of a memfd.
Result<void> write_snapshot(const std::string& path, const MachineState& machine,
                            const Fd& memory, uint64_t memory_bytes,
                            const HostCpuSummary& host = HostCpuSummary::of_this_host());

struct Snapshot {
  SnapshotReader reader;
  MachineState machine;
  SectionInfo memory;

  // Guest RAM, mapped copy-on-write from the file: nothing is read until the
  // guest touches a page, and the file never changes.
  Result<Mmap> map_memory() const;
};

// Opens, checks and decodes everything but the RAM's contents.
Result<Snapshot> read_snapshot(const std::string& path);

// Refuses a guest CPUID this host's KVM cannot offer (host_supported is
// Kvm::supported_cpuid()), naming the leaf, register and bit, and the CPU
// the snapshot came from. Bits KVM derives at run time (OSXSAVE, OSPKE,
// the APIC enable, TSC deadline) and bits the VMM sets itself (hypervisor,
// HTT) are not compared.
Result<void> check_cpu_compatible(const kvm::CpuidEntries& guest,
                                  const kvm::CpuidEntries& host_supported,
                                  const HostCpuSummary& source);

}  // namespace keel::migration
