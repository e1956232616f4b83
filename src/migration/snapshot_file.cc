#include "migration/snapshot_file.h"

#include <cpuid.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/mmap.h"
#include "base/bytes.h"

namespace keel::migration {
namespace {

// docs/snapshot-format.md, "File header" and "Sections".
constexpr uint32_t kHeaderBytes = 80;
constexpr uint32_t kHeaderCrcOffset = kHeaderBytes - 4;
constexpr std::array<char, 4> kSectionTag = {'K', 'S', 'E', 'C'};
constexpr uint32_t kSectionHeaderBytes = 36;
constexpr uint32_t kSectionHeaderCrcOffset = 32;
constexpr uint32_t kMaxAlignment = 2u << 20;
constexpr uint64_t kEndPayloadBytes = 16;
constexpr size_t kCrcChunkBytes = 1 << 20;
using Magic = std::array<char, 8>;
using Vendor = std::array<char, 12>;
using FeatureWords = std::array<uint32_t, 8>;
using Tag = std::array<char, 4>;

// crc continued over count zero bytes, without reading any.
uint32_t crc32_of_zeros(uint32_t crc, uint64_t count) {
  static const std::vector<std::byte> zeros(kCrcChunkBytes);
  static const uint32_t zeros_crc = snapshot_crc32(zeros);
  for (; count >= zeros.size(); count -= zeros.size()) {
    crc = static_cast<uint32_t>(crc32_combine(crc, zeros_crc, static_cast<z_off_t>(zeros.size())));
  }
  return snapshot_crc32(std::span(zeros).first(count), crc);
}

uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

bool is_singleton(SectionType type) {
  return type == SectionType::MachineConfig || type == SectionType::Vm ||
         type == SectionType::Memory || type == SectionType::Disks;
}

bool is_known(uint16_t type) {
  switch (static_cast<SectionType>(type)) {
    case SectionType::MachineConfig:
    case SectionType::Vcpu:
    case SectionType::Vm:
    case SectionType::Device:
    case SectionType::Memory:
    case SectionType::Disks:
    case SectionType::End: return true;
  }
  return false;
}

std::vector<std::byte> encode_header(const HostCpuSummary& host) {
  ByteWriter out;
  out.put(kSnapshotMagic);
  out.put(kSnapshotFormatVersion);
  out.put(kHeaderBytes);
  out.put(host.vendor);
  out.put(host.signature);
  out.put(host.features);
  out.put(uint32_t{0});  // flags
  out.put(uint64_t{0});  // reserved
  out.put(snapshot_crc32(out.data()));
  CHECK(out.data().size() == kHeaderBytes, "snapshot header layout");
  return std::move(out.data());
}

}  // namespace

uint32_t snapshot_crc32(std::span<const std::byte> data, uint32_t crc) {
  return static_cast<uint32_t>(
      crc32_z(crc, reinterpret_cast<const Bytef*>(data.data()), data.size()));
}

std::string_view section_type_name(SectionType type) {
  switch (type) {
    case SectionType::MachineConfig: return "machine-config";
    case SectionType::Vcpu: return "vcpu";
    case SectionType::Vm: return "vm";
    case SectionType::Device: return "device";
    case SectionType::Memory: return "memory";
    case SectionType::Disks: return "disks";
    case SectionType::End: return "end";
  }
  return "unknown";
}

std::string SectionInfo::label() const {
  if (is_known(static_cast<uint16_t>(type))) {
    return fmt::format("{} section '{}'", section_type_name(type), name);
  }
  return fmt::format("section type {} '{}'", static_cast<uint16_t>(type), name);
}

HostCpuSummary HostCpuSummary::of_this_host() {
  HostCpuSummary host;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  __cpuid(0, eax, ebx, ecx, edx);
  unsigned max_leaf = eax;
  std::memcpy(host.vendor.data(), &ebx, 4);
  std::memcpy(host.vendor.data() + 4, &edx, 4);
  std::memcpy(host.vendor.data() + 8, &ecx, 4);
  __cpuid(1, eax, ebx, ecx, edx);
  host.signature = eax;
  host.features[0] = ecx;
  host.features[1] = edx;
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    host.features[2] = ebx;
    host.features[3] = ecx;
    host.features[4] = edx;
  }
  if (max_leaf >= 0xd) {
    __cpuid_count(0xd, 0, eax, ebx, ecx, edx);
    host.features[7] = eax;
  }
  __cpuid(0x80000000, eax, ebx, ecx, edx);
  if (eax >= 0x80000001) {
    __cpuid(0x80000001, eax, ebx, ecx, edx);
    host.features[5] = ecx;
    host.features[6] = edx;
  }
  return host;
}

