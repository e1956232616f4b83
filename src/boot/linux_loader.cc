#include "boot/linux_loader.h"

#include <algorithm>
#include <array>
#include <cstring>

#include <fmt/format.h>

#include "boot/pvh_abi.h"
#include "machine/layout.h"

namespace keel::boot {
namespace {

using memory::GuestAddr;
using memory::GuestMemory;

// x86 boot protocol offsets, relative to the start of the image and of the
// zero page alike (the setup header sits at the same offset in both).
constexpr size_t kSetupSectsOffset = 0x1f1;
constexpr size_t kSyssizeOffset = 0x1f4;
constexpr size_t kBootFlagOffset = 0x1fe;
constexpr size_t kHeaderMagicOffset = 0x202;
constexpr size_t kVersionOffset = 0x206;
constexpr size_t kTypeOfLoaderOffset = 0x210;
constexpr size_t kLoadflagsOffset = 0x211;
constexpr size_t kRamdiskImageOffset = 0x218;
constexpr size_t kRamdiskSizeOffset = 0x21c;
constexpr size_t kHeapEndPtrOffset = 0x224;
constexpr size_t kCmdLinePtrOffset = 0x228;
constexpr size_t kInitrdAddrMaxOffset = 0x22c;
constexpr size_t kXloadflagsOffset = 0x236;
constexpr size_t kCmdlineSizeOffset = 0x238;
constexpr size_t kInitSizeOffset = 0x260;
constexpr size_t kAcpiRsdpAddrOffset = 0x070;
constexpr size_t kE820EntriesOffset = 0x1e8;
constexpr size_t kE820TableOffset = 0x2d0;
constexpr size_t kE820MaxEntries = 128;
constexpr size_t kZeroPageSize = 4096;

constexpr uint16_t kMinimumProtocol = 0x206;  // cmdline_size, 64-bit entry needs 2.12 xloadflags
constexpr uint8_t kLoadedHigh = 0x01;
constexpr uint8_t kCanUseHeap = 0x80;
constexpr uint16_t kXlfKernel64 = 0x01;
constexpr uint8_t kUndefinedLoader = 0xff;
constexpr uint64_t kKernelLoadAddress = layout::kHighMemoryStart;
constexpr uint64_t k64BitEntryOffset = 0x200;

using pvh::HvmMemmapEntry;
using pvh::HvmModlistEntry;
using pvh::HvmStartInfo;
using pvh::kHvmStartMagic;
using pvh::kXenElfnotePhys32Entry;
constexpr uint64_t kStartInfoAddress = layout::kBootParamsStart;
constexpr uint64_t kModlistAddress = kStartInfoAddress + 0x100;
constexpr uint64_t kMemmapAddress = kStartInfoAddress + 0x200;
constexpr size_t kMemmapMaxEntries = (0x1000 - 0x200) / sizeof(HvmMemmapEntry);

struct Elf64Header {
  std::array<uint8_t, 16> ident;
  uint16_t type;
  uint16_t machine;
  uint32_t version;
  uint64_t entry;
  uint64_t phoff;
  uint64_t shoff;
  uint32_t flags;
  uint16_t ehsize;
  uint16_t phentsize;
  uint16_t phnum;
  uint16_t shentsize;
  uint16_t shnum;
  uint16_t shstrndx;
};
struct Elf64ProgramHeader {
  uint32_t type;
  uint32_t flags;
  uint64_t offset;
  uint64_t vaddr;
  uint64_t paddr;
  uint64_t filesz;
  uint64_t memsz;
  uint64_t align;
};
constexpr uint32_t kPtLoad = 1;
constexpr uint32_t kPtNote = 4;
constexpr uint16_t kEmX86_64 = 62;

template <typename T>
T load(std::span<const std::byte> bytes, size_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

template <typename T>
void store(std::span<std::byte> bytes, size_t offset, T value) {
  std::memcpy(bytes.data() + offset, &value, sizeof(T));
}

uint64_t align_down(uint64_t value, uint64_t alignment) { return value & ~(alignment - 1); }
uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) & ~(alignment - 1);
}

uint64_t low_memory_end(const GuestMemory& memory) {
  return memory.regions().front().start.value + memory.regions().front().size_bytes;
}

Result<void> write_cmdline(const GuestMemory& memory, const std::string& cmdline,
                           uint64_t max_bytes) {
  if (cmdline.size() + 1 > max_bytes) {
    return fail(Errc::InvalidArgument,
                fmt::format("kernel command line is {} bytes; this kernel accepts at most {}",
                            cmdline.size(), max_bytes - 1));
  }
  std::vector<std::byte> bytes(cmdline.size() + 1);
  std::memcpy(bytes.data(), cmdline.data(), cmdline.size());
  return memory.write(GuestAddr(layout::kCmdlineStart), bytes);
}

// Puts the initrd as high as allowed, page aligned, above kernel_end.
Result<uint64_t> place_initrd(const GuestMemory& memory, std::span<const std::byte> initrd,
                              uint64_t highest_end, uint64_t kernel_end) {
  uint64_t top = std::min(low_memory_end(memory), highest_end);
  if (initrd.size() > top || align_down(top - initrd.size(), 4096) < kernel_end) {
    return fail(Errc::OutOfRange,
                fmt::format("initrd of {} bytes does not fit in guest memory below {:#x} above "
                            "the kernel (end {:#x}); give the guest more memory",
                            initrd.size(), top, kernel_end));
  }
  uint64_t address = align_down(top - initrd.size(), 4096);
  TRY(memory.write(GuestAddr(address), initrd));
  return address;
}

// Identity map of the first 4 GiB with 2 MiB pages, and a GDT with the
// 64-bit boot protocol's __BOOT_CS (0x10) and __BOOT_DS (0x18).
Result<void> write_long_mode_structures(const GuestMemory& memory) {
  constexpr uint64_t kPml4 = layout::kPageTablesStart;
  constexpr uint64_t kPdpt = kPml4 + 0x1000;
  constexpr uint64_t kPageDirectories = kPdpt + 0x1000;  // four, one per GiB
  constexpr uint64_t kPresentWritable = 0x3;
  constexpr uint64_t kLargePage = 0x80;
  TRY(memory.write_obj(GuestAddr(kPml4), kPdpt | kPresentWritable));
  for (uint64_t gib = 0; gib < 4; ++gib) {
    uint64_t directory = kPageDirectories + gib * 0x1000;
    TRY(memory.write_obj(GuestAddr(kPdpt + gib * 8), directory | kPresentWritable));
    std::array<uint64_t, 512> entries{};
    for (uint64_t i = 0; i < 512; ++i) {
      entries[i] = ((gib << 30) + (i << 21)) | kPresentWritable | kLargePage;
    }
    TRY(memory.write(GuestAddr(directory), std::as_bytes(std::span(entries))));
  }
  constexpr std::array<uint64_t, 4> kGdt = {
      0, 0,
      0x00af9b000000ffff,  // 0x10: 64-bit code
      0x00cf93000000ffff,  // 0x18: data
  };
  return memory.write(GuestAddr(layout::kGdtStart), std::as_bytes(std::span(kGdt)));
}

Result<EntryPoint> load_bzimage(const GuestMemory& memory, const LinuxImages& images) {
  std::span<const std::byte> kernel = images.kernel;
  if (kernel.size() < 0x1000) {
    return fail(Errc::Corrupt, fmt::format("bzImage of {} bytes is too short", kernel.size()));
  }
  if (load<uint16_t>(kernel, kBootFlagOffset) != 0xaa55) {
    return fail(Errc::Corrupt, "bzImage: boot flag 0xAA55 missing at 0x1fe");
  }
  uint16_t version = load<uint16_t>(kernel, kVersionOffset);
  if (version < kMinimumProtocol) {
    return fail(Errc::Unsupported, fmt::format("bzImage: boot protocol {}.{:02} is older than 2.06",
                                               version >> 8, version & 0xff));
  }
  if ((load<uint8_t>(kernel, kLoadflagsOffset) & kLoadedHigh) == 0) {
    return fail(Errc::Unsupported, "bzImage: a zImage (loaded low) is not supported");
  }
  if ((load<uint16_t>(kernel, kXloadflagsOffset) & kXlfKernel64) == 0) {
    return fail(Errc::Unsupported, "bzImage: kernel has no 64-bit entry point (XLF_KERNEL_64)");
  }
  size_t setup_sects = load<uint8_t>(kernel, kSetupSectsOffset);
  if (setup_sects == 0) setup_sects = 4;
  size_t setup_bytes = (setup_sects + 1) * 512;
  if (setup_bytes >= kernel.size()) {
    return fail(Errc::Corrupt, fmt::format("bzImage: setup ({} bytes) fills the whole {}-byte file",
                                           setup_bytes, kernel.size()));
  }
  size_t header_end = 0x202 + load<uint8_t>(kernel, 0x201);
  if (header_end > setup_bytes || header_end > kZeroPageSize) {
    return fail(Errc::Corrupt, "bzImage: setup header runs past the setup sectors");
  }
  std::span<const std::byte> payload = kernel.subspan(setup_bytes);
  // syssize counts the protected-mode payload in 16-byte paragraphs.
  uint64_t declared_payload = uint64_t{load<uint32_t>(kernel, kSyssizeOffset)} * 16;
  if (declared_payload > payload.size()) {
    return fail(Errc::Corrupt,
                fmt::format("bzImage is truncated: the header declares a {}-byte kernel, the file "
                            "holds {}",
                            declared_payload, payload.size()));
  }
  uint64_t init_size = load<uint32_t>(kernel, kInitSizeOffset);
  uint64_t kernel_end = kKernelLoadAddress + std::max<uint64_t>(payload.size(), init_size);
  if (!memory.contains(GuestAddr(kKernelLoadAddress), kernel_end - kKernelLoadAddress)) {
    return fail(Errc::OutOfRange,
                fmt::format("kernel needs guest memory up to {:#x} ({} MiB); give the guest more",
                            kernel_end, (kernel_end + (1 << 20) - 1) >> 20));
  }
  TRY(memory.write(GuestAddr(kKernelLoadAddress), payload));

  std::array<std::byte, kZeroPageSize> zero_page{};
  std::memcpy(zero_page.data() + kSetupSectsOffset, kernel.data() + kSetupSectsOffset,
              header_end - kSetupSectsOffset);
  store<uint8_t>(zero_page, kTypeOfLoaderOffset, kUndefinedLoader);
  store<uint8_t>(zero_page, kLoadflagsOffset,
                 static_cast<uint8_t>(load<uint8_t>(kernel, kLoadflagsOffset) | kCanUseHeap));
  store<uint16_t>(zero_page, kHeapEndPtrOffset, 0xfe00);

  // 64-bit sum: a cmdline_size of 0xffffffff must not wrap to 0.
  uint64_t cmdline_max = std::min<uint64_t>(uint64_t{load<uint32_t>(kernel, kCmdlineSizeOffset)} + 1,
                                            layout::kCmdlineMaxBytes);
  TRY(write_cmdline(memory, images.cmdline, cmdline_max));
  store<uint32_t>(zero_page, kCmdLinePtrOffset, static_cast<uint32_t>(layout::kCmdlineStart));

  if (!images.initrd.empty()) {
    uint64_t initrd_max = uint64_t{load<uint32_t>(kernel, kInitrdAddrMaxOffset)} + 1;
    uint64_t address = TRY(place_initrd(memory, images.initrd, initrd_max, align_up(kernel_end, 4096)));
    store<uint32_t>(zero_page, kRamdiskImageOffset, static_cast<uint32_t>(address));
    store<uint32_t>(zero_page, kRamdiskSizeOffset, static_cast<uint32_t>(images.initrd.size()));
  }
  store<uint64_t>(zero_page, kAcpiRsdpAddrOffset, images.rsdp_address);

  std::vector<E820Entry> e820 = build_e820(memory);
  if (e820.size() > kE820MaxEntries) return fail(Errc::OutOfRange, "e820: too many entries");
  store<uint8_t>(zero_page, kE820EntriesOffset, static_cast<uint8_t>(e820.size()));
  for (size_t i = 0; i < e820.size(); ++i) {
    size_t offset = kE820TableOffset + i * 20;
    store<uint64_t>(zero_page, offset, e820[i].address);
    store<uint64_t>(zero_page, offset + 8, e820[i].size_bytes);
    store<uint32_t>(zero_page, offset + 16, static_cast<uint32_t>(e820[i].type));
  }
  TRY(memory.write(GuestAddr(layout::kBootParamsStart), zero_page));
  TRY(write_long_mode_structures(memory));
  return EntryPoint{KernelFormat::BzImage, kKernelLoadAddress + k64BitEntryOffset,
                    layout::kBootParamsStart};
}

// Finds the PVH entry in the PT_NOTE segments, checking every length.
Result<uint64_t> find_pvh_entry(std::span<const std::byte> image,
                                const std::vector<Elf64ProgramHeader>& headers) {
  for (const Elf64ProgramHeader& header : headers) {
    if (header.type != kPtNote) continue;
    if (header.offset > image.size() || header.filesz > image.size() - header.offset) {
      return fail(Errc::Corrupt, "ELF: PT_NOTE segment runs past the end of the file");
    }
    std::span<const std::byte> notes = image.subspan(header.offset, header.filesz);
    size_t position = 0;
    while (notes.size() - position >= 12) {
      uint32_t name_size = load<uint32_t>(notes, position);
      uint32_t desc_size = load<uint32_t>(notes, position + 4);
      uint32_t type = load<uint32_t>(notes, position + 8);
      size_t name_at = position + 12;
      size_t desc_at = name_at + align_up(name_size, 4);
      size_t next = desc_at + align_up(desc_size, 4);
      if (name_size > notes.size() || desc_size > notes.size() || next > notes.size()) {
        return fail(Errc::Corrupt, "ELF: a note runs past its PT_NOTE segment");
      }
      bool is_xen = name_size == 4 && std::memcmp(notes.data() + name_at, "Xen", 4) == 0;
      if (is_xen && type == kXenElfnotePhys32Entry) {
        if (desc_size == 4) return uint64_t{load<uint32_t>(notes, desc_at)};
        if (desc_size == 8) return load<uint64_t>(notes, desc_at);
        return fail(Errc::Corrupt, "ELF: XEN_ELFNOTE_PHYS32_ENTRY has a bad size");
      }
      position = next;
    }
  }
  return fail(Errc::Unsupported,
              "ELF kernel has no XEN_ELFNOTE_PHYS32_ENTRY note: it was built without CONFIG_PVH "
              "(boot its bzImage instead)");
}

Result<EntryPoint> load_pvh(const GuestMemory& memory, const LinuxImages& images) {
  std::span<const std::byte> image = images.kernel;
  if (image.size() < sizeof(Elf64Header)) return fail(Errc::Corrupt, "ELF: file too short");
  auto elf = load<Elf64Header>(image, 0);
  if (elf.ident[4] != 2 || elf.ident[5] != 1) {
    return fail(Errc::Unsupported, "ELF: not a little-endian 64-bit ELF (ELFCLASS64, ELFDATA2LSB)");
  }
  if (elf.machine != kEmX86_64) {
    return fail(Errc::Unsupported, fmt::format("ELF: machine {} is not x86-64", elf.machine));
  }
  if (elf.phentsize != sizeof(Elf64ProgramHeader) || elf.phnum == 0 ||
      elf.phoff > image.size() ||
      uint64_t{elf.phnum} * sizeof(Elf64ProgramHeader) > image.size() - elf.phoff) {
    return fail(Errc::Corrupt, "ELF: program headers missing or past the end of the file");
  }
  std::vector<Elf64ProgramHeader> headers;
  for (uint16_t i = 0; i < elf.phnum; ++i) {
    headers.push_back(load<Elf64ProgramHeader>(image, elf.phoff + i * sizeof(Elf64ProgramHeader)));
  }
  uint64_t entry = TRY(find_pvh_entry(image, headers));

  uint64_t kernel_end = 0;
  bool entry_loaded = false;
  for (const Elf64ProgramHeader& header : headers) {
    if (header.type != kPtLoad) continue;
    if (header.offset > image.size() || header.filesz > image.size() - header.offset) {
      return fail(Errc::Corrupt, "ELF: PT_LOAD segment runs past the end of the file");
    }
    if (header.filesz > header.memsz) {
      return fail(Errc::Corrupt,
                  fmt::format("ELF: PT_LOAD segment at {:#x} has filesz {:#x} above memsz {:#x}",
                              header.paddr, header.filesz, header.memsz));
    }
    if (header.paddr < layout::kHighMemoryStart ||
        !memory.contains(GuestAddr(header.paddr), header.memsz)) {
      return fail(Errc::OutOfRange,
                  fmt::format("ELF: segment at {:#x}+{:#x} is outside guest RAM above 1 MiB; give "
                              "the guest more memory",
                              header.paddr, header.memsz));
    }
    TRY(memory.write(GuestAddr(header.paddr), image.subspan(header.offset, header.filesz)));
    std::span<std::byte> bss =
        TRY(memory.host_span(GuestAddr(header.paddr + header.filesz), header.memsz - header.filesz));
    std::memset(bss.data(), 0, bss.size());
    kernel_end = std::max(kernel_end, header.paddr + header.memsz);
    if (entry >= header.paddr && entry - header.paddr < header.filesz) entry_loaded = true;
  }
  if (kernel_end == 0) return fail(Errc::Corrupt, "ELF: no PT_LOAD segment");
  if (!entry_loaded) {
    return fail(Errc::Corrupt,
                fmt::format("ELF: PVH entry {:#x} is not inside a loaded segment", entry));
  }

  TRY(write_cmdline(memory, images.cmdline, layout::kCmdlineMaxBytes));
  HvmStartInfo start_info{};
  start_info.magic = kHvmStartMagic;
  start_info.version = 1;
  start_info.cmdline_paddr = layout::kCmdlineStart;
  start_info.rsdp_paddr = images.rsdp_address;
  if (!images.initrd.empty()) {
    // The kernel's own end is only known to the kernel (its brk area grows
    // past memsz); leave a generous gap and put the initrd at the top.
    uint64_t address = TRY(place_initrd(memory, images.initrd, ~uint64_t{0},
                                        align_up(kernel_end, 1 << 21) + (16 << 20)));
    HvmModlistEntry module{address, images.initrd.size(), 0, 0};
    TRY(memory.write_obj(GuestAddr(kModlistAddress), module));
    start_info.nr_modules = 1;
    start_info.modlist_paddr = kModlistAddress;
  }
  std::vector<E820Entry> e820 = build_e820(memory);
  if (e820.size() > kMemmapMaxEntries) return fail(Errc::OutOfRange, "memmap: too many entries");
  for (size_t i = 0; i < e820.size(); ++i) {
    HvmMemmapEntry entry_out{e820[i].address, e820[i].size_bytes,
                             static_cast<uint32_t>(e820[i].type), 0};
    TRY(memory.write_obj(GuestAddr(kMemmapAddress + i * sizeof(HvmMemmapEntry)), entry_out));
  }
  start_info.memmap_paddr = kMemmapAddress;
  start_info.memmap_entries = static_cast<uint32_t>(e820.size());
  TRY(memory.write_obj(GuestAddr(kStartInfoAddress), start_info));
  return EntryPoint{KernelFormat::PvhElf, entry, kStartInfoAddress};
}

}  // namespace

