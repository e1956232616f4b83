// Machine::save on the host's /dev/kvm: a real Machine (pvh_check.elf
// spinning on 2 vCPUs) is paused and saved; the file must hold its config,
// both vCPUs and all of its RAM. With virtio devices on the PCI bus, each
// function is saved as its own section, and Machine::restore refuses a
// config whose device set differs, naming the device. A machine whose
// disks and NICs were hot-plugged and ejected is saved with its current
// config (every device in its slot) and restored with each device there.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <future>
#include <map>
#include <thread>

#include "machine/machine.h"
#include "machine/migration.h"
#include "migration/device_state.h"
#include "migration/snapshot.h"
#include "migration/transport.h"
#include "net/net_namespace.h"
#include "tiny_guest.h"

namespace keel::machine {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

class MachineSnapshotTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (auto reason = testing::tiny_guest_unavailable_reason()) {
      GTEST_SKIP() << "needs a usable /dev/kvm: " << *reason;
    }
    testing::install_kick_handler();
    std::string pattern = ::testing::TempDir() + "keel-machine-snapshot-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  // Runs machine a moment (inside the spin loop by then), checks a running
  // machine is not saved, pauses it, saves it to path and stops it.
  static Result<void> run_pause_save(Machine& machine, const std::string& path) {
    std::thread runner([&] { machine.run(); });
    std::this_thread::sleep_for(100ms);
    EXPECT_FALSE(machine.save(path)) << "saved a running machine";
    Result<void> saved = machine.pause();
    EXPECT_TRUE(saved) << saved.error().message();
    if (saved) saved = machine.save(path);
    (void)machine.resume();
    machine.stop(StopReason::Stopped);
    runner.join();
    return saved;
  }

  std::string dir_;
};

// On both fresh-machine RAM backends: Machine::save writes RAM from its
// populated ranges (pagemap for anonymous RAM, SEEK_DATA for a memfd).
class MachineSnapshotBackendTest : public MachineSnapshotTest,
                                   public ::testing::WithParamInterface<memory::MemoryBackend> {};

INSTANTIATE_TEST_SUITE_P(Backends, MachineSnapshotBackendTest,
                         ::testing::Values(memory::MemoryBackend::Anonymous,
                                           memory::MemoryBackend::Memfd),
                         [](const auto& test_info) {
                           return std::string(memory::memory_backend_name(test_info.param));
                         });

TEST_P(MachineSnapshotBackendTest, PausedMachineSavesItsConfigVcpusAndRam) {
  Result<kvm::Kvm> kvm = kvm::Kvm::open();
  ASSERT_TRUE(kvm) << kvm.error().message();
  VmConfig config;
  config.memory_backend = GetParam();
  config.kernel = std::string(KEEL_VMM_GUEST_DIR) + "/pvh_check.elf";
  config.cmdline = "pvh-test spin";
  config.cpus = 2;
  config.memory_mib = 64;
  config.acpi = false;
  config.debug_exit = true;
  Result<std::unique_ptr<Machine>> machine =
      Machine::create(config, *kvm, [](std::span<const std::byte>) {});
  ASSERT_TRUE(machine) << machine.error().message();
  std::string path = dir_ + "/vm.snap";
  Result<void> saved = run_pause_save(**machine, path);
  if (!saved && kvm::Kvm::vendor_module() == "kvm_pvm") {
    GTEST_SKIP() << "PVM refuses part of the saved state: " << saved.error().message();
  }
  ASSERT_TRUE(saved) << saved.error().message();

  Result<migration::Snapshot> snapshot = migration::read_snapshot(path);
  ASSERT_TRUE(snapshot) << snapshot.error().message();
  EXPECT_EQ(snapshot->machine.config_json, to_json(config));
  ASSERT_EQ(snapshot->machine.vcpus.size(), 2u);
  for (const kvm::VcpuState& vcpu : snapshot->machine.vcpus) {
    EXPECT_FALSE(vcpu.msrs.empty());
    EXPECT_TRUE(vcpu.lapic.has_value()) << "Machine has an in-kernel irqchip";
  }
  ASSERT_EQ(snapshot->machine.devices.size(), 2u);
  EXPECT_EQ(snapshot->machine.devices[1].name, "rtc");
  EXPECT_TRUE(migration::decode_rtc_state(snapshot->machine.devices[1].data, "rtc"));
  EXPECT_EQ(snapshot->machine.devices[0].name, "serial0");
  Result<devices::SerialState> serial =
      migration::decode_serial_state(snapshot->machine.devices[0].data, "serial0");
  ASSERT_TRUE(serial) << serial.error().message();
  EXPECT_EQ(*serial, (*machine)->serial().save());
  EXPECT_TRUE(snapshot->machine.vm.ioapic.has_value());
  EXPECT_TRUE(snapshot->machine.vm.pit.has_value());
  EXPECT_EQ(snapshot->memory.payload_bytes, config.memory_mib << 20);
  EXPECT_TRUE(snapshot->reader.verify(snapshot->memory));
  // The saved RAM is the machine's, byte for byte (it is stopped now).
  Result<Mmap> saved_ram = snapshot->map_memory();
  ASSERT_TRUE(saved_ram) << saved_ram.error().message();
  std::span<const std::byte> ram = (*machine)->memory().ram();
  ASSERT_EQ(saved_ram->size_bytes(), ram.size());
  EXPECT_EQ(std::memcmp(saved_ram->data(), ram.data(), ram.size()), 0);
}

