// Machine: one booted VM. Machine::create is the sole composition root: it
// builds KVM state, guest memory, buses and devices from a VmConfig, loads
// the kernel and sets up the vCPUs. run() starts one thread per vCPU and
// returns when the guest powers off, resets, fails, or stop() is called.
// A reboot is a new Machine (restore-as-constructor, no in-place patching).
#pragma once

#include <pthread.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <span>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "base/event_fd.h"
#include "base/fd.h"
#include "base/event_loop.h"
#include "base/result.h"
#include "devices/ged.h"
#include "devices/io_bus.h"
#include "devices/pci/pci_bus.h"
#include "devices/pci_hotplug.h"
#include "devices/rtc.h"
#include "devices/serial.h"
#include "block/image_lock.h"
#include "devices/virtio/balloon.h"
#include "devices/virtio/blk.h"
#include "devices/virtio/console.h"
#include "devices/virtio/device.h"
#include "devices/virtio/net.h"
#include "devices/virtio/pci_transport.h"
#include "kvm/kvm.h"
#include "machine/kvm_interrupts.h"
#include "machine/vm_config.h"
#include "memory/guest_memory.h"
#include "migration/dirty_bitmap.h"
#include "migration/snapshot.h"

namespace keel::machine {

enum class StopReason {
  PowerOff,    // ACPI S5, or a KVM shutdown system event
  Reset,       // i8042, ACPI reset register, KVM reset event
  TripleFault, // KVM_EXIT_SHUTDOWN: the guest cannot continue
  Error,       // internal error, failed entry, unhandled exit, KVM_RUN failure
  DebugExit,   // a test guest wrote to the debug-exit port
  Stopped,     // stop() from the host (signal, API)
  GuestPanic,  // the guest reported a panic through pvpanic
  Migrated,    // the guest runs on a migration's destination now
};

struct StopStatus {
  StopReason reason;
  uint8_t debug_exit_code = 0;
  std::string detail;  // what went wrong, with a register dump for errors
};

std::string_view stop_reason_name(StopReason reason);

// One entry of the device tree the control API shows: a bus ("pci", "io"),
// an address on it ("0000:00:01.0", "0x3f8") and read-only properties.
// A device's counters for the control API's metrics.
struct DeviceCounters {
  std::string type;     // "virtio-blk"
  std::string address;  // "0000:00:01.0"
  devices::virtio::VirtioDevice::Counters counters;
};

// Devices plugged while the guest runs (the control API's disks and nets),
// through ACPI PCI hotplug (src/devices/pci_hotplug.h). Disks and NICs of
// the config are named disk0, disk1, ... and net0, ... and can be resized
// and unplugged the same way. A reboot starts from the config again.
enum class HotplugKind { Disk, Net };

// How a migrated-in machine's writable disks reach it: the same images as
// the source's (shared storage, handed over by their locks), or copies the
// migration stream wrote into this host's own images.
enum class DiskHandover { Shared, Copied };
std::string_view hotplug_kind_name(HotplugKind kind);  // "disk", "net"

struct HotplugDisk {
  std::string id;
  std::string path;
  std::string format = "auto";
  bool read_only = false;
  std::optional<uint8_t> slot;  // none: the lowest free slot
};

struct HotplugNet {
  std::string id;
  std::string tap;
  std::string mac;  // empty: a random locally administered address
  std::optional<uint8_t> slot;  // none: the lowest free slot
};

// How an unplug ended: the guest ejected the device (it is gone, its
// backend closed), or it did not within the timeout (the device stays).
struct UnplugOutcome {
  HotplugKind kind;
  std::string id;
  std::string address;  // "0000:00:05.0"
  bool ejected = false;
};
// Called once per unplug, on the thread that saw the end (a vCPU thread
// for the guest's eject, the device I/O thread for a timeout).
using UnplugDone = std::function<void(const UnplugOutcome&)>;

struct DeviceInfo {
  std::string type;
  std::string bus;
  std::string address;
  std::vector<std::pair<std::string, std::string>> properties;
};

class Machine {
 public:
  // Serial output goes to serial_output (called on vCPU threads).
  // virtio_console_output takes the guest's hvc0 output (device I/O thread;
  // an emerg_wr write comes on a vCPU thread, never at the same time) when
  // the config has a virtio console.
  using ConsoleOutput = std::function<void(std::span<const std::byte>)>;
  static Result<std::unique_ptr<Machine>> create(const VmConfig& config, const kvm::Kvm& kvm,
                                                 devices::Serial::Output serial_output,
                                                 ConsoleOutput virtio_console_output = {});
  // Restore as constructor: the machine a snapshot holds, in a new VM
  // (docs/snapshot-format.md, "Taking and restoring"). config is the
  // snapshot's own (the caller parses it, and may point the serial console
  // elsewhere). Checks first, building nothing: every vCPU's CPUID against
  // what this host's KVM offers (KVM_GET_SUPPORTED_CPUID), the disks
  // unchanged, sizes that agree; then maps guest RAM MAP_PRIVATE from the
  // file (pages read on first touch), builds the machine (prebuild) and
  // applies the saved state (Prebuilt::restore: devices from their saved
  // state, virtio-pci functions matched by PCI address and device type, a
  // different device set refused naming the device; the VM; each vCPU).
  // Errors name path.
  static Result<std::unique_ptr<Machine>> restore(const std::string& path,
                                                  const migration::Snapshot& snapshot,
                                                  const VmConfig& config, const kvm::Kvm& kvm,
                                                  devices::Serial::Output serial_output);

