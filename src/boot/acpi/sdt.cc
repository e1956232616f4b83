// System Description Table helpers. Spec: ACPI 6.4 sections 5.2.3.2 and
// 5.2.6. Implemented: header, checksum, GAS. Missing: nothing known.
#include "boot/acpi/sdt.h"

#include "base/check.h"

namespace keel::boot::acpi {

void ByteWriter::ascii(std::string_view text) {
  for (char c : text) u8(static_cast<uint8_t>(c));
}

void ByteWriter::put_le(uint64_t value, int width) {
  for (int i = 0; i < width; ++i) u8(static_cast<uint8_t>(value >> (8 * i)));
}

void ByteWriter::patch_u32(size_t offset, uint32_t value) {
  CHECK(offset + 4 <= bytes_.size(), "patch_u32 past the end");
  for (size_t i = 0; i < 4; ++i)
    bytes_[offset + i] = std::byte{static_cast<uint8_t>(value >> (8 * i))};
}

uint8_t byte_sum(std::span<const std::byte> data) {
  uint8_t sum = 0;
  for (std::byte b : data) sum = static_cast<uint8_t>(sum + static_cast<uint8_t>(b));
  return sum;
}

uint8_t checksum_for(std::span<const std::byte> data) {
  return static_cast<uint8_t>(0x100 - byte_sum(data));
}

SdtBuilder::SdtBuilder(std::string_view signature, uint8_t revision) {
  CHECK(signature.size() == 4, "an ACPI table signature has 4 characters");
  writer_.ascii(signature);
  writer_.u32(0);  // length, filled in by finish()
  writer_.u8(revision);
  writer_.u8(0);  // checksum, filled in by finish()
  writer_.ascii(kOemId);
  writer_.ascii(kOemTableId);
  writer_.u32(kOemRevision);
  writer_.ascii(kCreatorId);
  writer_.u32(kCreatorRevision);
  CHECK(writer_.size() == kSdtHeaderSize, "SDT header size");
}

Bytes SdtBuilder::finish() && {
  CHECK(writer_.size() <= UINT32_MAX, "ACPI table larger than 4 GiB");
  writer_.patch_u32(kSdtLengthOffset, static_cast<uint32_t>(writer_.size()));
  // The checksum field is still 0 here, so summing everything includes it.
  writer_.patch_u8(kSdtChecksumOffset, checksum_for(writer_.bytes()));
  return std::move(writer_).bytes();
}

GenericAddress io_port_u8(uint16_t port) {
  return GenericAddress{.space_id = AddressSpaceId::SystemIo,
                        .bit_width = 8,
                        .bit_offset = 0,
                        .access_size = AccessSize::Byte,
                        .address = port};
}

void write_generic_address(ByteWriter& writer, const GenericAddress& address) {
  writer.u8(static_cast<uint8_t>(address.space_id));
  writer.u8(address.bit_width);
  writer.u8(address.bit_offset);
  writer.u8(static_cast<uint8_t>(address.access_size));
  writer.u64(address.address);
}

}  // namespace keel::boot::acpi
