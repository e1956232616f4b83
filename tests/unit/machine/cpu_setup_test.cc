// build_cpuid on a synthetic "supported CPUID" list: the topology every vCPU
// reports must agree (APIC IDs in leaves 01H, 0BH, 1FH, 8000_001Eh; counts in
// 01H, 04H, 0BH, 8000_0008h), per Intel SDM vol. 2A and AMD APM vol. 3.
#include "machine/cpu_setup.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <optional>
#include <vector>

#include <gtest/gtest.h>

namespace keel::machine {
namespace {

constexpr uint32_t kSignificantIndex = kvm::kCpuidFlagSignificantIndex;

kvm::CpuidEntry leaf(uint32_t function, uint32_t index, uint32_t eax, uint32_t ebx, uint32_t ecx,
                     uint32_t edx, uint32_t flags = 0) {
  kvm::CpuidEntry entry{};
  entry.function = function;
  entry.index = index;
  entry.flags = flags;
  entry.eax = eax;
  entry.ebx = ebx;
  entry.ecx = ecx;
  entry.edx = edx;
  return entry;
}

// Leaf 4 EAX: cache type in [4:0], level in [7:5], self-initializing [8],
// plus host values in the sharing fields [25:14] and [31:26] that must be replaced.
uint32_t cache_eax(uint32_t type, uint32_t level) {
  return type | (level << 5) | (1u << 8) | (0x3fu << 26) | (0x7u << 14);
}

kvm::CpuidEntries supported_list(uint32_t max_basic = 0x1f) {
  return {
      leaf(0x0, 0, max_basic, 0x756e6547, 0x6c65746e, 0x49656e69),  // GenuineIntel
      leaf(0x1, 0, 0x000906ea, 0xab030800, 0x00000201, 0x00000001),
      leaf(0x4, 0, cache_eax(1, 1), 0x01c0003f, 0x3f, 0, kSignificantIndex),   // L1d
      leaf(0x4, 1, cache_eax(2, 1), 0x01c0003f, 0x3f, 0, kSignificantIndex),   // L1i
      leaf(0x4, 2, cache_eax(3, 2), 0x01c0003f, 0x3ff, 0, kSignificantIndex),  // L2
      leaf(0x4, 3, cache_eax(3, 3), 0x03c0003f, 0x3fff, 4, kSignificantIndex), // L3
      leaf(0x4, 4, 0, 0, 0, 0, kSignificantIndex),                             // null: the end
      leaf(0x7, 0, 0, 0x029c67af, 0, 0, kSignificantIndex),
      // The host's own topology, which must not leak into the guest.
      leaf(0xb, 0, 1, 2, 0x100, 7, kSignificantIndex),
      leaf(0xb, 1, 4, 8, 0x201, 7, kSignificantIndex),
      leaf(0x1f, 0, 1, 2, 0x100, 7, kSignificantIndex),
      leaf(0x1f, 1, 4, 8, 0x201, 7, kSignificantIndex),
      leaf(0x80000000, 0, 0x8000001e, 0, 0, 0),
      leaf(0x80000008, 0, 0x3030, 0, 0x000170ff, 0),
      leaf(0x8000001e, 0, 0x99, 0x0100, 0x0301, 0),
  };
}

std::optional<kvm::CpuidEntry> find(const kvm::CpuidEntries& entries, uint32_t function,
                                    uint32_t index = 0) {
  for (const kvm::CpuidEntry& entry : entries) {
    if (entry.function == function && entry.index == index) return entry;
  }
  return std::nullopt;
}

size_t count_of(const kvm::CpuidEntries& entries, uint32_t function) {
  return static_cast<size_t>(std::count_if(entries.begin(), entries.end(),
                                           [function](const kvm::CpuidEntry& e) {
                                             return e.function == function;
                                           }));
}

TEST(BuildCpuidTest, Leaf1CarriesApicIdCountAndHypervisorBits) {
  kvm::CpuidEntries cpuid = build_cpuid(supported_list(), 1, 4);
  std::optional<kvm::CpuidEntry> leaf1 = find(cpuid, 0x1);
  ASSERT_TRUE(leaf1);
  EXPECT_EQ(leaf1->ebx >> 24, 1u) << "initial APIC ID";
  EXPECT_EQ((leaf1->ebx >> 16) & 0xff, 4u) << "logical processor count";
  EXPECT_EQ(leaf1->ebx & 0xffff, 0x0800u) << "brand index and CLFLUSH size are the host's";
  EXPECT_NE(leaf1->ecx & (1u << 31), 0u) << "hypervisor bit";
  EXPECT_EQ(leaf1->ecx & 0x7fffffff, 0x201u) << "other feature bits are kept";
  EXPECT_NE(leaf1->edx & (1u << 28), 0u) << "HTT: EBX[23:16] is valid";
  EXPECT_EQ(leaf1->edx & 1, 1u);
  EXPECT_EQ(leaf1->eax, 0x000906eau);
}

TEST(BuildCpuidTest, TscDeadlineFollowsTheHostCapability) {
  constexpr uint32_t kTscDeadline = 1u << 24;
  auto without = find(build_cpuid(supported_list(), 0, 1), 0x1, 0);
  ASSERT_TRUE(without.has_value());
  EXPECT_EQ(without->ecx & kTscDeadline, 0u) << "not advertised unless KVM can emulate it";
  auto with = find(build_cpuid(supported_list(), 0, 1, {.tsc_deadline_timer = true}), 0x1, 0);
  ASSERT_TRUE(with.has_value());
  EXPECT_NE(with->ecx & kTscDeadline, 0u);
}

TEST(BuildCpuidTest, SingleVcpuHasNoHtt) {
  kvm::CpuidEntries cpuid = build_cpuid(supported_list(), 0, 1);
  std::optional<kvm::CpuidEntry> leaf1 = find(cpuid, 0x1);
  ASSERT_TRUE(leaf1);
  EXPECT_EQ(leaf1->ebx >> 24, 0u);
  EXPECT_EQ((leaf1->ebx >> 16) & 0xff, 1u);
  EXPECT_EQ(leaf1->edx & (1u << 28), 0u);
  EXPECT_NE(leaf1->ecx & (1u << 31), 0u);
}

TEST(BuildCpuidTest, Leaf4SharingFields) {
  kvm::CpuidEntries cpuid = build_cpuid(supported_list(), 1, 4);
  ASSERT_EQ(count_of(cpuid, 0x4), 5u);
  struct Cache {
    uint32_t type, level, sharing;
  };
  // L1d, L1i and L2 belong to one core; the L3 is shared by all 4 vCPUs.
  const Cache expected[] = {{1, 1, 0}, {2, 1, 0}, {3, 2, 0}, {3, 3, 3}};
  for (uint32_t index = 0; index < 4; ++index) {
    SCOPED_TRACE(index);
    std::optional<kvm::CpuidEntry> cache = find(cpuid, 0x4, index);
    ASSERT_TRUE(cache);
    EXPECT_EQ(cache->eax & 0x3fff, cache_eax(expected[index].type, expected[index].level) & 0x3fff)
        << "type, level and self-init are the host's";
    EXPECT_EQ((cache->eax >> 14) & 0xfff, expected[index].sharing) << "logical CPUs sharing - 1";
    EXPECT_EQ(cache->eax >> 26, 3u) << "cores in the package - 1";
    EXPECT_EQ(cache->ebx, supported_list()[2 + index].ebx) << "geometry is the host's";
    EXPECT_EQ(cache->flags, kSignificantIndex);
  }
  std::optional<kvm::CpuidEntry> null_entry = find(cpuid, 0x4, 4);
  ASSERT_TRUE(null_entry);
  EXPECT_EQ(null_entry->eax, 0u) << "a null cache type must stay null: it ends the list";
}

void expect_extended_topology(const kvm::CpuidEntries& cpuid, uint32_t function, uint32_t index,
                              uint32_t count, uint32_t core_shift) {
  SCOPED_TRACE(function);
  ASSERT_EQ(count_of(cpuid, function), 3u) << "SMT, core, then the invalid terminator";
  std::optional<kvm::CpuidEntry> smt = find(cpuid, function, 0);
  std::optional<kvm::CpuidEntry> core = find(cpuid, function, 1);
  std::optional<kvm::CpuidEntry> end = find(cpuid, function, 2);
  ASSERT_TRUE(smt && core && end);
  EXPECT_EQ(smt->eax & 0x1f, 0u) << "SMT shift: one thread per core";
  EXPECT_EQ(smt->ebx & 0xffff, 1u);
  EXPECT_EQ((smt->ecx >> 8) & 0xff, 1u) << "level type SMT";
  EXPECT_EQ(smt->ecx & 0xff, 0u) << "level number";
  EXPECT_EQ(core->eax & 0x1f, core_shift);
  EXPECT_EQ(core->ebx & 0xffff, count);
  EXPECT_EQ((core->ecx >> 8) & 0xff, 2u) << "level type Core";
  EXPECT_EQ(core->ecx & 0xff, 1u);
  EXPECT_EQ((end->ecx >> 8) & 0xff, 0u) << "level type Invalid";
  EXPECT_EQ(end->ecx & 0xff, 2u);
  EXPECT_EQ(end->eax, 0u);
  EXPECT_EQ(end->ebx, 0u);
  for (const auto& entry : {*smt, *core, *end}) {
    EXPECT_EQ(entry.edx, index) << "x2APIC ID";
    EXPECT_EQ(entry.flags & kSignificantIndex, kSignificantIndex);
  }
}

TEST(BuildCpuidTest, ExtendedTopologyLeavesReplaceTheHosts) {
  kvm::CpuidEntries cpuid = build_cpuid(supported_list(), 1, 4);
  expect_extended_topology(cpuid, 0xb, 1, 4, 2);
  expect_extended_topology(cpuid, 0x1f, 1, 4, 2);
}

TEST(BuildCpuidTest, ExtendedTopologyShiftRoundsUp) {
  kvm::CpuidEntries three = build_cpuid(supported_list(), 2, 3);
  expect_extended_topology(three, 0xb, 2, 3, 2);
  kvm::CpuidEntries one = build_cpuid(supported_list(), 0, 1);
  expect_extended_topology(one, 0xb, 0, 1, 0);
  kvm::CpuidEntries five = build_cpuid(supported_list(), 4, 5);
  expect_extended_topology(five, 0x1f, 4, 5, 3);
}

TEST(BuildCpuidTest, LowMaxLeafAddsNoExtendedTopology) {
  kvm::CpuidEntries supported = supported_list(0xa);
  std::erase_if(supported, [](const kvm::CpuidEntry& e) {
    return e.function == 0xb || e.function == 0x1f;
  });
  kvm::CpuidEntries cpuid = build_cpuid(supported, 1, 4);
  EXPECT_EQ(count_of(cpuid, 0xb), 0u);
  EXPECT_EQ(count_of(cpuid, 0x1f), 0u);
}

TEST(BuildCpuidTest, MaxLeafBetween0bAnd1fAddsOnly0b) {
  kvm::CpuidEntries supported = supported_list(0x1a);
  std::erase_if(supported, [](const kvm::CpuidEntry& e) { return e.function == 0x1f; });
  kvm::CpuidEntries cpuid = build_cpuid(supported, 1, 4);
  EXPECT_EQ(count_of(cpuid, 0xb), 3u);
  EXPECT_EQ(count_of(cpuid, 0x1f), 0u);
}

TEST(BuildCpuidTest, AmdTopologyLeaves) {
  kvm::CpuidEntries cpuid = build_cpuid(supported_list(), 1, 4);
  std::optional<kvm::CpuidEntry> size = find(cpuid, 0x80000008);
  ASSERT_TRUE(size);
  EXPECT_EQ(size->ecx & 0xff, 3u) << "NC: cores - 1";
  EXPECT_EQ((size->ecx >> 12) & 0xf, 2u) << "ApicIdCoreIdSize";
  EXPECT_EQ(size->ecx & ~0xf0ffu, 0x10000u) << "the other bits are the host's";
  EXPECT_EQ(size->eax, 0x3030u) << "address sizes untouched";
  std::optional<kvm::CpuidEntry> ext = find(cpuid, 0x8000001e);
  ASSERT_TRUE(ext);
  EXPECT_EQ(ext->eax, 1u) << "extended APIC ID";
  EXPECT_EQ(ext->ebx & 0xff, 1u) << "core ID";
  EXPECT_EQ((ext->ebx >> 8) & 0xff, 0u) << "threads per core - 1";
  EXPECT_EQ(ext->ecx & 0xff, 0u) << "node 0";
}

TEST(BuildCpuidTest, EveryLeafAgreesOnTheApicId) {
  for (uint32_t index = 0; index < 4; ++index) {
    SCOPED_TRACE(index);
    kvm::CpuidEntries cpuid = build_cpuid(supported_list(), index, 4);
    EXPECT_EQ(find(cpuid, 0x1)->ebx >> 24, index);
    EXPECT_EQ(find(cpuid, 0xb, 0)->edx, index);
    EXPECT_EQ(find(cpuid, 0xb, 1)->edx, index);
    EXPECT_EQ(find(cpuid, 0x1f, 0)->edx, index);
    EXPECT_EQ(find(cpuid, 0x8000001e)->eax, index);
  }
}

TEST(BuildCpuidTest, OtherLeavesAreUntouched) {
  kvm::CpuidEntries supported = supported_list();
  kvm::CpuidEntries cpuid = build_cpuid(supported, 1, 4);
  for (uint32_t function : {0x0u, 0x7u, 0x80000000u}) {
    std::optional<kvm::CpuidEntry> before = find(supported, function);
    std::optional<kvm::CpuidEntry> after = find(cpuid, function);
    ASSERT_TRUE(before && after);
    EXPECT_EQ(before->eax, after->eax);
    EXPECT_EQ(before->ebx, after->ebx);
    EXPECT_EQ(before->ecx, after->ecx);
    EXPECT_EQ(before->edx, after->edx);
  }
}

// Leaf 4 EAX[31:26] is a 6-bit field: with more than 64 vCPUs it must
// saturate at 63 instead of wrapping ((count - 1) << 26 keeps only the low
// 6 bits of count - 1, so 65 vCPUs would claim a single core).
TEST(BuildCpuidTest, Leaf4CoreCountSaturatesAbove64Vcpus) {
  for (uint32_t count : {64u, 65u, 100u, 254u}) {
    SCOPED_TRACE(count);
    kvm::CpuidEntries cpuid = build_cpuid(supported_list(), 0, count);
    std::optional<kvm::CpuidEntry> l1 = find(cpuid, 0x4, 0);
    ASSERT_TRUE(l1);
    EXPECT_EQ(l1->eax >> 26, std::min<uint32_t>(count - 1, 63));
    std::optional<kvm::CpuidEntry> l3 = find(cpuid, 0x4, 3);
    ASSERT_TRUE(l3);
    EXPECT_EQ((l3->eax >> 14) & 0xfff, count - 1);
  }
}

// KVM reports the brand string leaves as zeroes; the host's brand fills
// them so the guest's model name is the real one. A brand KVM does report
// is kept.
TEST(BuildCpuidTest, BrandStringLeavesComeFromTheHostWhenKvmLeavesThemEmpty) {
  kvm::CpuidEntries supported = supported_list();
  supported.push_back(leaf(0x80000002, 0, 0, 0, 0, 0));
  supported.push_back(leaf(0x80000003, 0, 0, 0, 0, 0));
  supported.push_back(leaf(0x80000004, 0, 0x11, 0x22, 0x33, 0x44));
  CpuidHostFeatures host;
  std::string text = "AMD EPYC Processor (with IBPB)";
  text.resize(48, ' ');
  std::memcpy(host.brand.data(), text.data(), 48);
  kvm::CpuidEntries cpuid = build_cpuid(supported, 0, 1, host);
  std::string brand;
  for (uint32_t function : {0x80000002u, 0x80000003u}) {
    std::optional<kvm::CpuidEntry> entry = find(cpuid, function);
    ASSERT_TRUE(entry);
    for (uint32_t reg : {entry->eax, entry->ebx, entry->ecx, entry->edx}) {
      brand.append(reinterpret_cast<const char*>(&reg), 4);
    }
  }
  EXPECT_EQ(brand, text.substr(0, 32));
  std::optional<kvm::CpuidEntry> kept = find(cpuid, 0x80000004);
  ASSERT_TRUE(kept);
  EXPECT_EQ(kept->eax, 0x11u) << "a brand leaf KVM filled in is not overwritten";
  EXPECT_EQ(kept->edx, 0x44u);
}

TEST(BuildCpuidTest, HostBrandIsReadFromTheCpu) {
  std::array<uint32_t, 12> brand = host_cpu_brand();
  const std::string text(reinterpret_cast<const char*>(brand.data()), 48);
  // Every x86-64 CPU this runs on has a brand string; it is printable ASCII
  // padded with spaces or NULs.
  EXPECT_NE(text.find_first_not_of(std::string(" \0", 2)), std::string::npos);
  for (char c : text) EXPECT_TRUE(c == 0 || (c >= 0x20 && c < 0x7f)) << int(c);
}

}  // namespace
}  // namespace keel::machine
