// The Linux loader against synthetic images built in memory: a bzImage with
// just the setup-header fields the 64-bit boot protocol reads, and a minimal
// PVH ELF64 (one PT_LOAD, one PT_NOTE). Checks what lands in guest memory
// (zero page, hvm_start_info, page tables, GDT, payload, initrd) and that
// every malformed image is an error naming what is wrong.
#include "boot/linux_loader.h"
#include "boot/pvh_abi.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <fmt/format.h>
#include <gtest/gtest.h>

#include "machine/layout.h"

namespace keel::boot {
namespace {

using memory::GuestAddr;
using memory::GuestMemory;
using ::testing::HasSubstr;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kGiB = 1ull << 30;
constexpr uint64_t kPageBytes = 4096;

// Boot protocol offsets (Documentation/arch/x86/boot.rst), written out here
// independently of the loader's own constants.
constexpr size_t kSetupSects = 0x1f1;
constexpr size_t kBootFlag = 0x1fe;
constexpr size_t kJump = 0x200;
constexpr size_t kHeaderMagic = 0x202;
constexpr size_t kVersion = 0x206;
constexpr size_t kTypeOfLoader = 0x210;
constexpr size_t kLoadflags = 0x211;
constexpr size_t kRamdiskImage = 0x218;
constexpr size_t kRamdiskSize = 0x21c;
constexpr size_t kHeapEndPtr = 0x224;
constexpr size_t kCmdLinePtr = 0x228;
constexpr size_t kInitrdAddrMax = 0x22c;
constexpr size_t kXloadflags = 0x236;
constexpr size_t kCmdlineSize = 0x238;
constexpr size_t kInitSize = 0x260;
constexpr size_t kAcpiRsdpAddr = 0x070;
constexpr size_t kE820Entries = 0x1e8;
constexpr size_t kE820Table = 0x2d0;

constexpr uint8_t kLoadedHigh = 0x01;
constexpr uint8_t kCanUseHeap = 0x80;
constexpr uint16_t kXlfKernel64 = 0x01;

constexpr uint64_t kPml4 = 0x9000;
constexpr uint64_t kPdpt = 0xa000;
constexpr uint64_t kPageDirectories = 0xb000;

template <typename T>
void put(std::vector<std::byte>& bytes, size_t offset, T value) {
  std::memcpy(bytes.data() + offset, &value, sizeof(T));
}

template <typename T>
T get(std::span<const std::byte> bytes, size_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

std::vector<std::byte> bytes_of(std::string_view text) {
  std::vector<std::byte> bytes(text.size());
  std::memcpy(bytes.data(), text.data(), text.size());
  return bytes;
}

// A recognisable, non-repeating-per-page pattern.
std::vector<std::byte> pattern(size_t size, uint8_t seed) {
  std::vector<std::byte> bytes(size);
  for (size_t i = 0; i < size; ++i) {
    bytes[i] = std::byte(static_cast<uint8_t>((i * 7 + seed + (i >> 12)) & 0xff));
  }
  return bytes;
}

GuestMemory make_memory(uint64_t size_bytes) {
  Result<GuestMemory> memory =
      GuestMemory::create(size_bytes, layout::kPciHoleStart, layout::kPciHoleEnd);
  CHECK(memory.has_value(), "test guest memory");
  return std::move(memory).value();
}

std::vector<std::byte> read_guest(const GuestMemory& memory, uint64_t address, size_t size) {
  std::vector<std::byte> bytes(size);
  Result<void> result = memory.read(GuestAddr(address), bytes);
  EXPECT_TRUE(result) << result.error().message();
  return bytes;
}

template <typename T>
T read_guest_obj(const GuestMemory& memory, uint64_t address) {
  Result<T> value = memory.read_obj<T>(GuestAddr(address));
  EXPECT_TRUE(value) << value.error().message();
  return value.value_or(T{});
}

// ---- bzImage ----

struct BzImageSpec {
  uint8_t setup_sects = 4;
  uint16_t version = 0x20f;
  uint8_t loadflags = kLoadedHigh;
  uint16_t xloadflags = kXlfKernel64;
  uint32_t cmdline_size = 2047;
  uint32_t initrd_addr_max = 0x7fffffff;
  uint32_t init_size = 4 * kMiB;
  size_t payload_bytes = 0x3000;
};

size_t setup_bytes_of(const BzImageSpec& spec) {
  return (size_t{spec.setup_sects == 0 ? uint8_t{4} : spec.setup_sects} + 1) * 512;
}

std::vector<std::byte> make_bzimage(const BzImageSpec& spec = {}) {
  std::vector<std::byte> image = pattern(setup_bytes_of(spec), 0x11);
  std::memset(image.data() + kSetupSects, 0, 0x268 - kSetupSects);  // a clean header
  put<uint8_t>(image, kSetupSects, spec.setup_sects);
  put<uint16_t>(image, kBootFlag, 0xaa55);
  put<uint8_t>(image, kJump, 0xeb);
  put<uint8_t>(image, kJump + 1, 0x66);  // the header ends at 0x202 + 0x66 = 0x268
  std::memcpy(image.data() + kHeaderMagic, "HdrS", 4);
  put<uint16_t>(image, kVersion, spec.version);
  put<uint8_t>(image, kLoadflags, spec.loadflags);
  put<uint32_t>(image, kInitrdAddrMax, spec.initrd_addr_max);
  put<uint16_t>(image, kXloadflags, spec.xloadflags);
  put<uint32_t>(image, kCmdlineSize, spec.cmdline_size);
  put<uint32_t>(image, kInitSize, spec.init_size);
  std::vector<std::byte> payload = pattern(spec.payload_bytes, 0x5a);
  image.insert(image.end(), payload.begin(), payload.end());
  return image;
}

std::span<const std::byte> payload_of(const std::vector<std::byte>& image, const BzImageSpec& spec) {
  return std::span(image).subspan(setup_bytes_of(spec));
}

LinuxImages images_of(std::span<const std::byte> kernel, std::span<const std::byte> initrd = {},
                      std::string cmdline = "console=ttyS0 panic=-1", uint64_t rsdp = 0) {
  return LinuxImages{kernel, initrd, std::move(cmdline), rsdp};
}

TEST(BzImageLoaderTest, ReturnsThe64BitEntryAndZeroPage) {
  GuestMemory memory = make_memory(256 * kMiB);
  std::vector<std::byte> kernel = make_bzimage();
  Result<EntryPoint> entry = load_linux(memory, images_of(kernel));
  ASSERT_TRUE(entry) << entry.error().message();
  EXPECT_EQ(entry->format, KernelFormat::BzImage);
  EXPECT_EQ(entry->rip, 0x100200u);
  EXPECT_EQ(entry->boot_info_address, 0x7000u);
  EXPECT_EQ(entry->boot_info_address, layout::kBootParamsStart);
}

// cmdline_size comes from the image: its maximum must not wrap the limit to
// zero (which refused every command line); Keel's own limit applies instead.
TEST(BzImageLoaderTest, HugeCmdlineSizeIsCappedNotWrapped) {
  GuestMemory memory = make_memory(256 * kMiB);
  BzImageSpec spec;
  spec.cmdline_size = 0xffffffff;
  std::vector<std::byte> kernel = make_bzimage(spec);
  Result<EntryPoint> entry = load_linux(memory, images_of(kernel, {}, "console=ttyS0"));
  ASSERT_TRUE(entry) << entry.error().message();
  std::string too_long(layout::kCmdlineMaxBytes, 'x');
  Result<EntryPoint> refused = load_linux(memory, images_of(kernel, {}, too_long));
  ASSERT_FALSE(refused);
  EXPECT_THAT(refused.error().message(),
              HasSubstr(fmt::format("at most {}", layout::kCmdlineMaxBytes - 1)));
}

TEST(BzImageLoaderTest, CopiesThePayloadTo1MiB) {
  GuestMemory memory = make_memory(256 * kMiB);
  BzImageSpec spec;
  std::vector<std::byte> kernel = make_bzimage(spec);
  ASSERT_TRUE(load_linux(memory, images_of(kernel)));
  std::span<const std::byte> payload = payload_of(kernel, spec);
  std::vector<std::byte> loaded = read_guest(memory, 0x100000, payload.size());
  EXPECT_TRUE(std::equal(loaded.begin(), loaded.end(), payload.begin(), payload.end()));
}

TEST(BzImageLoaderTest, SetupSectsZeroMeansFour) {
  GuestMemory memory = make_memory(64 * kMiB);
  BzImageSpec spec;
  spec.setup_sects = 0;
  std::vector<std::byte> kernel = make_bzimage(spec);
  ASSERT_TRUE(load_linux(memory, images_of(kernel)));
  std::span<const std::byte> payload = payload_of(kernel, spec);
  EXPECT_EQ(payload.data() - kernel.data(), 5 * 512);
  std::vector<std::byte> loaded = read_guest(memory, 0x100000, payload.size());
  EXPECT_TRUE(std::equal(loaded.begin(), loaded.end(), payload.begin(), payload.end()));
}

TEST(BzImageLoaderTest, FillsTheZeroPageHeader) {
  GuestMemory memory = make_memory(256 * kMiB);
  std::vector<std::byte> kernel = make_bzimage();
  const std::string cmdline = "console=ttyS0 root=/dev/vda quiet";
  ASSERT_TRUE(load_linux(memory, images_of(kernel, {}, cmdline, 0xe0000)));
  std::vector<std::byte> zero_page = read_guest(memory, layout::kBootParamsStart, 4096);

  EXPECT_EQ(get<uint8_t>(zero_page, kTypeOfLoader), 0xff);
  EXPECT_EQ(get<uint16_t>(zero_page, kBootFlag), 0xaa55);
  EXPECT_EQ(std::memcmp(zero_page.data() + kHeaderMagic, "HdrS", 4), 0);
  EXPECT_EQ(get<uint16_t>(zero_page, kVersion), 0x20f);
  EXPECT_EQ(get<uint8_t>(zero_page, kLoadflags), kLoadedHigh | kCanUseHeap);
  EXPECT_EQ(get<uint16_t>(zero_page, kHeapEndPtr), 0xfe00);
  EXPECT_EQ(get<uint32_t>(zero_page, kCmdLinePtr), layout::kCmdlineStart);
  EXPECT_EQ(get<uint64_t>(zero_page, kAcpiRsdpAddr), 0xe0000u);
  EXPECT_EQ(get<uint32_t>(zero_page, kRamdiskImage), 0u) << "no initrd was given";
  EXPECT_EQ(get<uint32_t>(zero_page, kRamdiskSize), 0u);

  std::vector<std::byte> line = read_guest(memory, layout::kCmdlineStart, cmdline.size() + 1);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(line.data()), cmdline.size()), cmdline);
  EXPECT_EQ(line.back(), std::byte{0}) << "the command line is NUL-terminated";
}

TEST(BzImageLoaderTest, E820TableMatchesBuildE820) {
  GuestMemory memory = make_memory(256 * kMiB);
  std::vector<std::byte> kernel = make_bzimage();
  ASSERT_TRUE(load_linux(memory, images_of(kernel)));
  std::vector<std::byte> zero_page = read_guest(memory, layout::kBootParamsStart, 4096);
  std::vector<E820Entry> expected = build_e820(memory);
  ASSERT_EQ(get<uint8_t>(zero_page, kE820Entries), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    size_t offset = kE820Table + i * 20;
    EXPECT_EQ(get<uint64_t>(zero_page, offset), expected[i].address) << "entry " << i;
    EXPECT_EQ(get<uint64_t>(zero_page, offset + 8), expected[i].size_bytes) << "entry " << i;
    EXPECT_EQ(get<uint32_t>(zero_page, offset + 16), static_cast<uint32_t>(expected[i].type))
        << "entry " << i;
  }
}

TEST(BzImageLoaderTest, PlacesTheInitrdPageAlignedAboveTheKernel) {
  GuestMemory memory = make_memory(256 * kMiB);
  BzImageSpec spec;
  spec.init_size = 8 * kMiB;
  std::vector<std::byte> kernel = make_bzimage(spec);
  std::vector<std::byte> initrd = pattern(3 * kMiB + 123, 0x77);
  ASSERT_TRUE(load_linux(memory, images_of(kernel, initrd)));
  std::vector<std::byte> zero_page = read_guest(memory, layout::kBootParamsStart, 4096);
  uint64_t address = get<uint32_t>(zero_page, kRamdiskImage);
  EXPECT_EQ(get<uint32_t>(zero_page, kRamdiskSize), initrd.size());
  EXPECT_EQ(address % kPageBytes, 0u);
  EXPECT_GE(address, 0x100000u + spec.init_size) << "the initrd overlaps the kernel's init_size";
  EXPECT_LE(address + initrd.size(), 256 * kMiB) << "the initrd must be inside RAM";
  std::vector<std::byte> loaded = read_guest(memory, address, initrd.size());
  EXPECT_EQ(loaded, initrd);
}

TEST(BzImageLoaderTest, InitrdStaysBelowInitrdAddrMax) {
  GuestMemory memory = make_memory(512 * kMiB);
  BzImageSpec spec;
  spec.initrd_addr_max = 0x0fffffff;  // 256 MiB - 1
  std::vector<std::byte> kernel = make_bzimage(spec);
  std::vector<std::byte> initrd = pattern(kMiB, 0x33);
  ASSERT_TRUE(load_linux(memory, images_of(kernel, initrd)));
  uint64_t address = read_guest_obj<uint32_t>(memory, layout::kBootParamsStart + kRamdiskImage);
  EXPECT_LE(address + initrd.size() - 1, spec.initrd_addr_max);
  EXPECT_EQ(address % kPageBytes, 0u);
  EXPECT_EQ(read_guest(memory, address, initrd.size()), initrd);
}

TEST(BzImageLoaderTest, BuildsIdentityPageTablesFor4GiB) {
  GuestMemory memory = make_memory(64 * kMiB);
  std::vector<std::byte> kernel = make_bzimage();
  ASSERT_TRUE(load_linux(memory, images_of(kernel)));
  constexpr uint64_t kPresentWritable = 0x3;
  constexpr uint64_t kLargePage = 0x80;
  constexpr uint64_t kAddressMask = 0x000ffffffffff000;
  uint64_t pml4e = read_guest_obj<uint64_t>(memory, kPml4);
  EXPECT_EQ(pml4e & kPresentWritable, kPresentWritable);
  ASSERT_EQ(pml4e & kAddressMask, kPdpt);
  for (uint64_t gib = 0; gib < 4; ++gib) {
    uint64_t pdpte = read_guest_obj<uint64_t>(memory, kPdpt + gib * 8);
    EXPECT_EQ(pdpte & kPresentWritable, kPresentWritable) << "PDPT entry " << gib;
    EXPECT_EQ(pdpte & kLargePage, 0u) << "PDPT entry " << gib << " must point at a directory";
    uint64_t directory = pdpte & kAddressMask;
    EXPECT_EQ(directory, kPageDirectories + gib * 0x1000);
    std::vector<std::byte> entries = read_guest(memory, directory, 4096);
    for (uint64_t i = 0; i < 512; ++i) {
      uint64_t pde = get<uint64_t>(entries, i * 8);
      uint64_t expected_address = (gib << 30) | (i << 21);
      ASSERT_EQ(pde, expected_address | kPresentWritable | kLargePage)
          << "PD entry " << i << " of GiB " << gib;
    }
  }
  // Nothing maps above 4 GiB.
  EXPECT_EQ(read_guest_obj<uint64_t>(memory, kPdpt + 4 * 8), 0u);
  EXPECT_EQ(read_guest_obj<uint64_t>(memory, kPml4 + 8), 0u);
}

TEST(BzImageLoaderTest, WritesTheBootGdt) {
  GuestMemory memory = make_memory(64 * kMiB);
  std::vector<std::byte> kernel = make_bzimage();
  ASSERT_TRUE(load_linux(memory, images_of(kernel)));
  // boot.rst: __BOOT_CS (0x10) a 64-bit code segment, __BOOT_DS (0x18) data.
  uint64_t code = read_guest_obj<uint64_t>(memory, layout::kGdtStart + 0x10);
  uint64_t data = read_guest_obj<uint64_t>(memory, layout::kGdtStart + 0x18);
  EXPECT_EQ(code, 0x00af9b000000ffffu);
  EXPECT_EQ(data, 0x00cf93000000ffffu);
  EXPECT_NE(code & (1ull << 47), 0u) << "present";
  EXPECT_NE(code & (1ull << 53), 0u) << "L: 64-bit code";
  EXPECT_EQ(code & (1ull << 54), 0u) << "D must be clear when L is set";
  EXPECT_NE(data & (1ull << 41), 0u) << "writable data";
  EXPECT_EQ(read_guest_obj<uint64_t>(memory, layout::kGdtStart), 0u) << "null descriptor";
}

TEST(BzImageLoaderTest, CmdlineUpToCmdlineSizeFitsOneMoreDoesNot) {
  BzImageSpec spec;
  spec.cmdline_size = 16;
  std::vector<std::byte> kernel = make_bzimage(spec);
  {
    GuestMemory memory = make_memory(64 * kMiB);
    Result<EntryPoint> entry = load_linux(memory, images_of(kernel, {}, std::string(16, 'a')));
    EXPECT_TRUE(entry) << entry.error().message();
  }
  GuestMemory memory = make_memory(64 * kMiB);
  Result<EntryPoint> entry = load_linux(memory, images_of(kernel, {}, std::string(17, 'a')));
  ASSERT_FALSE(entry);
  EXPECT_EQ(entry.error().code(), Errc::InvalidArgument);
  EXPECT_THAT(entry.error().message(), HasSubstr("command line is 17 bytes"));
  EXPECT_THAT(entry.error().message(), HasSubstr("at most 16"));
}

struct BzImageRejection {
  const char* name;
  std::vector<std::byte> kernel;
  Errc code;
  const char* message;
};

// Names the case in test listings instead of dumping its bytes.
void PrintTo(const BzImageRejection& value, std::ostream* stream) { *stream << value.name; }

std::vector<BzImageRejection> bzimage_rejections() {
  std::vector<BzImageRejection> cases;
  cases.push_back({"empty", {}, Errc::Unsupported, "neither a bzImage"});
  {
    std::vector<std::byte> kernel = make_bzimage();
    std::memcpy(kernel.data() + kHeaderMagic, "HdrX", 4);
    cases.push_back({"wrong_header_magic", kernel, Errc::Unsupported, "no 'HdrS'"});
  }
  {
    std::vector<std::byte> kernel = make_bzimage();
    put<uint16_t>(kernel, kBootFlag, 0x55aa);
    cases.push_back({"wrong_boot_flag", kernel, Errc::Corrupt, "0xAA55"});
  }
  {
    std::vector<std::byte> kernel = make_bzimage();
    kernel.resize(0x800);
    cases.push_back({"truncated_setup", kernel, Errc::Corrupt, "too short"});
  }
  {
    // syssize (paragraphs of payload) promises more than the file holds.
    std::vector<std::byte> kernel = make_bzimage();
    put<uint32_t>(kernel, 0x1f4, static_cast<uint32_t>(kernel.size()));
    cases.push_back({"truncated_payload", kernel, Errc::Corrupt, "truncated"});
  }
  {
    BzImageSpec spec;
    spec.version = 0x205;
    cases.push_back({"protocol_2_05", make_bzimage(spec), Errc::Unsupported, "2.05 is older than 2.06"});
  }
  {
    BzImageSpec spec;
    spec.xloadflags = 0x2;  // XLF_CAN_BE_LOADED_ABOVE_4G alone
    cases.push_back({"no_kernel_64", make_bzimage(spec), Errc::Unsupported, "XLF_KERNEL_64"});
  }
  {
    BzImageSpec spec;
    spec.loadflags = 0;
    cases.push_back({"zimage", make_bzimage(spec), Errc::Unsupported, "zImage"});
  }
  {
    // setup_sects says 64 sectors, but the file ends after 8 KiB.
    std::vector<std::byte> kernel = make_bzimage();
    put<uint8_t>(kernel, kSetupSects, 64);
    cases.push_back({"setup_sects_past_eof", kernel, Errc::Corrupt, "fills the whole"});
  }
  {
    BzImageSpec spec;
    spec.init_size = 0xffffffff;
    cases.push_back({"init_size_beyond_ram", make_bzimage(spec), Errc::OutOfRange,
                     "kernel needs guest memory up to"});
  }
  return cases;
}

class BzImageRejectionTest : public ::testing::TestWithParam<BzImageRejection> {};

TEST_P(BzImageRejectionTest, IsAnErrorNamingTheProblem) {
  GuestMemory memory = make_memory(64 * kMiB);
  Result<EntryPoint> entry = load_linux(memory, images_of(GetParam().kernel));
  ASSERT_FALSE(entry);
  EXPECT_EQ(entry.error().code(), GetParam().code) << entry.error().message();
  EXPECT_THAT(entry.error().message(), HasSubstr(GetParam().message));
}

INSTANTIATE_TEST_SUITE_P(Images, BzImageRejectionTest, ::testing::ValuesIn(bzimage_rejections()),
                         [](const auto& test_info) { return std::string(test_info.param.name); });

TEST(BzImageLoaderTest, KernelLargerThanRamIsAnError) {
  GuestMemory memory = make_memory(16 * kMiB);
  BzImageSpec spec;
  spec.init_size = 32 * kMiB;
  std::vector<std::byte> kernel = make_bzimage(spec);
  Result<EntryPoint> entry = load_linux(memory, images_of(kernel));
  ASSERT_FALSE(entry);
  EXPECT_EQ(entry.error().code(), Errc::OutOfRange);
  EXPECT_THAT(entry.error().message(), HasSubstr("give the guest more"));
}

TEST(BzImageLoaderTest, InitrdThatDoesNotFitIsAnError) {
  GuestMemory memory = make_memory(16 * kMiB);
  BzImageSpec spec;
  spec.init_size = 4 * kMiB;
  std::vector<std::byte> kernel = make_bzimage(spec);
  std::vector<std::byte> initrd(12 * kMiB, std::byte{1});  // 16 MiB - (1 + 4) MiB < 12 MiB
  Result<EntryPoint> entry = load_linux(memory, images_of(kernel, initrd));
  ASSERT_FALSE(entry);
  EXPECT_EQ(entry.error().code(), Errc::OutOfRange);
  EXPECT_THAT(entry.error().message(), HasSubstr("initrd of 12582912 bytes does not fit"));
}

TEST(BzImageLoaderTest, InitrdLargerThanInitrdAddrMaxIsAnError) {
  GuestMemory memory = make_memory(256 * kMiB);
  BzImageSpec spec;
  spec.initrd_addr_max = 0x7fffff;  // 8 MiB - 1
  std::vector<std::byte> kernel = make_bzimage(spec);
  // The kernel ends at 5 MiB (1 MiB + init_size): 4 MiB cannot fit below 8 MiB.
  std::vector<std::byte> initrd(4 * kMiB, std::byte{1});
  Result<EntryPoint> entry = load_linux(memory, images_of(kernel, initrd));
  ASSERT_FALSE(entry);
  EXPECT_THAT(entry.error().message(), HasSubstr("does not fit"));
}

// ---- PVH ELF ----

constexpr uint32_t kPtLoad = 1;
constexpr uint32_t kPtNote = 4;
constexpr uint32_t kXenPhys32Entry = 18;
constexpr size_t kElfHeaderBytes = 64;
constexpr size_t kProgramHeaderBytes = 56;
constexpr size_t kNoteOffset = 0x100;
constexpr size_t kSegmentOffset = 0x200;

struct Note {
  std::string name;  // without the NUL; namesz counts it
  uint32_t type;
  std::vector<std::byte> desc;
  // Overrides for hostile notes.
  std::optional<uint32_t> namesz;
  std::optional<uint32_t> descsz;
};

Note pvh_note(uint64_t entry, size_t desc_bytes = 4) {
  std::vector<std::byte> desc(desc_bytes);
  std::memcpy(desc.data(), &entry, std::min<size_t>(desc_bytes, 8));
  return Note{"Xen", kXenPhys32Entry, desc, std::nullopt, std::nullopt};
}

std::vector<std::byte> encode_notes(const std::vector<Note>& notes) {
  std::vector<std::byte> out;
  auto pad = [&out] { out.resize((out.size() + 3) & ~size_t{3}); };
  for (const Note& note : notes) {
    size_t at = out.size();
    out.resize(at + 12);
    put<uint32_t>(out, at, note.namesz.value_or(static_cast<uint32_t>(note.name.size() + 1)));
    put<uint32_t>(out, at + 4, note.descsz.value_or(static_cast<uint32_t>(note.desc.size())));
    put<uint32_t>(out, at + 8, note.type);
    for (char c : note.name) out.push_back(std::byte(c));
    out.push_back(std::byte{0});
    pad();
    out.insert(out.end(), note.desc.begin(), note.desc.end());
    pad();
  }
  return out;
}

struct ElfSpec {
  uint8_t elf_class = 2;  // ELFCLASS64
  uint8_t data = 1;       // ELFDATA2LSB
  uint16_t machine = 62;  // EM_X86_64
  uint16_t phentsize = kProgramHeaderBytes;
  std::optional<uint16_t> phnum;
  std::optional<uint64_t> phoff;
  uint64_t paddr = 0x200000;
  uint64_t filesz = 0x1800;
  uint64_t memsz = 0x4000;
  std::optional<uint64_t> load_offset;
  std::vector<Note> notes = {pvh_note(0x200010)};
  bool with_note_segment = true;
  bool with_load_segment = true;
};

std::vector<std::byte> make_elf(const ElfSpec& spec = {}) {
  std::vector<std::byte> notes = encode_notes(spec.notes);
  size_t note_end = kNoteOffset + notes.size();
  size_t segment_offset = std::max(kSegmentOffset, (note_end + 15) & ~size_t{15});
  std::vector<std::byte> image(segment_offset);
  image[0] = std::byte{0x7f};
  image[1] = std::byte{'E'};
  image[2] = std::byte{'L'};
  image[3] = std::byte{'F'};
  image[4] = std::byte{spec.elf_class};
  image[5] = std::byte{spec.data};
  image[6] = std::byte{1};  // EV_CURRENT
  put<uint16_t>(image, 16, 2);  // ET_EXEC
  put<uint16_t>(image, 18, spec.machine);
  put<uint32_t>(image, 20, 1);
  put<uint64_t>(image, 24, spec.paddr);  // e_entry: not what PVH uses
  uint16_t phnum = static_cast<uint16_t>((spec.with_load_segment ? 1 : 0) +
                                         (spec.with_note_segment ? 1 : 0));
  put<uint64_t>(image, 32, spec.phoff.value_or(kElfHeaderBytes));
  put<uint16_t>(image, 52, kElfHeaderBytes);
  put<uint16_t>(image, 54, spec.phentsize);
  put<uint16_t>(image, 56, spec.phnum.value_or(phnum));

  size_t header_at = kElfHeaderBytes;
  if (spec.with_load_segment) {
    put<uint32_t>(image, header_at, kPtLoad);
    put<uint32_t>(image, header_at + 4, 5);  // R+X
    put<uint64_t>(image, header_at + 8, spec.load_offset.value_or(segment_offset));
    put<uint64_t>(image, header_at + 16, spec.paddr);
    put<uint64_t>(image, header_at + 24, spec.paddr);
    put<uint64_t>(image, header_at + 32, spec.filesz);
    put<uint64_t>(image, header_at + 40, spec.memsz);
    put<uint64_t>(image, header_at + 48, 0x1000);
    header_at += kProgramHeaderBytes;
  }
  if (spec.with_note_segment) {
    put<uint32_t>(image, header_at, kPtNote);
    put<uint32_t>(image, header_at + 4, 4);
    put<uint64_t>(image, header_at + 8, kNoteOffset);
    put<uint64_t>(image, header_at + 32, notes.size());
    put<uint64_t>(image, header_at + 40, notes.size());
    put<uint64_t>(image, header_at + 48, 4);
  }
  std::memcpy(image.data() + kNoteOffset, notes.data(), notes.size());
  std::vector<std::byte> segment = pattern(spec.filesz < (64 * kMiB) ? spec.filesz : 0, 0x42);
  image.insert(image.end(), segment.begin(), segment.end());
  return image;
}

using pvh::HvmMemmapEntry;
using pvh::HvmModlistEntry;
using pvh::HvmStartInfo;

TEST(PvhLoaderTest, ReturnsTheNoteEntryAndStartInfo) {
  GuestMemory memory = make_memory(64 * kMiB);
  std::vector<std::byte> kernel = make_elf();
  Result<EntryPoint> entry = load_linux(memory, images_of(kernel));
  ASSERT_TRUE(entry) << entry.error().message();
  EXPECT_EQ(entry->format, KernelFormat::PvhElf);
  EXPECT_EQ(entry->rip, 0x200010u) << "the PVH note's entry, not e_entry";
  EXPECT_EQ(entry->boot_info_address, layout::kBootParamsStart);
}

TEST(PvhLoaderTest, EightByteEntryNoteWorksToo) {
  GuestMemory memory = make_memory(64 * kMiB);
  ElfSpec spec;
  spec.notes = {pvh_note(0x200020, 8)};
  std::vector<std::byte> kernel = make_elf(spec);
  Result<EntryPoint> entry = load_linux(memory, images_of(kernel));
  ASSERT_TRUE(entry) << entry.error().message();
  EXPECT_EQ(entry->rip, 0x200020u);
}

TEST(PvhLoaderTest, SkipsOtherNotesBeforeTheEntryNote) {
  GuestMemory memory = make_memory(64 * kMiB);
  ElfSpec spec;
  spec.notes = {
      Note{"GNU", 3, pattern(20, 1), std::nullopt, std::nullopt},    // a build id
      Note{"Xen", 6, pattern(6, 2), std::nullopt, std::nullopt},     // XEN_ELFNOTE_LOADER, odd size
      Note{"Linux", 18, pattern(4, 3), std::nullopt, std::nullopt},  // type 18, wrong owner
      pvh_note(0x200040),
  };
  std::vector<std::byte> kernel = make_elf(spec);
  Result<EntryPoint> entry = load_linux(memory, images_of(kernel));
  ASSERT_TRUE(entry) << entry.error().message();
  EXPECT_EQ(entry->rip, 0x200040u);
}

TEST(PvhLoaderTest, CopiesSegmentsAndZeroesBss) {
  GuestMemory memory = make_memory(64 * kMiB);
  ElfSpec spec;
  // Dirty the memory first so that zeroing is observable.
  std::vector<std::byte> junk(spec.memsz + 0x1000, std::byte{0xcc});
  ASSERT_TRUE(memory.write(GuestAddr(spec.paddr), junk));
  std::vector<std::byte> kernel = make_elf(spec);
  ASSERT_TRUE(load_linux(memory, images_of(kernel)));
  std::vector<std::byte> loaded = read_guest(memory, spec.paddr, spec.filesz);
  std::span<const std::byte> file_part = std::span(kernel).last(spec.filesz);
  EXPECT_TRUE(std::equal(loaded.begin(), loaded.end(), file_part.begin(), file_part.end()));
  std::vector<std::byte> bss = read_guest(memory, spec.paddr + spec.filesz, spec.memsz - spec.filesz);
  EXPECT_TRUE(std::all_of(bss.begin(), bss.end(), [](std::byte b) { return b == std::byte{0}; }))
      << "bss must be zeroed";
  EXPECT_EQ(read_guest_obj<uint8_t>(memory, spec.paddr + spec.memsz), 0xcc)
      << "nothing past memsz is touched";
}

TEST(PvhLoaderTest, FillsHvmStartInfo) {
  GuestMemory memory = make_memory(128 * kMiB);
  ElfSpec spec;
  std::vector<std::byte> kernel = make_elf(spec);
  std::vector<std::byte> initrd = pattern(kMiB + 5, 0x99);
  const std::string cmdline = "console=ttyS0 pvh";
  ASSERT_TRUE(load_linux(memory, images_of(kernel, initrd, cmdline, 0xe0000)));

  auto info = read_guest_obj<HvmStartInfo>(memory, layout::kBootParamsStart);
  EXPECT_EQ(info.magic, 0x336ec578u);
  EXPECT_EQ(info.version, 1u);
  EXPECT_EQ(info.flags, 0u);
  EXPECT_EQ(info.rsdp_paddr, 0xe0000u);

  std::vector<std::byte> line = read_guest(memory, info.cmdline_paddr, cmdline.size() + 1);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(line.data()), cmdline.size()), cmdline);
  EXPECT_EQ(line.back(), std::byte{0});

  ASSERT_EQ(info.nr_modules, 1u);
  auto module = read_guest_obj<HvmModlistEntry>(memory, info.modlist_paddr);
  EXPECT_EQ(module.size, initrd.size());
  EXPECT_EQ(module.paddr % kPageBytes, 0u);
  EXPECT_GE(module.paddr, spec.paddr + spec.memsz) << "the initrd overlaps the kernel";
  EXPECT_LE(module.paddr + module.size, 128 * kMiB);
  EXPECT_EQ(module.cmdline_paddr, 0u);
  EXPECT_EQ(read_guest(memory, module.paddr, initrd.size()), initrd);

  std::vector<E820Entry> expected = build_e820(memory);
  ASSERT_EQ(info.memmap_entries, expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    auto entry = read_guest_obj<HvmMemmapEntry>(memory, info.memmap_paddr + i * sizeof(HvmMemmapEntry));
    EXPECT_EQ(entry.address, expected[i].address) << "entry " << i;
    EXPECT_EQ(entry.size, expected[i].size_bytes) << "entry " << i;
    EXPECT_EQ(entry.type, static_cast<uint32_t>(expected[i].type)) << "entry " << i;
    EXPECT_EQ(entry.reserved, 0u);
  }
  // The boot structures must not overlap each other.
  EXPECT_GE(info.modlist_paddr, layout::kBootParamsStart + sizeof(HvmStartInfo));
  EXPECT_GE(info.memmap_paddr, info.modlist_paddr + sizeof(HvmModlistEntry));
}