std::string HostCpuSummary::describe() const {
  uint32_t family = (signature >> 8) & 0xf;
  uint32_t model = (signature >> 4) & 0xf;
  if (family == 0xf) family += (signature >> 20) & 0xff;
  if (family >= 6) model |= ((signature >> 16) & 0xf) << 4;
  std::string vendor_text(vendor.begin(), vendor.end());
  vendor_text.erase(std::find(vendor_text.begin(), vendor_text.end(), '\0'), vendor_text.end());
  return fmt::format("{} family {} model {} stepping {}", vendor_text, family, model,
                     signature & 0xf);
}

// ---- SnapshotWriter ----

Result<SnapshotWriter> SnapshotWriter::create(const std::string& path,
                                              const HostCpuSummary& host) {
  Fd fd = TRY(Fd::open(path + ".partial", O_WRONLY | O_CREAT | O_TRUNC, 0600));
  std::vector<std::byte> header = encode_header(host);
  TRY_CONTEXT(fd.pwrite_all(header, 0), fmt::format("snapshot {}", path));
  return SnapshotWriter(std::move(fd), path, header.size());
}

SnapshotWriter::~SnapshotWriter() {
  if (fd_.valid() && !finished_) ::unlink((path_ + ".partial").c_str());
}

Result<uint64_t> SnapshotWriter::write_section_header(SectionType type, std::string_view name,
                                                      uint16_t flags, uint32_t alignment,
                                                      uint64_t payload_bytes, uint32_t crc) {
  if (finished_) return fail(Errc::InvalidArgument, "snapshot already finished");
  if (name.empty() || name.size() > kMaxSectionNameBytes) {
    return fail(Errc::InvalidArgument,
                fmt::format("snapshot section name '{}': 1 to {} bytes", name,
                            kMaxSectionNameBytes));
  }
  bool singleton_again = is_singleton(type) && written_types_.contains(type);
  if (singleton_again || !written_.emplace(type, std::string(name)).second) {
    return fail(Errc::InvalidArgument,
                fmt::format("snapshot: a second {} section '{}'", section_type_name(type), name));
  }
  written_types_.insert(type);

  ByteWriter out;
  out.put(kSectionTag);
  out.put(static_cast<uint16_t>(type));
  out.put(flags);
  out.put(alignment);
  out.put(static_cast<uint16_t>(name.size()));
  out.put(uint16_t{0});
  out.put(payload_bytes);
  out.put(crc);
  out.put(uint32_t{0});
  uint32_t header_crc = snapshot_crc32(out.data());
  header_crc = snapshot_crc32(std::as_bytes(std::span(name)), header_crc);
  out.put(header_crc);
  out.put_string(name);
  uint64_t payload_offset = align_up(offset_ + out.data().size(), alignment);
  out.data().resize(payload_offset - offset_);  // zero padding
  TRY_CONTEXT(fd_.pwrite_all(out.data(), offset_), fmt::format("snapshot {}", path_));
  ++sections_;
  return payload_offset;
}