TEST_F(MachineSnapshotTest, VirtioFunctionsAreSavedAndADifferentDeviceSetIsRefused) {
  Result<kvm::Kvm> kvm = kvm::Kvm::open();
  ASSERT_TRUE(kvm) << kvm.error().message();
  VmConfig config;
  config.kernel = std::string(KEEL_VMM_GUEST_DIR) + "/pvh_check.elf";
  config.cmdline = "pvh-test spin";
  config.cpus = 1;
  config.memory_mib = 64;
  config.acpi = false;
  config.rng = true;             // PCI slot 1
  config.virtio_console = SerialConfig{.kind = SerialConfig::Kind::None, .path = {}};  // slot 2
  auto quiet = [](std::span<const std::byte>) {};
  Result<std::unique_ptr<Machine>> machine = Machine::create(config, *kvm, quiet, quiet);
  ASSERT_TRUE(machine) << machine.error().message();
  std::string path = dir_ + "/vm.snap";
  Result<void> saved = run_pause_save(**machine, path);
  if (!saved && kvm::Kvm::vendor_module() == "kvm_pvm") {
    GTEST_SKIP() << "PVM refuses part of the saved state: " << saved.error().message();
  }
  ASSERT_TRUE(saved) << saved.error().message();

  Result<migration::Snapshot> snapshot = migration::read_snapshot(path);
  ASSERT_TRUE(snapshot) << snapshot.error().message();
  const auto& devices = snapshot->machine.devices;
  ASSERT_EQ(devices.size(), 4u);
  EXPECT_EQ(devices[2].name, "pci-0000:00:01.0");
  EXPECT_EQ(devices[3].name, "pci-0000:00:02.0");
  auto rng = migration::decode_virtio_pci_state(devices[2].data, devices[2].name);
  ASSERT_TRUE(rng) << rng.error().message();
  EXPECT_EQ(rng->device_type, 4);  // entropy
  EXPECT_FALSE(rng->device.has_value()) << "the tiny guest never drives it";
  EXPECT_NE(rng->config[0x04] & 0x2, 0) << "memory decode as assign_bars left it";
  auto console = migration::decode_virtio_pci_state(devices[3].data, devices[3].name);
  ASSERT_TRUE(console);
  EXPECT_EQ(console->device_type, 3);

  // Without the rng the console moves to slot 1, and slot 2's section has
  // no device: refused, naming the address.
  VmConfig fewer = config;
  fewer.rng = false;
  auto refused = Machine::restore(path, *snapshot, fewer, *kvm, quiet);
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message().find("pci-0000:00:02.0"), std::string::npos)
      << refused.error().message();
  // With slot 2's section gone too, slot 1 holds another device type.
  snapshot->machine.devices.pop_back();
  auto mismatched = Machine::restore(path, *snapshot, fewer, *kvm, quiet);
  ASSERT_FALSE(mismatched);
  EXPECT_NE(mismatched.error().message().find("virtio-console"), std::string::npos)
      << mismatched.error().message();
  // A device the snapshot lacks is refused, naming it.
  auto missing = Machine::restore(path, *snapshot, config, *kvm, quiet);
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message().find("virtio-console at pci-0000:00:02.0"),
            std::string::npos)
      << missing.error().message();
}

// ---- hot-plugged and ejected devices ----