TEST(PvhLoaderTest, NoInitrdMeansNoModules) {
  GuestMemory memory = make_memory(64 * kMiB);
  std::vector<std::byte> kernel = make_elf();
  ASSERT_TRUE(load_linux(memory, images_of(kernel)));
  auto info = read_guest_obj<HvmStartInfo>(memory, layout::kBootParamsStart);
  EXPECT_EQ(info.nr_modules, 0u);
  EXPECT_EQ(info.modlist_paddr, 0u);
  EXPECT_EQ(info.rsdp_paddr, 0u);
}

TEST(PvhLoaderTest, InitrdThatDoesNotFitIsAnError) {
  GuestMemory memory = make_memory(32 * kMiB);
  std::vector<std::byte> kernel = make_elf();
  // The loader keeps 16 MiB above the 2 MiB-aligned kernel end (4 MiB) free,
  // so 12 MiB is the most that fits in 32 MiB.
  std::vector<std::byte> fits(12 * kMiB, std::byte{1});
  Result<EntryPoint> first = load_linux(memory, images_of(kernel, fits));
  EXPECT_TRUE(first) << first.error().message();
  std::vector<std::byte> initrd(13 * kMiB, std::byte{1});
  Result<EntryPoint> entry = load_linux(memory, images_of(kernel, initrd));
  ASSERT_FALSE(entry);
  EXPECT_EQ(entry.error().code(), Errc::OutOfRange);
  EXPECT_THAT(entry.error().message(), HasSubstr("initrd of 13631488 bytes does not fit"));
}