Result<void> SnapshotWriter::add(SectionType type, std::string_view name,
                                 std::span<const std::byte> payload, uint16_t flags) {
  if (!(flags & kSectionLazy) && payload.size() > kMaxEagerPayloadBytes) {
    return fail(Errc::OutOfRange, fmt::format("snapshot section '{}': {} bytes is over {}", name,
                                              payload.size(), kMaxEagerPayloadBytes));
  }
  uint64_t payload_offset =
      TRY(write_section_header(type, name, flags, 1, payload.size(), snapshot_crc32(payload)));
  TRY_CONTEXT(fd_.pwrite_all(payload, payload_offset), fmt::format("snapshot {}", path_));
  offset_ = payload_offset + payload.size();
  return ok();
}

Result<void> SnapshotWriter::add_file_contents(SectionType type, std::string_view name,
                                               const Fd& source, uint64_t length) {
  Mmap mapping;
  if (length > 0) mapping = TRY(Mmap::file(source, length, 0, PROT_READ, MAP_SHARED));
  std::vector<memory::ByteRange> populated =
      TRY_CONTEXT(memory::file_data_ranges(source, length, kPageBytes),
                  fmt::format("snapshot {}: guest memory", path_));
  return add_memory_contents(type, name, mapping.bytes(), populated);
}

// Guest RAM the guest never touched (or gave back through the balloon) is
// outside populated and is never read: reading it would allocate it (a read
// fault fills a shmem hole, and maps the zero page into anonymous memory).
// Inside, pages of zeros are skipped as well, so the snapshot is as sparse
// as the guest's memory and a restore maps zero pages for the rest.
Result<void> SnapshotWriter::add_memory_contents(SectionType type, std::string_view name,
                                                 std::span<const std::byte> memory,
                                                 std::span<const memory::ByteRange> populated) {
  if (memory.size() % kPageBytes != 0) {
    return fail(Errc::InvalidArgument,
                fmt::format("snapshot {}: {} bytes of memory is not whole pages", path_,
                            memory.size()));
  }
  uint64_t position = 0;
  for (const memory::ByteRange& range : populated) {
    if (range.begin < position || range.end < range.begin || range.end > memory.size() ||
        range.begin % kPageBytes != 0 || range.end % kPageBytes != 0) {
      return fail(Errc::InvalidArgument,
                  fmt::format("snapshot {}: populated range {:#x}-{:#x} is not in order, page "
                              "aligned and inside {} bytes of memory",
                              path_, range.begin, range.end, memory.size()));
    }
    position = range.end;
  }
  uint32_t crc = snapshot_crc32({});
  position = 0;
  for (const memory::ByteRange& range : populated) {
    crc = crc32_of_zeros(crc, range.begin - position);
    crc = snapshot_crc32(memory.subspan(range.begin, range.end - range.begin), crc);
    position = range.end;
  }
  crc = crc32_of_zeros(crc, memory.size() - position);
  const uint64_t payload_offset =
      TRY(write_section_header(type, name, kSectionLazy, kPageBytes, memory.size(), crc));

  auto is_zero = [](std::span<const std::byte> page) {
    return std::all_of(page.begin(), page.end(), [](std::byte b) { return b == std::byte{0}; });
  };
  // Runs of pages that hold data, written one pwrite each.
  uint64_t run_start = 0;
  uint64_t run_end = 0;
  auto flush = [&]() -> Result<void> {
    if (run_end > run_start) {
      TRY_CONTEXT(fd_.pwrite_all(memory.subspan(run_start, run_end - run_start),
                                 payload_offset + run_start),
                  fmt::format("snapshot {}", path_));
    }
    return ok();
  };
  for (const memory::ByteRange& range : populated) {
    for (uint64_t page = range.begin; page < range.end; page += kPageBytes) {
      if (is_zero(memory.subspan(page, kPageBytes))) continue;
      if (page != run_end) {
        TRY(flush());
        run_start = page;
      }
      run_end = page + kPageBytes;
    }
  }
  TRY(flush());
  offset_ = payload_offset + memory.size();
  return ok();
}

