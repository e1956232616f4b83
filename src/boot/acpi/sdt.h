// Building blocks shared by every ACPI table: a little-endian byte writer,
// the System Description Table header, checksums and Generic Address
// Structures. Spec: ACPI 6.4 sections 5.2.3.2 (Generic Address Structure),
// 5.2.6 (System Description Table Header) and 5.2.5.3 (RSDP checksums).
// Implemented: what Keel's tables use. Missing: nothing known.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

namespace keel::boot::acpi {

using Bytes = std::vector<std::byte>;

// Identification written into every table header (ACPI 6.4 section 5.2.6). The
// OEM ID is 6 characters and the OEM table ID 8, both space padded.
inline constexpr std::string_view kOemId = "KEEL  ";
inline constexpr std::string_view kOemTableId = "KEELVMM ";
inline constexpr uint32_t kOemRevision = 1;
inline constexpr std::string_view kCreatorId = "KEEL";
inline constexpr uint32_t kCreatorRevision = 1;

inline constexpr size_t kSdtHeaderSize = 36;
inline constexpr size_t kSdtLengthOffset = 4;
inline constexpr size_t kSdtChecksumOffset = 9;

// Appends little-endian fields to a byte vector; tables are built with it.
class ByteWriter {
 public:
  void u8(uint8_t value) { bytes_.push_back(std::byte{value}); }
  void u16(uint16_t value) { put_le(value, 2); }
  void u32(uint32_t value) { put_le(value, 4); }
  void u64(uint64_t value) { put_le(value, 8); }
  void zeros(size_t count) { bytes_.insert(bytes_.end(), count, std::byte{0}); }
  void append(std::span<const std::byte> data) {
    bytes_.insert(bytes_.end(), data.begin(), data.end());
  }
  // Exactly the characters of text; callers pass fixed-width fields.
  void ascii(std::string_view text);

  // Overwrites an already written little-endian field.
  void patch_u32(size_t offset, uint32_t value);
  void patch_u8(size_t offset, uint8_t value) { bytes_.at(offset) = std::byte{value}; }

  size_t size() const { return bytes_.size(); }
  const Bytes& bytes() const& { return bytes_; }
  Bytes&& bytes() && { return std::move(bytes_); }

 private:
  void put_le(uint64_t value, int width);

  Bytes bytes_;
};

// The value that makes the byte sum of data plus itself zero (mod 256).
uint8_t checksum_for(std::span<const std::byte> data);

// The byte sum of data (mod 256): 0 for a correctly checksummed table.
uint8_t byte_sum(std::span<const std::byte> data);

// A table that starts with the 36-byte System Description Table Header
// (ACPI 6.4 section 5.2.6). Append the body through writer(); finish() fills
// in the length and the checksum.
class SdtBuilder {
 public:
  // signature: the 4-character table signature ("FACP", "APIC", ...).
  SdtBuilder(std::string_view signature, uint8_t revision);

  ByteWriter& writer() { return writer_; }
  Bytes finish() &&;

 private:
  ByteWriter writer_;
};

// Generic Address Structure (ACPI 6.4 section 5.2.3.2).
enum class AddressSpaceId : uint8_t { SystemMemory = 0, SystemIo = 1 };
enum class AccessSize : uint8_t { Undefined = 0, Byte = 1, Word = 2, Dword = 3, Qword = 4 };

struct GenericAddress {
  AddressSpaceId space_id = AddressSpaceId::SystemMemory;
  uint8_t bit_width = 0;
  uint8_t bit_offset = 0;
  AccessSize access_size = AccessSize::Undefined;
  uint64_t address = 0;  // 0 with everything else 0: "not present"
};

inline constexpr size_t kGenericAddressSize = 12;

// An 8-bit register at an I/O port, accessed a byte at a time.
GenericAddress io_port_u8(uint16_t port);

void write_generic_address(ByteWriter& writer, const GenericAddress& address);

}  // namespace keel::boot::acpi