TEST(PvhLoaderTest, OverlongCommandLineIsAnError) {
  GuestMemory memory = make_memory(64 * kMiB);
  std::vector<std::byte> kernel = make_elf();
  Result<EntryPoint> entry =
      load_linux(memory, images_of(kernel, {}, std::string(layout::kCmdlineMaxBytes, 'x')));
  ASSERT_FALSE(entry);
  EXPECT_THAT(entry.error().message(), HasSubstr("command line"));
}

struct ElfRejection {
  const char* name;
  std::vector<std::byte> kernel;
  Errc code;
  const char* message;
};

void PrintTo(const ElfRejection& value, std::ostream* stream) { *stream << value.name; }

std::vector<ElfRejection> elf_rejections() {
  std::vector<ElfRejection> cases;
  {
    std::vector<std::byte> kernel = make_elf();
    kernel.resize(40);
    cases.push_back({"shorter_than_header", kernel, Errc::Corrupt, "too short"});
  }
  {
    std::vector<std::byte> kernel = make_elf();
    kernel[3] = std::byte{'G'};
    cases.push_back({"wrong_magic", kernel, Errc::Unsupported, "neither a bzImage"});
  }
  {
    ElfSpec spec;
    spec.elf_class = 1;
    cases.push_back({"elf32", make_elf(spec), Errc::Unsupported, "ELFCLASS64"});
  }
  {
    ElfSpec spec;
    spec.data = 2;
    cases.push_back({"big_endian", make_elf(spec), Errc::Unsupported, "little-endian"});
  }
  {
    ElfSpec spec;
    spec.machine = 183;  // EM_AARCH64
    cases.push_back({"aarch64", make_elf(spec), Errc::Unsupported, "machine 183 is not x86-64"});
  }
  {
    ElfSpec spec;
    spec.phoff = 0x100000;
    cases.push_back({"phoff_past_eof", make_elf(spec), Errc::Corrupt, "program headers"});
  }
  {
    ElfSpec spec;
    spec.phnum = 0xffff;
    cases.push_back({"phnum_past_eof", make_elf(spec), Errc::Corrupt, "program headers"});
  }
  {
    ElfSpec spec;
    spec.phoff = ~uint64_t{0} - 8;  // phoff + size would wrap
    cases.push_back({"phoff_wraps", make_elf(spec), Errc::Corrupt, "program headers"});
  }
  {
    ElfSpec spec;
    spec.phentsize = 32;
    cases.push_back({"wrong_phentsize", make_elf(spec), Errc::Corrupt, "program headers"});
  }
  {
    ElfSpec spec;
    spec.phnum = 0;
    cases.push_back({"no_program_headers", make_elf(spec), Errc::Corrupt, "program headers"});
  }
  {
    ElfSpec spec;
    spec.load_offset = 0x10000000;
    cases.push_back({"load_offset_past_eof", make_elf(spec), Errc::Corrupt, "past the end of the file"});
  }
  {
    std::vector<std::byte> kernel = make_elf();
    kernel.resize(kernel.size() - 1);  // the file is one byte short of filesz
    cases.push_back({"load_filesz_past_eof", kernel, Errc::Corrupt, "past the end of the file"});
  }
  {
    ElfSpec spec;
    spec.paddr = 0x80000;  // below 1 MiB: over the boot structures
    spec.notes = {pvh_note(0x80010)};
    cases.push_back({"load_below_1mib", make_elf(spec), Errc::OutOfRange, "outside guest RAM"});
  }
  {
    ElfSpec spec;
    spec.paddr = 63 * kMiB;
    spec.memsz = 2 * kMiB;  // runs past the end of 64 MiB of RAM
    spec.notes = {pvh_note(63 * kMiB + 0x10)};
    cases.push_back({"load_past_ram", make_elf(spec), Errc::OutOfRange, "outside guest RAM"});
  }
  {
    ElfSpec spec;
    spec.paddr = 0xc0000000;  // in the PCI hole
    spec.notes = {pvh_note(0xc0000010)};
    cases.push_back({"load_in_pci_hole", make_elf(spec), Errc::OutOfRange, "outside guest RAM"});
  }
  {
    ElfSpec spec;
    spec.memsz = ~uint64_t{0} - 0x100;  // paddr + memsz wraps
    cases.push_back({"load_memsz_wraps", make_elf(spec), Errc::OutOfRange, "outside guest RAM"});
  }
  {
    ElfSpec spec;
    spec.with_note_segment = false;
    cases.push_back({"no_note_segment", make_elf(spec), Errc::Unsupported, "XEN_ELFNOTE_PHYS32_ENTRY"});
  }
  {
    ElfSpec spec;
    spec.notes = {Note{"Xen", 17, pattern(4, 0), std::nullopt, std::nullopt}};  // other Xen note
    cases.push_back({"no_pvh_note", make_elf(spec), Errc::Unsupported, "XEN_ELFNOTE_PHYS32_ENTRY"});
  }
  {
    ElfSpec spec;
    spec.notes = {pvh_note(0x200010, 2)};
    cases.push_back({"pvh_note_bad_size", make_elf(spec), Errc::Corrupt, "bad size"});
  }
  {
    ElfSpec spec;
    spec.notes = {pvh_note(0x200010)};
    spec.notes[0].namesz = 40;  // past the 20-byte segment
    cases.push_back({"namesz_past_segment", make_elf(spec), Errc::Corrupt, "runs past its PT_NOTE"});
  }
  {
    ElfSpec spec;
    spec.notes = {pvh_note(0x200010)};
    spec.notes[0].descsz = 12;
    cases.push_back({"descsz_past_segment", make_elf(spec), Errc::Corrupt, "runs past its PT_NOTE"});
  }
  for (uint32_t huge : {0xffffffffu, 0xfffffffdu, 0xfffffff0u}) {
    ElfSpec name_spec;
    name_spec.notes = {pvh_note(0x200010)};
    name_spec.notes[0].namesz = huge;
    cases.push_back({"huge_namesz", make_elf(name_spec), Errc::Corrupt, "runs past its PT_NOTE"});
    ElfSpec desc_spec;
    desc_spec.notes = {pvh_note(0x200010)};
    desc_spec.notes[0].descsz = huge;
    cases.push_back({"huge_descsz", make_elf(desc_spec), Errc::Corrupt, "runs past its PT_NOTE"});
  }
  {
    ElfSpec spec;
    spec.notes = {pvh_note(0x204000)};  // just past the end of the only segment
    cases.push_back({"entry_outside_kernel", make_elf(spec), Errc::Corrupt, "not inside a loaded segment"});
  }
  {
    ElfSpec spec;
    spec.notes = {pvh_note(0x202000)};  // in the segment's bss, not in its file bytes
    cases.push_back({"entry_in_bss", make_elf(spec), Errc::Corrupt, "not inside a loaded segment"});
  }
  {
    ElfSpec spec;
    spec.with_load_segment = false;
    cases.push_back({"no_load_segment", make_elf(spec), Errc::Corrupt, "no PT_LOAD"});
  }
  return cases;
}