Result<void> SnapshotWriter::finish() {
  ByteWriter end;
  end.put(sections_);
  end.put(offset_);
  TRY(add(SectionType::End, "end", end.data()));
  if (::fdatasync(fd_.get()) < 0) return fail_errno(fmt::format("fdatasync {}.partial", path_));
  if (::rename((path_ + ".partial").c_str(), path_.c_str()) < 0) {
    return fail_errno(fmt::format("rename {}.partial to {}", path_, path_));
  }
  finished_ = true;
  return ok();
}

// ---- SnapshotReader ----

Result<SnapshotReader> SnapshotReader::open(const std::string& path) {
  Fd fd = TRY(Fd::open(path, O_RDONLY));
  return from_fd(std::move(fd), path);
}

Result<SnapshotReader> SnapshotReader::from_fd(Fd fd, std::string name) {
  SnapshotReader reader(std::move(fd), std::move(name));
  TRY(reader.parse());
  return reader;
}

Result<void> SnapshotReader::parse() {
  auto error = [this](Errc code, std::string_view problem) {
    return fail(code, fmt::format("snapshot {}: {}", name_, problem));
  };
  uint64_t file_bytes = TRY(fd_.size_bytes());
  if (file_bytes < kHeaderBytes) {
    return error(Errc::Corrupt, fmt::format("truncated: {} bytes, shorter than the {}-byte header",
                                            file_bytes, kHeaderBytes));
  }
  std::array<std::byte, kHeaderBytes> raw{};
  TRY(fd_.pread_all(raw, 0));
  ByteReader header(raw);
  auto magic = TRY(header.get<Magic>("header magic"));
  if (magic != kSnapshotMagic) return error(Errc::Corrupt, "not a Keel snapshot (bad magic)");
  version_ = TRY(header.get<uint32_t>("header version"));
  if (version_ < kOldestSnapshotFormatVersion || version_ > kSnapshotFormatVersion) {
    return error(Errc::Unsupported,
                 fmt::format("format version {}; this Keel reads versions {} to {}", version_,
                             kOldestSnapshotFormatVersion, kSnapshotFormatVersion));
  }
  auto header_bytes = TRY(header.get<uint32_t>("header length"));
  if (header_bytes != kHeaderBytes) {
    return error(Errc::Corrupt, fmt::format("header length {} (version {} has {})", header_bytes,
                                            version_, kHeaderBytes));
  }
  host_.vendor = TRY(header.get<Vendor>("header vendor"));
  host_.signature = TRY(header.get<uint32_t>("header signature"));
  host_.features = TRY(header.get<FeatureWords>("header features"));
  auto flags = TRY(header.get<uint32_t>("header flags"));
  auto reserved = TRY(header.get<uint64_t>("header reserved"));
  auto crc = TRY(header.get<uint32_t>("header crc"));
  if (crc != snapshot_crc32(std::span(raw).first(kHeaderCrcOffset))) {
    return error(Errc::Corrupt, "header checksum mismatch");
  }
  if (flags != 0 || reserved != 0) {
    return error(Errc::Corrupt, fmt::format("header flags {:#x} / reserved {:#x} must be zero",
                                            flags, reserved));
  }

  uint64_t offset = kHeaderBytes;
  std::set<std::pair<SectionType, std::string>> seen;
  std::set<SectionType> seen_types;
  while (true) {
    if (offset == file_bytes) {
      std::string after = sections_.empty() ? "the header" : sections_.back().label();
      return error(Errc::Corrupt, fmt::format("truncated: no end section after {}", after));
    }
    SectionInfo section = TRY(parse_section(offset, file_bytes));
    offset = section.payload_offset + section.payload_bytes;
    if (section.type == SectionType::End) {
      std::vector<std::byte> payload = TRY(this->payload(section));
      ByteReader end(payload);
      auto count = TRY(end.get<uint64_t>("end section count"));
      auto end_offset = TRY(end.get<uint64_t>("end section offset"));
      if (count != sections_.size() || end_offset != section.header_offset) {
        return error(Errc::Corrupt,
                     fmt::format("end section says {} sections ending at {}, file has {} at {}",
                                 count, end_offset, sections_.size(), section.header_offset));
      }
      if (offset != file_bytes) {
        return error(Errc::Corrupt,
                     fmt::format("{} bytes after the end section", file_bytes - offset));
      }
      break;
    }
    bool singleton_again = is_singleton(section.type) && seen_types.contains(section.type);
    if (singleton_again || !seen.emplace(section.type, section.name).second) {
      return error(Errc::Corrupt, fmt::format("duplicate {} at offset {}", section.label(),
                                              section.header_offset));
    }
    seen_types.insert(section.type);
    if (sections_.size() == kMaxSections) {
      return error(Errc::Corrupt, fmt::format("more than {} sections", kMaxSections));
    }
    sections_.push_back(std::move(section));
  }
  return check_required();
}

