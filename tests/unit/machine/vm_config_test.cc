// VmConfig: the --serial syntax, JSON merging (every key, every kind of bad
// input naming the key), validation against host limits, and to_json
// round-tripping through merge_json.
#include "machine/vm_config.h"

#include <stdlib.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <tuple>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "api/routes.h"

namespace keel::machine {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr uint64_t kGiB = 1ull << 30;

// ---- parse_serial ----

TEST(ParseSerialTest, AcceptsEveryForm) {
  Result<SerialConfig> stdio = parse_serial("stdio");
  ASSERT_TRUE(stdio);
  EXPECT_EQ(stdio->kind, SerialConfig::Kind::Stdio);
  EXPECT_EQ(stdio->path, "");
  Result<SerialConfig> none = parse_serial("none");
  ASSERT_TRUE(none);
  EXPECT_EQ(none->kind, SerialConfig::Kind::None);
  Result<SerialConfig> file = parse_serial("file:/tmp/console.log");
  ASSERT_TRUE(file);
  EXPECT_EQ(file->kind, SerialConfig::Kind::File);
  EXPECT_EQ(file->path, "/tmp/console.log");
  Result<SerialConfig> unix_socket = parse_serial("unix:/run/vm.sock");
  ASSERT_TRUE(unix_socket);
  EXPECT_EQ(unix_socket->kind, SerialConfig::Kind::Unix);
  EXPECT_EQ(unix_socket->path, "/run/vm.sock");
  // Only the first colon separates the kind from the path.
  Result<SerialConfig> colons = parse_serial("file:a:b");
  ASSERT_TRUE(colons);
  EXPECT_EQ(colons->path, "a:b");
}

TEST(ParseSerialTest, EmptyPathIsAnError) {
  for (const char* text : {"file:", "unix:"}) {
    Result<SerialConfig> serial = parse_serial(text);
    ASSERT_FALSE(serial) << text;
    EXPECT_EQ(serial.error().code(), Errc::InvalidArgument);
    EXPECT_THAT(serial.error().message(), HasSubstr("path is empty"));
  }
}

TEST(ParseSerialTest, JunkIsAnErrorListingTheForms) {
  for (const char* text : {"", "bogus", "STDIO", "tcp:1234", "file", " stdio"}) {
    Result<SerialConfig> serial = parse_serial(text);
    ASSERT_FALSE(serial) << "'" << text << "'";
    EXPECT_THAT(serial.error().message(),
                AllOf(HasSubstr(std::string("'") + text + "'"), HasSubstr("file:PATH")));
  }
}

// ---- merge_json ----

TEST(MergeJsonTest, EveryKey) {
  VmConfig config;
  Result<void> merged = merge_json(R"({
    "kernel": "/k/vmlinuz", "initrd": "/k/initrd.img", "cmdline": "console=ttyS0 quiet",
    "cpus": 4, "memory_mib": 2048, "memory_backend": "memfd", "serial": "unix:/tmp/s.sock",
    "reboot": false, "debug_exit": true, "acpi": false
  })", "vm.json", config);
  ASSERT_TRUE(merged) << merged.error().message();
  EXPECT_EQ(config.kernel, "/k/vmlinuz");
  EXPECT_EQ(config.initrd, "/k/initrd.img");
  EXPECT_EQ(config.cmdline, "console=ttyS0 quiet");
  EXPECT_EQ(config.cpus, 4u);
  EXPECT_EQ(config.memory_mib, 2048u);
  EXPECT_EQ(config.memory_backend, memory::MemoryBackend::Memfd);
  EXPECT_EQ(config.serial.kind, SerialConfig::Kind::Unix);
  EXPECT_EQ(config.serial.path, "/tmp/s.sock");
  EXPECT_FALSE(config.reboot);
  EXPECT_TRUE(config.debug_exit);
  EXPECT_FALSE(config.acpi);
}

TEST(MergeJsonTest, MemoryBackendDefaultsToAnonymousAndRoundTrips) {
  VmConfig config;
  EXPECT_EQ(config.memory_backend, memory::MemoryBackend::Anonymous);
  ASSERT_TRUE(merge_json(R"({"memory_backend": "anon"})", "vm.json", config));
  EXPECT_EQ(config.memory_backend, memory::MemoryBackend::Anonymous);
  config.memory_backend = memory::MemoryBackend::Memfd;
  VmConfig again;
  ASSERT_TRUE(merge_json(to_json(config), "again.json", again));
  EXPECT_EQ(again.memory_backend, memory::MemoryBackend::Memfd);
  EXPECT_EQ(*parse_memory_backend("anon"), memory::MemoryBackend::Anonymous);
  EXPECT_EQ(*parse_memory_backend("memfd"), memory::MemoryBackend::Memfd);
  Result<memory::MemoryBackend> bad = parse_memory_backend("Anon");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code(), Errc::InvalidArgument);
  EXPECT_THAT(bad.error().message(), HasSubstr("memory_backend 'Anon'"));
}

