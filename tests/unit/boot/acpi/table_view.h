// Test helpers: read little-endian fields out of built ACPI tables and find
// tables through the RSDP and XSDT the way an OS does. Spec: ACPI 6.4
// sections 5.2.5.3 (RSDP layout), 5.2.6 (table header), 5.2.8 (XSDT).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "boot/acpi/acpi.h"

namespace keel::boot::acpi::testing {

inline uint64_t read_le(std::span<const std::byte> bytes, size_t offset, size_t width) {
  EXPECT_LE(offset + width, bytes.size());
  if (offset + width > bytes.size()) return 0;
  uint64_t value = 0;
  for (size_t i = 0; i < width; ++i) {
    value |= uint64_t{static_cast<uint8_t>(bytes[offset + i])} << (8 * i);
  }
  return value;
}
inline uint8_t u8_at(std::span<const std::byte> b, size_t offset) {
  return static_cast<uint8_t>(read_le(b, offset, 1));
}
inline uint16_t u16_at(std::span<const std::byte> b, size_t offset) {
  return static_cast<uint16_t>(read_le(b, offset, 2));
}
inline uint32_t u32_at(std::span<const std::byte> b, size_t offset) {
  return static_cast<uint32_t>(read_le(b, offset, 4));
}
inline uint64_t u64_at(std::span<const std::byte> b, size_t offset) {
  return read_le(b, offset, 8);
}
inline std::string ascii_at(std::span<const std::byte> b, size_t offset, size_t length) {
  std::string text(length, '\0');
  if (offset + length <= b.size()) std::memcpy(text.data(), b.data() + offset, length);
  return text;
}
inline uint8_t sum_of(std::span<const std::byte> b) {
  uint8_t sum = 0;
  for (std::byte x : b) sum = static_cast<uint8_t>(sum + static_cast<uint8_t>(x));
  return sum;
}

// The tables of a blob built at `base`, by signature, located through the
// RSDP -> XSDT -> FADT -> DSDT chain. Checks bounds on the way (test
// failures, not crashes, on a broken blob).
struct TableSet {
  std::span<const std::byte> rsdp;
  std::map<std::string, std::span<const std::byte>> tables;  // "XSDT", "FACP", ...
  std::vector<uint64_t> xsdt_entries;

  std::span<const std::byte> get(const std::string& signature) const {
    auto it = tables.find(signature);
    EXPECT_NE(it, tables.end()) << "no " << signature;
    return it == tables.end() ? std::span<const std::byte>() : it->second;
  }
};

// The table at guest address `address`, with the length its header claims.
inline std::span<const std::byte> table_at(const AcpiTables& built, uint64_t address) {
  std::span<const std::byte> all(built.bytes);
  uint64_t offset = address - built.rsdp_address;
  if (address < built.rsdp_address || offset + 36 > all.size()) {
    ADD_FAILURE() << "table address " << address << " outside the blob";
    return {};
  }
  uint32_t length = u32_at(all, offset + 4);
  if (length < 36 || offset + length > all.size()) {
    ADD_FAILURE() << "table at " << address << " has bad length " << length;
    return {};
  }
  return all.subspan(offset, length);
}

inline TableSet parse(const AcpiTables& built) {
  TableSet set;
  std::span<const std::byte> all(built.bytes);
  if (all.size() < 36) {
    ADD_FAILURE() << "blob smaller than an RSDP";
    return set;
  }
  set.rsdp = all.first(36);
  uint64_t rsdt_address = u32_at(set.rsdp, 16);
  if (rsdt_address != 0) set.tables["RSDT"] = table_at(built, rsdt_address);
  auto xsdt = table_at(built, u64_at(set.rsdp, 24));
  set.tables["XSDT"] = xsdt;
  for (size_t offset = 36; offset + 8 <= xsdt.size(); offset += 8) {
    uint64_t address = u64_at(xsdt, offset);
    set.xsdt_entries.push_back(address);
    auto table = table_at(built, address);
    if (table.empty()) continue;
    set.tables[ascii_at(table, 0, 4)] = table;
  }
  if (set.tables.count("FACP")) {
    set.tables["DSDT"] = table_at(built, u64_at(set.tables["FACP"], 140));
  }
  return set;
}

}  // namespace keel::boot::acpi::testing
