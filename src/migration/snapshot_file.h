// The snapshot file: a header, self-describing checksummed sections, and an
// end section. Layout and rules: docs/snapshot-format.md. This layer knows
// sections, not what is in them (snapshot.h encodes the machine).
#pragma once

#include <array>
#include <cstdint>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/fd.h"
#include "base/result.h"
#include "memory/populated_ranges.h"

namespace keel::migration {

// What this Keel writes. Version 2: the config section may name PCI slots
// and ids (disks, nets, "slots"), which a version-1 reader would refuse as
// unknown keys; the layout is version 1's. Versions from
// kOldestSnapshotFormatVersion on are read (a version-1 file's config has
// no slots: its devices go in the lowest free slots, as they did).
inline constexpr uint32_t kSnapshotFormatVersion = 2;
inline constexpr uint32_t kOldestSnapshotFormatVersion = 1;
inline constexpr std::array<char, 8> kSnapshotMagic = {'K', 'E', 'E', 'L', 'S', 'N', 'A', 'P'};
inline constexpr size_t kMaxSectionNameBytes = 64;
// Sections other than lazy ones are read whole into memory: bound them.
inline constexpr uint64_t kMaxEagerPayloadBytes = 64ull << 20;
inline constexpr uint32_t kPageBytes = 4096;
// vCPUs plus devices stay far below this; it bounds a hostile file's work.
inline constexpr size_t kMaxSections = 16384;

enum class SectionType : uint16_t {
  MachineConfig = 1,  // the VM configuration, JSON (docs/vm-config.md)
  Vcpu = 2,           // one vCPU's KVM state, named "vcpu<N>"
  Vm = 3,             // irqchip, PIT and clock
  Device = 4,         // one device's state, named by the device; opaque here
  Memory = 5,         // guest RAM's bytes, page aligned, lazy
  Disks = 6,          // the disk images' identities (migration/disks.h)
  End = 0xffff,       // the trailer
};
std::string_view section_type_name(SectionType type);

// The checksum every part of the file carries: zlib's crc32, continued from crc.
uint32_t snapshot_crc32(std::span<const std::byte> data, uint32_t crc = 0);

// Section flags.
inline constexpr uint16_t kSectionOptional = 1 << 0;  // a reader that does not know it skips it
inline constexpr uint16_t kSectionLazy = 1 << 1;      // CRC checked only by verify(), see below
inline constexpr uint16_t kKnownSectionFlags = kSectionOptional | kSectionLazy;

// The CPU the snapshot was taken on, for the compatibility message: vendor,
// CPUID.1:EAX signature and the main feature words.
struct HostCpuSummary {
  std::array<char, 12> vendor{};
  uint32_t signature = 0;
  // CPUID 1.ECX, 1.EDX, 7.0.EBX, 7.0.ECX, 7.0.EDX, 0x80000001.ECX,
  // 0x80000001.EDX, 0xD.0.EAX (XSAVE components).
  std::array<uint32_t, 8> features{};

  static HostCpuSummary of_this_host();
  std::string describe() const;  // "GenuineIntel family 6 model 85 stepping 7"
  bool operator==(const HostCpuSummary&) const = default;
};

struct SectionInfo {
  SectionType type;
  std::string name;
  uint16_t flags = 0;
  uint32_t alignment = 1;       // of the payload in the file
  uint64_t header_offset = 0;
  uint64_t payload_offset = 0;  // page aligned for memory, so it can be mmapped
  uint64_t payload_bytes = 0;
  uint32_t payload_crc = 0;     // zlib crc32 of the payload

  std::string label() const;  // "vcpu section 'vcpu0'"
};

// Writes path + ".partial" and renames it to path in finish(), so a save
// that fails or is interrupted never leaves a file that looks whole.
class SnapshotWriter {
 public:
  static Result<SnapshotWriter> create(const std::string& path, const HostCpuSummary& host);
  SnapshotWriter(SnapshotWriter&&) = default;
  ~SnapshotWriter();

  Result<void> add(SectionType type, std::string_view name, std::span<const std::byte> payload,
                   uint16_t flags = 0);
  // A lazy section holding memory (guest RAM, a whole number of pages),
  // page aligned in the file. Only the populated ranges (in order, page
  // aligned; memory::GuestMemory::populated_ranges()) are read, the rest
  // is zeros; pages of zeros stay holes in the file.
  Result<void> add_memory_contents(SectionType type, std::string_view name,
                                   std::span<const std::byte> memory,
                                   std::span<const memory::ByteRange> populated);
  // The same from length bytes at the start of source (a memfd), its data
  // extents (SEEK_DATA) as the populated ranges.
  Result<void> add_file_contents(SectionType type, std::string_view name, const Fd& source,
                                 uint64_t length);
  // Writes the end section, syncs and renames into place.
  Result<void> finish();

 private:
  SnapshotWriter(Fd fd, std::string path, uint64_t offset)
      : fd_(std::move(fd)), path_(std::move(path)), offset_(offset) {}
  Result<uint64_t> write_section_header(SectionType type, std::string_view name, uint16_t flags,
                                        uint32_t alignment, uint64_t payload_bytes, uint32_t crc);

  Fd fd_;
  std::string path_;
  uint64_t offset_;
  uint64_t sections_ = 0;
  std::set<std::pair<SectionType, std::string>> written_;
  std::set<SectionType> written_types_;
  bool finished_ = false;
};

// Opens and checks a whole snapshot: magic, version, header and section
// checksums, lengths against the file, the end section, duplicates and the
// required sections (machine config, VM, memory, at least one vCPU). Every
// error names the section and the problem. Lazy payloads (guest memory) are
// bounds-checked but their CRC is only checked by verify(): reading all of
// guest RAM would defeat a lazy restore, and a corrupt page can only hurt
// the guest, never the VMM.
class SnapshotReader {
 public:
  static Result<SnapshotReader> open(const std::string& path);
  // name is used in error messages.
  static Result<SnapshotReader> from_fd(Fd fd, std::string name);

  uint32_t version() const { return version_; }
  const HostCpuSummary& host() const { return host_; }
  std::span<const SectionInfo> sections() const { return sections_; }
  const SectionInfo* find(SectionType type, std::string_view name) const;
  std::vector<const SectionInfo*> all(SectionType type) const;
  // A non-lazy section's payload, checksum checked again.
  Result<std::vector<std::byte>> payload(const SectionInfo& section) const;
  // Reads a section's payload through and checks its CRC.
  Result<void> verify(const SectionInfo& section) const;
  const Fd& fd() const { return fd_; }

 private:
  SnapshotReader(Fd fd, std::string name) : fd_(std::move(fd)), name_(std::move(name)) {}
  Result<void> parse();
  Result<SectionInfo> parse_section(uint64_t offset, uint64_t file_bytes) const;
  Result<void> check_required() const;

  Fd fd_;
  std::string name_;
  uint32_t version_ = 0;
  HostCpuSummary host_;
  std::vector<SectionInfo> sections_;  // without the end section
};

}  // namespace keel::migration