  // Restore as constructor in two steps, shared by restore() and a
  // migration's destination (docs/migration-protocol.md): prebuild() makes
  // all that the config alone decides (the KVM VM with its irqchip and PIT,
  // memory slots over memory, the buses, the devices with their host
  // backends but no state and no BARs, the vCPUs with no state, and what
  // this host's KVM offers for the CPUID check); Prebuilt::restore then
  // checks a saved state and applies it. A Prebuilt cannot run, so a
  // destination can build one while the pages still arrive into its RAM:
  // no device I/O thread starts and no vCPU enters the guest before the
  // whole state passed every check. writable_disk_locking: ForceShare on a
  // destination whose source still holds the shared disks (locks taken by
  // set_disk_locks(true) once it let go).
  class Prebuilt;
  static Result<Prebuilt> prebuild(const VmConfig& config, const kvm::Kvm& kvm,
                                   memory::GuestMemory memory,
                                   block::Locking writable_disk_locking);
  ~Machine();

  // Runs the vCPUs until the machine stops; returns why.
  StopStatus run();
  // Asks the machine to stop (thread-safe, async-signal-unsafe).
  void stop(StopReason reason, std::string detail = "");
  // Becomes readable once the machine has stopped (for an event loop).
  const EventFd& stopped_event() const { return stopped_event_; }
  // Why the machine stops, once stop() was called.
  std::optional<StopStatus> stop_status() const;

  // Holds every vCPU outside KVM_RUN (kicked as stop() does) and returns
  // once all are held; resume() lets them continue. Busy when the machine
  // is already paused, not paused (resume) or stopping; Timeout if a vCPU
  // does not come out. stop() ends a paused machine too.
  Result<void> pause();
  Result<void> resume();
  bool paused() const { return pause_requested_.load(); }
  // Before run(): the vCPUs start held, as if paused (resume() lets them go).
  void start_paused() { pause_requested_.store(true); }

  // vCPU throttling, for a live migration's auto-converge (QEMU's
  // cpu-throttle design): with percent > 0 (at most kMaxThrottlePercent,
  // larger values are clamped) a ticker thread kicks every vCPU out of
  // KVM_RUN once each kThrottleTimeslice / (1 - p) of wall time, and each
  // vCPU then sleeps p / (1 - p) x kThrottleTimeslice, so it spends p% of
  // wall time outside the guest. Not a pause: paused() stays false, and a
  // sleeping vCPU wakes at once for a pause, a stop or a lower throttle.
  // 0 ends it (and joins the ticker). Thread-safe; a machine that is
  // stopping is never throttled.
  static constexpr uint32_t kMaxThrottlePercent = 99;
  static constexpr std::chrono::milliseconds kThrottleTimeslice{10};
  void set_throttle(uint32_t percent);
  uint32_t throttle_percent() const { return throttle_percent_.load(); }
  // Writes a snapshot of the paused machine to path (docs/snapshot-format.md):
  // the config, every vCPU (pending I/O completed first), the VM's KVM state,
  // the devices (quiesced first, see quiesce_devices) and guest RAM. Busy
  // unless paused, or if a vCPU's pending string I/O needs another exit
  // (resume and retry); Timeout if a device's host I/O does not finish.
  // Call from the thread that paused. A machine restored from a snapshot
  // writes its RAM from its private mapping (path may even be the file it
  // was restored from: the new file is renamed over it). The config written
  // is current_config(): hot-plugged devices in, ejected ones out, every
  // device with its PCI slot. Refused before anything is written while a
  // hotplug is half done (check_state_saveable).
  Result<void> save(const std::string& path);
  // What save() writes, without the RAM, for save() and a migration's
  // final state alike: the same checks but the RAM backing (migration reads
  // RAM from the mapping, whatever backs it). With the devices quiesced
  // (quiesce_devices, after pause) and from the thread that paused.
  class QuiescedDevices;
  Result<migration::MachineState> save_state(const QuiescedDevices& quiesced);
  // Busy, naming the device, while a hotplug is half done: an unplug the
  // guest has not answered yet, or a plug whose notification the guest has
  // not read (the ACPI hotplug registers are not saved, so a restored guest
  // would never learn of either). Checked before a snapshot is written or a
  // migration starts.
  Result<void> check_state_saveable() const;