class ElfRejectionTest : public ::testing::TestWithParam<ElfRejection> {};

TEST_P(ElfRejectionTest, IsAnErrorNamingTheProblem) {
  GuestMemory memory = make_memory(64 * kMiB);
  Result<EntryPoint> entry = load_linux(memory, images_of(GetParam().kernel));
  ASSERT_FALSE(entry);
  EXPECT_EQ(entry.error().code(), GetParam().code) << entry.error().message();
  EXPECT_THAT(entry.error().message(), HasSubstr(GetParam().message));
}

INSTANTIATE_TEST_SUITE_P(Images, ElfRejectionTest, ::testing::ValuesIn(elf_rejections()),
                         [](const auto& test_info) {
                           return std::string(test_info.param.name) + "_" + std::to_string(test_info.index);
                         });

// A segment whose filesz exceeds memsz is malformed (the ELF spec requires
// filesz <= memsz), and the error should say so rather than blame the file size.
TEST(PvhLoaderTest, FileszAboveMemszIsAnErrorNamingIt) {
  GuestMemory memory = make_memory(64 * kMiB);
  ElfSpec spec;
  spec.filesz = 0x2000;
  spec.memsz = 0x1000;
  std::vector<std::byte> kernel = make_elf(spec);
  Result<EntryPoint> entry = load_linux(memory, images_of(kernel));
  ASSERT_FALSE(entry);
  EXPECT_EQ(entry.error().code(), Errc::Corrupt);
  EXPECT_THAT(entry.error().message(), HasSubstr("memsz"));
}

