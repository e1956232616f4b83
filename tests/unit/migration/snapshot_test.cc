#include "migration/snapshot.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "memory/guest_memory.h"
#include "migration/device_state.h"
#include "migration/kvm_state.h"

namespace keel::migration {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr uint64_t kMemoryBytes = 64 << 10;

template <typename T>
void fill(T& value, uint8_t seed) {
  auto* bytes = reinterpret_cast<uint8_t*>(&value);
  for (size_t i = 0; i < sizeof(T); ++i) bytes[i] = static_cast<uint8_t>(seed + i * 7);
}

template <typename T>
bool same_bytes(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

kvm::VcpuState sample_vcpu(uint8_t seed) {
  kvm::VcpuState state;
  for (uint32_t leaf : {0u, 1u, 7u}) {
    kvm::CpuidEntry entry{};
    entry.function = leaf;
    entry.eax = seed + leaf;
    entry.ecx = 0x1000u * leaf;
    state.cpuid.push_back(entry);
  }
  state.mp_state = kvm::MpState::Halted;
  fill(state.regs, seed);
  fill(state.sregs, static_cast<uint8_t>(seed + 1));
  state.sregs2.emplace();
  fill(*state.sregs2, static_cast<uint8_t>(seed + 2));
  state.xsave.resize(kvm::kXsaveLegacyBytes);
  for (size_t i = 0; i < state.xsave.size(); ++i) state.xsave[i] = std::byte(seed ^ i);
  state.xcrs.emplace();
  state.xcrs->nr_xcrs = 1;
  state.xcrs->xcrs[0].value = 7;
  state.lapic.emplace();
  fill(*state.lapic, static_cast<uint8_t>(seed + 3));
  state.msrs = {{0x10, 123456789u + seed}, {0x4b564d01, 0xfee00001}, {0xc0000080, 0x500}};
  state.events.emplace();
  fill(*state.events, static_cast<uint8_t>(seed + 4));
  state.debug_regs.emplace();
  fill(*state.debug_regs, static_cast<uint8_t>(seed + 5));
  state.tsc_khz = 2'600'000;
  return state;
}

MachineState sample_machine() {
  MachineState machine;
  machine.config_json = R"({"cpus": 2, "memory_mib": 1})";
  machine.vcpus = {sample_vcpu(1), sample_vcpu(50)};
  machine.vm.pic_master.emplace();
  fill(*machine.vm.pic_master, 9);
  machine.vm.pic_master->chip_id = kvm::kIrqchipPicMaster;
  machine.vm.pic_slave.emplace();
  fill(*machine.vm.pic_slave, 10);
  machine.vm.pic_slave->chip_id = kvm::kIrqchipPicSlave;
  machine.vm.ioapic.emplace();
  fill(*machine.vm.ioapic, 11);
  machine.vm.ioapic->chip_id = kvm::kIrqchipIoapic;
  machine.vm.pit.emplace();
  fill(*machine.vm.pit, 12);
  machine.vm.clock.emplace();
  machine.vm.clock->clock = 42'000'000;
  machine.devices = {{"serial0", {std::byte{1}, std::byte{2}}}, {"virtio-blk0", {}}};
  return machine;
}

template <typename T>
bool same_optional(const std::optional<T>& a, const std::optional<T>& b) {
  if (a.has_value() != b.has_value()) return false;
  return !a || same_bytes(*a, *b);
}

void expect_same_vcpu(const kvm::VcpuState& a, const kvm::VcpuState& b) {
  ASSERT_EQ(a.cpuid.size(), b.cpuid.size());
  EXPECT_EQ(std::memcmp(a.cpuid.data(), b.cpuid.data(), a.cpuid.size() * sizeof(a.cpuid[0])), 0);
  EXPECT_EQ(a.mp_state, b.mp_state);
  EXPECT_TRUE(same_bytes(a.regs, b.regs));
  EXPECT_TRUE(same_bytes(a.sregs, b.sregs));
  EXPECT_TRUE(same_optional(a.sregs2, b.sregs2)) << "sregs2";
  EXPECT_EQ(a.xsave, b.xsave);
  EXPECT_EQ(a.fpu.has_value(), b.fpu.has_value());
  EXPECT_TRUE(same_optional(a.xcrs, b.xcrs)) << "xcrs";
  EXPECT_TRUE(same_optional(a.lapic, b.lapic)) << "lapic";
  EXPECT_EQ(a.msrs, b.msrs);
  EXPECT_TRUE(same_optional(a.events, b.events)) << "events";
  EXPECT_TRUE(same_optional(a.debug_regs, b.debug_regs)) << "debug_regs";
  EXPECT_EQ(a.tsc_khz, b.tsc_khz);
}

std::vector<std::byte> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(data.size());
  std::memcpy(bytes.data(), data.data(), data.size());
  return bytes;
}

void write_file(const std::string& path, std::span<const std::byte> data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

template <typename T>
void put(std::vector<std::byte>& file, size_t offset, T value) {
  std::memcpy(file.data() + offset, &value, sizeof(T));
}

template <typename T>
T get(const std::vector<std::byte>& file, size_t offset) {
  T value;
  std::memcpy(&value, file.data() + offset, sizeof(T));
  return value;
}

// Offsets inside a section header (docs/snapshot-format.md).
constexpr size_t kSectionLengthOffset = 16;
constexpr size_t kSectionPayloadCrcOffset = 24;
constexpr size_t kSectionHeaderCrcOffset = 32;
constexpr size_t kSectionHeaderBytes = 36;

// Recomputes a section header's CRC after a test edited it.
void reseal_section(std::vector<std::byte>& file, size_t header_offset) {
  uint16_t name_bytes = get<uint16_t>(file, header_offset + 12);
  uint32_t crc = snapshot_crc32(std::span(file).subspan(header_offset, kSectionHeaderCrcOffset));
  crc = snapshot_crc32(std::span(file).subspan(header_offset + kSectionHeaderBytes, name_bytes),
                       crc);
  put(file, header_offset + kSectionHeaderCrcOffset, crc);
}

class SnapshotTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "keel-snapshot-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    path_ = dir_ + "/vm.snap";
    int fd = ::memfd_create("guest-ram", MFD_CLOEXEC);
    ASSERT_GE(fd, 0);
    memory_ = Fd(fd);
    ASSERT_EQ(::ftruncate(fd, kMemoryBytes), 0);
    std::vector<std::byte> pattern_bytes(kMemoryBytes);
    for (size_t i = 0; i < pattern_bytes.size(); ++i) pattern_bytes[i] = std::byte(i * 31 + 5);
    ASSERT_TRUE(memory_.pwrite_all(pattern_bytes, 0));
    memory_pattern_ = pattern_bytes;
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A snapshot at path_ of ram_bytes of guest RAM in which the guest wrote
  // one page of 0x5a at page_offset; page holds those bytes.
  void write_sparse(uint64_t ram_bytes, uint64_t page_offset, std::vector<std::byte>& page) {
    Fd ram(::memfd_create("sparse-ram", MFD_CLOEXEC));
    ASSERT_TRUE(ram.valid());
    ASSERT_EQ(::ftruncate(ram.get(), static_cast<off_t>(ram_bytes)), 0);
    page.assign(kPageBytes, std::byte{0x5a});
    ASSERT_TRUE(ram.pwrite_all(page, page_offset));
    ASSERT_TRUE(write_snapshot(path_, sample_machine(), ram, ram_bytes));
    sparse_ram_ = std::move(ram);
  }

  void write_sample() {
    Result<void> written = write_snapshot(path_, sample_machine(), memory_, kMemoryBytes);
    ASSERT_TRUE(written) << written.error().message();
  }
  // Opening path_ must fail as Corrupt (or Unsupported) with text in the message.
  void expect_rejected(std::string_view text, Errc code = Errc::Corrupt) {
    Result<SnapshotReader> reader = SnapshotReader::open(path_);
    ASSERT_FALSE(reader) << "accepted a snapshot that should say: " << text;
    EXPECT_EQ(reader.error().code(), code) << reader.error().message();
    EXPECT_THAT(reader.error().message(), HasSubstr(text));
  }
  std::vector<SectionInfo> sample_sections() {
    Result<SnapshotReader> reader = SnapshotReader::open(path_);
    EXPECT_TRUE(reader) << reader.error().message();
    return {reader->sections().begin(), reader->sections().end()};
  }

  std::string dir_;
  std::string path_;
  Fd memory_;
  std::vector<std::byte> memory_pattern_;
  Fd sparse_ram_;  // write_sparse()'s RAM
};

TEST_F(SnapshotTest, RoundTripKeepsEveryPart) {
  write_sample();
  EXPECT_FALSE(fs::exists(path_ + ".partial"));
  Result<Snapshot> snapshot = read_snapshot(path_);
  ASSERT_TRUE(snapshot) << snapshot.error().message();
  MachineState expected = sample_machine();
  EXPECT_EQ(snapshot->reader.version(), kSnapshotFormatVersion);
  EXPECT_EQ(snapshot->reader.host(), HostCpuSummary::of_this_host());
  EXPECT_EQ(snapshot->machine.config_json, expected.config_json);
  ASSERT_EQ(snapshot->machine.vcpus.size(), 2u);
  expect_same_vcpu(snapshot->machine.vcpus[0], expected.vcpus[0]);
  expect_same_vcpu(snapshot->machine.vcpus[1], expected.vcpus[1]);
  const kvm::VmState& vm = snapshot->machine.vm;
  ASSERT_TRUE(vm.pic_master && vm.pic_slave && vm.ioapic && vm.pit && vm.clock);
  EXPECT_TRUE(same_bytes(*vm.pic_master, *expected.vm.pic_master));
  EXPECT_TRUE(same_bytes(*vm.pic_slave, *expected.vm.pic_slave));
  EXPECT_TRUE(same_bytes(*vm.ioapic, *expected.vm.ioapic));
  EXPECT_TRUE(same_bytes(*vm.pit, *expected.vm.pit));
  EXPECT_EQ(vm.clock->clock, expected.vm.clock->clock);
  ASSERT_EQ(snapshot->machine.devices.size(), 2u);
  EXPECT_EQ(snapshot->machine.devices[0].name, "serial0");
  EXPECT_EQ(snapshot->machine.devices[0].data, expected.devices[0].data);
  EXPECT_EQ(snapshot->machine.devices[1].name, "virtio-blk0");
  EXPECT_TRUE(snapshot->machine.devices[1].data.empty());

  EXPECT_EQ(snapshot->memory.payload_offset % kPageBytes, 0u);
  EXPECT_EQ(snapshot->memory.payload_bytes, kMemoryBytes);
  EXPECT_TRUE(snapshot->reader.verify(snapshot->memory));
  Result<Mmap> ram = snapshot->map_memory();
  ASSERT_TRUE(ram) << ram.error().message();
  ASSERT_EQ(ram->size_bytes(), kMemoryBytes);
  EXPECT_EQ(std::memcmp(ram->data(), memory_pattern_.data(), kMemoryBytes), 0);
  // Copy-on-write: the guest may write, the file stays as saved.
  ram->data()[0] = std::byte{0xee};
  Result<Snapshot> again = read_snapshot(path_);
  ASSERT_TRUE(again);
  EXPECT_TRUE(again->reader.verify(again->memory));
}

TEST_F(SnapshotTest, UntouchedRamStaysAHoleInTheFile) {
  // 64 MiB of guest RAM of which the guest wrote one page.
  constexpr uint64_t kLargeRam = 64 << 20;
  std::vector<std::byte> page;
  write_sparse(kLargeRam, 40 << 20, page);
  ASSERT_FALSE(HasFatalFailure());
  const Fd& ram = sparse_ram_;

  struct stat info {};
  ASSERT_EQ(::stat(path_.c_str(), &info), 0);
  EXPECT_GE(static_cast<uint64_t>(info.st_size), kLargeRam);
  EXPECT_LT(static_cast<uint64_t>(info.st_blocks) * 512, 4u << 20) << "RAM was written whole";
  // Nor did saving fill the guest's own memory in (a read through a shared
  // mapping of a memfd hole allocates the page).
  struct stat ram_info {};
  ASSERT_EQ(::fstat(ram.get(), &ram_info), 0);
  EXPECT_LT(static_cast<uint64_t>(ram_info.st_blocks) * 512, 1u << 20) << "holes were filled";
  Result<Snapshot> snapshot = read_snapshot(path_);
  ASSERT_TRUE(snapshot) << snapshot.error().message();
  EXPECT_TRUE(snapshot->reader.verify(snapshot->memory));
  Result<Mmap> mapped = snapshot->map_memory();
  ASSERT_TRUE(mapped) << mapped.error().message();
  EXPECT_EQ(std::memcmp(mapped->data() + (40 << 20), page.data(), page.size()), 0);
  EXPECT_EQ(mapped->data()[0], std::byte{0});
  EXPECT_EQ(mapped->data()[kLargeRam - 1], std::byte{0});
}

// A restored machine saved again: RAM comes from its private mapping of
// the first snapshot (the guest's changes on top), zero pages stay holes,
// and the new file may replace the very one the mapping reads from.
TEST_F(SnapshotTest, RamFromAPrivateMappingIsSavedAgainEvenOverItsOwnFile) {
  constexpr uint64_t kLargeRam = 16 << 20;
  std::vector<std::byte> page;
  write_sparse(kLargeRam, 4 << 20, page);
  ASSERT_FALSE(HasFatalFailure());

  Result<Snapshot> first = read_snapshot(path_);
  ASSERT_TRUE(first) << first.error().message();
  Result<Mmap> mapped = first->map_memory();
  ASSERT_TRUE(mapped) << mapped.error().message();
  // The restored guest writes a page and zeroes the one it had.
  std::memset(mapped->data() + (8 << 20), 0x77, kPageBytes);
  std::memset(mapped->data() + (4 << 20), 0, kPageBytes);
  std::vector<std::byte> expected(mapped->data(), mapped->data() + kLargeRam);

  // All of a private mapping may hold data (GuestMemory::populated_ranges).
  const std::vector<memory::ByteRange> whole = {{0, kLargeRam}};
  Result<void> written = write_snapshot(path_, sample_machine(), mapped->bytes(), whole);
  ASSERT_TRUE(written) << written.error().message();
  EXPECT_FALSE(fs::exists(path_ + ".partial"));
  // The old mapping still reads the old file (its inode lives on).
  EXPECT_EQ(mapped->data()[(4 << 20) + 1], std::byte{0});
  EXPECT_EQ(mapped->data()[(8 << 20) + 1], std::byte{0x77});

  struct stat info {};
  ASSERT_EQ(::stat(path_.c_str(), &info), 0);
  EXPECT_LT(static_cast<uint64_t>(info.st_blocks) * 512, 4u << 20) << "zero pages were written";
  Result<Snapshot> second = read_snapshot(path_);
  ASSERT_TRUE(second) << second.error().message();
  EXPECT_TRUE(second->reader.verify(second->memory));
  Result<Mmap> again = second->map_memory();
  ASSERT_TRUE(again) << again.error().message();
  ASSERT_EQ(again->size_bytes(), kLargeRam);
  EXPECT_EQ(std::memcmp(again->data(), expected.data(), kLargeRam), 0);

  // Memory that is not whole pages is refused, and leaves no file.
  const std::string other = dir_ + "/odd.snap";
  Result<void> odd = write_snapshot(other, sample_machine(), mapped->bytes().first(100),
                                    std::vector<memory::ByteRange>{});
  ASSERT_FALSE(odd);
  EXPECT_EQ(odd.error().code(), Errc::InvalidArgument);
  EXPECT_FALSE(fs::exists(other));
  EXPECT_FALSE(fs::exists(other + ".partial"));
}

// A fresh machine's RAM, whichever backend it is, saved as Machine::save
// does (its populated ranges) and read back: every byte the same, untouched
// and discarded RAM zeros and holes in the file, and saving reads nothing
// it need not (untouched RAM stays unpopulated).
class GuestMemorySnapshotTest : public SnapshotTest,
                                public ::testing::WithParamInterface<memory::MemoryBackend> {};

INSTANTIATE_TEST_SUITE_P(Backends, GuestMemorySnapshotTest,
                         ::testing::Values(memory::MemoryBackend::Anonymous,
                                           memory::MemoryBackend::Memfd),
                         [](const auto& test_info) {
                           return std::string(memory::memory_backend_name(test_info.param));
                         });

TEST_P(GuestMemorySnapshotTest, RoundTripKeepsRamAndLeavesUntouchedPagesOut) {
  constexpr uint64_t kRam = 64 << 20;
  constexpr uint64_t kHole = 48 << 20;  // RAM in two regions, as a machine's above 3 GiB
  memory::GuestMemory ram = *memory::GuestMemory::create(kRam, kHole, 64 << 20, GetParam());
  std::vector<std::byte> block(3 << 20);
  for (size_t i = 0; i < block.size(); ++i) block[i] = std::byte(i * 13 + 1);
  ASSERT_TRUE(ram.write(memory::GuestAddr(1 << 20), block));
  ASSERT_TRUE(ram.write(memory::GuestAddr((64 << 20) + (10 << 20)), block));  // high region
  ASSERT_TRUE(ram.discard(memory::GuestAddr(2 << 20), 1 << 20));            // given back
  // Built aside: reading all of RAM would populate it (the zero page).
  std::vector<std::byte> expected(kRam);
  std::copy(block.begin(), block.end(), expected.begin() + (1 << 20));
  std::fill_n(expected.begin() + (2 << 20), 1 << 20, std::byte{0});
  std::copy(block.begin(), block.end(), expected.begin() + kHole + (10 << 20));

  Result<std::vector<memory::ByteRange>> populated = ram.populated_ranges();
  ASSERT_TRUE(populated) << populated.error().message();
  Result<void> written = write_snapshot(path_, sample_machine(), ram.ram(), *populated);
  ASSERT_TRUE(written) << written.error().message();
  Result<std::vector<memory::ByteRange>> after = ram.populated_ranges();
  ASSERT_TRUE(after);
  EXPECT_EQ(*after, *populated) << "saving touched RAM it should have skipped";

  struct stat info {};
  ASSERT_EQ(::stat(path_.c_str(), &info), 0);
  EXPECT_LT(static_cast<uint64_t>(info.st_blocks) * 512, 8u << 20) << "untouched RAM was written";
  Result<Snapshot> snapshot = read_snapshot(path_);
  ASSERT_TRUE(snapshot) << snapshot.error().message();
  EXPECT_TRUE(snapshot->reader.verify(snapshot->memory));
  Result<Mmap> mapped = snapshot->map_memory();
  ASSERT_TRUE(mapped) << mapped.error().message();
  ASSERT_EQ(mapped->size_bytes(), kRam);
  EXPECT_EQ(std::memcmp(mapped->data(), expected.data(), kRam), 0);
}

TEST_F(SnapshotTest, PopulatedRangesMustBeInOrderAndInside) {
  std::vector<std::byte> ram(16 * kPageBytes);
  auto refused = [&](std::vector<memory::ByteRange> ranges) {
    Result<void> written = write_snapshot(path_, sample_machine(), ram, ranges);
    ASSERT_FALSE(written);
    EXPECT_EQ(written.error().code(), Errc::InvalidArgument);
    EXPECT_THAT(written.error().message(), HasSubstr("populated range"));
    EXPECT_FALSE(fs::exists(path_));
  };
  refused({{0, 17 * kPageBytes}});
  refused({{4 * kPageBytes, 5 * kPageBytes}, {0, kPageBytes}});
  refused({{100, kPageBytes}});
  refused({{2 * kPageBytes, kPageBytes}});
}

TEST_F(SnapshotTest, VcpuWithFpuInsteadOfXsaveRoundTrips) {
  kvm::VcpuState state = sample_vcpu(3);
  state.xsave.clear();
  state.fpu.emplace();
  fill(*state.fpu, 77);
  state.sregs2.reset();
  state.lapic.reset();
  Result<kvm::VcpuState> decoded = decode_vcpu_state(encode_vcpu_state(state), "vcpu0");
  ASSERT_TRUE(decoded) << decoded.error().message();
  expect_same_vcpu(*decoded, state);
  ASSERT_TRUE(decoded->fpu);
  EXPECT_TRUE(same_bytes(*decoded->fpu, *state.fpu));
}

TEST_F(SnapshotTest, AnUnfinishedWriterLeavesNoFile) {
  {
    Result<SnapshotWriter> writer = SnapshotWriter::create(path_, HostCpuSummary::of_this_host());
    ASSERT_TRUE(writer);
    ASSERT_TRUE(writer->add(SectionType::MachineConfig, "config", {}));
    EXPECT_TRUE(fs::exists(path_ + ".partial"));
  }
  EXPECT_FALSE(fs::exists(path_ + ".partial"));
  EXPECT_FALSE(fs::exists(path_));
}

TEST_F(SnapshotTest, WriterRefusesDuplicateSections) {
  Result<SnapshotWriter> writer = SnapshotWriter::create(path_, HostCpuSummary::of_this_host());
  ASSERT_TRUE(writer);
  ASSERT_TRUE(writer->add(SectionType::Vcpu, "vcpu0", {}));
  EXPECT_FALSE(writer->add(SectionType::Vcpu, "vcpu0", {}));
  ASSERT_TRUE(writer->add(SectionType::Vm, "vm", {}));
  EXPECT_FALSE(writer->add(SectionType::Vm, "other-vm", {}));
}

TEST_F(SnapshotTest, BadMagicIsRejected) {
  write_sample();
  std::vector<std::byte> file = read_file(path_);
  file[0] = std::byte{'X'};
  write_file(path_, file);
  expect_rejected("not a Keel snapshot (bad magic)");
}

TEST_F(SnapshotTest, UnknownVersionIsRejectedNamingIt) {
  write_sample();
  std::vector<std::byte> file = read_file(path_);
  put<uint32_t>(file, 8, 3);
  write_file(path_, file);
  expect_rejected("format version 3; this Keel reads versions 1 to 2", Errc::Unsupported);
  put<uint32_t>(file, 8, 0);
  write_file(path_, file);
  expect_rejected("format version 0; this Keel reads versions 1 to 2", Errc::Unsupported);
}

// Version 1 (configs without PCI slots) is still read: its layout is
// version 2's.
TEST_F(SnapshotTest, VersionOneFilesAreStillRead) {
  write_sample();
  std::vector<std::byte> file = read_file(path_);
  put<uint32_t>(file, 8, kOldestSnapshotFormatVersion);
  constexpr size_t kHeaderCrcOffset = 76;
  put<uint32_t>(file, kHeaderCrcOffset, snapshot_crc32(std::span(file).first(kHeaderCrcOffset)));
  write_file(path_, file);
  Result<Snapshot> snapshot = read_snapshot(path_);
  ASSERT_TRUE(snapshot) << snapshot.error().message();
  EXPECT_EQ(snapshot->reader.version(), 1u);
}

TEST_F(SnapshotTest, TruncationAnywhereIsRejected) {
  write_sample();
  std::vector<std::byte> file = read_file(path_);
  std::vector<SectionInfo> sections = sample_sections();
  // At each section boundary first, with the message naming truncation.
  for (const SectionInfo& section : sections) {
    for (uint64_t cut : {section.header_offset, section.payload_offset,
                         section.payload_offset + section.payload_bytes}) {
      write_file(path_, std::span(file).first(cut));
      expect_rejected("truncated");
    }
  }
  // Then at every length (every 61st byte inside guest RAM, which is
  // large), cutting one file shorter and shorter.
  write_file(path_, file);
  const SectionInfo& memory = sections.back();
  for (size_t length = file.size(); length-- > 0;) {
    bool inside_memory = length > memory.payload_offset &&
                         length < memory.payload_offset + memory.payload_bytes;
    if (inside_memory && length % 61 != 0) continue;
    fs::resize_file(path_, length);
    ASSERT_FALSE(SnapshotReader::open(path_)) << "accepted a file cut at " << length;
  }
}

TEST_F(SnapshotTest, AnyFlippedByteOutsideRamIsRejected) {
  write_sample();
  const SectionInfo memory = sample_sections().back();
  ASSERT_EQ(memory.type, SectionType::Memory);
  Result<Fd> file = Fd::open(path_, O_RDWR);
  ASSERT_TRUE(file);
  uint64_t file_bytes = *file->size_bytes();
  for (uint64_t offset = 0; offset < file_bytes; ++offset) {
    if (offset >= memory.payload_offset && offset < memory.payload_offset + memory.payload_bytes) {
      continue;
    }
    std::byte original{};
    ASSERT_TRUE(file->pread_all(std::span(&original, 1), offset));
    std::byte flipped = original ^ std::byte{0x40};
    ASSERT_TRUE(file->pwrite_all(std::span(&flipped, 1), offset));
    ASSERT_FALSE(SnapshotReader::open(path_)) << "accepted a flipped byte at offset " << offset;
    ASSERT_TRUE(file->pwrite_all(std::span(&original, 1), offset));
  }
  EXPECT_TRUE(SnapshotReader::open(path_));
}

TEST_F(SnapshotTest, FlippedRamByteIsFoundByVerify) {
  write_sample();
  std::vector<std::byte> file = read_file(path_);
  const SectionInfo memory = sample_sections().back();
  file[memory.payload_offset + 4097] ^= std::byte{1};
  write_file(path_, file);
  // Opening stays lazy; verify reads RAM through and names the section.
  Result<SnapshotReader> reader = SnapshotReader::open(path_);
  ASSERT_TRUE(reader) << reader.error().message();
  Result<void> verified = reader->verify(*reader->find(SectionType::Memory, "ram"));
  ASSERT_FALSE(verified);
  EXPECT_THAT(verified.error().message(), HasSubstr("memory section 'ram'"));
  EXPECT_THAT(verified.error().message(), HasSubstr("payload checksum mismatch"));
}

TEST_F(SnapshotTest, CorruptPayloadIsRejectedNamingTheSection) {
  write_sample();
  std::vector<std::byte> file = read_file(path_);
  const SectionInfo* vcpu1 = nullptr;
  std::vector<SectionInfo> sections = sample_sections();
  for (const SectionInfo& section : sections) {
    if (section.name == "vcpu1") vcpu1 = &section;
  }
  ASSERT_NE(vcpu1, nullptr);
  file[vcpu1->payload_offset + 100] ^= std::byte{0x80};
  write_file(path_, file);
  expect_rejected("vcpu section 'vcpu1' at offset");
  expect_rejected("payload checksum mismatch");
}

TEST_F(SnapshotTest, HugeLengthsAreRejected) {
  write_sample();
  std::vector<std::byte> file = read_file(path_);
  const SectionInfo config = sample_sections().front();
  ASSERT_EQ(config.type, SectionType::MachineConfig);
  for (uint64_t length : {uint64_t{1} << 63, ~uint64_t{0}, uint64_t{file.size()}}) {
    std::vector<std::byte> damaged = file;
    put(damaged, config.header_offset + kSectionLengthOffset, length);
    reseal_section(damaged, config.header_offset);
    write_file(path_, damaged);
    expect_rejected("machine-config section 'config' at offset 80: truncated");
  }
  // Longer than a section read whole may be, even where the file is that long.
  std::vector<std::byte> damaged = file;
  put(damaged, config.header_offset + kSectionLengthOffset, kMaxEagerPayloadBytes + 1);
  reseal_section(damaged, config.header_offset);
  write_file(path_, damaged);
  fs::resize_file(path_, kMaxEagerPayloadBytes * 2);
  expect_rejected("is over the");
}

TEST_F(SnapshotTest, DuplicateSectionIsRejected) {
  write_sample();
  std::vector<std::byte> file = read_file(path_);
  std::vector<SectionInfo> sections = sample_sections();
  // Splice a second copy of vcpu0 after it and fix up the end section.
  const SectionInfo& vcpu0 = sections[1];
  ASSERT_EQ(vcpu0.name, "vcpu0");
  uint64_t end = vcpu0.payload_offset + vcpu0.payload_bytes;
  std::vector<std::byte> copy(file.begin() + static_cast<ptrdiff_t>(vcpu0.header_offset),
                              file.begin() + static_cast<ptrdiff_t>(end));
  // Shifting everything after vcpu0 would break the memory section's page
  // alignment, so duplicate into a file without memory: the duplicate must
  // be reported before the missing-memory check.
  std::vector<std::byte> spliced(file.begin(), file.begin() + static_cast<ptrdiff_t>(end));
  spliced.insert(spliced.end(), copy.begin(), copy.end());
  write_file(path_, spliced);
  expect_rejected("duplicate vcpu section 'vcpu0'");
}

TEST_F(SnapshotTest, MissingRequiredSectionsAreNamed) {
  MachineState machine = sample_machine();
  machine.vcpus.clear();
  ASSERT_TRUE(write_snapshot(path_, machine, memory_, kMemoryBytes));
  expect_rejected("no vcpu section");

  Result<SnapshotWriter> writer = SnapshotWriter::create(path_, HostCpuSummary::of_this_host());
  ASSERT_TRUE(writer);
  ASSERT_TRUE(writer->add(SectionType::MachineConfig, "config", {}));
  ASSERT_TRUE(writer->add(SectionType::Vm, "vm", encode_vm_state({})));
  ASSERT_TRUE(writer->finish());
  expect_rejected("no memory section");
}

TEST_F(SnapshotTest, UnknownSectionsAreSkippedOnlyWhenOptional) {
  auto write_with = [&](uint16_t flags) {
    Result<SnapshotWriter> writer = SnapshotWriter::create(path_, HostCpuSummary::of_this_host());
    ASSERT_TRUE(writer);
    ASSERT_TRUE(writer->add(SectionType::MachineConfig, "config", {}));
    ASSERT_TRUE(writer->add(static_cast<SectionType>(77), "future", {}, flags));
    ASSERT_TRUE(writer->add(SectionType::Vcpu, "vcpu0", encode_vcpu_state(sample_vcpu(1))));
    ASSERT_TRUE(writer->add(SectionType::Vm, "vm", encode_vm_state({})));
    ASSERT_TRUE(writer->add_file_contents(SectionType::Memory, "ram", memory_, kMemoryBytes));
    ASSERT_TRUE(writer->finish());
  };
  write_with(0);
  expect_rejected("section type 77 'future' at offset");
  write_with(kSectionOptional);
  Result<Snapshot> snapshot = read_snapshot(path_);
  ASSERT_TRUE(snapshot) << snapshot.error().message();
  EXPECT_EQ(snapshot->machine.vcpus.size(), 1u);
}

TEST_F(SnapshotTest, TooManySectionsAreRejected) {
  Result<SnapshotWriter> writer = SnapshotWriter::create(path_, HostCpuSummary::of_this_host());
  ASSERT_TRUE(writer);
  for (size_t i = 0; i <= kMaxSections; ++i) {
    ASSERT_TRUE(writer->add(SectionType::Device, "d" + std::to_string(i), {}));
  }
  ASSERT_TRUE(writer->finish());
  expect_rejected("more than 16384 sections");
}

TEST_F(SnapshotTest, BytesAfterTheEndAreRejected) {
  write_sample();
  std::vector<std::byte> file = read_file(path_);
  file.push_back(std::byte{0});
  write_file(path_, file);
  expect_rejected("1 bytes after the end section");
}

TEST_F(SnapshotTest, VcpuGapsAreRejected) {
  Result<SnapshotWriter> writer = SnapshotWriter::create(path_, HostCpuSummary::of_this_host());
  ASSERT_TRUE(writer);
  ASSERT_TRUE(writer->add(SectionType::MachineConfig, "config", {}));
  ASSERT_TRUE(writer->add(SectionType::Vcpu, "vcpu1", encode_vcpu_state(sample_vcpu(1))));
  ASSERT_TRUE(writer->add(SectionType::Vm, "vm", encode_vm_state({})));
  ASSERT_TRUE(writer->add_file_contents(SectionType::Memory, "ram", memory_, kMemoryBytes));
  ASSERT_TRUE(writer->finish());
  Result<Snapshot> snapshot = read_snapshot(path_);
  ASSERT_FALSE(snapshot);
  EXPECT_THAT(snapshot.error().message(), HasSubstr("1 vcpu sections but no 'vcpu0'"));
}

TEST_F(SnapshotTest, DiskIdentitiesRoundTripAndChangedDisksAreRefusedByName) {
  std::string disk_path = dir_ + "/disk.img";
  write_file(disk_path, std::vector<std::byte>(4096));
  Result<DiskIdentity> disk = identify_disk(disk_path);
  ASSERT_TRUE(disk) << disk.error().message();
  EXPECT_EQ(disk->size_bytes, 4096u);
  MachineState machine = sample_machine();
  machine.disks = {*disk};
  ASSERT_TRUE(write_snapshot(path_, machine, memory_, kMemoryBytes));
  Result<Snapshot> snapshot = read_snapshot(path_);
  ASSERT_TRUE(snapshot) << snapshot.error().message();
  ASSERT_EQ(snapshot->machine.disks.size(), 1u);
  EXPECT_EQ(snapshot->machine.disks[0], *disk);
  EXPECT_TRUE(check_disks_unchanged(snapshot->machine.disks));

  auto refused = [&](std::string_view change) {
    Result<void> result = check_disks_unchanged(snapshot->machine.disks);
    ASSERT_FALSE(result) << "accepted a disk that " << change;
    EXPECT_THAT(result.error().message(), HasSubstr(disk_path));
    EXPECT_THAT(result.error().message(), HasSubstr(change));
  };
  fs::resize_file(disk_path, 8192);
  refused("changed size");
  fs::resize_file(disk_path, 4096);
  fs::last_write_time(disk_path, fs::last_write_time(disk_path) + std::chrono::seconds(5));
  refused("was modified");
  // Made while the original still exists, so it cannot reuse its inode.
  write_file(dir_ + "/other.img", std::vector<std::byte>(4096));
  fs::rename(dir_ + "/other.img", disk_path);
  refused("was replaced by another file");
  fs::remove(disk_path);
  refused("the snapshot's disk is gone");
}

TEST(DisksCodecTest, HostileDiskListsAreRejected) {
  DiskIdentity disk{.path = "/a.img", .size_bytes = 1, .device = 2, .inode = 3, .modified_ns = 4};
  std::vector<DiskIdentity> disks = {disk, disk};
  std::vector<std::byte> good = encode_disks(disks);
  Result<std::vector<DiskIdentity>> decoded = decode_disks(good, "disks");
  ASSERT_TRUE(decoded) << decoded.error().message();
  EXPECT_EQ(*decoded, disks);
  for (size_t length = 0; length < good.size(); ++length) {
    ASSERT_FALSE(decode_disks(std::span(good).first(length), "disks")) << length;
  }
  std::vector<std::byte> longer = good;
  longer.push_back(std::byte{0});
  EXPECT_FALSE(decode_disks(longer, "disks"));
  std::vector<std::byte> many = good;
  put<uint32_t>(many, 0, 100000);
  Result<std::vector<DiskIdentity>> too_many = decode_disks(many, "disks");
  ASSERT_FALSE(too_many);
  EXPECT_THAT(too_many.error().message(), HasSubstr("100000 disks"));
}

// ---- vCPU and VM payloads, below the checksums ----

struct Record {
  uint16_t tag;
  std::vector<std::byte> data;
};

std::vector<std::byte> records(const std::vector<Record>& list) {
  std::vector<std::byte> out;
  for (const Record& record : list) {
    auto append = [&out](const auto& value) {
      const auto* bytes = reinterpret_cast<const std::byte*>(&value);
      out.insert(out.end(), bytes, bytes + sizeof(value));
    };
    append(record.tag);
    append(uint16_t{0});
    append(static_cast<uint32_t>(record.data.size()));
    out.insert(out.end(), record.data.begin(), record.data.end());
  }
  return out;
}

TEST(KvmStateCodecTest, HostileVcpuPayloadsAreRejected) {
  std::vector<std::byte> good = encode_vcpu_state(sample_vcpu(1));
  struct Case {
    std::vector<std::byte> payload;
    std::string message;
  };
  std::vector<std::byte> regs(sizeof(kvm::Regs));
  std::vector<Case> cases = {
      {records({{99, {}}}), "vcpu0: unknown field 99"},
      {records({{3, regs}, {3, regs}}), "field 3 appears twice"},
      {records({{3, std::vector<std::byte>(10)}}), "no CPUID"},
      {records({{1, std::vector<std::byte>(41)}}), "CPUID is 41 bytes"},
      {records({{1, {}}, {2, std::vector<std::byte>(4)}, {3, std::vector<std::byte>(143)}}),
       "registers is 143 bytes, expected 144"},
      {records({{1, {}}, {2, std::vector<std::byte>(4)}}), "no registers"},
      {std::vector<std::byte>(good.begin(), good.end() - 1), "needs"},
      {std::vector<std::byte>(7), "record length"},
  };
  for (const Case& test : cases) {
    Result<kvm::VcpuState> decoded = decode_vcpu_state(test.payload, "vcpu0");
    ASSERT_FALSE(decoded) << test.message;
    EXPECT_EQ(decoded.error().code(), Errc::Corrupt);
    EXPECT_THAT(decoded.error().message(), HasSubstr(test.message));
  }
}

TEST(KvmStateCodecTest, VcpuNeedsExactlyOneOfXsaveAndFpu) {
  kvm::VcpuState both = sample_vcpu(1);
  both.fpu.emplace();
  Result<kvm::VcpuState> decoded = decode_vcpu_state(encode_vcpu_state(both), "vcpu0");
  ASSERT_FALSE(decoded);
  EXPECT_THAT(decoded.error().message(), HasSubstr("exactly one of XSAVE and FPU"));
  kvm::VcpuState short_xsave = sample_vcpu(1);
  short_xsave.xsave.resize(100);
  decoded = decode_vcpu_state(encode_vcpu_state(short_xsave), "vcpu0");
  ASSERT_FALSE(decoded);
  EXPECT_THAT(decoded.error().message(), HasSubstr("XSAVE area of 100 bytes"));
}

TEST(KvmStateCodecTest, VmChipsComeTogether) {
  kvm::VmState state = sample_machine().vm;
  state.ioapic.reset();
  Result<kvm::VmState> decoded = decode_vm_state(encode_vm_state(state), "vm");
  ASSERT_FALSE(decoded);
  EXPECT_THAT(decoded.error().message(), HasSubstr("come together"));
  Result<kvm::VmState> empty = decode_vm_state({}, "vm");
  ASSERT_TRUE(empty);
  EXPECT_FALSE(empty->pic_master || empty->pit || empty->clock);
}

TEST(DeviceStateCodecTest, SerialStateRoundTripsAndHostileOnesAreRejected) {
  devices::SerialState state{.ier = 1, .lcr = 3, .mcr = 8, .scr = 0x5a, .fcr = 0xc1, .dll = 1,
                             .dlm = 0, .msr = 0xb0, .thr_empty_pending = true,
                             .interrupt_asserted = false, .input = {'h', 'i'}};
  Result<devices::SerialState> decoded =
      decode_serial_state(encode_serial_state(state), "serial0");
  ASSERT_TRUE(decoded) << decoded.error().message();
  EXPECT_EQ(*decoded, state);

  std::vector<std::byte> registers(8);
  struct Case {
    std::vector<std::byte> payload;
    std::string message;
  };
  std::vector<Case> cases = {
      {records({{1, registers}, {2, {std::byte{4}}}, {3, {}}}), "unknown flags 0x4"},
      {records({{1, std::vector<std::byte>(7)}}), "registers is 7 bytes, expected 8"},
      {records({{1, registers}, {2, {std::byte{0}}}}), "no input"},
      {records({{1, registers}, {2, {std::byte{0}}}, {3, std::vector<std::byte>(65537)}}),
       "input is 65537 bytes"},
      {records({{4, {}}}), "unknown field 4"},
  };
  for (const Case& test : cases) {
    Result<devices::SerialState> bad = decode_serial_state(test.payload, "serial0");
    ASSERT_FALSE(bad) << test.message;
    EXPECT_THAT(bad.error().message(), HasSubstr(test.message));
  }
}

TEST(DeviceStateCodecTest, RtcStateRoundTripsAndHostileOnesAreRejected) {
  devices::RtcState state;
  state.index = 0x0b;
  for (size_t i = 0; i < state.cmos.size(); ++i) state.cmos[i] = static_cast<uint8_t>(i * 3);
  Result<devices::RtcState> decoded = decode_rtc_state(encode_rtc_state(state), "rtc");
  ASSERT_TRUE(decoded) << decoded.error().message();
  EXPECT_EQ(*decoded, state);
  Result<devices::RtcState> short_cmos =
      decode_rtc_state(records({{1, {std::byte{0}}}, {2, std::vector<std::byte>(127)}}), "rtc");
  ASSERT_FALSE(short_cmos);
  EXPECT_THAT(short_cmos.error().message(), HasSubstr("CMOS RAM is 127 bytes, expected 128"));
  EXPECT_FALSE(decode_rtc_state(records({{2, std::vector<std::byte>(128)}}), "rtc"));
}

devices::virtio::VirtioPciState sample_virtio_pci(bool active) {
  devices::virtio::VirtioPciState state;
  state.device_type = 2;
  for (size_t i = 0; i < state.config.size(); ++i) state.config[i] = static_cast<uint8_t>(i * 5);
  state.status = active ? 0x0f : 0x03;
  state.isr = 2;
  state.config_generation = 3;
  state.config_vector = 0;
  state.queue_select = 1;
  state.device_feature_select = 1;
  state.driver_feature_select = 0;
  state.driver_features = (1ull << 32) | (1ull << 29) | 0x2;
  state.queues = {{.size = 256, .msix_vector = 1, .enabled = true, .desc = 0x10000,
                   .driver = 0x11000, .device = 0x12000},
                  {.size = 8, .msix_vector = 0xffff, .enabled = false, .desc = 0, .driver = 0,
                   .device = 0}};
  state.msix = {{.address = 0xfee00000, .data = 0x41, .control = 0, .pending = false},
                {.address = 0xfee01000, .data = 0x42, .control = 1, .pending = true},
                {}};
  if (active) {
    devices::virtio::VirtqueueState queue;
    queue.last_avail_idx = 65535;
    queue.used_idx = 65530;
    queue.signalled_used = 65529;
    queue.signalled_used_valid = true;
    state.device = devices::virtio::VirtioDeviceState{.queues = {queue, std::nullopt},
                                                      .extra = {std::byte{'h'}, std::byte{'i'}}};
  }
  return state;
}

TEST(DeviceStateCodecTest, VirtioPciStateRoundTrips) {
  for (bool active : {false, true}) {
    devices::virtio::VirtioPciState state = sample_virtio_pci(active);
    Result<devices::virtio::VirtioPciState> decoded =
        decode_virtio_pci_state(encode_virtio_pci_state(state), "pci-0000:00:01.0");
    ASSERT_TRUE(decoded) << decoded.error().message();
    EXPECT_EQ(*decoded, state) << "active " << active;
  }
  // An active device without device bytes has no such field, and reads
  // back with none.
  devices::virtio::VirtioPciState quiet = sample_virtio_pci(true);
  quiet.device->extra.clear();
  EXPECT_EQ(*decode_virtio_pci_state(encode_virtio_pci_state(quiet), "x"), quiet);
}

TEST(DeviceStateCodecTest, HostileVirtioPciStatesAreRejected) {
  const std::vector<std::byte> good = encode_virtio_pci_state(sample_virtio_pci(true));
  // Truncated anywhere: refused, never a crash.
  for (size_t length = 0; length < good.size(); ++length) {
    Result<devices::virtio::VirtioPciState> cut =
        decode_virtio_pci_state(std::span(good).first(length), "pci-0000:00:01.0");
    if (length == 0) {
      ASSERT_FALSE(cut);  // no device type
      continue;
    }
    // Cutting whole trailing records leaves a shorter valid payload only
    // when just the optional device bytes went.
    if (cut) {
      EXPECT_FALSE(cut->device && !cut->device->extra.empty()) << "length " << length;
    }
  }
  auto field = [](uint16_t tag, const auto& value) {
    return Record{
        tag, std::vector<std::byte>(reinterpret_cast<const std::byte*>(&value),
                                    reinterpret_cast<const std::byte*>(&value) + sizeof(value))};
  };
  const uint16_t type = 2;
  const std::vector<std::byte> config(256);
  std::array<uint8_t, 24> registers{};
  std::array<uint8_t, 32> queue{};
  std::array<uint8_t, 24> msix{};
  std::array<uint8_t, 8> position{};
  auto base = [&] {
    return std::vector<Record>{
        field(1, type), {2, config}, field(3, registers), field(4, queue), field(5, msix)};
  };
  struct Case {
    std::vector<Record> fields;
    std::string message;
  };
  std::vector<Case> cases;
  cases.push_back({{field(1, type)}, "no PCI configuration space"});
  auto with = [&](auto change, std::string message) {
    auto fields = base();
    change(fields);
    cases.push_back({std::move(fields), std::move(message)});
  };
  with([&](auto& f) { f[1].data.pop_back(); }, "PCI configuration space is 255 bytes");
  with([&](auto& f) { f[2].data[23] = std::byte{1}; }, "registers: reserved byte set");
  with([&](auto& f) { f[3].data[28] = std::byte{2}; }, "queue 0: enabled 2");
  with([&](auto& f) { f[3].data[31] = std::byte{1}; }, "queue 0: enabled 0 or reserved");
  with([&](auto& f) { f[3].data.pop_back(); }, "queues is 31 bytes");
  with([&](auto& f) { f[4].data[12] = std::byte{2}; }, "MSI-X entry 0: control 0x2");
  with([&](auto& f) { f[4].data[16] = std::byte{3}; }, "MSI-X entry 0: control 0x0, pending 3");
  with([&](auto& f) { f.push_back({6, {}}); }, "0 queue positions for 1 queues");
  with([&](auto& f) { f.push_back({7, {std::byte{1}}}); }, "device bytes without queue positions");
  with([&](auto& f) {
    auto p = position;
    p[6] = 4;
    f.push_back(field(6, p));
  }, "queue 0 position: flags 0x4");
  with([&](auto& f) {
    auto p = position;
    p[0] = 1;  // a position, but the queue is not live
    f.push_back(field(6, p));
  }, "queue 0: a position for a queue that is not live");
  with([&](auto& f) { f.push_back({8, {}}); }, "unknown field 8");
  with([&](auto& f) { f.push_back(field(1, type)); }, "field 1 appears twice");
  with([&](auto& f) { f[3].data = std::vector<std::byte>(32 * 1025); }, "not up to 1024");
  for (const Case& test : cases) {
    Result<devices::virtio::VirtioPciState> bad =
        decode_virtio_pci_state(records(test.fields), "pci-0000:00:01.0");
    ASSERT_FALSE(bad) << test.message;
    EXPECT_EQ(bad.error().code(), Errc::Corrupt) << test.message;
    EXPECT_THAT(bad.error().message(), HasSubstr(test.message));
    EXPECT_THAT(bad.error().message(), HasSubstr("pci-0000:00:01.0"));
  }
  EXPECT_TRUE(decode_virtio_pci_state(records(base()), "pci-0000:00:01.0"));
}

TEST(DeviceStateCodecTest, PciSectionNamesRoundTripAndOthersAreNotOnes) {
  EXPECT_EQ(pci_section_name({0, 3, 0}), "pci-0000:00:03.0");
  for (uint8_t slot : {uint8_t{0}, uint8_t{1}, uint8_t{0x1f}}) {
    auto parsed = parse_pci_section_name(pci_section_name({0, slot, 0}));
    ASSERT_TRUE(parsed);
    EXPECT_EQ(parsed->device, slot);
  }
  for (std::string_view name : {"serial0", "rtc", "pci-0000:00:20.0", "pci-0000:00:03.8",
                                "pci-0000:00:0G.0", "pci-0000:00:03.0x", "pci-0000:00:03",
                                "PCI-0000:00:03.0", "pci-0000:00:+3.0", "pci-0000:0-:03.0"}) {
    EXPECT_FALSE(parse_pci_section_name(name)) << name;
  }
}

// ---- CPU compatibility ----

kvm::CpuidEntry leaf(uint32_t function, uint32_t index, uint32_t ebx, uint32_t ecx) {
  kvm::CpuidEntry entry{};
  entry.function = function;
  entry.index = index;
  entry.flags = function == 7 ? kvm::kCpuidFlagSignificantIndex : 0;
  entry.ebx = ebx;
  entry.ecx = ecx;
  return entry;
}

TEST(CpuCompatibilityTest, MissingFeatureIsNamed) {
  HostCpuSummary source;
  std::memcpy(source.vendor.data(), "GenuineIntel", 12);
  source.signature = 0x50657;
  kvm::CpuidEntries host = {leaf(1, 0, 0, 0x1), leaf(7, 0, 0x1, 0)};
  kvm::CpuidEntries guest = {leaf(1, 0, 0, 0x1), leaf(7, 0, 0x21, 0)};
  Result<void> result = check_cpu_compatible(guest, host, source);
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code(), Errc::Unsupported);
  EXPECT_THAT(result.error().message(), HasSubstr("CPUID.0x7.0:EBX bit 5"));
  EXPECT_THAT(result.error().message(),
              HasSubstr("GenuineIntel family 6 model 85 stepping 7"));
  EXPECT_TRUE(check_cpu_compatible(host, host, source));
}