// The PCI address of each named disk and NIC ("disk:hot1" -> "0000:00:03.0").
std::map<std::string, std::string> named_addresses(const Machine& machine) {
  std::map<std::string, std::string> addresses;
  for (const DeviceInfo& device : machine.devices()) {
    for (const auto& [key, value] : device.properties) {
      if (key == "id") addresses[device.type + ":" + value] = device.address;
    }
  }
  return addresses;
}

// The virtio-pci sections of a snapshot, by name.
std::map<std::string, std::vector<std::byte>> pci_sections(const migration::MachineState& state) {
  std::map<std::string, std::vector<std::byte>> sections;
  for (const migration::DeviceState& device : state.devices) {
    if (device.name.starts_with("pci-")) sections[device.name] = device.data;
  }
  return sections;
}

// Pauses machine (running) and saves it; a Busy answer while the guest has
// not yet taken a plug notification is retried for a while.
Result<void> pause_and_save(Machine& machine, const std::string& path) {
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (true) {
    TRY(machine.pause());
    Result<void> saved = machine.save(path);
    TRY(machine.resume());
    if (saved || saved.error().code() != Errc::Busy ||
        std::chrono::steady_clock::now() > deadline) {
      return saved;
    }
    std::this_thread::sleep_for(20ms);
  }
}

class MachineHotplugSnapshotTest : public MachineSnapshotTest {
 protected:
  void SetUp() override {
    MachineSnapshotTest::SetUp();
    if (IsSkipped()) return;
    const std::string why = net::testing::enter_private_net_namespace();
    if (!why.empty()) GTEST_SKIP() << "the hot-plugged NIC needs a tap: " << why;
  }
  std::string image(const std::string& name) {
    const std::string path = dir_ + "/" + name;
    Fd fd(::open(path.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600));
    EXPECT_TRUE(fd.valid());
    EXPECT_EQ(::ftruncate(fd.get(), 1 << 20), 0);
    return path;
  }
  // The machine of these tests, running on runner: a config disk (slot 1)
  // and the rng (slot 2); a disk hot-plugged into the lowest free slot (3)
  // and a NIC into slot 9; then the guest ejects the config disk, leaving
  // slot 1 empty below the rng.
  void start_hotplugged(const kvm::Kvm& kvm, std::unique_ptr<Machine>& machine,
                        std::thread& runner) {
    VmConfig config;
    config.kernel = std::string(KEEL_VMM_GUEST_DIR) + "/pvh_check.elf";
    config.cmdline = "pvh-test j";  // ejects what it is asked to
    config.memory_mib = 64;
    config.acpi = true;  // hotplug is ACPI's
    config.rng = true;
    DiskConfig boot_disk;
    boot_disk.path = image("disk0.raw");
    boot_disk.format = "raw";
    config.disks = {boot_disk};
    Result<std::unique_ptr<Machine>> created = Machine::create(config, kvm, quiet_);
    ASSERT_TRUE(created) << created.error().message();
    machine = std::move(*created);
    Machine& vm = *machine;
    runner = std::thread([&vm] { vm.run(); });
    Result<std::string> disk = vm.add_disk(
        {.id = "hot1", .path = image("hot1.raw"), .format = "raw", .read_only = false,
         .slot = std::nullopt});
    ASSERT_TRUE(disk) << disk.error().message();
    EXPECT_EQ(*disk, "0000:00:03.0");
    Result<std::string> nic =
        vm.add_net({.id = "hotnet", .tap = "keelhot0", .mac = "", .slot = 9});
    ASSERT_TRUE(nic) << nic.error().message();
    EXPECT_EQ(*nic, "0000:00:09.0");
    EXPECT_FALSE(vm.add_disk({.id = "taken", .path = image("taken.raw"), .format = "raw",
                              .read_only = false, .slot = 9}))
        << "slot 9 is the NIC's";
    std::promise<UnplugOutcome> ejected;
    Result<std::string> unplug = vm.request_unplug(
        HotplugKind::Disk, "disk0", 10s,
        [&ejected](const UnplugOutcome& outcome) { ejected.set_value(outcome); });
    ASSERT_TRUE(unplug) << unplug.error().message();
    EXPECT_TRUE(ejected.get_future().get().ejected) << "pvh-test j ejects what it is asked to";
  }