TEST(MergeJsonTest, EmptyObjectChangesNothing) {
  VmConfig config;
  ASSERT_TRUE(merge_json("{}", "vm.json", config));
  VmConfig defaults;
  EXPECT_EQ(to_json(config), to_json(defaults));
}

TEST(MergeJsonTest, LaterMergeOverridesOnlyPresentKeys) {
  VmConfig config;
  ASSERT_TRUE(merge_json(R"({"kernel": "a", "cpus": 2, "memory_mib": 256, "acpi": false})",
                         "first.json", config));
  ASSERT_TRUE(merge_json(R"({"cpus": 8, "cmdline": "x"})", "second.json", config));
  EXPECT_EQ(config.kernel, "a");
  EXPECT_EQ(config.cpus, 8u);
  EXPECT_EQ(config.memory_mib, 256u);
  EXPECT_EQ(config.cmdline, "x");
  EXPECT_FALSE(config.acpi);
  EXPECT_TRUE(config.reboot);
}

TEST(MergeJsonTest, UnknownKeyIsNamed) {
  VmConfig config;
  Result<void> merged = merge_json(R"({"kernel": "a", "memory": 512})", "vm.json", config);
  ASSERT_FALSE(merged);
  EXPECT_EQ(merged.error().code(), Errc::InvalidArgument);
  EXPECT_THAT(merged.error().message(),
              AllOf(HasSubstr("vm.json"), HasSubstr("unknown key \"memory\""),
                    HasSubstr("memory_mib")));
}

struct BadJson {
  const char* name;
  const char* json;
  const char* message;
};

// Names the case in test listings instead of dumping its bytes.
void PrintTo(const BadJson& value, std::ostream* stream) { *stream << value.name; }

class MergeJsonRejectionTest : public ::testing::TestWithParam<BadJson> {};

TEST_P(MergeJsonRejectionTest, NamesTheKeyAndTheProblem) {
  VmConfig config;
  Result<void> merged = merge_json(GetParam().json, "vm.json", config);
  ASSERT_FALSE(merged) << GetParam().json;
  EXPECT_EQ(merged.error().code(), Errc::InvalidArgument);
  EXPECT_THAT(merged.error().message(), AllOf(HasSubstr("vm.json"), HasSubstr(GetParam().message)));
}

INSTANTIATE_TEST_SUITE_P(
    Inputs, MergeJsonRejectionTest,
    ::testing::Values(
        BadJson{"kernel_number", R"({"kernel": 5})", "\"kernel\" must be a string, not number"},
        BadJson{"initrd_null", R"({"initrd": null})", "\"initrd\" must be a string, not null"},
        BadJson{"cmdline_array", R"({"cmdline": ["a"]})", "\"cmdline\" must be a string, not array"},
        BadJson{"cpus_string", R"({"cpus": "4"})", "\"cpus\" must be a whole number, not string"},
        BadJson{"cpus_fraction", R"({"cpus": 1.5})", "\"cpus\" must be a whole number, not number"},
        BadJson{"cpus_negative", R"({"cpus": -1})", "\"cpus\" must not be negative (got -1)"},
        BadJson{"cpus_absurd", R"({"cpus": 5000})", "\"cpus\" 5000"},
        BadJson{"memory_negative", R"({"memory_mib": -512})",
                "\"memory_mib\" must not be negative (got -512)"},
        BadJson{"memory_bool", R"({"memory_mib": true})",
                "\"memory_mib\" must be a whole number, not boolean"},
        BadJson{"memory_backend_junk", R"({"memory_backend": "hugetlb"})",
                "memory_backend 'hugetlb': expected anon or memfd"},
        BadJson{"memory_backend_number", R"({"memory_backend": 1})",
                "\"memory_backend\" must be a string, not number"},
        BadJson{"serial_number", R"({"serial": 1})", "\"serial\" must be a string"},
        BadJson{"serial_junk", R"({"serial": "bogus"})", "serial 'bogus'"},
        BadJson{"reboot_string", R"({"reboot": "no"})", "\"reboot\" must be true or false, not string"},
        BadJson{"debug_exit_number", R"({"debug_exit": 1})", "\"debug_exit\" must be true or false"},
        BadJson{"acpi_null", R"({"acpi": null})", "\"acpi\" must be true or false"},
        BadJson{"array_top_level", R"([1, 2])", "top level must be an object"},
        BadJson{"string_top_level", R"("kernel")", "top level must be an object"},
        BadJson{"syntax_error", "{\"cpus\": 2,\n \"memory_mib\": }", "line 2, column"},
        BadJson{"truncated", R"({"cpus": 2)", "not valid JSON"},
        BadJson{"empty", "", "not valid JSON"}),
    [](const auto& test_info) { return std::string(test_info.param.name); });

