// AML emitter. Spec: ACPI 6.4 chapter 20 (AML grammar) and section 6.4
// (resource data types). Implemented and missing: see aml.h.
#include "boot/acpi/aml.h"

#include "base/check.h"

namespace keel::boot::acpi::aml {
namespace {

// Opcodes and prefixes, ACPI 6.4 section 20.3 (AML byte stream encoding).
constexpr uint8_t kZeroOp = 0x00;
constexpr uint8_t kOneOp = 0x01;
constexpr uint8_t kNameOp = 0x08;
constexpr uint8_t kBytePrefix = 0x0a;
constexpr uint8_t kWordPrefix = 0x0b;
constexpr uint8_t kDWordPrefix = 0x0c;
constexpr uint8_t kStringPrefix = 0x0d;
constexpr uint8_t kQWordPrefix = 0x0e;
constexpr uint8_t kScopeOp = 0x10;
constexpr uint8_t kBufferOp = 0x11;
constexpr uint8_t kPackageOp = 0x12;
constexpr uint8_t kVarPackageOp = 0x13;
constexpr uint8_t kMethodOp = 0x14;
constexpr uint8_t kDualNamePrefix = 0x2e;
constexpr uint8_t kMultiNamePrefix = 0x2f;
constexpr uint8_t kExtOpPrefix = 0x5b;
constexpr uint8_t kOpRegionOp = 0x80;  // after kExtOpPrefix
constexpr uint8_t kFieldOp = 0x81;     // after kExtOpPrefix
constexpr uint8_t kDeviceOp = 0x82;    // after kExtOpPrefix
constexpr uint8_t kStoreOp = 0x70;
constexpr uint8_t kAndOp = 0x7b;
constexpr uint8_t kNotifyOp = 0x86;
constexpr uint8_t kIfOp = 0xa0;
constexpr uint8_t kRootChar = '\\';
constexpr uint8_t kParentPrefixChar = '^';
constexpr uint8_t kNullName = 0x00;
constexpr uint8_t kLocal0Op = 0x60;
constexpr uint8_t kArg0Op = 0x68;
constexpr uint8_t kReturnOp = 0xa4;

// Resource descriptor tags, ACPI 6.4 sections 6.4.2 (small) and 6.4.3 (large).
constexpr uint8_t kIrqNoFlagsTag = 0x22;         // small item 0x04, length 2
constexpr uint8_t kIoPortTag = 0x47;             // small item 0x08, length 7
constexpr uint8_t kEndTag = 0x79;                // small item 0x0f, length 1
constexpr uint8_t kMemory32FixedTag = 0x86;      // large item 0x06
constexpr uint8_t kDWordAddressTag = 0x87;       // large item 0x07
constexpr uint8_t kWordAddressTag = 0x88;        // large item 0x08
constexpr uint8_t kExtendedInterruptTag = 0x89;  // large item 0x09
constexpr uint8_t kQWordAddressTag = 0x8a;       // large item 0x0a

void put(Bytes& out, uint8_t value) {
  out.push_back(std::byte{value});
}

void put_le(Bytes& out, uint64_t value, int width_bytes) {
  for (int i = 0; i < width_bytes; ++i) put(out, static_cast<uint8_t>(value >> (8 * i)));
}

void append(Bytes& out, const Bytes& more) {
  out.insert(out.end(), more.begin(), more.end());
}

bool is_lead_name_char(char c) {
  return (c >= 'A' && c <= 'Z') || c == '_';
}
bool is_name_char(char c) {
  return is_lead_name_char(c) || (c >= '0' && c <= '9');
}
bool is_hex_digit(char c) {
  return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F');
}
uint32_t hex_value(char c) {
  return c <= '9' ? uint32_t(c - '0') : uint32_t(c - 'A' + 10);
}

// A term that is an opcode, a PkgLength and a body: Scope, Device, Method...
Bytes op_with_body(std::initializer_list<uint8_t> opcode, const Bytes& body) {
  Bytes out;
  for (uint8_t byte : opcode) put(out, byte);
  append(out, with_pkg_length(body));
  return out;
}

// A term that is an opcode and its operands, no PkgLength: Store, Notify...
Bytes op_with_operands(uint8_t opcode, std::initializer_list<const Bytes*> operands) {
  Bytes out;
  put(out, opcode);
  for (const Bytes* operand : operands) append(out, *operand);
  return out;
}

}  // namespace

bool is_valid_name_seg(std::string_view segment) {
  if (segment.empty() || segment.size() > 4 || !is_lead_name_char(segment[0])) return false;
  for (char c : segment.substr(1)) {
    if (!is_name_char(c)) return false;
  }
  return true;
}

Bytes name_seg(std::string_view segment) {
  CHECK(is_valid_name_seg(segment), "invalid AML NameSeg");
  Bytes out;
  for (char c : segment) put(out, static_cast<uint8_t>(c));
  // ACPI 6.4 section 20.2.2: names shorter than 4 characters are padded
  // with trailing underscores.
  while (out.size() < 4) put(out, '_');
  return out;
}

Bytes name_string(std::string_view path) {
  Bytes out;
  if (!path.empty() && path[0] == '\\') {
    put(out, kRootChar);
    path.remove_prefix(1);
  } else {
    while (!path.empty() && path[0] == '^') {
      put(out, kParentPrefixChar);
      path.remove_prefix(1);
    }
  }
  std::vector<std::string_view> segments;
  while (!path.empty()) {
    size_t dot = path.find('.');
    segments.push_back(path.substr(0, dot));
    if (dot == std::string_view::npos) break;
    path.remove_prefix(dot + 1);
    CHECK(!path.empty(), "AML name path ends with '.'");
  }
  CHECK(segments.size() <= 255, "AML name path with more than 255 segments");
  if (segments.empty()) {
    put(out, kNullName);
  } else if (segments.size() == 2) {
    put(out, kDualNamePrefix);
  } else if (segments.size() > 2) {
    put(out, kMultiNamePrefix);
    put(out, static_cast<uint8_t>(segments.size()));
  }
  for (std::string_view segment : segments) append(out, name_seg(segment));
  return out;
}

Bytes encode_pkg_length(uint32_t length) {
  CHECK(length <= kMaxPkgLength, "AML PkgLength too large");
  Bytes out;
  // ACPI 6.4 section 20.2.4: one byte holds 6 bits. Longer encodings put the
  // count of following bytes in bits 7-6 of the lead byte, the low 4 bits of
  // the length in its bits 3-0, and the rest 8 bits per following byte.
  if (length <= 0x3f) {
    put(out, static_cast<uint8_t>(length));
    return out;
  }
  int follow_count = length <= 0xfff ? 1 : length <= 0xfffff ? 2 : 3;
  put(out, static_cast<uint8_t>((follow_count << 6) | (length & 0x0f)));
  for (int i = 0; i < follow_count; ++i) put(out, static_cast<uint8_t>(length >> (4 + 8 * i)));
  return out;
}

Bytes with_pkg_length(const Bytes& body) {
  // The encoded length includes the PkgLength bytes, so the encoding size
  // depends on itself: take the first size whose limit covers the total.
  constexpr uint32_t kLimits[] = {0x3f, 0xfff, 0xfffff, kMaxPkgLength};
  for (size_t encoding_size = 1; encoding_size <= 4; ++encoding_size) {
    uint64_t total = uint64_t{body.size()} + encoding_size;
    if (total <= kLimits[encoding_size - 1]) {
      Bytes out = encode_pkg_length(static_cast<uint32_t>(total));
      CHECK(out.size() == encoding_size, "PkgLength encoding size");
      append(out, body);
      return out;
    }
  }
  CHECK(false, "AML object larger than a PkgLength can describe");
  return {};
}

Bytes integer(uint64_t value) {
  Bytes out;
  if (value == 0) {
    put(out, kZeroOp);
  } else if (value == 1) {
    put(out, kOneOp);
  } else if (value <= UINT8_MAX) {
    put(out, kBytePrefix);
    put_le(out, value, 1);
  } else if (value <= UINT16_MAX) {
    put(out, kWordPrefix);
    put_le(out, value, 2);
  } else if (value <= UINT32_MAX) {
    put(out, kDWordPrefix);
    put_le(out, value, 4);
  } else {
    // Only a definition block of revision 2 or more has 64-bit integers
    // (ACPI 6.4 section 19.6, DefinitionBlock); Keel's DSDT is revision 2.
    put(out, kQWordPrefix);
    put_le(out, value, 8);
  }
  return out;
}

Bytes string(std::string_view text) {
  Bytes out;
  put(out, kStringPrefix);
  for (char c : text) {
    CHECK(c > 0, "AML strings are ASCII without NUL");  // char is signed on x86
    put(out, static_cast<uint8_t>(c));
  }
  put(out, 0);
  return out;
}

Bytes buffer(const Bytes& data) {
  Bytes body = integer(data.size());
  append(body, data);
  return op_with_body({kBufferOp}, body);
}

Bytes package(const std::vector<Bytes>& elements) {
  // PackageOp's NumElements is one byte; VarPackageOp takes an integer.
  Bytes body;
  uint8_t opcode = kPackageOp;
  if (elements.size() <= 255) {
    put(body, static_cast<uint8_t>(elements.size()));
  } else {
    opcode = kVarPackageOp;
    body = integer(elements.size());
  }
  for (const Bytes& element : elements) append(body, element);
  return op_with_body({opcode}, body);
}

bool is_valid_eisa_id(std::string_view id) {
  if (id.size() != 7) return false;
  for (char c : id.substr(0, 3)) {
    if (c < 'A' || c > 'Z') return false;
  }
  for (char c : id.substr(3)) {
    if (!is_hex_digit(c)) return false;
  }
  return true;
}

uint32_t eisa_id(std::string_view id) {
  CHECK(is_valid_eisa_id(id), "invalid EISA ID");
  // ACPI 6.4 section 19.6, EISAID: the three letters compressed to
  // 5 bits each ('A' = 1) in a big-endian 16-bit vendor field, then the
  // four hex digits as a big-endian 16-bit product number; the four bytes
  // in that order make the (little-endian) integer.
  uint32_t vendor =
      (uint32_t(id[0] - '@') << 10) | (uint32_t(id[1] - '@') << 5) | uint32_t(id[2] - '@');
  uint32_t product = 0;
  for (char c : id.substr(3)) product = (product << 4) | hex_value(c);
  return (vendor >> 8) | ((vendor & 0xff) << 8) | ((product >> 8) << 16) | ((product & 0xff) << 24);
}

Bytes name(std::string_view path, const Bytes& object) {
  Bytes out;
  put(out, kNameOp);
  append(out, name_string(path));
  append(out, object);
  return out;
}

Bytes scope(std::string_view path, const std::vector<Bytes>& terms) {
  Bytes body = name_string(path);
  append(body, concat(terms));
  return op_with_body({kScopeOp}, body);
}

Bytes device(std::string_view path, const std::vector<Bytes>& terms) {
  Bytes body = name_string(path);
  append(body, concat(terms));
  return op_with_body({kExtOpPrefix, kDeviceOp}, body);
}

Bytes method(std::string_view path, uint8_t arg_count, MethodSerialization serialization,
             const std::vector<Bytes>& terms) {
  CHECK(arg_count <= 7, "AML methods take at most 7 arguments");
  Bytes body = name_string(path);
  // MethodFlags: bits 2-0 ArgCount, bit 3 SerializeFlag, bits 7-4 SyncLevel (0).
  put(body, static_cast<uint8_t>(arg_count | (static_cast<uint8_t>(serialization) << 3)));
  append(body, concat(terms));
  return op_with_body({kMethodOp}, body);
}

Bytes return_value(const Bytes& value) {
  return op_with_operands(kReturnOp, {&value});
}

Bytes arg(uint8_t index) {
  CHECK(index <= 6, "AML has Arg0..Arg6");
  return Bytes{std::byte{static_cast<uint8_t>(kArg0Op + index)}};
}

Bytes local(uint8_t index) {
  CHECK(index <= 7, "AML has Local0..Local7");
  return Bytes{std::byte{static_cast<uint8_t>(kLocal0Op + index)}};
}

Bytes concat(const std::vector<Bytes>& terms) {
  Bytes out;
  for (const Bytes& term : terms) append(out, term);
  return out;
}

Bytes operation_region(std::string_view name, RegionSpace space, uint64_t offset,
                       uint64_t length) {
  Bytes out;
  put(out, kExtOpPrefix);
  put(out, kOpRegionOp);
  append(out, name_string(name));
  put(out, static_cast<uint8_t>(space));
  append(out, integer(offset));
  append(out, integer(length));
  return out;
}

Bytes field(std::string_view region, FieldAccess access, FieldUpdate update,
            const std::vector<FieldUnit>& units) {
  Bytes body = name_string(region);
  put(body, static_cast<uint8_t>(static_cast<uint8_t>(access) |
                                 (static_cast<uint8_t>(update) << 5)));
  for (const FieldUnit& unit : units) {
    // NamedField := NameSeg PkgLength, the PkgLength being the width in
    // bits (section 20.2.5.2), not a byte count.
    CHECK(unit.bits > 0 && unit.bits <= kMaxPkgLength, "AML field width");
    append(body, name_seg(unit.name));
    append(body, encode_pkg_length(unit.bits));
  }
  return op_with_body({kExtOpPrefix, kFieldOp}, body);
}

Bytes reference(std::string_view path) {
  return name_string(path);
}

Bytes store(const Bytes& value, const Bytes& target) {
  return op_with_operands(kStoreOp, {&value, &target});
}

Bytes bitwise_and(const Bytes& left, const Bytes& right) {
  static const Bytes kNoTarget = {std::byte{kNullName}};
  return op_with_operands(kAndOp, {&left, &right, &kNoTarget});
}

Bytes if_then(const Bytes& predicate, const std::vector<Bytes>& terms) {
  Bytes body = predicate;
  append(body, concat(terms));
  return op_with_body({kIfOp}, body);
}

Bytes notify(const Bytes& object, const Bytes& value) {
  return op_with_operands(kNotifyOp, {&object, &value});
}

// ---- Resource templates ----

ResourceTemplate& ResourceTemplate::io(uint16_t min, uint16_t max, uint8_t alignment,
                                       uint8_t length) {
  CHECK(min <= max, "IO descriptor with min > max");
  put(descriptors_, kIoPortTag);
  put(descriptors_, 1);  // Information bit 0: the device decodes 16 address bits
  put_le(descriptors_, min, 2);
  put_le(descriptors_, max, 2);
  put(descriptors_, alignment);
  put(descriptors_, length);
  return *this;
}

ResourceTemplate& ResourceTemplate::irq_no_flags(uint8_t irq) {
  CHECK(irq < 16, "IRQ descriptors name ISA IRQs 0-15");
  // Without the optional flags byte the IRQ is edge-triggered, active high
  // and exclusive (section 6.4.2.1).
  put(descriptors_, kIrqNoFlagsTag);
  put_le(descriptors_, uint16_t{1} << irq, 2);
  return *this;
}

ResourceTemplate& ResourceTemplate::memory32_fixed(MemoryAccess access, uint32_t base,
                                                   uint32_t length) {
  put(descriptors_, kMemory32FixedTag);
  put_le(descriptors_, 9, 2);  // length of the data after the 3-byte header
  put(descriptors_, static_cast<uint8_t>(access));
  put_le(descriptors_, base, 4);
  put_le(descriptors_, length, 4);
  return *this;
}

ResourceTemplate& ResourceTemplate::interrupt(InterruptTrigger trigger, InterruptPolarity polarity,
                                              InterruptSharing sharing, uint32_t gsi) {
  // Flags (section 6.4.3.6): bit 0 consumer, bit 1 edge, bit 2 active low,
  // bit 3 shared; one interrupt number, no resource source.
  uint8_t flags = 1;
  if (trigger == InterruptTrigger::Edge) flags |= 1 << 1;
  if (polarity == InterruptPolarity::ActiveLow) flags |= 1 << 2;
  if (sharing == InterruptSharing::Shared) flags |= 1 << 3;
  put(descriptors_, kExtendedInterruptTag);
  put_le(descriptors_, 2 + 4, 2);
  put(descriptors_, flags);
  put(descriptors_, 1);
  put_le(descriptors_, gsi, 4);
  return *this;
}

void ResourceTemplate::address_space(int width_bytes, SpaceType type, ResourceUsage usage,
                                     uint8_t type_flags, uint64_t min, uint64_t max) {
  CHECK(min <= max, "address space descriptor with min > max");
  uint8_t tag = width_bytes == 2   ? kWordAddressTag
                : width_bytes == 4 ? kDWordAddressTag
                                   : kQWordAddressTag;
  // General flags (section 6.4.3.5.1): bit 0 consumer, bit 1 subtractive
  // decode (no), bit 2 _MIF, bit 3 _MAF. With both fixed, _LEN must be
  // max - min + 1 (section 6.4.3.5, the "fixed size, fixed location" row of
  // the valid combinations); _GRA 0 leaves alignment unconstrained.
  uint8_t general_flags = static_cast<uint8_t>(usage) | (1 << 2) | (1 << 3);
  put(descriptors_, tag);
  put_le(descriptors_, 3 + 5 * width_bytes, 2);
  put(descriptors_, static_cast<uint8_t>(type));
  put(descriptors_, general_flags);
  put(descriptors_, type_flags);
  put_le(descriptors_, 0, width_bytes);    // _GRA
  put_le(descriptors_, min, width_bytes);  // _MIN
  put_le(descriptors_, max, width_bytes);  // _MAX
  put_le(descriptors_, 0, width_bytes);    // _TRA
  // For the full 64-bit range this wraps to 0, which no caller asks for.
  put_le(descriptors_, max - min + 1, width_bytes);  // _LEN
}

ResourceTemplate& ResourceTemplate::word_bus_number(ResourceUsage usage, uint16_t min,
                                                    uint16_t max) {
  address_space(2, SpaceType::BusNumber, usage, 0, min, max);
  return *this;
}

ResourceTemplate& ResourceTemplate::word_io(ResourceUsage usage, uint16_t min, uint16_t max) {
  // I/O type-specific flags (section 6.4.3.5.5): _RNG = 3, the whole range
  // (ISA and non-ISA aliases); no translation.
  address_space(2, SpaceType::Io, usage, 0x03, min, max);
  return *this;
}

namespace {
// Memory type-specific flags (section 6.4.3.5.5): bit 0 _RW, bits 2-1 _MEM,
// bits 4-3 _MTP (0: AddressRangeMemory), bit 5 _TTP (0: TypeStatic).
uint8_t memory_flags(Cacheability cacheability, MemoryAccess access) {
  return static_cast<uint8_t>(static_cast<uint8_t>(access) |
                              (static_cast<uint8_t>(cacheability) << 1));
}
}  // namespace

ResourceTemplate& ResourceTemplate::dword_memory(ResourceUsage usage, Cacheability cacheability,
                                                 MemoryAccess access, uint32_t min, uint32_t max) {
  address_space(4, SpaceType::Memory, usage, memory_flags(cacheability, access), min, max);
  return *this;
}

ResourceTemplate& ResourceTemplate::qword_memory(ResourceUsage usage, Cacheability cacheability,
                                                 MemoryAccess access, uint64_t min, uint64_t max) {
  address_space(8, SpaceType::Memory, usage, memory_flags(cacheability, access), min, max);
  return *this;
}

Bytes ResourceTemplate::bytes() const {
  Bytes out = descriptors_;
  put(out, kEndTag);
  // Section 6.4.2.9: the checksum byte makes the sum of every byte of the
  // template, End Tag included, zero.
  uint8_t sum = 0;
  for (std::byte b : out) sum = static_cast<uint8_t>(sum + static_cast<uint8_t>(b));
  put(out, static_cast<uint8_t>(0x100 - sum));
  return out;
}

Bytes ResourceTemplate::to_buffer() const {
  return buffer(bytes());
}

}  // namespace keel::boot::acpi::aml
