// A whole machine in a snapshot file: its config, every vCPU, the VM-wide
// KVM state, device blobs and guest RAM (docs/snapshot-format.md). The
// machine pauses, fills a MachineState and calls write_snapshot; a new
// process calls read_snapshot, checks compatibility, maps the RAM lazily
// and restores into fresh KVM objects.
#pragma once

#include <cstdint>
#include <string>
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

// Writes the machine and memory_bytes of guest RAM from memory (a memfd),
// via a ".partial" file renamed into place.
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