TEST(MergeJsonTest, HugeMemoryParsesAndIsLeftToValidate) {
  VmConfig config;
  ASSERT_TRUE(merge_json(R"({"memory_mib": 18446744073709551615})", "vm.json", config));
  EXPECT_EQ(config.memory_mib, ~uint64_t{0});  // validate() refuses it (MemoryTooLarge)
}

TEST(MergeJsonTest, NumberTooLargeForUint64IsAnError) {
  VmConfig config;
  Result<void> merged = merge_json(R"({"memory_mib": 18446744073709551616})", "vm.json", config);
  ASSERT_FALSE(merged);
  EXPECT_THAT(merged.error().message(), HasSubstr("\"memory_mib\" must be a whole number"));
}

// ---- validate ----

class ValidateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "keel-vm-config-XXXXXX";
    std::vector<char> path(pattern.begin(), pattern.end());
    path.push_back('\0');
    int fd = ::mkstemp(path.data());
    ASSERT_GE(fd, 0);
    ::close(fd);
    kernel_ = path.data();
    config_.kernel = kernel_;
  }
  void TearDown() override {
    if (!kernel_.empty()) ::unlink(kernel_.c_str());
  }
  std::string kernel_;
  VmConfig config_;
};

TEST_F(ValidateTest, AcceptsAReasonableConfig) {
  Result<void> valid = validate(config_, 64, 16 * kGiB);
  EXPECT_TRUE(valid) << valid.error().message();
}

TEST_F(ValidateTest, NoKernel) {
  config_.kernel.clear();
  Result<void> valid = validate(config_, 64, 16 * kGiB);
  ASSERT_FALSE(valid);
  EXPECT_THAT(valid.error().message(), HasSubstr("kernel: no kernel given"));
}

TEST_F(ValidateTest, UnreadableKernelIsNamed) {
  config_.kernel = "/nonexistent/keel/vmlinuz";
  Result<void> valid = validate(config_, 64, 16 * kGiB);
  ASSERT_FALSE(valid);
  EXPECT_EQ(valid.error().code(), Errc::NotFound);
  EXPECT_THAT(valid.error().message(), HasSubstr("kernel: cannot open '/nonexistent/keel/vmlinuz'"));
}

TEST_F(ValidateTest, UnreadableInitrdIsNamed) {
  config_.initrd = "/nonexistent/keel/initrd.img";
  Result<void> valid = validate(config_, 64, 16 * kGiB);
  ASSERT_FALSE(valid);
  EXPECT_THAT(valid.error().message(),
              HasSubstr("initrd: cannot open '/nonexistent/keel/initrd.img'"));
}

TEST_F(ValidateTest, ZeroCpus) {
  config_.cpus = 0;
  Result<void> valid = validate(config_, 64, 16 * kGiB);
  ASSERT_FALSE(valid);
  EXPECT_THAT(valid.error().message(), HasSubstr("cpus: must be at least 1 (got 0)"));
}

TEST_F(ValidateTest, CpusAboveTheHostLimit) {
  config_.cpus = 9;
  Result<void> valid = validate(config_, 8, 16 * kGiB);
  ASSERT_FALSE(valid);
  EXPECT_THAT(valid.error().message(), HasSubstr("cpus: 9 is more than this host's KVM allows (8)"));
  config_.cpus = 8;
  EXPECT_TRUE(validate(config_, 8, 16 * kGiB));
}

TEST_F(ValidateTest, CpusCappedAt254ForXapicIds) {
  config_.cpus = 254;
  EXPECT_TRUE(validate(config_, 1024, 16 * kGiB));
  config_.cpus = 255;
  Result<void> valid = validate(config_, 1024, 16 * kGiB);
  ASSERT_FALSE(valid);
  EXPECT_THAT(valid.error().message(), HasSubstr("cpus: 255"));
}