  // Dirty tracking for live migration (docs/migration-protocol.md): every
  // memory slot logs the guest's writes (KVM_MEM_LOG_DIRTY_PAGES) and
  // GuestMemory marks the VMM's own. collect_dirty_pages ORs the pages
  // dirtied since the last call into dirty (by RAM offset) and those the
  // VMM wrote also into vmm_written. From one thread at a time (the
  // migration's). KVM's log is the VM's dirty ring if it has one (see
  // dirty_log_mode(): the keel-vmm --dirty-log choice, made when the VM
  // was created), else the per-slot bitmap; the pages reported are the same.
  Result<void> start_dirty_log();
  Result<void> collect_dirty_pages(migration::DirtyBitmap& dirty,
                                   migration::DirtyBitmap& vmm_written);
  Result<void> stop_dirty_log();
  kvm::DirtyLogMode dirty_log_mode() const { return vm_.dirty_log_mode(); }

  // Disk handover for live migration on shared storage
  // (docs/migration-protocol.md): a migrated-in machine opens its writable
  // disks without their image locks, so the source's locks do not stop it;
  // set_disk_locks(false) lets go of them on the source (devices
  // quiesced), set_disk_locks(true) takes them (the destination before it
  // runs, the source again after a failed handover). Busy naming the disk
  // while another process holds it. check_disks_hand_over: Unsupported,
  // naming it, for a writable disk whose format caches metadata (qcow2).
  Result<void> check_disks_hand_over();
  Result<void> set_disk_locks(bool held);
  // Every writable disk's virtio-blk (index in current_config().disks, and
  // "disk 'PATH'" for errors), for the handover and for a migration that
  // copies local disks (machine/disk_mirror.h).
  struct WritableDisk {
    uint32_t index = 0;
    std::string what;
    devices::virtio::Blk* blk = nullptr;
  };
  std::vector<WritableDisk> writable_disks();

  // The device side of a save, for snapshots and migration alike. While the
  // returned object lives, the device I/O loop is held (no doorbell,
  // completion, socket or timer callback runs: the holder owns what they
  // touch) and every virtio device has finished its in-flight host work
  // (virtio-blk: backend requests completed and pushed used); so guest RAM
  // and device state stay still until it is dropped, which lets the loop
  // go on and kicks every queue once. Needs the vCPUs paused (Busy);
  // Timeout, naming the device, if a device's host I/O does not finish.
  class QuiescedDevices {
   public:
    QuiescedDevices(QuiescedDevices&& other) noexcept
        : machine_(std::exchange(other.machine_, nullptr)), hold_(std::move(other.hold_)) {}
    QuiescedDevices& operator=(QuiescedDevices&&) = delete;
    ~QuiescedDevices();
    // For a source whose machine has migrated away: dropping this then
    // lets the loop go on without kicking the queues, so no device picks up
    // work the destination now owns.
    void skip_kick() { machine_ = nullptr; }

   private:
    friend class Machine;
    QuiescedDevices(Machine& machine, EventLoop::Hold hold)
        : machine_(&machine), hold_(std::move(hold)) {}
    Machine* machine_;  // whose queues are kicked when dropped; null once moved from
    EventLoop::Hold hold_;
  };
  Result<QuiescedDevices> quiesce_devices();
  // Every device's section (serial0, rtc, one per virtio-pci function),
  // each payload a byte buffer; with the devices quiesced.
  Result<std::vector<migration::DeviceState>> save_devices(const QuiescedDevices& quiesced);