  const std::map<std::string, std::string> kHotplugged = {{"virtio-blk:hot1", "0000:00:03.0"},
                                                          {"virtio-net:hotnet", "0000:00:09.0"}};
  const Machine::ConsoleOutput quiet_ = [](std::span<const std::byte>) {};
};

// The snapshot's config lists what is plugged now, each in its slot, and
// a restore builds each device where its saved section says, with the
// same state.
TEST_F(MachineHotplugSnapshotTest, HotPluggedAndEjectedDevicesComeBackInTheirSlots) {
  Result<kvm::Kvm> kvm = kvm::Kvm::open();
  ASSERT_TRUE(kvm) << kvm.error().message();
  auto quiet = quiet_;
  const std::string path = dir_ + "/vm.snap";
  {
    std::unique_ptr<Machine> machine;
    std::thread runner;
    start_hotplugged(*kvm, machine, runner);
    if (HasFatalFailure()) {
      if (machine) machine->stop(StopReason::Stopped);
      if (runner.joinable()) runner.join();
      return;
    }
    Result<void> saved = pause_and_save(*machine, path);
    machine->stop(StopReason::Stopped);
    runner.join();
    if (!saved && kvm::Kvm::vendor_module() == "kvm_pvm") {
      GTEST_SKIP() << "PVM refuses part of the saved state: " << saved.error().message();
    }
    ASSERT_TRUE(saved) << saved.error().message();
  }  // the disks' locks and the tap go with the machine

  Result<migration::Snapshot> snapshot = migration::read_snapshot(path);
  ASSERT_TRUE(snapshot) << snapshot.error().message();
  VmConfig saved_config;
  ASSERT_TRUE(merge_json(snapshot->machine.config_json, path, saved_config));
  ASSERT_EQ(saved_config.disks.size(), 1u) << snapshot->machine.config_json;
  EXPECT_EQ(saved_config.disks[0].id, "hot1");
  EXPECT_EQ(saved_config.disks[0].slot, std::optional<uint8_t>(3));
  EXPECT_EQ(saved_config.disks[0].path, dir_ + "/hot1.raw");
  ASSERT_EQ(saved_config.nets.size(), 1u);
  EXPECT_EQ(saved_config.nets[0].id, "hotnet");
  EXPECT_EQ(saved_config.nets[0].tap, "keelhot0");
  EXPECT_EQ(saved_config.nets[0].slot, std::optional<uint8_t>(9));
  EXPECT_FALSE(saved_config.nets[0].mac.empty()) << "the MAC the guest saw";
  EXPECT_EQ(saved_config.slots.rng, std::optional<uint8_t>(2));
  ASSERT_EQ(snapshot->machine.disks.size(), 1u) << "one identity per disk plugged now";
  EXPECT_EQ(snapshot->machine.disks[0].path, dir_ + "/hot1.raw");
  const auto sections = pci_sections(snapshot->machine);
  std::vector<std::string> names;
  for (const auto& [name, data] : sections) names.push_back(name);
  EXPECT_EQ(names, (std::vector<std::string>{"pci-0000:00:02.0", "pci-0000:00:03.0",
                                             "pci-0000:00:09.0"}));

  // Devices in other slots than their sections: refused, naming the place.
  VmConfig moved = saved_config;
  moved.disks[0].slot = 4;
  auto refused = Machine::restore(path, *snapshot, moved, *kvm, quiet);
  ASSERT_FALSE(refused);
  EXPECT_THAT(refused.error().message(), ::testing::HasSubstr("pci-0000:00:03.0"));
  VmConfig swapped = saved_config;
  swapped.disks[0].slot = 9;
  swapped.nets[0].slot = 3;
  auto mismatched = Machine::restore(path, *snapshot, swapped, *kvm, quiet);
  ASSERT_FALSE(mismatched);
  EXPECT_THAT(mismatched.error().message(), ::testing::HasSubstr("virtio-net"));
  // The config as it was before slots: the rng would move into the gap.
  VmConfig unslotted = saved_config;
  unslotted.disks[0].slot.reset();
  unslotted.nets[0].slot.reset();
  unslotted.slots = {};
  EXPECT_FALSE(Machine::restore(path, *snapshot, unslotted, *kvm, quiet));
  // Two devices on one slot in a (hostile) saved config: refused by name.
  VmConfig clash = saved_config;
  clash.nets[0].slot = 3;
  auto clashed = Machine::restore(path, *snapshot, clash, *kvm, quiet);
  ASSERT_FALSE(clashed);
  EXPECT_THAT(clashed.error().message(), ::testing::HasSubstr("nets[0].slot: slot 3"));

  Result<std::unique_ptr<Machine>> restored =
      Machine::restore(path, *snapshot, saved_config, *kvm, quiet);
  ASSERT_TRUE(restored) << restored.error().message();
  EXPECT_EQ(named_addresses(**restored), kHotplugged);
  // Saved again, every function's state is what the first snapshot held.
  std::thread runner([&] { (*restored)->run(); });
  const std::string again = dir_ + "/again.snap";
  Result<void> saved_again = pause_and_save(**restored, again);
  (*restored)->stop(StopReason::Stopped);
  runner.join();
  ASSERT_TRUE(saved_again) << saved_again.error().message();
  Result<migration::Snapshot> second = migration::read_snapshot(again);
  ASSERT_TRUE(second) << second.error().message();
  EXPECT_EQ(pci_sections(second->machine), sections);
  EXPECT_EQ(second->machine.config_json, snapshot->machine.config_json);
}