TEST_F(ValidateTest, MemoryTooSmall) {
  config_.memory_mib = 16;
  EXPECT_TRUE(validate(config_, 8, 16 * kGiB));
  config_.memory_mib = 15;
  Result<void> valid = validate(config_, 8, 16 * kGiB);
  ASSERT_FALSE(valid);
  EXPECT_THAT(valid.error().message(), HasSubstr("memory_mib: 15 MiB is too little"));
  config_.memory_mib = 0;
  EXPECT_FALSE(validate(config_, 8, 16 * kGiB));
}

TEST_F(ValidateTest, MemoryTooLarge) {
  config_.memory_mib = 4096;
  EXPECT_TRUE(validate(config_, 8, 4 * kGiB));
  config_.memory_mib = 4097;
  Result<void> valid = validate(config_, 8, 4 * kGiB);
  ASSERT_FALSE(valid);
  EXPECT_THAT(valid.error().message(),
              HasSubstr("memory_mib: 4097 MiB is more than this host has (4096 MiB)"));
  config_.memory_mib = ~uint64_t{0};
  EXPECT_FALSE(validate(config_, 8, 4 * kGiB));
}

// ---- to_json ----

TEST(ToJsonTest, RoundTripsThroughMergeJson) {
  VmConfig original;
  original.kernel = "/boot/vmlinuz \"quoted\"";
  original.initrd = "/boot/initrd";
  original.cmdline = "console=ttyS0 init=/bin/sh\tx";
  original.cpus = 3;
  original.memory_mib = 12345;
  original.serial = SerialConfig{SerialConfig::Kind::File, "/var/log/vm console.log"};
  original.reboot = false;
  original.debug_exit = true;
  original.acpi = false;
  std::string text = to_json(original);

  VmConfig copy;
  Result<void> merged = merge_json(text, "to_json", copy);
  ASSERT_TRUE(merged) << merged.error().message() << "\n" << text;
  EXPECT_EQ(copy.kernel, original.kernel);
  EXPECT_EQ(copy.initrd, original.initrd);
  EXPECT_EQ(copy.cmdline, original.cmdline);
  EXPECT_EQ(copy.cpus, original.cpus);
  EXPECT_EQ(copy.memory_mib, original.memory_mib);
  EXPECT_EQ(copy.serial.kind, original.serial.kind);
  EXPECT_EQ(copy.serial.path, original.serial.path);
  EXPECT_EQ(copy.reboot, original.reboot);
  EXPECT_EQ(copy.debug_exit, original.debug_exit);
  EXPECT_EQ(copy.acpi, original.acpi);
  EXPECT_EQ(to_json(copy), text);
}

TEST(ToJsonTest, EverySerialKindRoundTrips) {
  for (SerialConfig serial : {SerialConfig{SerialConfig::Kind::Stdio, ""},
                              SerialConfig{SerialConfig::Kind::None, ""},
                              SerialConfig{SerialConfig::Kind::File, "/f"},
                              SerialConfig{SerialConfig::Kind::Unix, "/u.sock"}}) {
    VmConfig original;
    original.serial = serial;
    VmConfig copy;
    copy.serial = SerialConfig{SerialConfig::Kind::File, "/other"};
    ASSERT_TRUE(merge_json(to_json(original), "to_json", copy));
    EXPECT_EQ(copy.serial.kind, serial.kind);
    EXPECT_EQ(copy.serial.path, serial.path);
  }
}

TEST(ToJsonTest, DefaultsAreListed) {
  std::string text = to_json(VmConfig{});
  for (const char* key : {"\"kernel\"", "\"initrd\"", "\"cmdline\"", "\"cpus\": 1",
                          "\"memory_mib\": 512", "\"serial\": \"stdio\"", "\"reboot\": true",
                          "\"debug_exit\": false", "\"acpi\": true"}) {
    EXPECT_THAT(text, HasSubstr(key));
  }
}

}  // namespace
}  // namespace keel::machine

