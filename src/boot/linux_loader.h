// Loads an unmodified Linux kernel into guest memory.
// Spec: Documentation/arch/x86/boot.rst (the x86 boot protocol, 2.06+, with
// the 64-bit entry point) and the Xen PVH boot ABI (docs/misc/pvh.pandoc:
// XEN_ELFNOTE_PHYS32_ENTRY, struct hvm_start_info version 1).
// Implemented: bzImage (64-bit entry, relocatable kernels loaded at 1 MiB),
// PVH ELF64 vmlinux; an initrd; the command line; e820 / PVH memmap; the
// ACPI RSDP address handed over in boot_params and hvm_start_info.
// Missing: 32-bit-only kernels, EFI handover, setup_data chains.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "memory/guest_memory.h"

namespace keel::boot {

enum class E820Type : uint32_t { Ram = 1, Reserved = 2, Acpi = 3 };

struct E820Entry {
  uint64_t address;
  uint64_t size_bytes;
  E820Type type;
};

// The machine's memory map: RAM regions of guest memory with the legacy
// holes carved out, plus the reserved ranges (ACPI tables, PCI ECAM).
std::vector<E820Entry> build_e820(const memory::GuestMemory& memory);

enum class KernelFormat { BzImage, PvhElf };

// Where the vCPU starts and how: the loader's half of the boot contract.
struct EntryPoint {
  KernelFormat format;
  uint64_t rip;
  // bzImage: rsi = boot_params; PVH: rbx = hvm_start_info.
  uint64_t boot_info_address;
};

struct LinuxImages {
  std::span<const std::byte> kernel;
  std::span<const std::byte> initrd;  // may be empty
  std::string cmdline;
  uint64_t rsdp_address = 0;  // 0: no ACPI
};

// Recognises the format by its magic ("HdrS" setup header or ELF) and
// loads it; a bad or truncated image is an error naming what is wrong.
Result<EntryPoint> load_linux(const memory::GuestMemory& memory, const LinuxImages& images);

Result<KernelFormat> detect_kernel_format(std::span<const std::byte> kernel);

}  // namespace keel::boot
