// AML emitter tests. Spec: ACPI 6.4 chapter 20 (20.2.2 names, 20.2.3 data
// objects, 20.2.4 PkgLength, 20.2.5 term objects) and section 6.4 (resource
// descriptors), checked byte by byte. Covered: every emitter function,
// PkgLength at the 63/4095/1048575 boundaries, integer prefixes, NameSeg
// padding, EISAID, End Tag checksums, CHECKs on bad input. Missing: nothing known.
#include "boot/acpi/aml.h"

#include <gtest/gtest.h>

#include <initializer_list>
#include <string>
#include <utility>

namespace keel::boot::acpi::aml {
namespace {

Bytes bytes(std::initializer_list<int> values) {
  Bytes out;
  for (int v : values) out.push_back(std::byte{static_cast<uint8_t>(v)});
  return out;
}

Bytes ascii(std::string_view text) {
  Bytes out;
  for (char c : text) out.push_back(std::byte{static_cast<uint8_t>(c)});
  return out;
}

Bytes join(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const Bytes& part : parts) out.insert(out.end(), part.begin(), part.end());
  return out;
}

uint8_t sum_of(const Bytes& data) {
  uint8_t sum = 0;
  for (std::byte b : data) sum = static_cast<uint8_t>(sum + static_cast<uint8_t>(b));
  return sum;
}

// Decodes a PkgLength the way an AML interpreter does: (value, encoding size).
std::pair<uint32_t, size_t> decode_pkg_length(const Bytes& data) {
  uint8_t lead = static_cast<uint8_t>(data.at(0));
  size_t follow = lead >> 6;
  if (follow == 0) return {lead & 0x3fu, 1};
  uint32_t value = lead & 0x0fu;
  for (size_t i = 0; i < follow; ++i) {
    value |= uint32_t{static_cast<uint8_t>(data.at(1 + i))} << (4 + 8 * i);
  }
  return {value, 1 + follow};
}

TEST(AmlPkgLengthTest, EncodesAtEachSizeBoundary) {
  EXPECT_EQ(encode_pkg_length(0), bytes({0x00}));
  EXPECT_EQ(encode_pkg_length(63), bytes({0x3f}));
  EXPECT_EQ(encode_pkg_length(64), bytes({0x40, 0x04}));
  EXPECT_EQ(encode_pkg_length(4095), bytes({0x4f, 0xff}));
  EXPECT_EQ(encode_pkg_length(4096), bytes({0x80, 0x00, 0x01}));
  EXPECT_EQ(encode_pkg_length(1048575), bytes({0x8f, 0xff, 0xff}));
  EXPECT_EQ(encode_pkg_length(1048576), bytes({0xc0, 0x00, 0x00, 0x01}));
  EXPECT_EQ(encode_pkg_length(kMaxPkgLength), bytes({0xcf, 0xff, 0xff, 0xff}));
}

TEST(AmlPkgLengthTest, RoundTripsThroughADecoder) {
  for (uint32_t value : {0u, 1u, 62u, 63u, 64u, 65u, 0x123u, 4094u, 4095u, 4096u, 0x12345u,
                         1048575u, 1048576u, 0x1234567u, kMaxPkgLength}) {
    Bytes encoded = encode_pkg_length(value);
    auto [decoded, size] = decode_pkg_length(encoded);
    EXPECT_EQ(decoded, value);
    EXPECT_EQ(size, encoded.size());
  }
}

TEST(AmlPkgLengthTest, WithBodyCountsItsOwnBytes) {
  // {body size, expected encoding size}: the total (body + encoding) must
  // fit the encoding, so a body of 63 needs two bytes though 63 fits one.
  const std::pair<size_t, size_t> cases[] = {
      {0, 1}, {62, 1}, {63, 2}, {64, 2}, {4093, 2}, {4094, 3}, {1048572, 3}, {1048573, 4},
  };
  for (auto [body_size, encoding_size] : cases) {
    Bytes body(body_size, std::byte{0xaa});
    Bytes out = with_pkg_length(body);
    ASSERT_EQ(out.size(), body_size + encoding_size) << "body " << body_size;
    auto [value, size] = decode_pkg_length(out);
    EXPECT_EQ(size, encoding_size) << "body " << body_size;
    EXPECT_EQ(value, body_size + encoding_size) << "body " << body_size;
  }
}

TEST(AmlIntegerTest, UsesTheSmallestEncoding) {
  EXPECT_EQ(integer(0), bytes({0x00}));  // ZeroOp
  EXPECT_EQ(integer(1), bytes({0x01}));  // OneOp
  EXPECT_EQ(integer(2), bytes({0x0a, 0x02}));
  EXPECT_EQ(integer(0xff), bytes({0x0a, 0xff}));
  EXPECT_EQ(integer(0x100), bytes({0x0b, 0x00, 0x01}));
  EXPECT_EQ(integer(0xffff), bytes({0x0b, 0xff, 0xff}));
  EXPECT_EQ(integer(0x10000), bytes({0x0c, 0x00, 0x00, 0x01, 0x00}));
  EXPECT_EQ(integer(0xffffffff), bytes({0x0c, 0xff, 0xff, 0xff, 0xff}));
  EXPECT_EQ(integer(0x100000000), bytes({0x0e, 0, 0, 0, 0, 1, 0, 0, 0}));
  EXPECT_EQ(integer(0x0123456789abcdef),
            bytes({0x0e, 0xef, 0xcd, 0xab, 0x89, 0x67, 0x45, 0x23, 0x01}));
  EXPECT_EQ(integer(UINT64_MAX), bytes({0x0e, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}));
}

TEST(AmlNameTest, PadsShortSegmentsWithUnderscores) {
  EXPECT_EQ(name_seg("_S5"), ascii("_S5_"));
  EXPECT_EQ(name_seg("A"), ascii("A___"));
  EXPECT_EQ(name_seg("SB"), ascii("SB__"));
  EXPECT_EQ(name_seg("PCI0"), ascii("PCI0"));
}

TEST(AmlNameTest, ValidatesSegments) {
  EXPECT_TRUE(is_valid_name_seg("_HID"));
  EXPECT_TRUE(is_valid_name_seg("S00"));
  EXPECT_TRUE(is_valid_name_seg("_"));
  EXPECT_FALSE(is_valid_name_seg(""));
  EXPECT_FALSE(is_valid_name_seg("ABCDE"));
  EXPECT_FALSE(is_valid_name_seg("0ABC"));  // digits cannot lead
  EXPECT_FALSE(is_valid_name_seg("pci0"));  // names are upper case
  EXPECT_FALSE(is_valid_name_seg("A-B"));
}

TEST(AmlNameTest, EncodesPrefixesAndMultiSegmentPaths) {
  EXPECT_EQ(name_string("_HID"), ascii("_HID"));
  EXPECT_EQ(name_string("\\_S5"), join({bytes({0x5c}), ascii("_S5_")}));
  EXPECT_EQ(name_string("^^FOO"), join({bytes({0x5e, 0x5e}), ascii("FOO_")}));
  EXPECT_EQ(name_string("\\_SB.PCI0"), join({bytes({0x5c, 0x2e}), ascii("_SB_PCI0")}));
  EXPECT_EQ(name_string("\\_SB.PCI0.S08"),
            join({bytes({0x5c, 0x2f, 0x03}), ascii("_SB_PCI0S08_")}));
  EXPECT_EQ(name_string("\\"), bytes({0x5c, 0x00}));  // root: NullName
  EXPECT_EQ(name_string("^"), bytes({0x5e, 0x00}));
}

TEST(AmlNameTest, BadNamesAreBugs) {
  EXPECT_DEATH(name_seg("lower"), "NameSeg");
  EXPECT_DEATH(name_string("\\_SB..PCI0"), "NameSeg");
  EXPECT_DEATH(name_string("\\_SB."), "ends with");
}

TEST(AmlEisaIdTest, CompressesPnpIds) {
  // PNP0A08: 'P' 'N' 'P' -> 0x41d0 big-endian, then 0x0a 0x08.
  EXPECT_EQ(eisa_id("PNP0A08"), 0x080ad041u);
  EXPECT_EQ(integer(eisa_id("PNP0A08")), bytes({0x0c, 0x41, 0xd0, 0x0a, 0x08}));
  EXPECT_EQ(eisa_id("PNP0A03"), 0x030ad041u);
  EXPECT_EQ(eisa_id("PNP0501"), 0x0105d041u);
  EXPECT_EQ(eisa_id("PNP0C02"), 0x020cd041u);
  // Every letter of the 5-bit alphabet and hex digit lands in its field.
  EXPECT_EQ(eisa_id("ZZZFFFF"), 0xffff5a6bu);
  EXPECT_EQ(eisa_id("AAA0000"), 0x00002104u);
}

TEST(AmlEisaIdTest, ValidatesIds) {
  EXPECT_TRUE(is_valid_eisa_id("PNP0A08"));
  EXPECT_FALSE(is_valid_eisa_id("pnp0a08"));
  EXPECT_FALSE(is_valid_eisa_id("PNP0A0"));
  EXPECT_FALSE(is_valid_eisa_id("PNP0A0G"));
  EXPECT_FALSE(is_valid_eisa_id("PN00A08"));
  EXPECT_DEATH(eisa_id("PNP0a08"), "EISA");
}

TEST(AmlDataTest, EncodesStringsBuffersAndPackages) {
  EXPECT_EQ(string("ab"), bytes({0x0d, 'a', 'b', 0x00}));
  EXPECT_EQ(string(""), bytes({0x0d, 0x00}));
  // BufferOp PkgLength(6) BufferSize(ByteConst 3) 1 2 3
  EXPECT_EQ(buffer(bytes({1, 2, 3})), bytes({0x11, 0x06, 0x0a, 0x03, 1, 2, 3}));
  EXPECT_EQ(buffer({}), bytes({0x11, 0x02, 0x00}));
  // PackageOp PkgLength(4) NumElements(2) One Zero
  EXPECT_EQ(package({integer(1), integer(0)}), bytes({0x12, 0x04, 0x02, 0x01, 0x00}));
  EXPECT_EQ(package({}), bytes({0x12, 0x02, 0x00}));
}

TEST(AmlDataTest, LargePackagesUseVarPackage) {
  std::vector<Bytes> elements(256, integer(0));
  Bytes out = package(elements);
  EXPECT_EQ(static_cast<uint8_t>(out[0]), 0x13);  // VarPackageOp
  auto [length, size] = decode_pkg_length(Bytes(out.begin() + 1, out.end()));
  EXPECT_EQ(length, out.size() - 1);
  // VarNumElements is a TermArg: WordConst 256.
  EXPECT_EQ(Bytes(out.begin() + 1 + size, out.begin() + 4 + size), bytes({0x0b, 0x00, 0x01}));

  std::vector<Bytes> most(255, integer(0));
  Bytes fits = package(most);
  EXPECT_EQ(static_cast<uint8_t>(fits[0]), 0x12);
}

TEST(AmlObjectTest, EncodesNamedObjectsAndScopes) {
  EXPECT_EQ(name("_UID", integer(1)), join({bytes({0x08}), ascii("_UID"), bytes({0x01})}));
  // DeviceOp is ExtOpPrefix 0x82; PkgLength covers the name and the body.
  EXPECT_EQ(device("COM1", {}), join({bytes({0x5b, 0x82, 0x05}), ascii("COM1")}));
  EXPECT_EQ(device("COM1", {name("_UID", integer(1))}),
            join({bytes({0x5b, 0x82, 0x0b}), ascii("COM1"), bytes({0x08}), ascii("_UID"),
                  bytes({0x01})}));
  EXPECT_EQ(scope("\\_SB", {}), join({bytes({0x10, 0x06, 0x5c}), ascii("_SB_")}));
}

TEST(AmlObjectTest, EncodesMethods) {
  // Method(_STA, 0, NotSerialized) { Return(0x0F) }
  EXPECT_EQ(method("_STA", 0, MethodSerialization::NotSerialized, {return_value(integer(0x0f))}),
            join({bytes({0x14, 0x09}), ascii("_STA"), bytes({0x00, 0xa4, 0x0a, 0x0f})}));
  // Method(_OSC, 4, Serialized) { Return(Arg3) }: flags 4 | 1 << 3.
  EXPECT_EQ(method("_OSC", 4, MethodSerialization::Serialized, {return_value(arg(3))}),
            join({bytes({0x14, 0x08}), ascii("_OSC"), bytes({0x0c, 0xa4, 0x6b})}));
  EXPECT_EQ(arg(0), bytes({0x68}));
  EXPECT_EQ(arg(6), bytes({0x6e}));
  EXPECT_EQ(local(0), bytes({0x60}));
  EXPECT_EQ(local(7), bytes({0x67}));
}

TEST(AmlObjectTest, EncodesRegionsFieldsAndStatements) {
  // OperationRegion(EREG, SystemMemory, 0xFEB00000, 4)
  EXPECT_EQ(operation_region("EREG", RegionSpace::SystemMemory, 0xfeb00000, 4),
            join({bytes({0x5b, 0x80}), ascii("EREG"),
                  bytes({0x00, 0x0c, 0x00, 0x00, 0xb0, 0xfe, 0x0a, 0x04})}));
  // Field(EREG, DWordAcc, NoLock, WriteAsZeros) { ESEL, 32 }: flags 3 | 2 << 5,
  // then the unit's width in bits as a PkgLength.
  EXPECT_EQ(field("EREG", FieldAccess::DWord, FieldUpdate::WriteAsZeros, {{"ESEL", 32}}),
            join({bytes({0x5b, 0x81, 0x0b}), ascii("EREG"), bytes({0x43}), ascii("ESEL"),
                  bytes({0x20})}));
  // A width past 63 bits takes a two-byte PkgLength.
  EXPECT_EQ(field("R", FieldAccess::Byte, FieldUpdate::Preserve, {{"WIDE", 64}}),
            join({bytes({0x5b, 0x81, 0x0c}), ascii("R___"), bytes({0x01}), ascii("WIDE"),
                  bytes({0x40, 0x04})}));
  EXPECT_EQ(store(reference("ESEL"), local(0)), join({bytes({0x70}), ascii("ESEL"), bytes({0x60})}));
  // And(Local0, One) with no target: NullName.
  EXPECT_EQ(bitwise_and(local(0), integer(1)), bytes({0x7b, 0x60, 0x01, 0x00}));
  // If (Local0) { Notify(\_SB.PWRB, 0x80) }
  EXPECT_EQ(if_then(local(0), {notify(reference("\\_SB.PWRB"), integer(0x80))}),
            join({bytes({0xa0, 0x0f, 0x60, 0x86, 0x5c, 0x2e}), ascii("_SB_"), ascii("PWRB"),
                  bytes({0x0a, 0x80})}));
}

TEST(AmlResourceTest, SmallDescriptorsAndEndTagChecksum) {
  ResourceTemplate crs;
  crs.io(0x3f8, 0x3f8, 1, 8).irq_no_flags(4);
  Bytes out = crs.bytes();
  Bytes expected = bytes({0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08,  // IO
                          0x22, 0x10, 0x00,                                // IRQNoFlags {4}
                          0x79});                                          // End Tag
  ASSERT_EQ(out.size(), expected.size() + 1);
  EXPECT_EQ(Bytes(out.begin(), out.end() - 1), expected);
  EXPECT_EQ(sum_of(out), 0) << "End Tag checksum";
  // As a Buffer: BufferOp PkgLength BufferSize(13) and the template.
  EXPECT_EQ(crs.to_buffer(), join({bytes({0x11, 0x10, 0x0a, 0x0d}), out}));
}

TEST(AmlResourceTest, EmptyTemplateIsJustTheEndTag) {
  EXPECT_EQ(ResourceTemplate().bytes(), bytes({0x79, 0x87}));
}

TEST(AmlResourceTest, AddressSpaceDescriptors) {
  ResourceTemplate bus;
  bus.word_bus_number(ResourceUsage::Producer, 0, 0xff);
  Bytes bus_bytes = bus.bytes();
  ASSERT_EQ(bus_bytes.size(), 16u + 2u);
  EXPECT_EQ(Bytes(bus_bytes.begin(), bus_bytes.end() - 2),
            bytes({0x88, 0x0d, 0x00,  // WORD address space, 13 bytes follow
                   0x02, 0x0c, 0x00,  // bus numbers; producer, MinFixed, MaxFixed; no flags
                   0x00, 0x00, 0x00, 0x00, 0xff, 0x00, 0x00, 0x00, 0x00, 0x01}));

  ResourceTemplate io;
  io.word_io(ResourceUsage::Producer, 0x1000, 0xffff);
  Bytes io_bytes = io.bytes();
  ASSERT_EQ(io_bytes.size(), 16u + 2u);
  EXPECT_EQ(Bytes(io_bytes.begin(), io_bytes.begin() + 16),
            bytes({0x88, 0x0d, 0x00, 0x01, 0x0c, 0x03,  // I/O, EntireRange
                   0x00, 0x00, 0x00, 0x10, 0xff, 0xff, 0x00, 0x00, 0x00, 0xf0}));

  ResourceTemplate mem32;
  mem32.dword_memory(ResourceUsage::Producer, Cacheability::NonCacheable, MemoryAccess::ReadWrite,
                     0xc0000000, 0xdfffffff);
  Bytes mem32_bytes = mem32.bytes();
  ASSERT_EQ(mem32_bytes.size(), 26u + 2u);
  EXPECT_EQ(Bytes(mem32_bytes.begin(), mem32_bytes.begin() + 26),
            bytes({0x87, 0x17, 0x00, 0x00, 0x0c, 0x01,  // memory, RW non-cacheable
                   0,    0,    0,    0,                 // _GRA
                   0x00, 0x00, 0x00, 0xc0,              // _MIN
                   0xff, 0xff, 0xff, 0xdf,              // _MAX
                   0,    0,    0,    0,                 // _TRA
                   0x00, 0x00, 0x00, 0x20}));           // _LEN

  ResourceTemplate mem64;
  mem64.qword_memory(ResourceUsage::Consumer, Cacheability::Prefetchable, MemoryAccess::ReadOnly,
                     0x100000000, 0x1ffffffff);
  Bytes out = mem64.bytes();
  ASSERT_EQ(out.size(), 46u + 2u);
  EXPECT_EQ(Bytes(out.begin(), out.begin() + 6), bytes({0x8a, 0x2b, 0x00, 0x00, 0x0d, 0x06}));
  EXPECT_EQ(Bytes(out.begin() + 14, out.begin() + 22), bytes({0, 0, 0, 0, 1, 0, 0, 0}));  // _MIN
  EXPECT_EQ(Bytes(out.begin() + 38, out.begin() + 46), bytes({0, 0, 0, 0, 1, 0, 0, 0}));  // _LEN
  EXPECT_EQ(sum_of(out), 0);
}

TEST(AmlResourceTest, FixedMemoryAndExtendedInterrupt) {
  ResourceTemplate crs;
  crs.memory32_fixed(MemoryAccess::ReadWrite, 0xe0000000, 0x10000000);
  crs.interrupt(InterruptTrigger::Edge, InterruptPolarity::ActiveHigh, InterruptSharing::Exclusive,
                5);
  crs.interrupt(InterruptTrigger::Level, InterruptPolarity::ActiveLow, InterruptSharing::Shared,
                0x20);
  Bytes out = crs.bytes();
  EXPECT_EQ(Bytes(out.begin(), out.end() - 2),
            bytes({0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xe0, 0x00, 0x00, 0x00,
                   0x10, 0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00,  // consumer, edge
                   0x89, 0x06, 0x00, 0x0d, 0x01, 0x20, 0x00, 0x00, 0x00}));  // level, low, shared
  EXPECT_EQ(sum_of(out), 0);
}

TEST(AmlResourceTest, BadDescriptorsAreBugs) {
  ResourceTemplate crs;
  EXPECT_DEATH(crs.irq_no_flags(16), "ISA");
  EXPECT_DEATH(crs.word_io(ResourceUsage::Producer, 0x2000, 0x1000), "min > max");
}

}  // namespace
}  // namespace keel::boot::acpi::aml