  // Presses the ACPI power button: the GED raises its interrupt and the
  // guest's _EVT notifies \_SB.PWRB; what happens then is the guest's
  // choice (Linux reports KEY_POWER to userspace). Busy without ACPI.
  Result<void> press_power_button();

  // Hotplug (thread: the one that owns the Machine, keel-vmm's main).
  // Busy without ACPI, while stopping, or when no slot is free; the id
  // must be new. Returns the PCI address; the guest sees the device after
  // its ACPI notification, with no rescan.
  Result<std::string> add_disk(const HotplugDisk& disk);
  Result<std::string> add_net(const HotplugNet& net);
  // Asks the guest to eject the device: done runs when it did (the device
  // is reset, unplugged and its backend closed, its image unlocked) or when
  // timeout passed without it. NotFound for an unknown id, Busy if an
  // unplug of it is already pending.
  Result<std::string> request_unplug(HotplugKind kind, const std::string& id,
                                     std::chrono::milliseconds timeout, UnplugDone done);
  // Grows disk id to size_bytes (see devices::virtio::Blk::resize), on the
  // device I/O thread; waits for it. Returns the new size.
  Result<uint64_t> resize_disk(const std::string& id, uint64_t size_bytes);

  // The config the machine was built from (a reboot's, too).
  const VmConfig& config() const { return config_; }
  // The machine as it is now, as a config: the disks and NICs plugged now
  // (the config's that are left, then the hot-plugged ones in the order
  // they came), each with its id and PCI slot, and the other virtio
  // devices' slots. What a snapshot records and GET /api/v1/vm/config
  // shows; a migration's destination is started with it.
  VmConfig current_config() const;
  // Every device the guest can see, PCI functions first.
  std::vector<DeviceInfo> devices() const;
  // Every virtio device's counters, in PCI slot order.
  std::vector<DeviceCounters> device_counters() const;
  // Userspace exits of each vCPU, (kind name, count) for every kind.
  std::vector<std::vector<std::pair<std::string_view, uint64_t>>> exit_counts() const;

  devices::Serial& serial() { return *serial_; }
  // Host input for the virtio console; dropped if there is none.
  void virtio_console_input(std::span<const std::byte> bytes);
  // The virtio devices on the PCI bus, in the order they were plugged.
  std::vector<std::shared_ptr<devices::virtio::VirtioPci>> virtio_devices() const {
    std::lock_guard lock(hotplug_mutex_);
    return virtio_devices_;
  }
  // The balloon, if the config has one (also in virtio_devices()).
  devices::virtio::Balloon* balloon() const { return balloon_.get(); }
  // "io-out 1234, mmio-read 56, ..." summed over vCPUs, for logs.
  std::string exit_summary() const;
  const memory::GuestMemory& memory() const { return memory_; }

 private:
  Machine(const VmConfig& config, kvm::Vm vm, memory::GuestMemory memory, EventFd stopped_event);
  // A VM with the in-kernel devices and memory's regions, then the Machine.
  static Result<std::unique_ptr<Machine>> assemble(const VmConfig& config, const kvm::Kvm& kvm,
                                                   memory::GuestMemory memory);
  // Prebuilt::restore (and restore(), before it builds anything): whether
  // saved can be restored on this host (supported: what its KVM offers)
  // with config. DiskHandover::Copied checks only the read-only disks'
  // identities (the writable ones are this host's copies).
  static Result<void> check_restorable(const std::string& label,
                                       const migration::MachineState& saved,
                                       const migration::HostCpuSummary& source,
                                       const VmConfig& config,
                                       const kvm::CpuidEntries& supported, DiskHandover disks);