TEST(CpuCompatibilityTest, BitsKvmDerivesAtRunTimeAreIgnored) {
  kvm::CpuidEntries host = {leaf(1, 0, 0, 0x1)};
  kvm::CpuidEntries guest = {leaf(1, 0, 0, 0x1 | (1u << 27) | (1u << 24))};
  EXPECT_TRUE(check_cpu_compatible(guest, host, HostCpuSummary{}));
}

TEST(CpuCompatibilityTest, BitsTheVmmSetsItselfAreIgnored) {
  // The hypervisor bit (1.ECX 31) and HTT (1.EDX 28) come from Keel's
  // build_cpuid, never from KVM_GET_SUPPORTED_CPUID.
  kvm::CpuidEntries host = {leaf(1, 0, 0, 0x1)};
  kvm::CpuidEntry guest_leaf = leaf(1, 0, 0, 0x1 | (1u << 31));
  guest_leaf.edx = 1u << 28;
  EXPECT_TRUE(check_cpu_compatible({guest_leaf}, host, HostCpuSummary{}));
  guest_leaf.ecx |= 1u << 30;  // RDRAND is a real feature: still compared
  EXPECT_FALSE(check_cpu_compatible({guest_leaf}, host, HostCpuSummary{}));
}

}  // namespace
}  // namespace keel::migration