Result<SectionInfo> SnapshotReader::parse_section(uint64_t offset, uint64_t file_bytes) const {
  auto error = [&](std::string_view what, std::string_view problem) {
    return fail(Errc::Corrupt,
                fmt::format("snapshot {}: {} at offset {}: {}", name_, what, offset, problem));
  };
  std::string what = "section header";
  if (file_bytes - offset < kSectionHeaderBytes) {
    return error(what, fmt::format("truncated: {} of {} header bytes", file_bytes - offset,
                                   kSectionHeaderBytes));
  }
  std::array<std::byte, kSectionHeaderBytes> raw{};
  TRY(fd_.pread_all(raw, offset));
  ByteReader header(raw);
  auto tag = TRY(header.get<Tag>("section tag"));
  if (tag != kSectionTag) return error(what, "bad section tag");
  SectionInfo section;
  auto type = TRY(header.get<uint16_t>("section type"));
  section.type = static_cast<SectionType>(type);
  section.flags = TRY(header.get<uint16_t>("section flags"));
  section.alignment = TRY(header.get<uint32_t>("section alignment"));
  auto name_bytes = TRY(header.get<uint16_t>("section name length"));
  auto reserved16 = TRY(header.get<uint16_t>("section reserved"));
  section.payload_bytes = TRY(header.get<uint64_t>("section length"));
  section.payload_crc = TRY(header.get<uint32_t>("section crc"));
  auto reserved32 = TRY(header.get<uint32_t>("section reserved"));
  auto header_crc = TRY(header.get<uint32_t>("section header crc"));
  if (name_bytes == 0 || name_bytes > kMaxSectionNameBytes) {
    return error(what, fmt::format("name length {} (1 to {})", name_bytes, kMaxSectionNameBytes));
  }
  if (file_bytes - offset - kSectionHeaderBytes < name_bytes) {
    return error(what, "truncated in the section name");
  }
  section.name.resize(name_bytes);
  TRY(fd_.pread_all(std::as_writable_bytes(std::span(section.name)),
                    offset + kSectionHeaderBytes));
  uint32_t expected_crc = snapshot_crc32(std::span(raw).first(kSectionHeaderCrcOffset));
  expected_crc = snapshot_crc32(std::as_bytes(std::span(section.name)), expected_crc);
  if (header_crc != expected_crc) return error(what, "header checksum mismatch");

  section.header_offset = offset;
  what = section.label();
  if (!is_known(type) && !(section.flags & kSectionOptional)) {
    return error(what, "unknown section type, and not marked optional");
  }
  if ((section.flags & ~kKnownSectionFlags) != 0 || reserved16 != 0 || reserved32 != 0) {
    return error(what, fmt::format("unknown flags {:#x} or non-zero reserved fields",
                                   section.flags));
  }
  if (section.alignment == 0 || section.alignment > kMaxAlignment ||
      (section.alignment & (section.alignment - 1)) != 0) {
    return error(what, fmt::format("alignment {} is not a power of two up to {}",
                                   section.alignment, kMaxAlignment));
  }
  uint64_t name_end = offset + kSectionHeaderBytes + name_bytes;
  section.payload_offset = align_up(name_end, section.alignment);
  if (section.payload_offset > file_bytes ||
      section.payload_bytes > file_bytes - section.payload_offset) {
    return error(what, fmt::format("truncated: {} payload bytes at offset {}, the file has {}",
                                   section.payload_bytes, section.payload_offset, file_bytes));
  }
  bool lazy = section.flags & kSectionLazy;
  if (!lazy && section.payload_bytes > kMaxEagerPayloadBytes) {
    return error(what, fmt::format("length {} is over the {} a non-lazy section may have",
                                   section.payload_bytes, kMaxEagerPayloadBytes));
  }
  if (section.type == SectionType::End && section.payload_bytes != kEndPayloadBytes) {
    return error(what, fmt::format("length {} (the end section has {})", section.payload_bytes,
                                   kEndPayloadBytes));
  }
  std::vector<std::byte> padding(section.payload_offset - name_end);
  TRY(fd_.pread_all(padding, name_end));
  if (std::any_of(padding.begin(), padding.end(), [](std::byte b) { return b != std::byte{0}; })) {
    return error(what, "non-zero padding before the payload");
  }
  if (!lazy) TRY(verify(section));
  return section;
}

