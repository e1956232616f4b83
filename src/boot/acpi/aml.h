// A small AML (ACPI Machine Language) emitter: each function returns the
// encoded bytes of one AML term, and terms nest by value, e.g.
//
//   scope("\\_SB", {device("COM1", {name("_HID", integer(eisa_id("PNP0501"))),
//                                   name("_UID", integer(1))})})
//
// Spec: ACPI 6.4 chapter 20 (AML grammar: 20.2.2 name objects, 20.2.3 data
// objects, 20.2.4 package length, 20.2.5 term objects) and section 6.4
// (resource data types for ACPI, the bytes inside a ResourceTemplate).
// Implemented: NameSeg/NameString, PkgLength (1-4 bytes), integers in their
// smallest encoding, strings, buffers, packages, Name, Scope, Device, Method,
// Return, ArgN/LocalN, EISAID, OperationRegion and Field (named units only),
// Store, And, If, Notify and names as operands (what the GED's _EVT needs);
// resource templates with IO, IRQNoFlags, Memory32Fixed, extended Interrupt,
// Word/DWord/QWord address spaces and the checksummed End Tag.
// Missing: Else, While, the arithmetic and logical opcodes beyond And,
// Offset/AccessAs in field lists (add them when PCI hotplug needs them).
//
// The inputs are Keel's own constants (names, IDs, ranges), so a malformed
// one is a bug and CHECK-fails; callers that build names at run time can
// test them first with is_valid_name_seg()/is_valid_eisa_id().
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace keel::boot::acpi {

using Bytes = std::vector<std::byte>;

namespace aml {

// Largest value a PkgLength can encode (4 bytes: 4 + 3 * 8 bits).
inline constexpr uint32_t kMaxPkgLength = 0x0fffffff;

// ---- Names (ACPI 6.4 section 20.2.2) ----

// A NameSeg is 1 to 4 characters: a lead character A-Z or '_', then A-Z,
// 0-9 or '_'. Shorter segments are padded with '_' ("_S5" -> "_S5_").
bool is_valid_name_seg(std::string_view segment);
// The 4 bytes of a NameSeg, padded.
Bytes name_seg(std::string_view segment);
// A NameString: an optional root ('\') or parent ('^'...) prefix, then
// NameSegs separated by '.': "\\_SB.PCI0", "^PCI0", "_HID", "\\_S5".
// Encodes with NullName, DualNamePrefix or MultiNamePrefix as the segment
// count requires.
Bytes name_string(std::string_view path);

// ---- Package length (ACPI 6.4 section 20.2.4) ----

// The raw encoding of a PkgLength value. `length` counts the encoding bytes
// themselves: up to 63 is one byte, then 2, 3 or 4 bytes up to 4095,
// 1048575 and kMaxPkgLength.
Bytes encode_pkg_length(uint32_t length);
// PkgLength followed by body, choosing the smallest encoding that covers
// itself plus the body.
Bytes with_pkg_length(const Bytes& body);

// ---- Data objects (ACPI 6.4 section 20.2.3) ----

// ZeroOp, OneOp, or the smallest of Byte/Word/DWord/QWord prefixes.
Bytes integer(uint64_t value);
// StringPrefix, the ASCII characters (no NUL inside), NullChar.
Bytes string(std::string_view text);
// BufferOp with the size as an integer and the bytes.
Bytes buffer(const Bytes& data);
// PackageOp with its element count (VarPackageOp above 255 elements).
// Elements are data objects or name strings.
Bytes package(const std::vector<Bytes>& elements);

// The compressed EISA ID of a PnP ID like "PNP0A08" (three letters A-Z and
// four hex digits), as the 32-bit integer ASL's EISAID() produces. Emit it
// with integer(eisa_id(...)).
bool is_valid_eisa_id(std::string_view id);
uint32_t eisa_id(std::string_view id);

// ---- Named objects and namespace modifiers (ACPI 6.4 section 20.2.5) ----

// Name(path, object)
Bytes name(std::string_view path, const Bytes& object);
// Scope(path) { terms }
Bytes scope(std::string_view path, const std::vector<Bytes>& terms);
// Device(path) { terms }
Bytes device(std::string_view path, const std::vector<Bytes>& terms);

enum class MethodSerialization : uint8_t { NotSerialized = 0, Serialized = 1 };
// Method(path, arg_count, serialization) { terms }; arg_count 0..7.
Bytes method(std::string_view path, uint8_t arg_count, MethodSerialization serialization,
             const std::vector<Bytes>& terms);
// Return(value)
Bytes return_value(const Bytes& value);
// Arg0..Arg6 and Local0..Local7.
Bytes arg(uint8_t index);
Bytes local(uint8_t index);

// The terms one after another.
Bytes concat(const std::vector<Bytes>& terms);

// ---- Operation regions and fields (ACPI 6.4 sections 19.6.100, 19.6.48) ----

enum class RegionSpace : uint8_t { SystemMemory = 0x00, SystemIo = 0x01 };
// OperationRegion(name, space, offset, length)
Bytes operation_region(std::string_view name, RegionSpace space, uint64_t offset,
                       uint64_t length);

// FieldFlags (section 20.2.5.2): bits 3-0 AccessType, bit 4 LockRule,
// bits 6-5 UpdateRule.
enum class FieldAccess : uint8_t { Any = 0, Byte = 1, Word = 2, DWord = 3, QWord = 4 };
enum class FieldUpdate : uint8_t { Preserve = 0, WriteAsOnes = 1, WriteAsZeros = 2 };
struct FieldUnit {
  std::string_view name;  // a NameSeg
  uint32_t bits;          // width, packed one after another from bit 0
};
// Field(region, access, NoLock, update) { name, bits, ... }
Bytes field(std::string_view region, FieldAccess access, FieldUpdate update,
            const std::vector<FieldUnit>& units);

// ---- Statements and expressions (ACPI 6.4 sections 20.2.5.3, 20.2.5.4) ----

// A named object as an operand or target: the NameString of path.
Bytes reference(std::string_view path);
// Store(value, target)
Bytes store(const Bytes& value, const Bytes& target);
// And(left, right) with no target: the value only.
Bytes bitwise_and(const Bytes& left, const Bytes& right);
// If(predicate) { terms }: the terms run when predicate is not zero.
Bytes if_then(const Bytes& predicate, const std::vector<Bytes>& terms);
// Notify(object, value)
Bytes notify(const Bytes& object, const Bytes& value);

// ---- Resource templates (ACPI 6.4 section 6.4) ----

// General flags bit 0 of address space descriptors: a producer (a bridge's
// window) or a consumer (a device's own registers).
enum class ResourceUsage : uint8_t { Producer = 0, Consumer = 1 };
// _MEM of memory address space descriptors (section 6.4.3.5.5).
enum class Cacheability : uint8_t {
  NonCacheable = 0,
  Cacheable = 1,
  WriteCombining = 2,
  Prefetchable = 3,
};
enum class MemoryAccess : uint8_t { ReadOnly = 0, ReadWrite = 1 };
enum class InterruptTrigger : uint8_t { Level, Edge };
enum class InterruptPolarity : uint8_t { ActiveHigh, ActiveLow };
enum class InterruptSharing : uint8_t { Exclusive, Shared };

// The bytes of an ASL ResourceTemplate(): descriptors appended in order,
// then an End Tag whose checksum makes the whole template sum to zero.
// Address space descriptors describe a fixed range [min, max]: MinFixed,
// MaxFixed, PosDecode, granularity 0, no translation, length max - min + 1.
class ResourceTemplate {
 public:
  // IO(Decode16, min, max, alignment, length); section 6.4.2.5.
  ResourceTemplate& io(uint16_t min, uint16_t max, uint8_t alignment, uint8_t length);
  // IRQNoFlags() {irq}: ISA IRQ 0-15, edge, active high; section 6.4.2.1.
  ResourceTemplate& irq_no_flags(uint8_t irq);
  // Memory32Fixed(access, base, length); section 6.4.3.4.
  ResourceTemplate& memory32_fixed(MemoryAccess access, uint32_t base, uint32_t length);
  // Interrupt(ResourceConsumer, trigger, polarity, sharing) {gsi}; section 6.4.3.6.
  ResourceTemplate& interrupt(InterruptTrigger trigger, InterruptPolarity polarity,
                              InterruptSharing sharing, uint32_t gsi);
  // WordBusNumber; section 6.4.3.5.3.
  ResourceTemplate& word_bus_number(ResourceUsage usage, uint16_t min, uint16_t max);
  // WordIO with EntireRange; section 6.4.3.5.3.
  ResourceTemplate& word_io(ResourceUsage usage, uint16_t min, uint16_t max);
  // DWordMemory; section 6.4.3.5.2.
  ResourceTemplate& dword_memory(ResourceUsage usage, Cacheability cacheability,
                                 MemoryAccess access, uint32_t min, uint32_t max);
  // QWordMemory; section 6.4.3.5.1.
  ResourceTemplate& qword_memory(ResourceUsage usage, Cacheability cacheability,
                                 MemoryAccess access, uint64_t min, uint64_t max);

  // The descriptors and the End Tag.
  Bytes bytes() const;
  // bytes() as an AML Buffer, the value of Name(_CRS, ResourceTemplate() {...}).
  Bytes to_buffer() const;

 private:
  enum class SpaceType : uint8_t { Memory = 0, Io = 1, BusNumber = 2 };
  void address_space(int width_bytes, SpaceType type, ResourceUsage usage, uint8_t type_flags,
                     uint64_t min, uint64_t max);

  Bytes descriptors_;
};

}  // namespace aml
}  // namespace keel::boot::acpi