TEST(DetectKernelFormatTest, RecognisesBothMagics) {
  std::vector<std::byte> bzimage = make_bzimage();
  std::vector<std::byte> elf = make_elf();
  EXPECT_EQ(*detect_kernel_format(bzimage), KernelFormat::BzImage);
  EXPECT_EQ(*detect_kernel_format(elf), KernelFormat::PvhElf);
  std::vector<std::byte> three = bytes_of("\x7f" "EL");
  EXPECT_FALSE(detect_kernel_format(three));
  std::vector<std::byte> short_header(0x205, std::byte{0});
  std::memcpy(short_header.data() + kHeaderMagic, "HdrS", 3);
  EXPECT_FALSE(detect_kernel_format(short_header));
}

// ---- build_e820 ----

void expect_well_formed(const std::vector<E820Entry>& map, uint64_t memory_bytes) {
  uint64_t ram = 0;
  for (size_t i = 0; i < map.size(); ++i) {
    EXPECT_GT(map[i].size_bytes, 0u) << "entry " << i;
    if (i > 0) {
      EXPECT_GE(map[i].address, map[i - 1].address + map[i - 1].size_bytes)
          << "entry " << i << " overlaps or is out of order";
    }
    if (map[i].type == E820Type::Ram) {
      ram += map[i].size_bytes;
      bool in_hole = map[i].address < layout::kPciHoleEnd &&
                     map[i].address + map[i].size_bytes > layout::kPciHoleStart;
      EXPECT_FALSE(in_hole) << "RAM entry " << i << " overlaps the PCI hole";
      bool in_legacy = map[i].address < layout::kHighMemoryStart &&
                       map[i].address + map[i].size_bytes > layout::kEbdaStart;
      EXPECT_FALSE(in_legacy) << "RAM entry " << i << " covers the EBDA/VGA/BIOS area";
    }
  }
  // All RAM except the legacy hole between the EBDA and 1 MiB.
  EXPECT_EQ(ram, memory_bytes - (layout::kHighMemoryStart - layout::kEbdaStart));
  auto ecam = std::find_if(map.begin(), map.end(), [](const E820Entry& e) {
    return e.address == layout::kPciEcamStart;
  });
  ASSERT_NE(ecam, map.end()) << "ECAM must be reserved for Linux to use MCFG";
  EXPECT_EQ(ecam->size_bytes, layout::kPciEcamSize);
  EXPECT_EQ(ecam->type, E820Type::Reserved);
}