namespace keel::machine {
namespace {

// ---- virtio device flags and JSON ----

TEST(DeviceFlagsTest, DiskTakesEveryKey) {
  Result<DiskConfig> disk = parse_disk("path=/var/a.img,readonly=on,serial=ABC,format=qcow2");
  ASSERT_TRUE(disk) << disk.error().message();
  EXPECT_EQ(*disk, (DiskConfig{"/var/a.img", true, "ABC", "qcow2", "", std::nullopt}));
  EXPECT_EQ(parse_disk("path=/x")->format, "auto");
}

TEST(DeviceFlagsTest, DiskErrorsNameKeyAndValue) {
  EXPECT_THAT(parse_disk("readonly=on").error().message(), HasSubstr("path= is missing"));
  EXPECT_THAT(parse_disk("path=/x,format=vmdk").error().message(),
              AllOf(HasSubstr("--disk"), HasSubstr("format='vmdk'")));
  EXPECT_THAT(parse_disk("path=/x,serial=123456789012345678901").error().message(),
              HasSubstr("longer than 20"));
  EXPECT_THAT(parse_disk("path=/x,colour=red").error().message(), HasSubstr("unknown key 'colour'"));
  EXPECT_THAT(parse_disk("path=/x,junk").error().message(), HasSubstr("'junk' is not key=value"));
}

TEST(DeviceFlagsTest, NetChecksNameAndMtu) {
  Result<NetConfig> net = parse_net("tap=tap0,mac=52:54:00:00:00:01,mtu=9000,bridge=br0");
  ASSERT_TRUE(net) << net.error().message();
  EXPECT_EQ(*net, (NetConfig{"tap0", "52:54:00:00:00:01", 9000, "br0", "", std::nullopt}));
  EXPECT_THAT(parse_net("tap=averyveryverylongname").error().message(), HasSubstr("interface name"));
  EXPECT_THAT(parse_net("tap=t,mtu=12").error().message(), HasSubstr("below 68"));
  EXPECT_THAT(parse_net("tap=t,mtu=70000").error().message(), HasSubstr("more than 65535"));
  EXPECT_THAT(parse_net("tap=t,mtu=-1").error().message(), HasSubstr("whole number"));
  EXPECT_THAT(parse_net("mac=52:54:00:00:00:01").error().message(), HasSubstr("tap= is missing"));
}

TEST(DeviceFlagsTest, BalloonAndVsock) {
  EXPECT_EQ(*parse_balloon("on"), BalloonConfig{});
  Result<BalloonConfig> balloon = parse_balloon("target-mib=128,deflate-on-oom=off,stats-period=5");
  ASSERT_TRUE(balloon);
  EXPECT_EQ(balloon->target_mib, 128u);
  EXPECT_FALSE(balloon->deflate_on_oom);
  EXPECT_EQ(balloon->stats_period_s, 5u);
  EXPECT_EQ(*parse_vsock("cid=7,socket=/run/v.sock"), (VsockConfig{7, "/run/v.sock"}));
  EXPECT_THAT(parse_vsock("cid=2,socket=/s").error().message(), HasSubstr("reserved"));
  EXPECT_THAT(parse_vsock("cid=9").error().message(), HasSubstr("socket= is missing"));
}

TEST(DeviceJsonTest, DevicesRoundTrip) {
  VmConfig original;
  original.disks = {DiskConfig{"/a.img", false, "", "auto", "", std::nullopt},
                    DiskConfig{"/b.qcow2", true, "S1", "qcow2", "", std::nullopt}};
  original.nets = {NetConfig{"tap3", "", 1500, "br9", "", std::nullopt}};
  original.rng = true;
  original.virtio_console = SerialConfig{SerialConfig::Kind::Unix, "/run/hvc.sock"};
  original.balloon = BalloonConfig{64, false, true, 2};
  original.vsock = VsockConfig{5, "/run/vsock"};
  const std::string text = to_json(original);
  VmConfig copy;
  Result<void> merged = merge_json(text, "to_json", copy);
  ASSERT_TRUE(merged) << merged.error().message() << "\n" << text;
  EXPECT_EQ(copy.disks, original.disks);
  EXPECT_EQ(copy.nets, original.nets);
  EXPECT_TRUE(copy.rng);
  EXPECT_EQ(copy.virtio_console->path, "/run/hvc.sock");
  EXPECT_EQ(copy.balloon, original.balloon);
  EXPECT_EQ(copy.vsock, original.vsock);
  EXPECT_EQ(to_json(copy), text);
}

// ---- PCI slots and ids (what a snapshot of a hot-plugged machine records) ----

// A disk or NIC with its path or tap (key), slot and id; the rest defaults.
template <typename Device>
Device device_at(std::string Device::*key, std::string value, std::optional<uint8_t> slot,
                 std::string id) {
  Device device;
  device.*key = std::move(value);
  device.id = std::move(id);
  device.slot = slot;
  return device;
}

DiskConfig disk_at(std::string path, std::optional<uint8_t> slot, std::string id = "") {
  return device_at(&DiskConfig::path, std::move(path), slot, std::move(id));
}

NetConfig net_at(std::string tap, std::optional<uint8_t> slot, std::string id = "") {
  return device_at(&NetConfig::tap, std::move(tap), slot, std::move(id));
}

TEST(DeviceSlotsTest, FlagsTakeSlotAndId) {
  Result<DiskConfig> disk = parse_disk("path=/a.img,id=data,slot=7");
  ASSERT_TRUE(disk) << disk.error().message();
  EXPECT_EQ(disk->id, "data");
  EXPECT_EQ(disk->slot, std::optional<uint8_t>(7));
  Result<NetConfig> net = parse_net("tap=tap0,slot=31,id=uplink");
  ASSERT_TRUE(net) << net.error().message();
  EXPECT_EQ(net->slot, std::optional<uint8_t>(31));
  EXPECT_EQ(net->id, "uplink");
  EXPECT_FALSE(parse_disk("path=/a.img")->slot.has_value()) << "no slot: the lowest free one";
}

TEST(DeviceSlotsTest, BadSlotsAndIdsNameTheFieldAndValue) {
  EXPECT_THAT(parse_disk("path=/a,slot=0").error().message(),
              AllOf(HasSubstr("--disk"), HasSubstr("slot=0"), HasSubstr("host bridge")));
  EXPECT_THAT(parse_disk("path=/a,slot=32").error().message(),
              AllOf(HasSubstr("slot=32"), HasSubstr("more than 31")));
  EXPECT_THAT(parse_net("tap=t,slot=-1").error().message(), HasSubstr("slot='-1'"));
  EXPECT_THAT(parse_net("tap=t,slot=x").error().message(), HasSubstr("slot='x'"));
  EXPECT_THAT(parse_disk("path=/a,id=a b").error().message(), HasSubstr("id='a b'"));
  EXPECT_THAT(parse_disk("path=/a,id=").error().message(), HasSubstr("id=''"));
  VmConfig config;
  EXPECT_THAT(merge_json(R"({"nets": [{"tap": "t", "slot": 40}]})", "vm.json", config)
                  .error().message(),
              AllOf(HasSubstr("vm.json: nets[0]"), HasSubstr("slot=40")));
  EXPECT_THAT(merge_json(R"({"slots": {"rng": 0}})", "vm.json", config).error().message(),
              AllOf(HasSubstr("vm.json: slots"), HasSubstr("rng=0")));
  EXPECT_THAT(merge_json(R"({"slots": {"gpu": 3}})", "vm.json", config).error().message(),
              AllOf(HasSubstr("unknown key 'gpu'"), HasSubstr("rng, virtio_console")));
  EXPECT_THAT(merge_json(R"({"slots": [3]})", "vm.json", config).error().message(),
              HasSubstr("\"slots\" must be an object"));
}

TEST(DeviceSlotsTest, TwoDevicesOnOneSlotAreRefusedNamingBoth) {
  VmConfig config;
  config.disks = {disk_at("/a", 3), disk_at("/b", std::nullopt), disk_at("/c", 5)};
  config.nets = {net_at("t0", 4)};
  config.slots.rng = 6;
  EXPECT_THAT(check_device_slots(config).error().message(),
              HasSubstr("slots.rng: slot 6 given, but there is no rng"));
  config.rng = true;
  EXPECT_TRUE(check_device_slots(config));
  config.nets[0].slot = 5;
  Result<void> clash = check_device_slots(config);
  ASSERT_FALSE(clash);
  EXPECT_EQ(clash.error().code(), Errc::InvalidArgument);
  EXPECT_THAT(clash.error().message(), HasSubstr("nets[0].slot: slot 5 is disks[2].slot's too"));
  config.nets[0].slot = 6;
  EXPECT_THAT(check_device_slots(config).error().message(),
              HasSubstr("slots.rng: slot 6 is nets[0].slot's too"));
  config.slots.rng = 0;  // a hand-made config, not parsed
  EXPECT_THAT(check_device_slots(config).error().message(),
              HasSubstr("slots.rng: slot 0 is not one of 1-31"));
}

TEST(DeviceSlotsTest, IdsAreUniqueAndDefaultToTheIndex) {
  VmConfig config;
  config.disks = {disk_at("/a", std::nullopt), disk_at("/b", std::nullopt, "data")};
  config.nets = {net_at("t0", std::nullopt)};
  EXPECT_EQ(disk_id(config, 0), "disk0");
  EXPECT_EQ(disk_id(config, 1), "data");
  EXPECT_EQ(net_id(config, 0), "net0");
  EXPECT_TRUE(check_device_slots(config));
  config.disks[1].id = "disk0";  // the default name of disks[0]
  EXPECT_THAT(check_device_slots(config).error().message(),
              HasSubstr("disks[1].id: 'disk0' is disks[0]'s too"));
  // A disk and a NIC may share an id: the API names them by kind.
  config.disks[1].id = "net0";
  EXPECT_TRUE(check_device_slots(config));
}

TEST_F(ValidateTest, SlotClashIsAValidationError) {
  config_.nets = {net_at("t0", 2), net_at("t1", 2)};
  Result<void> valid = validate(config_, 64, 16 * kGiB);
  ASSERT_FALSE(valid);
  EXPECT_THAT(valid.error().message(), HasSubstr("nets[1].slot: slot 2 is nets[0].slot's too"));
}

TEST(DeviceSlotsTest, SlotsAndIdsRoundTripAndAreLeftOutWhereUnset) {
  VmConfig original;
  original.disks = {disk_at("/a.img", 4, "disk0"),
                    DiskConfig{"/hot.raw", true, "hot1", "raw", "hot1", 1}};
  original.nets = {NetConfig{"tap3", "52:54:00:00:00:01", 1500, "", "n", 9}};
  original.rng = true;
  original.balloon = BalloonConfig{};
  original.slots = DeviceSlots{.rng = 2, .virtio_console = std::nullopt, .balloon = 31,
                               .vsock = std::nullopt};
  VmConfig copy;
  const std::string text = to_json(original);
  ASSERT_TRUE(merge_json(text, "to_json", copy)) << text;
  EXPECT_TRUE(std::tie(copy.disks, copy.nets, copy.slots) ==
              std::tie(original.disks, original.nets, original.slots))
      << to_json(copy);
  EXPECT_EQ(to_json(copy), text);
  // A config without slots or ids prints as it did before they existed.
  VmConfig plain;
  plain.disks = {disk_at("/a.img", std::nullopt)};
  plain.nets = {net_at("tap3", std::nullopt)};
  const std::string plain_text = to_json(plain);
  EXPECT_THAT(plain_text, ::testing::Not(HasSubstr("slot")));
  EXPECT_THAT(plain_text, ::testing::Not(HasSubstr("\"id\"")));
}

TEST(DeviceJsonTest, BadDeviceEntriesNameTheirPlace) {
  VmConfig config;
  EXPECT_THAT(merge_json(R"({"disks": [{"path": "/a"}, {"readonly": true}]})", "vm.json", config)
                  .error().message(),
              AllOf(HasSubstr("vm.json: disks[1]"), HasSubstr("path= is missing")));
  EXPECT_THAT(merge_json(R"({"disks": {"path": "/a"}})", "vm.json", config).error().message(),
              HasSubstr("\"disks\" must be an array"));
  EXPECT_THAT(merge_json(R"({"nets": [{"tap": "t", "mtu": [1]}]})", "vm.json", config)
                  .error().message(),
              HasSubstr("nets[0]: \"mtu\" must be"));
  EXPECT_THAT(merge_json(R"({"vsock": {"cid": 1, "socket": "/s"}})", "vm.json", config)
                  .error().message(),
              HasSubstr("vm.json: vsock: cid=1 is reserved"));
}

TEST(DeviceValidateTest, StdioOnlyOnce) {
  VmConfig config;
  config.kernel = "/proc/self/exe";
  config.virtio_console = SerialConfig{SerialConfig::Kind::Stdio, ""};
  Result<void> valid = validate(config, 8, 64 * kGiB);
  ASSERT_FALSE(valid);
  EXPECT_THAT(valid.error().message(), HasSubstr("--serial none"));
}

TEST(DeviceValidateTest, MissingDiskIsNamed) {
  VmConfig config;
  config.kernel = "/proc/self/exe";
  config.serial.kind = SerialConfig::Kind::None;
  config.disks = {DiskConfig{"/nonexistent/disk.img", false, "", "auto", "", std::nullopt}};
  Result<void> valid = validate(config, 8, 64 * kGiB);
  ASSERT_FALSE(valid);
  EXPECT_THAT(valid.error().message(), AllOf(HasSubstr("disks[0]"), HasSubstr("/nonexistent/disk.img")));
}

// ---- config_from_json (PUT /api/v1/vm/config) ----

// Every error starts with the top-level key at fault: the API reports it as
// the field.
struct ApiConfigCase {
  const char* name;
  std::string body;
  const char* field;
  const char* message;
};

class ConfigFromJsonTest : public ::testing::TestWithParam<ApiConfigCase> {};

TEST_P(ConfigFromJsonTest, ErrorsStartWithTheField) {
  Result<VmConfig> config = config_from_json(GetParam().body, 8, 4 * kGiB);
  ASSERT_FALSE(config);
  const std::string& context = config.error().context();
  // As the API reads it (api::field_named_by): the key, then ':', '[' or ' '.
  const std::string field = GetParam().field;
  ASSERT_GT(context.size(), field.size()) << context;
  EXPECT_TRUE(context.starts_with(field) &&
              std::string_view(":[ ").find(context[field.size()]) != std::string_view::npos)
      << context;
  EXPECT_THAT(context, HasSubstr(GetParam().message));
  EXPECT_EQ(config.error().code(), Errc::InvalidArgument) << context;
}

INSTANTIATE_TEST_SUITE_P(
    Bodies, ConfigFromJsonTest,
    ::testing::Values(
        ApiConfigCase{"NotJson", "{", "body", "not valid JSON"},
        ApiConfigCase{"NotAnObject", "[1]", "body", "must be a JSON object"},
        ApiConfigCase{"UnknownKey", R"({"kernel": "/proc/self/exe", "colour": 1})", "colour",
                      "unknown key \"colour\""},
        ApiConfigCase{"WrongType", R"({"kernel": "/proc/self/exe", "cpus": "two"})", "cpus",
                      "must be a whole number"},
        ApiConfigCase{"BadDisk", R"({"kernel": "/proc/self/exe", "disks": [{"format": "vmdk"}]})",
                      "disks", "format='vmdk'"},
        ApiConfigCase{"NoKernel", R"({"cpus": 1})", "kernel", "no kernel given"},
        ApiConfigCase{"MissingKernel", R"({"kernel": "/nonexistent/keel/vmlinuz"})", "kernel",
                      "cannot open"},
        ApiConfigCase{"TooManyCpus", R"({"kernel": "/proc/self/exe", "cpus": 9})", "cpus",
                      "more than this host's KVM allows (8)"},
        ApiConfigCase{"TooLittleMemory", R"({"kernel": "/proc/self/exe", "memory_mib": 15})",
                      "memory_mib", "too little"},
        ApiConfigCase{"MissingDisk",
                      R"({"kernel": "/proc/self/exe", "disks": [{"path": "/nonexistent/d.img"}]})",
                      "disks", "/nonexistent/d.img"},
        ApiConfigCase{"TwoStdioConsoles",
                      R"({"kernel": "/proc/self/exe", "virtio_console": "stdio"})",
                      "virtio_console", "already the serial console"}),
    [](const ::testing::TestParamInfo<ApiConfigCase>& param_info) { return param_info.param.name; });

TEST(ConfigFromJsonTest, TheBodyIsTheWholeConfigOverTheDefaults) {
  Result<VmConfig> config = config_from_json(
      R"({"kernel": "/proc/self/exe", "cmdline": "pvh-test", "memory_mib": 64, "serial": "none",
          "debug_exit": true})",
      8, 4 * kGiB);
  ASSERT_TRUE(config) << config.error().message();
  EXPECT_EQ(config->kernel, "/proc/self/exe");
  EXPECT_EQ(config->cmdline, "pvh-test");
  EXPECT_EQ(config->memory_mib, 64u);
  EXPECT_EQ(config->serial.kind, SerialConfig::Kind::None);
  EXPECT_TRUE(config->debug_exit);
  EXPECT_EQ(config->cpus, VmConfig{}.cpus);
  EXPECT_EQ(config->reboot, VmConfig{}.reboot);
  // What GET /api/v1/vm/config returns goes back in unchanged.
  Result<VmConfig> again = config_from_json(to_json(*config), 8, 4 * kGiB);
  ASSERT_TRUE(again) << again.error().message();
  EXPECT_EQ(to_json(*again), to_json(*config));
}

// PUT /api/v1/vm/config's body fields (routes.cc, checked against
// docs/api/openapi.json) are exactly the schema's keys.
TEST(ConfigFromJsonTest, TheApiRouteTakesExactlyTheSchemaKeys) {
  const api::Route* route = nullptr;
  for (const api::Route& candidate : api::routes()) {
    if (candidate.method == "PUT" && candidate.path == "/api/v1/vm/config") route = &candidate;
  }
  ASSERT_NE(route, nullptr);
  std::vector<std::string_view> fields(route->body_fields.begin(), route->body_fields.end());
  std::vector<std::string_view> keys(json_keys().begin(), json_keys().end());
  EXPECT_EQ(fields, keys);
}

}  // namespace
}  // namespace keel::machine
