// The seam between the API thread and the machine side. The API thread
// turns each request into a Command, hands it to a CommandHandler and sends
// the reply when it comes back; it never touches machine state itself
// (../shared/STYLE.md, Threads). keel-vmm's handler is a CommandQueue its
// main thread serves; tests use a fake.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace keel::api {

enum class CommandKind {
  GetVm,       // {state, boot, config}
  GetDevices,  // {devices: [{type, bus, address, properties}]}
  GetMetrics,  // {state, vcpus: [{index, exits: {kind: n}}], memory: {...}}
  Pause,
  Resume,
  Reset,
  Stop,
  SetBalloon,  // {target_mib, actual_mib}; Busy (409) without a balloon device
  PowerButton,  // {state}; Busy (409) without ACPI or while stopping
  Snapshot,   // {path, bytes}; Command::path is where
  // Hotplug (Command::device): {id, address}; the guest is notified through
  // ACPI. Removal asks the guest to eject; device-removed or eject-timeout
  // events say how it ended.
  AddDisk,
  RemoveDisk,
  ResizeDisk,  // {id, size_bytes}
  AddNet,
  RemoveNet,
  GetConfig,  // the VM's configuration (docs/vm-config.md); Busy before one is set
  Configure,  // {state: configured, config}; Command::body is the JSON config; Busy once started
  Start,      // {state, boot}; Busy if not configured or already started
  Migrate,          // starts a live migration (Command::migrate); {phase, destination}
  GetMigration,     // the last migration's progress and statistics; {phase: none} if none
  CancelMigration,  // the source keeps running; 409 when there is nothing to cancel
  // Before start only (keel-vmm --api-socket alone), like Start:
  Restore,  // the machine of the snapshot at Command::restore.path; {state, boot, config}
  Receive,  // listens on Command::source for a live migration; {state: receiving, source}
};

// PUT /api/v1/vm/restore, checked by parse_restore_body.
struct RestoreRequest {
  std::string path;    // the snapshot file
  bool paused = false;  // hold the vCPUs until PUT /api/v1/vm/resume
  std::string serial;  // as keel-vmm --serial; empty: the snapshot's own
};

// PUT /api/v1/vm/migrate, its types checked by parse_migrate_body; the
// machine side parses the destination address.
struct MigrateRequest {
  std::string destination;     // unix:PATH or tcp:HOST:PORT
  uint64_t downtime_ms = 300;  // 1 to 60000
  uint64_t bandwidth_mib = 0;  // MiB/s, 0 for no limit
  bool compress = false;
  bool migrate_disks = false;  // copy writable disks into the destination's own images
  bool auto_converge = true;   // throttle the vCPUs while the guest outpaces the link
  bool postcopy = false;       // after the first pass, run on the destination and fetch the rest
};

std::string_view command_name(CommandKind kind);

// The body of a hotplug route, checked by parse_device_body; which fields
// are set depends on the route.
struct DeviceRequest {
  std::string id;
  std::string path;             // AddDisk
  std::string format = "auto";  // AddDisk: auto, raw, qcow2
  bool read_only = false;       // AddDisk
  uint64_t size_bytes = 0;      // ResizeDisk
  std::string tap;              // AddNet
  std::string mac;              // AddNet; empty: random
  uint64_t timeout_ms = 0;      // RemoveDisk, RemoveNet
  std::optional<uint8_t> slot;  // AddDisk, AddNet: the PCI slot; none: the lowest free one
};

struct Command {
  CommandKind kind;
  // SetBalloon: the balloon size asked for, already checked as a number;
  // the machine side checks it against the guest's RAM.
  uint64_t balloon_target_mib = 0;
  std::string path{};  // Snapshot: the file to write (checked by parse_snapshot_body)
  DeviceRequest device{};  // the hotplug commands
  // Configure: the JSON document, already checked to be an object of known
  // keys; the machine side parses and validates it.
  std::string body{};
  MigrateRequest migrate{};  // Migrate
  RestoreRequest restore{};  // Restore
  std::string source{};      // Receive: unix:PATH or tcp:HOST:PORT (checked by parse_receive_body)
};

// A JSON body on success; on failure an Error whose code picks the HTTP
// status (see http_status_for): Busy is a state conflict (409). A 400 for a
// route with a single body field names that field; for a route with several
// (PUT /api/v1/vm/config) the context starts with the one at fault
// ("cpus: ...", see field_named_by in routes.h).
using Reply = Result<nlohmann::json>;
using ReplyCallback = std::function<void(Reply)>;

class CommandHandler {
 public:
  virtual ~CommandHandler() = default;
  // Takes the command and calls done exactly once, on any thread, possibly
  // before submit returns. Must not block.
  virtual void submit(Command command, ReplyCallback done) = 0;
};

// 400 InvalidArgument/OutOfRange, 404 NotFound, 409 Busy, 422 Corrupt (a
// snapshot or image the request named is malformed), 501 Unsupported,
// 503 Timeout, 403 PermissionDenied, 500 otherwise.
unsigned http_status_for(Errc code);

}  // namespace keel::api
