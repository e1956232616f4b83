// Machine::save on the host's /dev/kvm: a real Machine (pvh_check.elf
// spinning on 2 vCPUs) is paused and saved; the file must hold its config,
// both vCPUs and all of its RAM. With virtio devices on the PCI bus, each
// function is saved as its own section, and Machine::restore refuses a
// config whose device set differs, naming the device.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>

#include "machine/machine.h"
#include "migration/device_state.h"
#include "migration/snapshot.h"
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

}  // namespace
}  // namespace keel::machine