TEST(BuildE820Test, SmallGuest) {
  GuestMemory memory = make_memory(256 * kMiB);
  std::vector<E820Entry> map = build_e820(memory);
  ASSERT_EQ(map.size(), 4u);
  EXPECT_EQ(map[0].address, 0u);
  EXPECT_EQ(map[0].size_bytes, layout::kEbdaStart);
  EXPECT_EQ(map[0].type, E820Type::Ram);
  EXPECT_EQ(map[1].address, layout::kAcpiStart);
  EXPECT_EQ(map[1].size_bytes, layout::kAcpiEnd - layout::kAcpiStart);
  EXPECT_EQ(map[1].type, E820Type::Reserved);
  EXPECT_EQ(map[2].address, 0x100000u);
  EXPECT_EQ(map[2].size_bytes, 255 * kMiB);
  EXPECT_EQ(map[2].type, E820Type::Ram);
  EXPECT_EQ(map[3].address, layout::kPciEcamStart);
  EXPECT_EQ(map[3].type, E820Type::Reserved);
  expect_well_formed(map, 256 * kMiB);
}

TEST(BuildE820Test, FourGiBGuestIsSplitAroundTheHole) {
  GuestMemory memory = make_memory(4 * kGiB);
  std::vector<E820Entry> map = build_e820(memory);
  ASSERT_EQ(map.size(), 5u);
  EXPECT_EQ(map[2].address, 0x100000u);
  EXPECT_EQ(map[2].size_bytes, layout::kPciHoleStart - 0x100000);
  EXPECT_EQ(map[2].type, E820Type::Ram);
  EXPECT_EQ(map[3].address, layout::kPciEcamStart);
  EXPECT_EQ(map[4].address, layout::kPciHoleEnd);
  EXPECT_EQ(map[4].size_bytes, 4 * kGiB - layout::kPciHoleStart);
  EXPECT_EQ(map[4].type, E820Type::Ram);
  expect_well_formed(map, 4 * kGiB);
}

TEST(BuildE820Test, WellFormedAtTheEdges) {
  for (uint64_t size : {16 * kMiB, 3 * kGiB, 3 * kGiB + kPageBytes, 5 * kGiB}) {
    SCOPED_TRACE(size);
    GuestMemory memory = make_memory(size);
    expect_well_formed(build_e820(memory), size);
  }
}

}  // namespace
}  // namespace keel::boot
