#include "machine/machine.h"

#include <signal.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>

#include <fmt/format.h>

#include "base/fd.h"
#include "base/log.h"
#include "block/image.h"
#include "boot/acpi/acpi.h"
#include "boot/linux_loader.h"
#include "devices/acpi_pm.h"
#include "devices/i8042.h"
#include "devices/pci/pci_config_io.h"
#include "devices/pci/pci_ecam.h"
#include "devices/pci/pci_host_bridge.h"
#include "devices/pvpanic.h"
#include "devices/rtc.h"
#include "devices/virtio/balloon.h"
#include "devices/virtio/blk.h"
#include "devices/virtio/net.h"
#include "devices/virtio/console.h"
#include "devices/virtio/rng.h"
#include "devices/virtio/vsock.h"
#include "machine/acpi_setup.h"
#include "machine/cpu_setup.h"
#include "machine/layout.h"
#include "migration/device_state.h"
#include "migration/snapshot.h"
#include "net/mac_address.h"
#include "net/tap.h"

namespace keel::machine {
namespace {

// The MAC of NIC index when the config leaves it out: random, but chosen
// once per process, so a guest keeps its address across reboots (each a new
// Machine).
net::MacAddress default_mac(size_t index) {
  static std::vector<net::MacAddress> chosen;
  while (chosen.size() <= index) chosen.push_back(net::MacAddress::random_local());
  return chosen[index];
}

Result<std::vector<std::byte>> read_file(const std::string& path, const char* what) {
  Fd fd = TRY_CONTEXT(Fd::open(path, O_RDONLY), what);
  uint64_t size = TRY(fd.size_bytes());
  constexpr uint64_t kMaxImageBytes = 2ull << 30;
  if (size == 0 || size > kMaxImageBytes) {
    return fail(Errc::InvalidArgument,
                fmt::format("{} '{}': size {} bytes is not plausible", what, path, size));
  }
  std::vector<std::byte> bytes(size);
  TRY_CONTEXT(fd.pread_all(bytes, 0), fmt::format("{} '{}'", what, path));
  return bytes;
}

// MADV_HUGEPAGE gives guest RAM 2 MiB pages only where the host's
// transparent hugepage setting allows it: `enabled` (madvise or always) for
// the anonymous backend, `shmem_enabled` (advise, within_size, always) for
// the memfd one, which Debian leaves at never. Without them each first touch
// of guest RAM is a 4 KiB fault for KVM to fill: a Linux guest touches
// ~120 MiB while it boots, which in bench/RESULTS.md's nested runs made
// keel-vmm's guest reach init several times later. Said once per process.
void note_hugepages(memory::MemoryBackend backend) {
  static std::once_flag once;
  std::call_once(once, [backend] {
    const bool memfd = backend == memory::MemoryBackend::Memfd;
    const std::string path = memfd ? "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
                                   : "/sys/kernel/mm/transparent_hugepage/enabled";
    Result<Fd> fd = Fd::open(path, O_RDONLY);
    if (!fd) return;
    char text[128] = {};
    ssize_t length = ::read(fd->get(), text, sizeof(text) - 1);
    if (length <= 0) return;
    std::string_view setting(text, static_cast<size_t>(length));
    if (setting.find("[never]") != std::string_view::npos ||
        setting.find("[deny]") != std::string_view::npos) {
      LOG_INFO("guest RAM gets no transparent hugepages: {} is never or deny ({} gives them; "
               "README.md, host setup)", path, memfd ? "advise" : "madvise");
    }
  });
}

// A guest that reboots through the BIOS (Linux's machine_real_restart,
// which it picks on hardware-reduced ACPI without EFI) jumps to F000:FFF0 in
// real mode. On a PC the firmware's reset code is there; Keel has no
// firmware, so it places a 16-bit stub that writes the ACPI reset value to
// the reset register, then halts.
Result<void> write_reset_vector_stub(const memory::GuestMemory& memory) {
  static_assert(layout::kAcpiResetPort <= 0xffff);
  const uint8_t stub[] = {
      0xb0, layout::kAcpiResetValue,                              // mov al, value
      0xba, layout::kAcpiResetPort & 0xff, layout::kAcpiResetPort >> 8,  // mov dx, port
      0xee,                                                       // out dx, al
      0xf4,                                                       // hlt
      0xeb, 0xfd,                                                 // jmp back to hlt
  };
  return memory.write(memory::GuestAddr(layout::kResetVector), std::as_bytes(std::span(stub)));
}

}  // namespace

namespace {

std::string pci_address(uint8_t slot) { return fmt::format("0000:00:{:02x}.0", slot); }

}  // namespace

std::string_view stop_reason_name(StopReason reason) {
  switch (reason) {
    case StopReason::PowerOff: return "power-off";
    case StopReason::Reset: return "reset";
    case StopReason::TripleFault: return "triple-fault";
    case StopReason::Error: return "error";
    case StopReason::DebugExit: return "debug-exit";
    case StopReason::Stopped: return "stopped";
    case StopReason::GuestPanic: return "guest-panic";
    case StopReason::Migrated: return "migrated";
  }
  return "?";
}

Machine::Machine(const VmConfig& config, kvm::Vm vm, memory::GuestMemory memory,
                 EventFd stopped_event)
    : config_(config), vm_(std::move(vm)), memory_(std::move(memory)),
      stopped_event_(std::move(stopped_event)) {}

Machine::~Machine() {
  set_throttle(0);  // joins the ticker, which kicks the vCPUs
  // Pending unplug timeouts first (their callbacks take hotplug_mutex_).
  std::vector<EventLoop::WatchId> timers;
  {
    std::lock_guard lock(hotplug_mutex_);
    for (Named& named : named_) {
      if (named.timer_watch) timers.push_back(*named.timer_watch);
    }
  }
  for (EventLoop::WatchId id : timers) io_loop_->remove(id);
  // Devices stop their I/O (and drop their event-loop watches) before the
  // loop goes away; a guest reset ends the Machine the same way.
  for (auto& device : virtio_devices()) device->reset();
  stop_io_thread();
}

void Machine::start_io_thread() {
  if (io_thread_.joinable()) return;
  io_thread_ = std::thread([this] { io_loop_->run(); });
}

void Machine::stop_io_thread() {
  if (!io_thread_.joinable()) return;
  io_loop_->stop();
  io_thread_.join();
}

Result<std::unique_ptr<Machine>> Machine::assemble(const VmConfig& config, const kvm::Kvm& kvm,
                                                   memory::GuestMemory memory) {
  kvm::Vm vm = TRY(kvm.create_vm());
  TRY(vm.set_tss_address(layout::kTssAddress));
  TRY(vm.set_identity_map_address(layout::kIdentityMapAddress));
  TRY(vm.create_irqchip());
  TRY(vm.create_pit());
  uint32_t slot = 0;
  for (const memory::MemoryRegion& region : memory.regions()) {
    TRY(vm.set_memory_region(slot++, region.start.value, region.size_bytes, region.host));
  }
  EventFd stopped_event = TRY(EventFd::create());
  std::unique_ptr<Machine> machine(
      new Machine(config, std::move(vm), std::move(memory), std::move(stopped_event)));
  machine->exit_counts_ = std::vector<std::array<std::atomic<uint64_t>, kExitKinds>>(config.cpus);
  return machine;
}

Result<std::unique_ptr<Machine>> Machine::create(const VmConfig& config, const kvm::Kvm& kvm,
                                                 devices::Serial::Output serial_output,
                                                 ConsoleOutput virtio_console_output) {
  note_hugepages(config.memory_backend);
  memory::GuestMemory memory =
      TRY(memory::GuestMemory::create(config.memory_mib << 20, layout::kPciHoleStart,
                                      layout::kPciHoleEnd, config.memory_backend));
  std::unique_ptr<Machine> machine = TRY(assemble(config, kvm, std::move(memory)));
  TRY(machine->build_devices(std::move(virtio_console_output)));
  TRY(machine->add_serial_and_rtc(std::move(serial_output), {}));
  TRY(machine->pci_bus_->assign_bars());

  std::vector<std::byte> kernel = TRY(read_file(config.kernel, "kernel"));
  std::vector<std::byte> initrd;
  if (!config.initrd.empty()) initrd = TRY(read_file(config.initrd, "initrd"));
  TRY(write_reset_vector_stub(machine->memory_));
  uint64_t rsdp_address = 0;
  if (config.acpi) rsdp_address = TRY(write_acpi_tables(machine->memory_, config.cpus));
  boot::LinuxImages images{kernel, initrd, config.cmdline, rsdp_address};
  boot::EntryPoint entry = TRY_CONTEXT(boot::load_linux(machine->memory_, images),
                                       fmt::format("kernel '{}'", config.kernel));

  kvm::CpuidEntries supported = TRY(kvm.supported_cpuid());
  CpuidHostFeatures host{
      .tsc_deadline_timer = kvm.check_extension(kvm::Capability::TscDeadlineTimer).value_or(0) > 0,
      .brand = host_cpu_brand(),
  };
  for (uint32_t index = 0; index < config.cpus; ++index) {
    auto vcpu = std::make_unique<kvm::Vcpu>(TRY(machine->vm_.create_vcpu(index)));
    kvm::CpuidEntries cpuid = build_cpuid(supported, index, config.cpus, host);
    TRY_CONTEXT(configure_vcpu(*vcpu, cpuid), fmt::format("vcpu {}", index));
    machine->vcpus_.push_back(std::move(vcpu));
    machine->cpuids_.push_back(std::move(cpuid));
  }
  TRY(set_boot_entry_state(*machine->vcpus_.front(), entry));
  return machine;
}

Result<std::unique_ptr<Machine>> Machine::restore(const std::string& path,
                                                  const migration::Snapshot& snapshot,
                                                  const VmConfig& config, const kvm::Kvm& kvm,
                                                  devices::Serial::Output serial_output) {
  const std::string label = fmt::format("restore {}", path);
  if (snapshot.memory.payload_bytes != config.memory_mib << 20) {
    return fail(Errc::Corrupt, fmt::format("{}: {} bytes of RAM for a config of {} MiB", label,
                                           snapshot.memory.payload_bytes, config.memory_mib));
  }
  // Before anything is built (a tap created, a disk locked); the
  // prebuilt machine's restore checks again, which costs little.
  TRY(check_restorable(label, snapshot.machine, snapshot.reader.host(), config,
                       TRY(kvm.supported_cpuid()), DiskHandover::Shared));
  memory::GuestMemory memory = TRY_CONTEXT(
      memory::GuestMemory::map_private(snapshot.reader.fd(), snapshot.memory.payload_offset,
                                       snapshot.memory.payload_bytes, layout::kPciHoleStart,
                                       layout::kPciHoleEnd),
      fmt::format("{}: guest RAM", label));
  Prebuilt prebuilt =
      TRY_CONTEXT(prebuild(config, kvm, std::move(memory), block::Locking::Lock), label);
  return std::move(prebuilt).restore(label, snapshot.machine, snapshot.reader.host(),
                                     std::move(serial_output));
}

Result<Machine::Prebuilt> Machine::prebuild(const VmConfig& config, const kvm::Kvm& kvm,
                                            memory::GuestMemory memory,
                                            block::Locking writable_disk_locking) {
  kvm::CpuidEntries supported = TRY(kvm.supported_cpuid());
  std::unique_ptr<Machine> machine = TRY(assemble(config, kvm, std::move(memory)));
  machine->writable_disk_locking_ = writable_disk_locking;
  // The virtio console's output is dropped, as on every restore.
  TRY(machine->build_devices({}));
  for (uint32_t index = 0; index < config.cpus; ++index) {
    machine->vcpus_.push_back(std::make_unique<kvm::Vcpu>(TRY(machine->vm_.create_vcpu(index))));
  }
  return Prebuilt(std::move(machine), std::move(supported));
}

Result<std::unique_ptr<Machine>> Machine::Prebuilt::restore(
    const std::string& label, const migration::MachineState& saved,
    const migration::HostCpuSummary& source, devices::Serial::Output serial_output,
    DiskHandover disks) && {
  std::unique_ptr<Machine> machine = std::move(machine_);
  CHECK(machine != nullptr, "Machine::Prebuilt::restore on a moved-from or used Prebuilt");
  if (machine->memory_.size_bytes() != machine->config_.memory_mib << 20) {
    return fail(Errc::Corrupt, fmt::format("{}: {} bytes of RAM for a config of {} MiB", label,
                                           machine->memory_.size_bytes(),
                                           machine->config_.memory_mib));
  }
  TRY(check_restorable(label, saved, source, machine->config_, supported_cpuid_, disks));
  TRY_CONTEXT(machine->add_serial_and_rtc(std::move(serial_output), saved.devices), label);
  TRY_CONTEXT(machine->restore_virtio_devices(saved.devices), label);
  TRY_CONTEXT(machine->vm_.restore_state(saved.vm), fmt::format("{}: vm", label));
  for (uint32_t index = 0; index < machine->vcpus_.size(); ++index) {
    TRY_CONTEXT(machine->vcpus_[index]->restore_state(saved.vcpus[index]),
                fmt::format("{}: vcpu {}", label, index));
    machine->cpuids_.push_back(saved.vcpus[index].cpuid);
  }
  // A notification the guest sent just before the save may never have been
  // seen; the doorbells run as soon as the device I/O loop starts.
  machine->kick_virtio_queues();
  return machine;
}

Result<void> Machine::check_restorable(const std::string& label,
                                       const migration::MachineState& saved,
                                       const migration::HostCpuSummary& source,
                                       const VmConfig& config,
                                       const kvm::CpuidEntries& supported, DiskHandover disks) {
  auto refuse = [&label](Errc code, const std::string& what) {
    return fail(code, fmt::format("{}: {}", label, what));
  };
  if (saved.vcpus.size() != config.cpus) {
    return refuse(Errc::Corrupt, fmt::format("{} vcpu sections for a config of {} vCPUs",
                                             saved.vcpus.size(), config.cpus));
  }
  for (const migration::DeviceState& device : saved.devices) {
    if (device.name != migration::kSerialSectionName && device.name != migration::kRtcSectionName &&
        !migration::parse_pci_section_name(device.name)) {
      return refuse(Errc::Unsupported,
                    fmt::format("device section '{}' is one this Keel cannot restore", device.name));
    }
  }
  if (disks == DiskHandover::Copied) {
    // The writable disks are copies of the source's, whose identities
    // (inode, mtime) say nothing here; read-only ones are still shared.
    std::vector<migration::DiskIdentity> shared;
    for (size_t index = 0; index < saved.disks.size(); ++index) {
      if (index < config.disks.size() && config.disks[index].read_only) {
        shared.push_back(saved.disks[index]);
      }
    }
    TRY_CONTEXT(migration::check_disks_unchanged(shared), label);
  } else {
    TRY_CONTEXT(migration::check_disks_unchanged(saved.disks), label);
  }
  for (size_t index = 0; index < saved.vcpus.size(); ++index) {
    TRY_CONTEXT(migration::check_cpu_compatible(saved.vcpus[index].cpuid, supported, source),
                fmt::format("{}: vcpu {}", label, index));
  }
  return ok();
}

Result<void> Machine::restore_virtio_devices(std::span<const migration::DeviceState> saved) {
  auto section_for = [&saved](const std::string& name) -> const migration::DeviceState* {
    for (const migration::DeviceState& device : saved) {
      if (device.name == name) return &device;
    }
    return nullptr;
  };
  // Every saved function must meet the same device in the same slot.
  for (const migration::DeviceState& device : saved) {
    std::optional<devices::PciAddress> address = migration::parse_pci_section_name(device.name);
    if (!address) continue;
    auto virtio = std::dynamic_pointer_cast<devices::virtio::VirtioPci>(
        address->bus == 0 && address->function == 0 ? pci_bus_->device(address->device) : nullptr);
    if (virtio == nullptr) {
      return fail(Errc::Corrupt, fmt::format("the snapshot has a virtio device at {}, which this "
                                             "config does not (a different device set)",
                                             device.name));
    }
  }
  for (int slot = 0; slot < devices::PciBus::kSlotCount; ++slot) {
    auto virtio = std::dynamic_pointer_cast<devices::virtio::VirtioPci>(
        pci_bus_->device(static_cast<uint8_t>(slot)));
    if (virtio == nullptr) continue;
    const std::string name = migration::pci_section_name({0, static_cast<uint8_t>(slot), 0});
    const std::string_view type = virtio->device().name();
    const migration::DeviceState* section = section_for(name);
    if (section == nullptr) {
      return fail(Errc::Corrupt, fmt::format("the config has {} at {}, which the snapshot does "
                                             "not (a different device set)", type, name));
    }
    devices::virtio::VirtioPciState state =
        TRY(migration::decode_virtio_pci_state(section->data, name));
    if (state.device_type != static_cast<uint16_t>(virtio->device().type())) {
      return fail(Errc::Corrupt,
                  fmt::format("{}: the snapshot has virtio device type {} there, the config {} "
                              "(a different device set)", name, state.device_type, type));
    }
    TRY_CONTEXT(virtio->restore_state(state), name);
    TRY_CONTEXT(pci_bus_->refresh_mappings(static_cast<uint8_t>(slot)), name);
  }
  return ok();
}

void Machine::kick_virtio_queues() {
  for (const auto& device : virtio_devices_) device->kick_queues();
}

Result<void> Machine::add_serial_and_rtc(devices::Serial::Output serial_output,
                                         std::span<const migration::DeviceState> saved) {
  auto serial_interrupt = [this] {
    // An edge on ISA IRQ 4 (IOAPIC pin 4 / PIC line 4).
    if (!vm_.set_irq_line(layout::kCom1Irq, true) || !vm_.set_irq_line(layout::kCom1Irq, false)) {
      LOG_RATELIMITED(warn, "serial: could not raise IRQ {}", layout::kCom1Irq);
    }
  };
  auto saved_section = [&saved](std::string_view name) -> Result<std::span<const std::byte>> {
    for (const migration::DeviceState& device : saved) {
      if (device.name == name) return std::span<const std::byte>(device.data);
    }
    return fail(Errc::Corrupt, fmt::format("no '{}' device section", name));
  };
  if (saved.empty()) {
    serial_ = std::make_shared<devices::Serial>(std::move(serial_output), serial_interrupt);
    rtc_ = std::make_shared<devices::Rtc>();
  } else {
    devices::SerialState serial = TRY(migration::decode_serial_state(
        TRY(saved_section(migration::kSerialSectionName)), migration::kSerialSectionName));
    serial_ = TRY(devices::Serial::restore(std::move(serial_output), serial_interrupt, serial));
    devices::RtcState rtc = TRY(migration::decode_rtc_state(
        TRY(saved_section(migration::kRtcSectionName)), migration::kRtcSectionName));
    rtc_ = TRY(devices::Rtc::restore(rtc));
  }
  TRY(pio_bus_.map(layout::kCom1Port, 8, serial_));
  TRY(pio_bus_.map(layout::kRtcPort, 2, rtc_));
  return ok();
}

Result<void> Machine::build_devices(ConsoleOutput virtio_console_output) {
  TRY(pio_bus_.map(layout::kI8042Port, 5, std::make_shared<devices::I8042>([this] {
                     stop(StopReason::Reset, "i8042 reset");
                   })));
  TRY(pio_bus_.map(layout::kAcpiSleepControlPort, 3,
                   std::make_shared<devices::AcpiPm>(
                       layout::kAcpiS5SleepType, layout::kAcpiResetValue,
                       [this] { stop(StopReason::PowerOff, "ACPI S5"); },
                       [this] { stop(StopReason::Reset, "ACPI reset register"); })));
  // A panicking guest ends the VM: left running, Linux would reboot (panic=N)
  // or hang, and the host would learn neither why nor when.
  TRY(pio_bus_.map(layout::kPvpanicPort, 1,
                   std::make_shared<devices::Pvpanic>([this](uint8_t events) {
                     if (events & devices::Pvpanic::kPanicked) {
                       stop(StopReason::GuestPanic, "the guest panicked (pvpanic)");
                     } else {
                       LOG_RATELIMITED(warn, "pvpanic: the guest panicked and runs its crash kernel");
                     }
                   })));
  if (config_.acpi) {
    ged_ = std::make_shared<devices::Ged>([this] {
      // An edge on the GED's GSI, as its _CRS says.
      if (!vm_.set_irq_line(layout::kGedGsi, true) || !vm_.set_irq_line(layout::kGedGsi, false)) {
        LOG_RATELIMITED(warn, "GED: could not raise GSI {}", layout::kGedGsi);
      }
    });
    TRY(mmio_bus_.map(layout::kGedStart, devices::Ged::kRegisterBytes, ged_));
    pci_hotplug_ = std::make_shared<devices::PciHotplug>([this](uint8_t slot) { ejected(slot); });
    TRY(mmio_bus_.map(layout::kPciHotplugStart, devices::PciHotplug::kRegisterBytes,
                      pci_hotplug_));
  }
  // PCI: the host bridge on bus 0, reachable through mechanism #1 and ECAM,
  // with the same windows the ACPI _CRS announces.
  devices::PciWindows windows{
      .mmio32_base = layout::kPciMmio32Start,
      .mmio32_size_bytes = layout::kPciMmio32Size,
      .mmio64_base = pci_mmio64_base(memory_),
      .mmio64_size_bytes = layout::kPciMmio64Size,
      .io_base = layout::kPciIoStart,
      .io_size_bytes = layout::kPciIoSize,
  };
  pci_bus_ = std::make_shared<devices::PciBus>(mmio_bus_, pio_bus_, windows);
  TRY(pio_bus_.map(layout::kPciConfigAddressPort, devices::PciConfigIo::kSizeBytes,
                   std::make_shared<devices::PciConfigIo>(pci_bus_)));
  TRY(mmio_bus_.map(layout::kPciEcamStart, layout::kPciEcamSize,
                    std::make_shared<devices::PciEcam>(pci_bus_)));
  io_loop_ = TRY(EventLoop::create());
  // BARs are assigned by create(); a restored guest keeps the ones it
  // programmed (restore_virtio_devices).
  TRY(build_virtio_devices(std::move(virtio_console_output)));
  if (config_.debug_exit) {
    TRY(pio_bus_.map(layout::kDebugExitPort, 1,
                     std::make_shared<devices::DebugExit>([this](uint8_t code) {
                       stop(StopReason::DebugExit, fmt::format("debug exit {}", code));
                       std::lock_guard lock(stop_mutex_);
                       if (stop_status_ && stop_status_->reason == StopReason::DebugExit) {
                         stop_status_->debug_exit_code = code;
                       }
                     })));
  }
  return ok();
}

Result<std::pair<std::shared_ptr<devices::virtio::VirtioPci>, uint8_t>> Machine::add_virtio(
    std::shared_ptr<devices::virtio::VirtioDevice> device, std::optional<uint8_t> slot) {
  const std::string name(device->name());
  auto pci = TRY_CONTEXT(
      devices::virtio::VirtioPci::create(std::move(device), memory_, interrupt_fabric_, *io_loop_),
      name);
  std::lock_guard lock(hotplug_mutex_);
  uint8_t plugged = TRY_CONTEXT(pci_bus_->add_device(pci, slot), name);
  LOG_DEBUG("{} at PCI 00:{:02x}.0", name, plugged);
  virtio_devices_.push_back(pci);
  return std::pair(std::move(pci), plugged);
}

Result<std::shared_ptr<devices::virtio::Blk>> Machine::open_disk(const DiskConfig& disk,
                                                                 const std::string& what) {
  const block::ImageFormat format = TRY_CONTEXT(block::parse_image_format(disk.format), what);
  const block::Access access = disk.read_only ? block::Access::ReadOnly : block::Access::ReadWrite;
  if (!disk.read_only && writable_disk_locking_ == block::Locking::ForceShare &&
      (format == block::ImageFormat::Auto ? TRY_CONTEXT(block::probe_image_format(disk.path), what)
                                          : format) != block::ImageFormat::Raw) {
    // Opening a qcow2 image for writing reads (and may write) metadata
    // the source is still changing.
    return fail(Errc::Unsupported, fmt::format("{}: a writable disk is handed over in a "
                                               "migration only as a raw image", what));
  }
  auto backend = TRY_CONTEXT(
      block::open_image(disk.path, format, access,
                        disk.read_only ? block::Locking::Lock : writable_disk_locking_),
      what);
  std::shared_ptr<devices::virtio::Blk> blk =
      TRY_CONTEXT(devices::virtio::Blk::create(
                      std::move(backend),
                      devices::virtio::BlkConfig{.serial = disk.serial, .access = access}),
                  what);
  return blk;
}

Result<std::shared_ptr<devices::virtio::Net>> Machine::open_nic(const NetConfig& nic, size_t index,
                                                                const std::string& what) {
  const net::MacAddress mac = nic.mac.empty() ? default_mac(index)
                                              : TRY_CONTEXT(net::MacAddress::parse(nic.mac), what);
  auto tap =
      TRY_CONTEXT(net::Tap::open({.name = nic.tap, .mtu = nic.mtu, .bridge = nic.bridge}), what);
  LOG_INFO("{}: {} {}, MAC {}, MTU {}{}", what, tap->created() ? "created" : "attached to",
           tap->name(), mac.to_string(), nic.mtu,
           nic.bridge.empty() ? "" : fmt::format(", bridge {}", nic.bridge));
  std::shared_ptr<devices::virtio::Net> device = TRY_CONTEXT(
      devices::virtio::Net::create(
          std::move(tap), devices::virtio::NetDeviceConfig{
                              .mac = mac.bytes, .mtu = static_cast<uint16_t>(nic.mtu)}),
      what);
  return device;
}

Result<void> Machine::build_virtio_devices(ConsoleOutput virtio_console_output) {
  // A snapshot's config is input like any other: slots and ids checked here
  // for every build, not only where validate() ran.
  TRY(check_device_slots(config_));
  // Every device is made in the config's order; those the config gives a
  // slot are plugged there first, then the rest into the lowest free slots
  // in that order, so a config without slots places them as it always did.
  struct Planned {
    std::shared_ptr<devices::virtio::VirtioDevice> device;
    std::optional<uint8_t> slot;                   // wanted, then where it went
    std::optional<Named> named;                    // the config's disks and NICs
    std::optional<uint8_t>* recorded = nullptr;    // a single device's entry in device_slots_
  };
  std::vector<Planned> planned;
  auto named = [](HotplugKind kind, std::string id) {
    return Named{.kind = kind, .id = std::move(id), .slot = 0, .pci = nullptr, .disk = {},
                 .net = {}, .done = {}, .timer = {}, .timer_watch = {}};
  };
  for (size_t index = 0; index < config_.disks.size(); ++index) {
    const DiskConfig& disk = config_.disks[index];
    auto blk = TRY(open_disk(disk, fmt::format("disk {} '{}'", index, disk.path)));
    Named entry = named(HotplugKind::Disk, disk_id(config_, index));
    entry.disk = disk;
    entry.disk.id = entry.id;
    planned.push_back({std::move(blk), disk.slot, std::move(entry), nullptr});
  }
  for (size_t index = 0; index < config_.nets.size(); ++index) {
    // The config records the MAC the guest sees, so that a snapshot's config
    // restores the NIC with it rather than with a new random one.
    if (config_.nets[index].mac.empty()) config_.nets[index].mac = default_mac(index).to_string();
    const NetConfig& nic = config_.nets[index];
    auto device = TRY(open_nic(nic, index, fmt::format("net {} (tap '{}')", index, nic.tap)));
    Named entry = named(HotplugKind::Net, net_id(config_, index));
    entry.net = nic;
    entry.net.id = entry.id;
    planned.push_back({std::move(device), nic.slot, std::move(entry), nullptr});
  }
  if (config_.rng) {
    std::shared_ptr<devices::virtio::Rng> rng = TRY(devices::virtio::Rng::create());
    planned.push_back({std::move(rng), config_.slots.rng, std::nullopt, &device_slots_.rng});
  }
  if (config_.virtio_console) {
    auto output = virtio_console_output ? std::move(virtio_console_output)
                                        : ConsoleOutput([](std::span<const std::byte>) {});
    virtio_console_ = TRY(devices::virtio::VirtioConsole::create(std::move(output)));
    planned.push_back({virtio_console_, config_.slots.virtio_console, std::nullopt,
                       &device_slots_.virtio_console});
  }
  if (config_.balloon) {
    const BalloonConfig& balloon = *config_.balloon;
    balloon_ = TRY_CONTEXT(devices::virtio::Balloon::create(devices::virtio::BalloonOptions{
                               .target_mib = balloon.target_mib,
                               .deflate_on_oom = balloon.deflate_on_oom,
                               .free_page_reporting = balloon.free_page_reporting,
                               .stats_period_s = balloon.stats_period_s,
                               .guest_memory_bytes = config_.memory_mib << 20}),
                           "balloon");
    planned.push_back({balloon_, config_.slots.balloon, std::nullopt, &device_slots_.balloon});
  }
  if (config_.vsock) {
    devices::virtio::VsockDeviceConfig vsock_config;
    vsock_config.guest_cid = config_.vsock->cid;
    vsock_config.socket_path = config_.vsock->socket;
    auto vsock = TRY_CONTEXT(devices::virtio::Vsock::create(std::move(vsock_config)), "--vsock");
    planned.push_back({std::move(vsock), config_.slots.vsock, std::nullopt, &device_slots_.vsock});
  }
  std::vector<std::shared_ptr<devices::virtio::VirtioPci>> functions(planned.size());
  for (bool with_slot : {true, false}) {
    for (size_t index = 0; index < planned.size(); ++index) {
      Planned& device = planned[index];
      if (device.slot.has_value() != with_slot) continue;
      auto [pci, slot] = TRY(add_virtio(std::move(device.device), device.slot));
      functions[index] = std::move(pci);
      device.slot = slot;
    }
  }
  // The config's disks and NICs get names (in the config's order), so the
  // API can resize and unplug them as it does hot-plugged ones.
  std::lock_guard lock(hotplug_mutex_);
  for (size_t index = 0; index < planned.size(); ++index) {
    Planned& device = planned[index];
    if (device.recorded != nullptr) *device.recorded = device.slot;
    if (!device.named) continue;
    device.named->slot = *device.slot;
    device.named->pci = functions[index];
    device.named->disk.slot = device.slot;
    device.named->net.slot = device.slot;
    named_.push_back(std::move(*device.named));
  }
  return ok();
}

VmConfig Machine::current_config() const {
  VmConfig config = config_;
  config.disks.clear();
  config.nets.clear();
  std::lock_guard lock(hotplug_mutex_);
  for (const Named& named : named_) {
    if (named.kind == HotplugKind::Disk) {
      config.disks.push_back(named.disk);
    } else {
      config.nets.push_back(named.net);
    }
  }
  config.slots = device_slots_;
  return config;
}

void Machine::virtio_console_input(std::span<const std::byte> bytes) {
  // Buffered in the device and delivered on the device I/O thread.
  if (virtio_console_) virtio_console_->enqueue_input(bytes);
}

StopStatus Machine::run() {
  start_io_thread();
  std::vector<std::thread> threads;
  {
    std::lock_guard lock(stop_mutex_);
    for (auto& vcpu : vcpus_) {
      threads.emplace_back([this, raw = vcpu.get()] { vcpu_loop(*raw); });
      vcpu_threads_.push_back(threads.back().native_handle());
    }
  }
  {
    std::unique_lock lock(stop_mutex_);
    stop_cv_.wait(lock, [this] { return stop_status_.has_value(); });
  }
  set_throttle(0);
  kick_vcpus();
  {
    // Forget the handles before joining: a late stop() must not signal a
    // thread that has been joined. Every vCPU was kicked above and sees
    // stopping_, so none needs another kick.
    std::lock_guard lock(stop_mutex_);
    vcpu_threads_.clear();
  }
  for (std::thread& thread : threads) thread.join();
  std::lock_guard lock(stop_mutex_);
  return *stop_status_;
}

void Machine::stop(StopReason reason, std::string detail) {
  {
    std::lock_guard lock(stop_mutex_);
    if (!stop_status_) stop_status_ = StopStatus{reason, 0, std::move(detail)};
    stopping_.store(true);
  }
  stop_cv_.notify_all();
  pause_cv_.notify_all();  // a held or throttled vCPU leaves to stop
  throttle_cv_.notify_all();
  (void)stopped_event_.signal();
  kick_vcpus();
}

void Machine::kick_vcpus() {
  std::lock_guard lock(stop_mutex_);
  kick_vcpus_locked();
}

void Machine::kick_vcpus_locked() {
  for (size_t i = 0; i < vcpu_threads_.size(); ++i) {
    // immediate_exit covers a vCPU that is about to enter KVM_RUN; the
    // signal (handler installed by the process, without SA_RESTART) covers
    // one already inside it.
    vcpus_[i]->set_immediate_exit(true);
    pthread_kill(vcpu_threads_[i], SIGUSR1);
  }
}

void Machine::vcpu_loop(kvm::Vcpu& vcpu) {
  uint64_t tick_served = throttle_tick_.load();
  while (!stopping_.load()) {
    if (pause_requested_.load()) {
      hold_while_paused(vcpu);
      continue;
    }
    if (throttle_tick_.load() != tick_served) {
      throttle_sleep(vcpu);
      // A tick that came during the sleep is served by it (QEMU skips a
      // tick while the vCPU's sleep is still pending, too).
      tick_served = throttle_tick_.load();
      continue;
    }
    Result<kvm::VcpuExit> exit = vcpu.run();
    if (!exit) {
      stop(StopReason::Error, fmt::format("vcpu {}: {}", vcpu.index(), exit.error().message()));
      return;
    }
    if (!handle_exit(vcpu, *exit)) return;
  }
}

std::string Machine::exit_summary() const {
  std::string summary;
  for (size_t kind = 0; kind < kExitKinds; ++kind) {
    uint64_t total = 0;
    for (const auto& row : exit_counts_) total += row[kind].load(std::memory_order_relaxed);
    if (total == 0) continue;
    if (!summary.empty()) summary += ", ";
    summary += fmt::format("{} {}", kvm::exit_kind_name(static_cast<kvm::VcpuExit::Kind>(kind)),
                           total);
  }
  return summary.empty() ? "none" : summary;
}

bool Machine::handle_exit(kvm::Vcpu& vcpu, const kvm::VcpuExit& exit) {
  using Kind = kvm::VcpuExit::Kind;
  exit_counts_[vcpu.index()][static_cast<size_t>(exit.kind)].fetch_add(1,
                                                                      std::memory_order_relaxed);
  switch (exit.kind) {
    case Kind::IoIn:
    case Kind::IoOut: {
      std::span<std::byte> data = vcpu.io_data();
      for (uint32_t i = 0; i < exit.count; ++i) {
        std::span<std::byte> element = data.subspan(size_t{i} * exit.size, exit.size);
        if (exit.kind == Kind::IoIn) {
          pio_bus_.read(exit.address, element);
        } else {
          pio_bus_.write(exit.address, element);
        }
      }
      return true;
    }
    case Kind::MmioRead:
      if (!mmio_bus_.read(exit.address, vcpu.mmio_data())) {
        LOG_RATELIMITED(debug, "vcpu {}: unclaimed MMIO read at {:#x}", vcpu.index(), exit.address);
      }
      return true;
    case Kind::MmioWrite:
      if (!mmio_bus_.write(exit.address, vcpu.mmio_data())) {
        LOG_RATELIMITED(debug, "vcpu {}: unclaimed MMIO write at {:#x}", vcpu.index(), exit.address);
      }
      return true;
    case Kind::Hlt: return !stopping_.load();
    case Kind::Interrupted:
      absorb_kick(vcpu);
      return !stopping_.load();
    case Kind::DirtyRingFull:
      // KVM will not enter the guest again until the ring has room. This
      // thread empties it itself rather than waiting for the migration's
      // next round, so a pause or stop meanwhile finds it as any other exit.
      if (Result<void> harvested = harvest_full_ring(vcpu); !harvested) {
        stop(StopReason::Error, harvested.error().message());
        return false;
      }
      return !stopping_.load();
    case Kind::SystemEvent:
      if (exit.code == kvm::kSystemEventShutdown) {
        stop(StopReason::PowerOff, "KVM shutdown event");
      } else if (exit.code == kvm::kSystemEventReset) {
        stop(StopReason::Reset, "KVM reset event");
      } else {
        stop(StopReason::Error,
             fmt::format("vcpu {}: guest crash event {}\n{}", vcpu.index(), exit.code,
                         register_dump(vcpu)));
      }
      return false;
    case Kind::Shutdown:
      stop(StopReason::TripleFault,
           fmt::format("vcpu {}: triple fault (KVM_EXIT_SHUTDOWN)\n{}", vcpu.index(),
                       register_dump(vcpu)));
      return false;
    case Kind::InternalError:
      stop(StopReason::Error,
           fmt::format("vcpu {}: KVM internal error, suberror {} data {:#x} {:#x} {:#x} {:#x}\n{}",
                       vcpu.index(), exit.code, exit.data[0], exit.data[1], exit.data[2],
                       exit.data[3], register_dump(vcpu)));
      return false;
    case Kind::FailEntry:
      stop(StopReason::Error, fmt::format("vcpu {}: VM entry failed, hardware reason {:#x}\n{}",
                                          vcpu.index(), exit.code, register_dump(vcpu)));
      return false;
    case Kind::Unknown:
      stop(StopReason::Error, fmt::format("vcpu {}: unhandled KVM exit reason {}\n{}", vcpu.index(),
                                          exit.code, register_dump(vcpu)));
      return false;
  }
  return true;
}

std::string Machine::register_dump(kvm::Vcpu& vcpu) {
  Result<kvm::Regs> regs = vcpu.regs();
  Result<kvm::Sregs> sregs = vcpu.sregs();
  if (!regs || !sregs) return "(registers unavailable)";
  const kvm::Regs& r = *regs;
  const kvm::Sregs& s = *sregs;
  return fmt::format(
      "  rip {:016x} rsp {:016x} rflags {:08x}\n"
      "  rax {:016x} rbx {:016x} rcx {:016x} rdx {:016x}\n"
      "  rsi {:016x} rdi {:016x} rbp {:016x}\n"
      "  r8  {:016x} r9  {:016x} r10 {:016x} r11 {:016x}\n"
      "  r12 {:016x} r13 {:016x} r14 {:016x} r15 {:016x}\n"
      "  cs {:04x} (base {:x} l {} db {} dpl {})  ss {:04x}\n"
      "  cr0 {:x} cr2 {:x} cr3 {:x} cr4 {:x} efer {:x}\n"
      "  gdt {:x}/{:x} idt {:x}/{:x}",
      r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10,
      r.r11, r.r12, r.r13, r.r14, r.r15, s.cs.selector, s.cs.base, s.cs.l, s.cs.db, s.cs.dpl,
      s.ss.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.gdt.base, s.gdt.limit, s.idt.base,
      s.idt.limit);
}

// ---- Control: pause, introspection (the API's commands run these) ----

std::optional<StopStatus> Machine::stop_status() const {
  std::lock_guard lock(stop_mutex_);
  return stop_status_;
}

Result<void> Machine::pause() {
  {
    std::lock_guard lock(stop_mutex_);
    if (stopping_.load()) return fail(Errc::Busy, "the VM is stopping");
    if (pause_requested_.load()) return fail(Errc::Busy, "the VM is already paused");
    pause_requested_.store(true);
  }
  // A vCPU inside KVM_RUN comes out on the kick; one about to enter sees
  // immediate_exit; one not yet started sees pause_requested_ first; a
  // throttled one wakes from its sleep.
  pause_cv_.notify_all();
  kick_vcpus();
  constexpr auto kPauseTimeout = std::chrono::seconds(5);
  std::unique_lock lock(stop_mutex_);
  bool held = pause_cv_.wait_for(lock, kPauseTimeout, [this] {
    return held_vcpus_ == vcpus_.size() || stopping_.load();
  });
  if (stopping_.load()) return fail(Errc::Busy, "the VM stopped while pausing");
  if (!held) {
    pause_requested_.store(false);
    pause_cv_.notify_all();
    return fail(Errc::Timeout, fmt::format("only {} of {} vCPUs left KVM_RUN within {} s",
                                           held_vcpus_, vcpus_.size(), kPauseTimeout.count()));
  }
  return ok();
}

Result<void> Machine::resume() {
  {
    std::lock_guard lock(stop_mutex_);
    if (stopping_.load()) return fail(Errc::Busy, "the VM is stopping");
    if (!pause_requested_.load()) return fail(Errc::Busy, "the VM is not paused");
    pause_requested_.store(false);
  }
  pause_cv_.notify_all();
  return ok();
}

Result<void> Machine::check_state_saveable() const {
  // Refused before anything is written or sent. The ACPI hotplug registers
  // and the GED's event are not saved: an unplug the guest has not answered
  // would never end on the restored side, and a plug whose notification
  // the guest has not read would never be seen there.
  if (pci_hotplug_ != nullptr) {
    const uint32_t unread_plugs = pci_hotplug_->up();
    std::lock_guard lock(hotplug_mutex_);
    for (const Named& named : named_) {
      if (named.done) {
        return fail(Errc::Busy,
                    fmt::format("{} '{}' at {}: an unplug is pending (wait until the guest "
                                "ejects it or the unplug times out)",
                                hotplug_kind_name(named.kind), named.id, pci_address(named.slot)));
      }
      if ((unread_plugs >> named.slot) & 1) {
        return fail(Errc::Busy,
                    fmt::format("{} '{}' at {}: the guest has not taken its hotplug "
                                "notification yet (retry once it has)",
                                hotplug_kind_name(named.kind), named.id, pci_address(named.slot)));
      }
    }
  }
  // A device without snapshot state answers Unsupported, naming itself,
  // from save_devices() (VirtioDevice::save_state), before anything is
  // written: every device Keel builds has state today.
  return ok();
}

Machine::QuiescedDevices::~QuiescedDevices() {
  // Kicked while still held: the doorbells run first thing once the loop
  // goes on, so a device that stopped popping looks at its rings again.
  if (machine_ != nullptr) machine_->kick_virtio_queues();
}

Result<Machine::QuiescedDevices> Machine::quiesce_devices() {
  if (!paused()) return fail(Errc::Busy, "the VM is not paused");
  // Longer than any one disk request should take; a stuck backend (a hung
  // NFS server) ends the save with an error instead of hanging the API.
  constexpr auto kQuiesceTimeout = std::chrono::seconds(10);
  EventLoop::Hold hold = TRY_CONTEXT(io_loop_->hold(kQuiesceTimeout), "device I/O loop");
  QuiescedDevices quiesced(*this, std::move(hold));
  for (int slot = 0; slot < devices::PciBus::kSlotCount; ++slot) {
    auto virtio = std::dynamic_pointer_cast<devices::virtio::VirtioPci>(
        pci_bus_->device(static_cast<uint8_t>(slot)));
    if (virtio == nullptr) continue;
    TRY_CONTEXT(virtio->quiesce(kQuiesceTimeout),
                migration::pci_section_name({0, static_cast<uint8_t>(slot), 0}));
  }
  return quiesced;
}

Result<std::vector<migration::DeviceState>> Machine::save_devices(
    const QuiescedDevices& /*quiesced*/) {
  std::vector<migration::DeviceState> devices;
  devices.push_back({std::string(migration::kSerialSectionName),
                     migration::encode_serial_state(serial_->save())});
  devices.push_back(
      {std::string(migration::kRtcSectionName), migration::encode_rtc_state(rtc_->save())});
  for (int slot = 0; slot < devices::PciBus::kSlotCount; ++slot) {
    auto virtio = std::dynamic_pointer_cast<devices::virtio::VirtioPci>(
        pci_bus_->device(static_cast<uint8_t>(slot)));
    if (virtio == nullptr) continue;
    const std::string name = migration::pci_section_name({0, static_cast<uint8_t>(slot), 0});
    devices::virtio::VirtioPciState state = TRY_CONTEXT(virtio->save_state(), name);
    devices.push_back({name, migration::encode_virtio_pci_state(state)});
  }
  return devices;
}

Result<void> Machine::save(const std::string& path) {
  if (!paused()) return fail(Errc::Busy, "snapshot: the VM is not paused");
  TRY_CONTEXT(check_state_saveable(), "snapshot");
  // Devices first: their last completions write RAM and raise interrupts,
  // which the vCPU and VM state saved below must already hold.
  QuiescedDevices quiesced = TRY_CONTEXT(quiesce_devices(), "snapshot");
  migration::MachineState state = TRY(save_state(quiesced));
  // RAM is written from its mapping, whatever backs it. For RAM restored
  // from a snapshot, the guest's changes are private pages of the mapping
  // and the rest is still the old file's; the new file is written beside
  // and renamed over the path, so even the very file the mapping reads from
  // may be replaced: the mapping keeps the old file's inode alive.
  std::vector<memory::ByteRange> populated =
      TRY_CONTEXT(memory_.populated_ranges(), "snapshot");
  return migration::write_snapshot(path, state, memory_.ram(), populated);
}

Result<migration::MachineState> Machine::save_state(const QuiescedDevices& quiesced) {
  if (!paused()) return fail(Errc::Busy, "snapshot: the VM is not paused");
  TRY_CONTEXT(check_state_saveable(), "snapshot");
  migration::MachineState state;
  // The devices as they are now (hot-plugged ones in, ejected ones out, each
  // in its slot), so a restore builds each where its section says.
  VmConfig config = current_config();
  // The run-time target (PUT /api/v1/vm/balloon) is the host's: a restore
  // keeps it even where the driver never started (the device bytes, saved
  // only for an active driver, hold it too).
  if (balloon_ != nullptr) config.balloon->target_mib = balloon_->target_mib();
  state.config_json = to_json(config);
  // The held vCPU threads wait outside KVM_RUN until resume(), which only
  // this thread calls, so their vCPUs can be read from here.
  for (const std::unique_ptr<kvm::Vcpu>& vcpu : vcpus_) {
    TRY_CONTEXT(vcpu->complete_pending_io(), "save");
    kvm::VcpuState saved = TRY_CONTEXT(vcpu->save_state(), "save");
    saved.cpuid = cpuids_[vcpu->index()];  // what the guest was given (see cpuids_)
    state.vcpus.push_back(std::move(saved));
  }
  state.vm = TRY_CONTEXT(vm_.save_state(), "save");
  state.devices = TRY_CONTEXT(save_devices(quiesced), "snapshot");
  for (const DiskConfig& disk : config.disks) {
    state.disks.push_back(TRY_CONTEXT(migration::identify_disk(disk.path), "save"));
  }
  return state;
}

std::vector<Machine::WritableDisk> Machine::writable_disks() {
  // In current_config()'s order: the destination's config lists the same.
  std::vector<WritableDisk> disks;
  std::lock_guard lock(hotplug_mutex_);
  uint32_t index = 0;
  for (const Named& named : named_) {
    if (named.kind != HotplugKind::Disk) continue;
    const uint32_t this_index = index++;
    if (named.disk.read_only) continue;  // readers share an image: nothing to hand over
    if (auto* blk = dynamic_cast<devices::virtio::Blk*>(&named.pci->device())) {
      disks.push_back({this_index, fmt::format("disk '{}'", named.disk.path), blk});
    }
  }
  return disks;
}

Result<void> Machine::check_disks_hand_over() {
  for (const WritableDisk& disk : writable_disks()) {
    if (disk.blk->backend().format_name() != "raw") {
      return fail(Errc::Unsupported,
                  fmt::format("{}: a writable {} disk cannot be handed over yet (raw only; "
                              "migrate_disks copies it instead)",
                              disk.what, disk.blk->backend().format_name()));
    }
  }
  return ok();
}

Result<void> Machine::set_disk_locks(bool held) {
  for (const WritableDisk& disk : writable_disks()) {
    TRY_CONTEXT(disk.blk->backend().set_image_locked(held), disk.what);
  }
  return ok();
}

Result<void> Machine::start_dirty_log() {
  if (vm_.dirty_ring()) {
    // Whatever a ring still holds from an earlier migration is stale.
    migration::DirtyBitmap stale(memory_.page_count());
    TRY(harvest_dirty_rings(stale));
  } else if (!vm_.manual_dirty_protect()) {
    TRY(vm_.enable_manual_dirty_protect());
  }
  memory_.set_dirty_tracking(true);
  uint32_t slot = 0;
  for (const memory::MemoryRegion& region : memory_.regions()) {
    TRY(vm_.set_memory_region(slot++, region.start.value, region.size_bytes, region.host,
                              kvm::MemoryFlags::LogDirtyPages));
  }
  return ok();
}

std::vector<migration::SlotPages> Machine::slot_pages() const {
  constexpr uint64_t kPage = memory::GuestMemory::kPageBytes;
  std::vector<migration::SlotPages> slots;
  for (const memory::MemoryRegion& region : memory_.regions()) {
    slots.push_back({.first_page = region.file_offset / kPage,
                     .page_count = region.size_bytes / kPage});
  }
  return slots;
}

Result<void> Machine::harvest_dirty_rings(migration::DirtyBitmap& dirty) {
  const std::vector<migration::SlotPages> slots = slot_pages();
  std::lock_guard lock(dirty_ring_mutex_);
  for (const std::unique_ptr<kvm::Vcpu>& vcpu : vcpus_) {
    (void)migration::harvest_ring(vcpu->dirty_ring(), slots, dirty);
  }
  if (ring_pending_) {
    dirty.merge(*ring_pending_);
    ring_pending_->clear();
  }
  // Only now may KVM re-protect the pages: a write from here on is logged
  // again, and one before it lands before the caller reads the page.
  TRY(vm_.reset_dirty_rings());
  return ok();
}

Result<void> Machine::harvest_full_ring(kvm::Vcpu& vcpu) {
  const std::vector<migration::SlotPages> slots = slot_pages();
  std::lock_guard lock(dirty_ring_mutex_);
  if (!ring_pending_) ring_pending_.emplace(memory_.page_count());
  (void)migration::harvest_ring(vcpu.dirty_ring(), slots, *ring_pending_);
  TRY_CONTEXT(vm_.reset_dirty_rings(), fmt::format("vcpu {}: dirty ring full", vcpu.index()));
  return ok();
}

Result<void> Machine::collect_dirty_pages(migration::DirtyBitmap& dirty,
                                          migration::DirtyBitmap& vmm_written) {
  constexpr uint64_t kPage = memory::GuestMemory::kPageBytes;
  if (vm_.dirty_ring()) {
    TRY(harvest_dirty_rings(dirty));
  } else {
    uint32_t slot = 0;
    std::vector<uint64_t> log;
    for (const memory::MemoryRegion& region : memory_.regions()) {
      const uint64_t pages = region.size_bytes / kPage;
      log.assign((pages + 63) / 64, 0);
      TRY(vm_.get_dirty_log(slot, log));
      if (vm_.manual_dirty_protect()) {
        // Write-protect again exactly the pages about to be sent, before they
        // are read: a write after this is logged for the next round.
        TRY(vm_.clear_dirty_log(slot, 0, static_cast<uint32_t>(pages), log));
      }
      dirty.merge_words(region.file_offset / kPage, log);
      ++slot;
    }
  }
  migration::DirtyBitmap written(dirty.page_count());
  memory_.take_dirty_pages(written.words());
  dirty.merge(written);
  vmm_written.merge(written);
  return ok();
}

Result<void> Machine::stop_dirty_log() {
  memory_.set_dirty_tracking(false);
  uint32_t slot = 0;
  for (const memory::MemoryRegion& region : memory_.regions()) {
    TRY(vm_.set_memory_region(slot++, region.start.value, region.size_bytes, region.host));
  }
  if (vm_.dirty_ring()) {
    // Empty the rings, so that no vCPU exits full on entries nobody wants.
    migration::DirtyBitmap stale(memory_.page_count());
    TRY(harvest_dirty_rings(stale));
  }
  return ok();
}

void Machine::hold_while_paused(kvm::Vcpu& vcpu) {
  std::unique_lock lock(stop_mutex_);
  ++held_vcpus_;
  pause_cv_.notify_all();
  pause_cv_.wait(lock, [this] { return !pause_requested_.load() || stopping_.load(); });
  --held_vcpus_;
  // The pause's kick set immediate_exit; clear it under the lock kicks take,
  // so a stop() racing with this resume still gets through (it sets
  // stopping_ under the same lock, and the loop checks it first).
  vcpu.set_immediate_exit(false);
}

// ---- vCPU throttle (auto-converge) ----

void Machine::set_throttle(uint32_t percent) {
  percent = std::min(percent, kMaxThrottlePercent);
  std::lock_guard control(throttle_control_mutex_);
  {
    std::lock_guard lock(stop_mutex_);
    if (stopping_.load()) percent = 0;
    throttle_percent_.store(percent);
  }
  throttle_cv_.notify_all();
  pause_cv_.notify_all();  // a vCPU asleep for a throttle that ended wakes now
  if (percent > 0 && !throttle_thread_.joinable()) {
    throttle_thread_ = std::thread([this] { throttle_ticks(); });
  } else if (percent == 0 && throttle_thread_.joinable()) {
    throttle_thread_.join();
  }
}

void Machine::throttle_ticks() {
  using Clock = std::chrono::steady_clock;
  std::unique_lock lock(stop_mutex_);
  // A new percentage takes effect from the next tick: waiting from scratch
  // on each change would never tick while a migration changes it faster
  // than one period.
  Clock::time_point next_tick = Clock::now();
  for (;;) {
    const uint32_t percent = throttle_percent_.load();
    if (percent == 0 || stopping_.load()) return;
    // Each period the vCPUs run one timeslice and sleep the rest.
    next_tick += std::chrono::duration_cast<Clock::duration>(kThrottleTimeslice) * 100 /
                 (100 - percent);
    next_tick = std::max(next_tick, Clock::now());  // no burst of ticks after a late wake
    if (throttle_cv_.wait_until(lock, next_tick, [this] {
          return throttle_percent_.load() == 0 || stopping_.load();
        })) {
      return;
    }
    throttle_tick_.fetch_add(1);
    kick_vcpus_locked();
  }
}

void Machine::throttle_sleep(kvm::Vcpu& vcpu) {
  std::unique_lock lock(stop_mutex_);
  const uint32_t percent = throttle_percent_.load();
  if (percent > 0) {
    const auto sleep =
        std::chrono::duration_cast<std::chrono::microseconds>(kThrottleTimeslice) * percent /
        (100 - percent);
    // A timed wait, not a sleep: a pause or stop must not wait for it.
    pause_cv_.wait_for(lock, sleep, [this] {
      return pause_requested_.load() || stopping_.load() || throttle_percent_.load() == 0;
    });
  }
  // The tick's kick set immediate_exit; cleared under the lock kicks take,
  // and the loop checks stopping_ and pause_requested_ before running again.
  vcpu.set_immediate_exit(false);
}

void Machine::absorb_kick(kvm::Vcpu& vcpu) {
  // A kick for a pause, stop or throttle tick is seen by the loop's checks,
  // which run after this (every kick sets its flag under stop_mutex_
  // first); a kick that comes later sets immediate_exit again. Without
  // this, a kick whose purpose was already served would leave KVM_RUN
  // returning at once forever.
  std::lock_guard lock(stop_mutex_);
  vcpu.set_immediate_exit(false);
}

Result<void> Machine::press_power_button() {
  if (ged_ == nullptr) {
    return fail(Errc::Busy, "the VM has no ACPI (--no-acpi), hence no power button");
  }
  if (stop_status()) return fail(Errc::Busy, "the VM is stopping");
  ged_->trigger(boot::acpi::kGedEventPowerButton);
  return ok();
}

// ---- Hotplug: ACPI PCI hotplug of virtio-blk and virtio-net ----

std::string_view hotplug_kind_name(HotplugKind kind) {
  return kind == HotplugKind::Disk ? "disk" : "net";
}

Result<std::string> Machine::add_disk(const HotplugDisk& disk) {
  if (pci_hotplug_ == nullptr) return fail(Errc::Busy, "the VM has no ACPI, hence no hotplug");
  // The guest sees the id as the disk's serial (GET_ID), cut to its 20 bytes.
  const DiskConfig config{.path = disk.path, .read_only = disk.read_only,
                          .serial = disk.id.substr(0, devices::virtio::kBlkIdBytes),
                          .format = disk.format, .id = disk.id, .slot = std::nullopt};
  auto blk = TRY(open_disk(config, fmt::format("disk '{}' ({})", disk.id, disk.path)));
  return hotplug(Named{.kind = HotplugKind::Disk, .id = disk.id, .slot = 0, .pci = nullptr,
                       .disk = config, .net = {}, .done = {}, .timer = {}, .timer_watch = {}},
                 std::move(blk), disk.slot);
}

Result<std::string> Machine::add_net(const HotplugNet& nic) {
  if (pci_hotplug_ == nullptr) return fail(Errc::Busy, "the VM has no ACPI, hence no hotplug");
  // The MAC the guest sees is recorded, for current_config().
  const std::string mac =
      nic.mac.empty() ? default_mac(config_.nets.size() + hot_nets_).to_string() : nic.mac;
  const NetConfig config{.tap = nic.tap, .mac = mac, .mtu = 1500, .bridge = "", .id = nic.id,
                         .slot = std::nullopt};
  auto device = TRY(open_nic(config, config_.nets.size() + hot_nets_,
                             fmt::format("net '{}' (tap '{}')", nic.id, nic.tap)));
  ++hot_nets_;
  return hotplug(Named{.kind = HotplugKind::Net, .id = nic.id, .slot = 0, .pci = nullptr,
                       .disk = {}, .net = config, .done = {}, .timer = {}, .timer_watch = {}},
                 std::move(device), nic.slot);
}

Result<std::string> Machine::hotplug(Named entry,
                                     std::shared_ptr<devices::virtio::VirtioDevice> device,
                                     std::optional<uint8_t> wanted_slot) {
  if (stop_status()) return fail(Errc::Busy, "the VM is stopping");
  const HotplugKind kind = entry.kind;
  const std::string id = entry.id;
  if (wanted_slot && (*wanted_slot < kFirstDeviceSlot || *wanted_slot > kLastDeviceSlot)) {
    return fail(Errc::InvalidArgument, fmt::format("slot: {} is not one of {}-{}", *wanted_slot,
                                                   kFirstDeviceSlot, kLastDeviceSlot));
  }
  const std::string name(device->name());
  auto pci = TRY_CONTEXT(
      devices::virtio::VirtioPci::create(std::move(device), memory_, interrupt_fabric_, *io_loop_),
      name);
  uint8_t slot = 0;
  {
    std::lock_guard lock(hotplug_mutex_);
    for (const Named& named : named_) {
      if (named.kind == kind && named.id == id) {
        return fail(Errc::Busy, fmt::format("id: a {} named '{}' exists", hotplug_kind_name(kind), id));
      }
    }
    // BARs unassigned and decode off: the guest's acpiphp places them.
    slot = TRY_CONTEXT(pci_bus_->add_device(pci, wanted_slot),
                       wanted_slot ? fmt::format("{} at {}", name, pci_address(*wanted_slot))
                                   : name);
    virtio_devices_.push_back(pci);
    entry.slot = slot;
    entry.pci = pci;
    entry.disk.slot = slot;
    entry.net.slot = slot;
    named_.push_back(std::move(entry));
  }
  pci_hotplug_->plugged(slot);
  ged_->trigger(boot::acpi::kGedEventPciHotplug);
  LOG_INFO("hotplug: {} '{}' ({}) plugged at {}", hotplug_kind_name(kind), id, name,
           pci_address(slot));
  return pci_address(slot);
}

Result<std::string> Machine::request_unplug(HotplugKind kind, const std::string& id,
                                            std::chrono::milliseconds timeout, UnplugDone done) {
  if (pci_hotplug_ == nullptr) return fail(Errc::Busy, "the VM has no ACPI, hence no hotplug");
  if (stop_status()) return fail(Errc::Busy, "the VM is stopping");
  int raw = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (raw < 0) return fail_errno("unplug: timerfd_create");
  Fd timer(raw);
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(timeout);
  itimerspec when{};
  when.it_value.tv_sec = seconds.count();
  when.it_value.tv_nsec =
      std::chrono::duration_cast<std::chrono::nanoseconds>(timeout - seconds).count();
  if (when.it_value.tv_sec == 0 && when.it_value.tv_nsec == 0) when.it_value.tv_nsec = 1;
  if (::timerfd_settime(timer.get(), 0, &when, nullptr) < 0) {
    return fail_errno("unplug: timerfd_settime");
  }
  uint8_t slot = 0;
  {
    std::lock_guard lock(hotplug_mutex_);
    auto it = std::find_if(named_.begin(), named_.end(), [&](const Named& named) {
      return named.kind == kind && named.id == id;
    });
    if (it == named_.end()) {
      return fail(Errc::NotFound, fmt::format("id: no {} named '{}'", hotplug_kind_name(kind), id));
    }
    if (it->done) {
      return fail(Errc::Busy, fmt::format("{} '{}': an unplug is already pending",
                                          hotplug_kind_name(kind), id));
    }
    const int timer_fd = timer.get();
    it->timer_watch = TRY_CONTEXT(
        io_loop_->add(timer_fd, Ready::In, [this, kind, id](uint32_t) { unplug_timed_out(kind, id); }),
        "unplug: watch the timeout");
    it->timer = std::move(timer);
    it->done = std::move(done);
    slot = it->slot;
    pci_hotplug_->request_eject(slot);
  }
  ged_->trigger(boot::acpi::kGedEventPciHotplug);
  LOG_INFO("hotplug: asked the guest to eject {} '{}' at {}", hotplug_kind_name(kind), id,
           pci_address(slot));
  return pci_address(slot);
}

void Machine::ejected(uint8_t slot) {
  std::optional<Named> gone;
  {
    std::lock_guard lock(hotplug_mutex_);
    auto it = std::find_if(named_.begin(), named_.end(),
                           [slot](const Named& named) { return named.slot == slot; });
    // PciHotplug passes only slots whose eject was requested.
    if (it == named_.end() || !it->done) return;
    gone = std::move(*it);
    named_.erase(it);
    std::erase(virtio_devices_, gone->pci);
  }
  // Waits for a timeout callback that may be running; it finds nothing.
  if (gone->timer_watch) io_loop_->remove(*gone->timer_watch);
  (void)pci_bus_->remove_device(slot);
  // The guest's driver let go already; the reset stops any I/O left and
  // drops the device's event-loop watches before it is destroyed.
  gone->pci->reset();
  LOG_INFO("hotplug: the guest ejected {} '{}' at {}", hotplug_kind_name(gone->kind), gone->id,
           pci_address(slot));
  gone->done(UnplugOutcome{.kind = gone->kind, .id = gone->id, .address = pci_address(slot),
                           .ejected = true});
  // gone->pci, the last owner but an access in flight on another vCPU,
  // goes here: the backend closes and the image lock is released.
}

void Machine::unplug_timed_out(HotplugKind kind, const std::string& id) {
  std::optional<Named> pending;  // just what the callback needs
  {
    std::lock_guard lock(hotplug_mutex_);
    auto it = std::find_if(named_.begin(), named_.end(), [&](const Named& named) {
      return named.kind == kind && named.id == id && named.done;
    });
    if (it == named_.end()) return;
    pending = Named{.kind = it->kind, .id = it->id, .slot = it->slot, .pci = nullptr,
                    .disk = {}, .net = {}, .done = std::exchange(it->done, nullptr),
                    .timer = std::move(it->timer), .timer_watch = it->timer_watch};
    it->timer.reset();
    it->timer_watch.reset();
    pci_hotplug_->cancel_eject(it->slot);
  }
  io_loop_->remove(*pending->timer_watch);  // from its own callback: returns at once
  LOG_WARN("hotplug: the guest did not eject {} '{}' at {}; it stays plugged",
           hotplug_kind_name(pending->kind), id, pci_address(pending->slot));
  pending->done(UnplugOutcome{.kind = pending->kind, .id = id,
                              .address = pci_address(pending->slot), .ejected = false});
}

Result<uint64_t> Machine::resize_disk(const std::string& id, uint64_t size_bytes) {
  std::shared_ptr<devices::virtio::VirtioPci> pci;
  {
    std::lock_guard lock(hotplug_mutex_);
    for (const Named& named : named_) {
      if (named.kind == HotplugKind::Disk && named.id == id) pci = named.pci;
    }
  }
  if (pci == nullptr) return fail(Errc::NotFound, fmt::format("id: no disk named '{}'", id));
  auto* blk = dynamic_cast<devices::virtio::Blk*>(&pci->device());
  CHECK(blk != nullptr, "a named disk is a virtio-blk");
  // The device's lock keeps requests out while the backend grows.
  TRY_CONTEXT(blk->resize(size_bytes), fmt::format("disk '{}'", id));
  LOG_INFO("hotplug: disk '{}' is now {} bytes", id, blk->size_bytes());
  return blk->size_bytes();
}

std::vector<DeviceInfo> Machine::devices() const {
  std::vector<DeviceInfo> list;
  for (int slot = 0; slot < devices::PciBus::kSlotCount; ++slot) {
    std::shared_ptr<devices::PciDevice> device = pci_bus_->device(static_cast<uint8_t>(slot));
    if (device == nullptr) continue;
    DeviceInfo info{.type = "pci-device", .bus = "pci",
                    .address = pci_address(static_cast<uint8_t>(slot)), .properties = {}};
    if (slot == devices::PciBus::kHostBridgeSlot) {
      info.type = "pci-host-bridge";
      info.properties = {
          {"vendor_id", fmt::format("{:#06x}", devices::PciHostBridge::kVendorId)},
          {"device_id", fmt::format("{:#06x}", devices::PciHostBridge::kDeviceId)},
          {"ecam", fmt::format("{:#x}", layout::kPciEcamStart)},
      };
    } else if (auto virtio = std::dynamic_pointer_cast<devices::virtio::VirtioPci>(device)) {
      devices::virtio::VirtioDevice& inner = virtio->device();
      info.type = std::string(inner.name());
      info.properties = {
          {"virtio_device_id", std::to_string(static_cast<uint16_t>(inner.type()))},
          {"queues", std::to_string(inner.queue_max_sizes().size())},
          {"device_features", fmt::format("{:#x}", inner.features())},
          {"driver_status", fmt::format("{:#04x}", virtio->status())},
      };
      if (auto* balloon = dynamic_cast<const devices::virtio::Balloon*>(&inner)) {
        // The run-time target (PUT /api/v1/vm/balloon) and what the driver did.
        info.properties.emplace_back("target_mib", std::to_string(balloon->target_mib()));
        info.properties.emplace_back(
            "actual_mib",
            std::to_string(balloon->actual_pages() / devices::virtio::kBalloonPagesPerMib));
      }
      if (auto* blk = dynamic_cast<const devices::virtio::Blk*>(&inner)) {
        info.properties.emplace_back("size_bytes", std::to_string(blk->size_bytes()));
      }
      if (auto bar = pci_bus_->mapped_bar_address(static_cast<uint8_t>(slot), 0)) {
        info.properties.emplace_back("bar0", fmt::format("{:#x}", *bar));
      }
      std::lock_guard lock(hotplug_mutex_);
      for (const Named& named : named_) {
        if (named.pci != virtio) continue;
        info.properties.emplace_back("id", named.id);
        if (named.done) info.properties.emplace_back("unplug", "pending");
      }
    }
    list.push_back(std::move(info));
  }
  auto port = [](uint16_t value) { return fmt::format("{:#x}", value); };
  list.push_back({"serial-16550a", "io", port(layout::kCom1Port),
                     {{"irq", std::to_string(layout::kCom1Irq)},
                      {"console", std::string(config_.serial.kind == SerialConfig::Kind::None
                                                  ? "none" : "host")}}});
  list.push_back({"i8042", "io", port(layout::kI8042Port), {{"role", "reset only"}}});
  list.push_back({"rtc-cmos", "io", port(layout::kRtcPort), {}});
  list.push_back({"acpi-pm", "io", port(layout::kAcpiSleepControlPort),
                     {{"acpi_tables", config_.acpi ? "on" : "off"}}});
  list.push_back({"pvpanic", "io", port(layout::kPvpanicPort), {}});
  if (ged_ != nullptr) {
    list.push_back({"acpi-ged", "mmio", fmt::format("{:#x}", layout::kGedStart),
                    {{"gsi", std::to_string(layout::kGedGsi)},
                     {"events", "power-button,pci-hotplug"}}});
    list.push_back({"acpi-pci-hotplug", "mmio", fmt::format("{:#x}", layout::kPciHotplugStart),
                    {{"slots", "1-31"}}});
  }
  if (config_.debug_exit) list.push_back({"debug-exit", "io", port(layout::kDebugExitPort), {}});
  return list;
}

std::vector<DeviceCounters> Machine::device_counters() const {
  std::vector<DeviceCounters> list;
  for (int slot = 0; slot < devices::PciBus::kSlotCount; ++slot) {
    auto virtio = std::dynamic_pointer_cast<devices::virtio::VirtioPci>(
        pci_bus_->device(static_cast<uint8_t>(slot)));
    if (virtio == nullptr) continue;
    list.push_back({std::string(virtio->device().name()), pci_address(static_cast<uint8_t>(slot)),
                    virtio->counters()});
  }
  return list;
}

std::vector<std::vector<std::pair<std::string_view, uint64_t>>> Machine::exit_counts() const {
  std::vector<std::vector<std::pair<std::string_view, uint64_t>>> counts;
  for (const auto& row : exit_counts_) {
    auto& out = counts.emplace_back();
    for (size_t kind = 0; kind < kExitKinds; ++kind) {
      out.emplace_back(kvm::exit_kind_name(static_cast<kvm::VcpuExit::Kind>(kind)),
                       row[kind].load(std::memory_order_relaxed));
    }
  }
  return counts;
}

}  // namespace keel::machine
