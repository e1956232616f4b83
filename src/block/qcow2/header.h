// The qcow2 header: parsing and checking the first cluster of an image.
// Spec: QEMU docs/interop/qcow2.txt, "Header", "Additional fields",
// "Header extensions", "Feature name table".
// Implemented: versions 2 and 3; every field checked against the file size
// and the others; header extensions walked with bounds (backing file format,
// feature name table, external data file name, encryption pointer; unknown
// ones skipped); the incompatible features Keel understands (dirty, corrupt,
// compression type zlib/zstd) and refusals naming the rest.
// Missing: nothing for reading; bitmaps are not interpreted (their autoclear
// bit is cleared on the first write, which the spec allows).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace keel::block::qcow2 {

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t kMinClusterBits = 9;
inline constexpr uint32_t kMaxClusterBits = 21;  // 2 MiB, as QEMU
inline constexpr uint32_t kV2HeaderBytes = 72;
inline constexpr uint32_t kV3MinHeaderBytes = 104;
// What Keel writes for v3: the fields through compression_type, padded to 8.
inline constexpr uint32_t kV3HeaderBytes = 112;
// Implementation limits, the same as QEMU's, so every image QEMU opens
// opens here and a hostile header cannot make us allocate more.
inline constexpr uint64_t kMaxL1Bytes = 32ull << 20;
inline constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;
inline constexpr uint32_t kMaxBackingNameBytes = 1023;
inline constexpr uint32_t kMaxSnapshots = 65536;
// Host offsets in L1/L2/refcount entries have bits 9..55.
inline constexpr uint64_t kMaxHostOffset = 1ull << 56;

// Header field byte offsets (for in-place header updates).
inline constexpr uint64_t kRefcountTableOffsetField = 48;  // then refcount_table_clusters at 56
inline constexpr uint64_t kIncompatibleFeaturesField = 72;
inline constexpr uint64_t kAutoclearFeaturesField = 88;

// Incompatible feature bits.
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatExternalData = 1ull << 2;
inline constexpr uint64_t kIncompatCompressionType = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
// Compatible feature bits.
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;

// Header extension types.
inline constexpr uint32_t kExtEnd = 0;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureNames = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtEncryption = 0x0537be77;
inline constexpr uint32_t kExtExternalDataFile = 0x44415441;

enum class CompressionType : uint8_t { Zlib = 0, Zstd = 1 };

struct FeatureName {
  uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
  uint8_t bit = 0;
  std::string name;
};

struct Header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size_bytes = 0;  // the virtual disk size
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;  // entries
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = kV2HeaderBytes;
  CompressionType compression_type = CompressionType::Zlib;

  // From the backing file name and the header extensions.
  std::string backing_file;    // empty: no backing file
  std::string backing_format;  // empty: not recorded (probe)
  std::vector<FeatureName> feature_names;
  bool has_bitmaps = false;  // a bitmaps extension is present

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint64_t l2_entries() const { return cluster_size() / 8; }
  uint32_t refcount_bits() const { return uint32_t{1} << refcount_order; }
  bool dirty() const { return (incompatible_features & kIncompatDirty) != 0; }
  bool corrupt() const { return (incompatible_features & kIncompatCorrupt) != 0; }
  bool lazy_refcounts() const { return (compatible_features & kCompatLazyRefcounts) != 0; }
};

// Bytes the caller should read from the start of the file for parse_header:
// enough for any cluster size (the header, its extensions and the backing
// file name all live in the first cluster).
inline constexpr uint64_t kHeaderReadBytes = uint64_t{1} << kMaxClusterBits;

// Parses and checks a header. leading_bytes is the start of the file (at
// least min(file_size, kHeaderReadBytes) bytes, fewer only when the file is
// shorter); file_size_bytes is the whole file's size. Errors name the image
// (what) and the field: Corrupt for a malformed header, Unsupported for a
// valid feature Keel does not implement.
Result<Header> parse_header(std::span<const std::byte> leading_bytes, uint64_t file_size_bytes,
                            std::string_view what);

// L1 entries a virtual size needs with this cluster size.
uint64_t l1_entries_for(uint64_t size_bytes, uint32_t cluster_bits);

// A human name for an incompatible feature bit, from the image's feature
// name table or Keel's own knowledge ("bit 7" if neither knows it).
std::string incompatible_feature_name(const Header& header, uint32_t bit);

// Big-endian helpers shared by the qcow2 code. Inline: every guest request
// reads its L2 entries through load_be64, which as a call was ~2% of a 4 KiB
// qcow2 read (perf, bench/RESULTS.md).
inline uint32_t load_be32(const std::byte* p) {
  uint32_t value = 0;
  for (int i = 0; i < 4; ++i) value = (value << 8) | static_cast<uint8_t>(p[i]);
  return value;
}
inline uint64_t load_be64(const std::byte* p) {
  uint64_t value = 0;
  for (int i = 0; i < 8; ++i) value = (value << 8) | static_cast<uint8_t>(p[i]);
  return value;
}
inline void store_be16(std::byte* p, uint16_t value) {
  p[0] = std::byte(static_cast<uint8_t>(value >> 8));
  p[1] = std::byte(static_cast<uint8_t>(value));
}
inline void store_be32(std::byte* p, uint32_t value) {
  for (int i = 3; i >= 0; --i) {
    p[i] = std::byte(static_cast<uint8_t>(value));
    value >>= 8;
  }
}
inline void store_be64(std::byte* p, uint64_t value) {
  for (int i = 7; i >= 0; --i) {
    p[i] = std::byte(static_cast<uint8_t>(value));
    value >>= 8;
  }
}

}  // namespace keel::block::qcow2
