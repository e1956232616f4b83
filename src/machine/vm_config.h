// VmConfig: everything that defines a VM, from the command line or a JSON
// file (docs/vm-config.md documents the schema). Validation names the field
// and the value, so `keel-vmm` can say exactly what is wrong.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "memory/guest_memory.h"

namespace keel::machine {

struct SerialConfig {
  enum class Kind { Stdio, File, Unix, None };
  Kind kind = Kind::Stdio;
  std::string path;  // File and Unix
};

// PCI slots on bus 0 that a virtio device may be given: 0 is the host
// bridge's, and ACPI hotplug describes slots 1-31 (S01-S1F).
inline constexpr uint8_t kFirstDeviceSlot = 1;
inline constexpr uint8_t kLastDeviceSlot = 31;

// --disk path=P[,readonly=on][,serial=S][,format=auto|raw|qcow2][,id=ID][,slot=N]
struct DiskConfig {
  std::string path;
  bool read_only = false;
  std::string serial;  // the virtio-blk ID, at most 20 bytes
  std::string format = "auto";
  std::string id;               // the API's name; empty: "disk<index>"
  std::optional<uint8_t> slot;  // PCI slot; none: the lowest free one
  bool operator==(const DiskConfig&) const = default;
};

// --net tap=NAME[,mac=52:54:00:12:34:56][,mtu=1500][,bridge=BR][,id=ID][,slot=N]
struct NetConfig {
  std::string tap;     // opened if it exists, created otherwise
  std::string mac;     // empty: a random locally administered address
  uint32_t mtu = 1500;
  std::string bridge;  // an existing Linux bridge to attach the tap to
  std::string id;               // the API's name; empty: "net<index>"
  std::optional<uint8_t> slot;  // PCI slot; none: the lowest free one
  bool operator==(const NetConfig&) const = default;
};

// "slots": where the devices that are not in a list sit (a snapshot
// records them, so that a restore rebuilds them where the guest found them
// even when an ejected disk left a gap below them).
struct DeviceSlots {
  std::optional<uint8_t> rng;
  std::optional<uint8_t> virtio_console;
  std::optional<uint8_t> balloon;
  std::optional<uint8_t> vsock;
  bool operator==(const DeviceSlots&) const = default;
};

// --balloon [target-mib=N][,deflate-on-oom=on][,free-page-reporting=on][,stats-period=S]
struct BalloonConfig {
  uint64_t target_mib = 0;  // memory the guest should give back
  bool deflate_on_oom = true;
  bool free_page_reporting = true;
  uint32_t stats_period_s = 0;  // 0: the host never asks for statistics
  bool operator==(const BalloonConfig&) const = default;
};

// --vsock cid=N,socket=PATH (Firecracker-style hybrid vsock, docs/vsock.md)
struct VsockConfig {
  uint64_t cid = 3;
  std::string socket;
  bool operator==(const VsockConfig&) const = default;
};

struct VmConfig {
  std::string kernel;
  std::string initrd;
  std::string cmdline = "console=ttyS0 reboot=k panic=-1";
  uint32_t cpus = 1;
  uint64_t memory_mib = 512;
  // What a fresh machine's RAM is: anonymous memory (hugepages under the
  // host's default THP setting) or a memfd (shareable). A restored machine's
  // RAM is always a private mapping of its snapshot.
  memory::MemoryBackend memory_backend = memory::MemoryBackend::Anonymous;
  SerialConfig serial;
  bool reboot = true;        // false: a guest reboot ends keel-vmm (exit status 3)
  bool debug_exit = false;   // map the test-exit port 0xf4
  bool acpi = true;
  // Virtio devices, each a PCI function on bus 0.
  std::vector<DiskConfig> disks;
  std::vector<NetConfig> nets;
  bool rng = false;
  std::optional<SerialConfig> virtio_console;  // hvc0
  std::optional<BalloonConfig> balloon;
  std::optional<VsockConfig> vsock;
  DeviceSlots slots;
};

// The id a config disk or NIC has in the API: its own, else disk<index> /
// net<index>.
std::string disk_id(const VmConfig& config, size_t index);
std::string net_id(const VmConfig& config, size_t index);

// The devices' PCI slots and ids: each slot given is in 1-31 and held by
// one device only (disks, nets and "slots" alike, the latter only for a
// device the config has); disk ids and NIC ids are
// each unique. Errors name the field and the value ("nets[0].slot: slot 3
// is disks[1]'s too"). validate() calls it, and so does every machine
// build (a snapshot's config is input too).
Result<void> check_device_slots(const VmConfig& config);

// "stdio", "none", "file:PATH" or "unix:PATH".
Result<SerialConfig> parse_serial(const std::string& text);

// "anon" or "memfd" (--memory-backend, "memory_backend"); the error names
// the field and the value.
// memory::memory_backend_name is the other way.
Result<memory::MemoryBackend> parse_memory_backend(const std::string& text);

// The comma-separated key=value forms of --disk, --net, --balloon and
// --vsock; errors name the flag, the key and the value.
Result<DiskConfig> parse_disk(const std::string& text);
Result<NetConfig> parse_net(const std::string& text);
Result<BalloonConfig> parse_balloon(const std::string& text);
Result<VsockConfig> parse_vsock(const std::string& text);

// Parses a JSON document into config, overriding only the keys present.
// Unknown keys, wrong types and impossible values are errors naming the key.
Result<void> merge_json(const std::string& json_text, const std::string& source, VmConfig& config);

// Checks the whole config against this host (CPU and memory limits, files).
// Each error's context starts with the JSON key at fault ("memory_mib: ...").
Result<void> validate(const VmConfig& config, uint32_t max_vcpus, uint64_t host_memory_bytes);

// The top-level keys of the JSON schema, in the order docs/vm-config.md lists them.
std::span<const std::string_view> json_keys();

// PUT /api/v1/vm/config: json_text alone is the whole configuration (the
// defaults for every key it leaves out), parsed as merge_json and checked as
// validate does. Every error's context starts with the top-level key at
// fault ("cpus: ...", "disks: ..."), which the API reports as the field.
Result<VmConfig> config_from_json(const std::string& json_text, uint32_t max_vcpus,
                                  uint64_t host_memory_bytes);

std::string to_json(const VmConfig& config);

}  // namespace keel::machine