std::vector<E820Entry> build_e820(const GuestMemory& memory) {
  std::vector<E820Entry> map;
  const memory::MemoryRegion& low = memory.regions().front();
  // Conventional memory up to the EBDA, then the legacy video/BIOS area.
  map.push_back({0, std::min<uint64_t>(layout::kEbdaStart, low.size_bytes), E820Type::Ram});
  map.push_back({layout::kAcpiStart, layout::kAcpiEnd - layout::kAcpiStart, E820Type::Reserved});
  if (low.size_bytes > layout::kHighMemoryStart) {
    map.push_back({layout::kHighMemoryStart, low.size_bytes - layout::kHighMemoryStart,
                   E820Type::Ram});
  }
  // Linux uses MCFG's ECAM only if the range is reserved (e820 or ACPI).
  map.push_back({layout::kPciEcamStart, layout::kPciEcamSize, E820Type::Reserved});
  for (size_t i = 1; i < memory.regions().size(); ++i) {
    map.push_back({memory.regions()[i].start.value, memory.regions()[i].size_bytes, E820Type::Ram});
  }
  return map;
}

Result<KernelFormat> detect_kernel_format(std::span<const std::byte> kernel) {
  if (kernel.size() >= 4 && std::memcmp(kernel.data(), "\x7f" "ELF", 4) == 0) {
    return KernelFormat::PvhElf;
  }
  if (kernel.size() >= kHeaderMagicOffset + 4 &&
      std::memcmp(kernel.data() + kHeaderMagicOffset, "HdrS", 4) == 0) {
    return KernelFormat::BzImage;
  }
  return fail(Errc::Unsupported,
              "kernel is neither a bzImage (no 'HdrS' setup header at 0x202) nor an ELF vmlinux");
}

Result<EntryPoint> load_linux(const GuestMemory& memory, const LinuxImages& images) {
  KernelFormat format = TRY(detect_kernel_format(images.kernel));
  if (format == KernelFormat::BzImage) return load_bzimage(memory, images);
  return load_pvh(memory, images);
}

}  // namespace keel::boot