  // Every device but the serial port and RTC, fresh, BARs unassigned.
  Result<void> build_devices(ConsoleOutput virtio_console_output);
  // The serial port and RTC: fresh with no saved sections, else from
  // their sections (a restore).
  Result<void> add_serial_and_rtc(devices::Serial::Output serial_output,
                                  std::span<const migration::DeviceState> saved);
  Result<void> build_virtio_devices(ConsoleOutput virtio_console_output);
  // Applies each virtio-pci function's saved section (restore only).
  Result<void> restore_virtio_devices(std::span<const migration::DeviceState> saved);
  void kick_virtio_queues();
  // Plugs device into slot, or the lowest free one; returns its VirtioPci
  // and the slot.
  Result<std::pair<std::shared_ptr<devices::virtio::VirtioPci>, uint8_t>> add_virtio(
      std::shared_ptr<devices::virtio::VirtioDevice> device, std::optional<uint8_t> slot);
  Result<std::shared_ptr<devices::virtio::Blk>> open_disk(const DiskConfig& disk,
                                                          const std::string& what);
  Result<std::shared_ptr<devices::virtio::Net>> open_nic(const NetConfig& nic, size_t index,
                                                         const std::string& what);
  // A run-time plug: the device in slot (or a free one), then the guest
  // notified. entry says what it is (kind, id, its disk or NIC config).
  struct Named;
  Result<std::string> hotplug(Named entry, std::shared_ptr<devices::virtio::VirtioDevice> device,
                              std::optional<uint8_t> slot);
  // The guest's _EJ0 (vCPU thread) and the unplug timeout (I/O thread).
  void ejected(uint8_t slot);
  void unplug_timed_out(HotplugKind kind, const std::string& id);
  void start_io_thread();
  void stop_io_thread();
  void vcpu_loop(kvm::Vcpu& vcpu);
  // Handles one exit; false when the vCPU must stop.
  bool handle_exit(kvm::Vcpu& vcpu, const kvm::VcpuExit& exit);
  std::string register_dump(kvm::Vcpu& vcpu);
  void kick_vcpus();
  void kick_vcpus_locked();  // with stop_mutex_ held
  // Parks the calling vCPU thread while a pause is requested.
  void hold_while_paused(kvm::Vcpu& vcpu);
  // A throttle tick's sleep of the calling vCPU thread (see set_throttle).
  void throttle_sleep(kvm::Vcpu& vcpu);
  // After a kick that asked nothing of this vCPU: immediate_exit cleared.
  void absorb_kick(kvm::Vcpu& vcpu);
  // The ticker thread's loop (see set_throttle).
  void throttle_ticks();

  VmConfig config_;
  kvm::Vm vm_;
  memory::GuestMemory memory_;
  // Declared before the buses and devices that use them, so they are
  // destroyed after them.
  KvmInterruptFabric interrupt_fabric_{vm_};
  std::unique_ptr<EventLoop> io_loop_;  // device I/O: doorbells, completions, sockets
  std::thread io_thread_;
  devices::IoBus pio_bus_{"pio"};
  devices::IoBus mmio_bus_{"mmio"};
  std::shared_ptr<devices::Serial> serial_;
  std::shared_ptr<devices::Rtc> rtc_;
  std::shared_ptr<devices::Ged> ged_;  // with ACPI only
  std::shared_ptr<devices::PciBus> pci_bus_;
  std::shared_ptr<devices::PciHotplug> pci_hotplug_;  // with ACPI only
  // A virtio-blk or virtio-net function the API can name (config or hot).
  struct Named {
    HotplugKind kind;
    std::string id;
    uint8_t slot = 0;
    std::shared_ptr<devices::virtio::VirtioPci> pci;
    // What current_config() lists for it (id and slot filled in; a NIC's
    // MAC as the guest sees it): the one of disk and net its kind says.
    DiskConfig disk;
    NetConfig net;
    // While an unplug is pending: who waits, and its timeout's timerfd.
    UnplugDone done;
    std::optional<Fd> timer;
    std::optional<EventLoop::WatchId> timer_watch;
  };
  // Guards virtio_devices_ (changed by hotplug on the main thread and by
  // the guest's eject on a vCPU thread) and named_. Taken before the PCI
  // bus's lock; never held while waiting for the event loop.
  mutable std::mutex hotplug_mutex_;
  std::vector<std::shared_ptr<devices::virtio::VirtioPci>> virtio_devices_;
  std::vector<Named> named_;
  // Where the single virtio devices went (current_config()'s "slots").
  DeviceSlots device_slots_;
  size_t hot_nets_ = 0;  // NICs plugged at run time, for their default MACs
  // ForceShare on a migration destination until set_disk_locks(true).
  block::Locking writable_disk_locking_ = block::Locking::Lock;
  std::shared_ptr<devices::virtio::VirtioConsole> virtio_console_;  // also in virtio_devices_
  std::shared_ptr<devices::virtio::Balloon> balloon_;               // also in virtio_devices_
  std::vector<std::unique_ptr<kvm::Vcpu>> vcpus_;
  // The CPUID each vCPU was given, what a snapshot records: KVM_GET_CPUID2
  // does not always answer it back (PVM reports the host's own bits).
  std::vector<kvm::CpuidEntries> cpuids_;
  // Userspace exits by kind, one row per vCPU: each row is written only by
  // its own vCPU thread (relaxed), read by anyone for a summary.
  static constexpr size_t kExitKinds = static_cast<size_t>(kvm::VcpuExit::Kind::Unknown) + 1;
  std::vector<std::array<std::atomic<uint64_t>, kExitKinds>> exit_counts_;
  std::vector<pthread_t> vcpu_threads_;