Result<void> SnapshotReader::check_required() const {
  for (SectionType type : {SectionType::MachineConfig, SectionType::Vm, SectionType::Memory,
                           SectionType::Vcpu}) {
    if (all(type).empty()) {
      return fail(Errc::Corrupt, fmt::format("snapshot {}: no {} section", name_,
                                             section_type_name(type)));
    }
  }
  return ok();
}

const SectionInfo* SnapshotReader::find(SectionType type, std::string_view name) const {
  for (const SectionInfo& section : sections_) {
    if (section.type == type && section.name == name) return &section;
  }
  return nullptr;
}

std::vector<const SectionInfo*> SnapshotReader::all(SectionType type) const {
  std::vector<const SectionInfo*> result;
  for (const SectionInfo& section : sections_) {
    if (section.type == type) result.push_back(&section);
  }
  return result;
}

Result<std::vector<std::byte>> SnapshotReader::payload(const SectionInfo& section) const {
  if (section.payload_bytes > kMaxEagerPayloadBytes) {
    return fail(Errc::OutOfRange, fmt::format("snapshot {}: {} is too large to read whole",
                                              name_, section.label()));
  }
  std::vector<std::byte> data(section.payload_bytes);
  TRY_CONTEXT(fd_.pread_all(data, section.payload_offset),
              fmt::format("snapshot {}: {}", name_, section.label()));
  if (snapshot_crc32(data) != section.payload_crc) {
    return fail(Errc::Corrupt,
                fmt::format("snapshot {}: {}: payload checksum mismatch", name_, section.label()));
  }
  return data;
}

Result<void> SnapshotReader::verify(const SectionInfo& section) const {
  std::vector<std::byte> chunk(std::min<uint64_t>(section.payload_bytes, kCrcChunkBytes));
  uint32_t crc = snapshot_crc32({});
  for (uint64_t done = 0; done < section.payload_bytes;) {
    auto count =
        static_cast<size_t>(std::min<uint64_t>(chunk.size(), section.payload_bytes - done));
    std::span<std::byte> part(chunk.data(), count);
    TRY_CONTEXT(fd_.pread_all(part, section.payload_offset + done),
                fmt::format("snapshot {}: {}", name_, section.label()));
    crc = snapshot_crc32(part, crc);
    done += count;
  }
  if (crc != section.payload_crc) {
    return fail(Errc::Corrupt,
                fmt::format("snapshot {}: {} at offset {}: payload checksum mismatch", name_,
                            section.label(), section.header_offset));
  }
  return ok();
}

}  // namespace keel::migration