// Live migration of the same machine into a destination configured with
// the source's current config (another tap name: host names may differ):
// the destination has every device in the source's slot, with the state
// the source had (the tiny guest never drives them, so a snapshot the
// source took just before is that state).
TEST_F(MachineHotplugSnapshotTest, HotPluggedMachineMigratesWithItsCurrentConfig) {
  Result<kvm::Kvm> kvm = kvm::Kvm::open();
  ASSERT_TRUE(kvm) << kvm.error().message();
  std::unique_ptr<Machine> source;
  std::thread runner;
  start_hotplugged(*kvm, source, runner);
  auto stop_source = [&] {
    if (source) source->stop(StopReason::Stopped);
    if (runner.joinable()) runner.join();
  };
  if (HasFatalFailure()) return stop_source();
  const std::string before = dir_ + "/before.snap";
  Result<void> saved = pause_and_save(*source, before);
  if (!saved && kvm::Kvm::vendor_module() == "kvm_pvm") {
    stop_source();
    GTEST_SKIP() << "PVM refuses part of the saved state: " << saved.error().message();
  }
  ASSERT_TRUE(saved) << saved.error().message();

  VmConfig destination_config = source->current_config();
  ASSERT_EQ(destination_config.nets.size(), 1u);
  destination_config.nets[0].tap = "keelhot1";
  Result<migration::StreamAddress> address =
      migration::parse_stream_address("unix:" + dir_ + "/migrate.sock");
  ASSERT_TRUE(address) << address.error().message();
  Result<Fd> listener = migration::listen_stream(*address);
  ASSERT_TRUE(listener) << listener.error().message();
  std::optional<Result<std::unique_ptr<Machine>>> received;
  std::thread destination([&] {
    Result<Fd> connection = migration::accept_stream(*listener, *address, 30000);
    if (!connection) {
      received.emplace(fail(std::move(connection).error()));
      return;
    }
    received.emplace(receive_migration(*connection, "source", destination_config, *kvm, quiet_));
  });
  MigrationOptions options;
  options.destination = *address;
  Result<std::unique_ptr<MigrationSender>> sender = MigrationSender::start(
      *source, options, [](std::string_view, const MigrationStats&) {});
  ASSERT_TRUE(sender) << sender.error().message();
  (*sender)->wait();
  destination.join();
  EXPECT_EQ((*sender)->stats().phase, MigrationPhase::Completed) << (*sender)->stats().error;
  runner.join();  // the source stops once migrated
  ASSERT_TRUE(received.has_value());
  ASSERT_TRUE(*received) << received->error().message();
  Machine& arrived = ***received;
  EXPECT_EQ(named_addresses(arrived), kHotplugged);

  std::thread arrived_runner([&arrived] { arrived.run(); });
  const std::string after = dir_ + "/after.snap";
  Result<void> saved_after = pause_and_save(arrived, after);
  arrived.stop(StopReason::Stopped);
  arrived_runner.join();
  ASSERT_TRUE(saved_after) << saved_after.error().message();
  Result<migration::Snapshot> first = migration::read_snapshot(before);
  Result<migration::Snapshot> second = migration::read_snapshot(after);
  ASSERT_TRUE(first && second);
  EXPECT_EQ(pci_sections(second->machine), pci_sections(first->machine));
}

}  // namespace
}  // namespace keel::machine