  // Dirty ring mode: harvests every vCPU's ring into dirty (with
  // dirty_ring_mutex_ held), then hands the entries back to KVM.
  Result<void> harvest_dirty_rings(migration::DirtyBitmap& dirty);
  // KVM_EXIT_DIRTY_RING_FULL, on that vCPU's thread: its ring into
  // ring_pending_ and back to KVM, so it can run on at once.
  Result<void> harvest_full_ring(kvm::Vcpu& vcpu);
  std::vector<migration::SlotPages> slot_pages() const;
  // Guards every vCPU's DirtyRing (its fetch index) and ring_pending_: the
  // pages a full ring gave up between two collections. A leaf: nothing
  // waits for a vCPU while holding it.
  std::mutex dirty_ring_mutex_;
  std::optional<migration::DirtyBitmap> ring_pending_;

  // Guards stop_status_, vcpu_threads_ during kicks, and the pause state
  // (pause_requested_ changes, held_vcpus_).
  mutable std::mutex stop_mutex_;
  std::condition_variable stop_cv_;
  std::condition_variable pause_cv_;  // held_vcpus_ or pause_requested_ changed, or stopping
  std::atomic<bool> pause_requested_{false};
  size_t held_vcpus_ = 0;
  std::optional<StopStatus> stop_status_;
  std::atomic<bool> stopping_{false};
  // The throttle: the percentage changes under stop_mutex_ (so a sleeping
  // vCPU's and the ticker's waits see it); throttle_tick_ counts the
  // ticker's kicks, each vCPU sleeping once for each tick it sees.
  std::atomic<uint32_t> throttle_percent_{0};
  std::atomic<uint64_t> throttle_tick_{0};
  std::condition_variable throttle_cv_;  // the ticker's: the percentage changed, or stopping
  std::mutex throttle_control_mutex_;    // one set_throttle at a time: guards throttle_thread_
  std::thread throttle_thread_;
  EventFd stopped_event_;
};

// What Machine::prebuild makes: a machine with no saved state yet, which
// nothing can run. Dropping it lets go of everything it built.
class Machine::Prebuilt {
 public:
  Prebuilt(Prebuilt&&) noexcept = default;
  Prebuilt& operator=(Prebuilt&&) noexcept = default;

  // Guest RAM, for a migration's pages (no vCPU runs).
  std::span<std::byte> ram() const { return machine_->memory_.ram(); }
  const memory::GuestMemory& memory() const { return machine_->memory_; }
  // Checks saved against this host and the config (Machine::restore's
  // checks) and applies it: the serial port and RTC from their sections,
  // each virtio-pci function's section, the VM's in-kernel state, then each
  // vCPU's. Errors start with label; on one, nothing ran and what was built
  // goes away with this object.
  Result<std::unique_ptr<Machine>> restore(const std::string& label,
                                           const migration::MachineState& saved,
                                           const migration::HostCpuSummary& source,
                                           devices::Serial::Output serial_output,
                                           DiskHandover disks = DiskHandover::Shared) &&;

 private:
  friend class Machine;
  Prebuilt(std::unique_ptr<Machine> machine, kvm::CpuidEntries supported_cpuid)
      : machine_(std::move(machine)), supported_cpuid_(std::move(supported_cpuid)) {}
  std::unique_ptr<Machine> machine_;
  kvm::CpuidEntries supported_cpuid_;  // KVM_GET_SUPPORTED_CPUID, for the check
};

}  // namespace keel::machine
