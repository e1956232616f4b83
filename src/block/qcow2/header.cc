// qcow2 header parsing; see header.h for the status card.
#include "block/qcow2/header.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

namespace keel::block::qcow2 {
namespace {

constexpr uint64_t kKnownIncompatible = kIncompatDirty | kIncompatCorrupt | kIncompatExternalData |
                                        kIncompatCompressionType | kIncompatExtendedL2;

Failure corrupt(std::string_view what, std::string_view detail) {
  return fail(Errc::Corrupt, fmt::format("qcow2 image {}: {}", what, detail));
}

Failure unsupported(std::string_view what, std::string_view detail) {
  return fail(Errc::Unsupported, fmt::format("qcow2 image {}: {}", what, detail));
}

// Checks that [offset, offset + length) lies inside a file of file_size
// bytes, without overflow.
bool inside(uint64_t offset, uint64_t length, uint64_t file_size) {
  return offset <= file_size && length <= file_size - offset;
}

}  // namespace

uint64_t l1_entries_for(uint64_t size_bytes, uint32_t cluster_bits) {
  // One L1 entry maps an L2 table: cluster_size / 8 clusters.
  const uint32_t shift = cluster_bits + (cluster_bits - 3);
  const uint64_t per_entry = uint64_t{1} << shift;
  return size_bytes / per_entry + (size_bytes % per_entry != 0 ? 1 : 0);
}

std::string incompatible_feature_name(const Header& header, uint32_t bit) {
  for (const FeatureName& feature : header.feature_names) {
    if (feature.type == 0 && feature.bit == bit && !feature.name.empty()) {
      return fmt::format("'{}' (bit {})", feature.name, bit);
    }
  }
  switch (bit) {
    case 0: return "'dirty' (bit 0)";
    case 1: return "'corrupt' (bit 1)";
    case 2: return "'external data file' (bit 2)";
    case 3: return "'compression type' (bit 3)";
    case 4: return "'extended L2 entries' (bit 4)";
    default: return fmt::format("bit {}", bit);
  }
}

Result<Header> parse_header(std::span<const std::byte> bytes, uint64_t file_size,
                            std::string_view what) {
  if (bytes.size() > file_size) bytes = bytes.first(file_size);
  if (bytes.size() < kV2HeaderBytes) {
    return corrupt(what, fmt::format("{} bytes is too short for a header", bytes.size()));
  }
  const std::byte* p = bytes.data();
  if (load_be32(p) != kMagic) return corrupt(what, "bad magic (not a qcow2 image)");

  Header h;
  h.version = load_be32(p + 4);
  if (h.version != 2 && h.version != 3) {
    return unsupported(what, fmt::format("version {} (Keel reads versions 2 and 3)", h.version));
  }
  h.backing_file_offset = load_be64(p + 8);
  h.backing_file_size = load_be32(p + 16);
  h.cluster_bits = load_be32(p + 20);
  h.size_bytes = load_be64(p + 24);
  h.crypt_method = load_be32(p + 32);
  h.l1_size = load_be32(p + 36);
  h.l1_table_offset = load_be64(p + 40);
  h.refcount_table_offset = load_be64(p + 48);
  h.refcount_table_clusters = load_be32(p + 56);
  h.nb_snapshots = load_be32(p + 60);
  h.snapshots_offset = load_be64(p + 64);

  if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits) {
    return corrupt(what, fmt::format("cluster_bits {} outside {}..{}", h.cluster_bits,
                                     kMinClusterBits, kMaxClusterBits));
  }
  const uint64_t cluster_size = h.cluster_size();

  if (h.version == 3) {
    if (bytes.size() < kV3MinHeaderBytes) {
      return corrupt(what, fmt::format("{} bytes is too short for a version 3 header",
                                       bytes.size()));
    }
    h.incompatible_features = load_be64(p + 72);
    h.compatible_features = load_be64(p + 80);
    h.autoclear_features = load_be64(p + 88);
    h.refcount_order = load_be32(p + 96);
    h.header_length = load_be32(p + 100);
    if (h.header_length < kV3MinHeaderBytes || h.header_length % 8 != 0 ||
        h.header_length > cluster_size || h.header_length > bytes.size()) {
      return corrupt(what, fmt::format("header_length {} (must be a multiple of 8, at least {} "
                                       "and inside the first cluster and the file)",
                                       h.header_length, kV3MinHeaderBytes));
    }
    if (h.refcount_order > 6) {
      return corrupt(what, fmt::format("refcount_order {} exceeds 6", h.refcount_order));
    }
    // compression_type lives at byte 104 when the header is long enough.
    const uint8_t compression =
        h.header_length > 104 ? static_cast<uint8_t>(p[104]) : uint8_t{0};
    if ((h.incompatible_features & kIncompatCompressionType) != 0) {
      if (compression == 0) {
        return corrupt(what, "the compression type feature is set but compression_type is 0");
      }
    } else if (compression != 0) {
      return corrupt(what, fmt::format("compression_type {} without the compression type feature",
                                       compression));
    }
    if (compression > 1) {
      return unsupported(what, fmt::format("compression_type {} (Keel reads zlib and zstd)",
                                           compression));
    }
    h.compression_type = static_cast<CompressionType>(compression);
  }

  const uint64_t header_end = h.header_length;

  // Header extensions follow the header up to the end of the first cluster.
  const uint64_t area_end = std::min<uint64_t>(cluster_size, bytes.size());
  uint64_t ext_end = header_end;
  bool saw_backing_format = false;
  if (h.version == 3) {
    uint64_t at = header_end;
    while (true) {
      if (at + 8 > area_end) {
        // A header that fills its cluster exactly may have no end marker.
        if (at == area_end) break;
        return corrupt(what, fmt::format("header extension at {} runs past the first cluster", at));
      }
      const uint32_t type = load_be32(p + at);
      const uint32_t length = load_be32(p + at + 4);
      if (type == kExtEnd) {
        at += 8;
        break;
      }
      const uint64_t padded = (uint64_t{length} + 7) & ~uint64_t{7};
      if (padded > area_end - at - 8) {
        return corrupt(what, fmt::format("header extension {:#x} at {}: length {} runs past the "
                                         "first cluster",
                                         type, at, length));
      }
      const std::byte* data = p + at + 8;
      switch (type) {
        case kExtBackingFormat:
          if (saw_backing_format) return corrupt(what, "two backing format extensions");
          saw_backing_format = true;
          if (length == 0 || length > 64) {
            return corrupt(what, fmt::format("backing format extension length {}", length));
          }
          h.backing_format.assign(reinterpret_cast<const char*>(data), length);
          break;
        case kExtFeatureNames:
          for (uint64_t i = 0; i + 48 <= length; i += 48) {
            FeatureName feature;
            feature.type = static_cast<uint8_t>(data[i]);
            feature.bit = static_cast<uint8_t>(data[i + 1]);
            const char* name = reinterpret_cast<const char*>(data + i + 2);
            feature.name.assign(name, strnlen(name, 46));
            h.feature_names.push_back(std::move(feature));
          }
          break;
        case kExtBitmaps:
          h.has_bitmaps = true;
          break;
        case kExtEncryption:
          return unsupported(what, "encryption (an encryption header extension is present)");
        default:
          // Bitmaps, the external data file name (refused below through its
          // feature bit) and unknown extensions: safe to skip.
          break;
      }
      at += 8 + padded;
    }
    ext_end = at;
  }

  // Feature checks come after the extensions so errors can use their names.
  if (h.version == 3) {
    const uint64_t unknown = h.incompatible_features & ~kKnownIncompatible;
    if (unknown != 0) {
      const uint32_t bit = static_cast<uint32_t>(__builtin_ctzll(unknown));
      return unsupported(what, fmt::format("unknown incompatible feature {}",
                                           incompatible_feature_name(h, bit)));
    }
    if ((h.incompatible_features & kIncompatExternalData) != 0) {
      return unsupported(what, "the external data file feature (incompatible bit 2) is not "
                               "supported");
    }
    if ((h.incompatible_features & kIncompatExtendedL2) != 0) {
      return unsupported(what, "the extended L2 entries feature (incompatible bit 4, "
                               "subclusters) is not supported");
    }
  }
  if (h.crypt_method != 0) {
    return unsupported(what, fmt::format("encryption (crypt_method {}) is not supported",
                                         h.crypt_method));
  }

  // The virtual size: the L1 table must map all of it, within QEMU's limit.
  if (h.size_bytes > (uint64_t{1} << 62)) {
    return corrupt(what, fmt::format("virtual size {} is implausible", h.size_bytes));
  }
  if (uint64_t{h.l1_size} * 8 > kMaxL1Bytes) {
    return corrupt(what, fmt::format("l1_size {} exceeds the {} MiB limit", h.l1_size,
                                     kMaxL1Bytes >> 20));
  }
  const uint64_t l1_needed = l1_entries_for(h.size_bytes, h.cluster_bits);
  if (h.l1_size < l1_needed) {
    return corrupt(what, fmt::format("l1_size {} is too small for virtual size {} (needs {})",
                                     h.l1_size, h.size_bytes, l1_needed));
  }
  if (h.l1_size > 0) {
    if (h.l1_table_offset % cluster_size != 0 || h.l1_table_offset == 0 ||
        !inside(h.l1_table_offset, uint64_t{h.l1_size} * 8, file_size)) {
      return corrupt(what, fmt::format("l1_table_offset {:#x} ({} entries) is unaligned or "
                                       "outside the file ({} bytes)",
                                       h.l1_table_offset, h.l1_size, file_size));
    }
  }

  // The refcount table.
  if (h.refcount_table_clusters == 0 ||
      uint64_t{h.refcount_table_clusters} * cluster_size > kMaxRefcountTableBytes) {
    return corrupt(what, fmt::format("refcount_table_clusters {} (must be 1..{} bytes' worth)",
                                     h.refcount_table_clusters, kMaxRefcountTableBytes));
  }
  if (h.refcount_table_offset % cluster_size != 0 || h.refcount_table_offset == 0 ||
      !inside(h.refcount_table_offset, uint64_t{h.refcount_table_clusters} * cluster_size,
              file_size)) {
    return corrupt(what, fmt::format("refcount_table_offset {:#x} is unaligned or outside the "
                                     "file ({} bytes)",
                                     h.refcount_table_offset, file_size));
  }

  // Internal snapshots: only the table's placement is checked here.
  if (h.nb_snapshots > kMaxSnapshots) {
    return corrupt(what, fmt::format("nb_snapshots {} exceeds {}", h.nb_snapshots, kMaxSnapshots));
  }
  if (h.nb_snapshots > 0 &&
      (h.snapshots_offset % cluster_size != 0 || h.snapshots_offset == 0 ||
       h.snapshots_offset >= file_size)) {
    return corrupt(what, fmt::format("snapshots_offset {:#x} is unaligned or outside the file",
                                     h.snapshots_offset));
  }

  // The backing file name: in the first cluster, after the extensions.
  if (h.backing_file_offset != 0) {
    if (h.backing_file_size == 0 || h.backing_file_size > kMaxBackingNameBytes) {
      return corrupt(what, fmt::format("backing_file_size {} (must be 1..{})",
                                       h.backing_file_size, kMaxBackingNameBytes));
    }
    if (h.backing_file_offset < ext_end ||
        !inside(h.backing_file_offset, h.backing_file_size, area_end)) {
      return corrupt(what, fmt::format("backing file name at {:#x} ({} bytes) overlaps the "
                                       "header or leaves the first cluster",
                                       h.backing_file_offset, h.backing_file_size));
    }
    h.backing_file.assign(reinterpret_cast<const char*>(p + h.backing_file_offset),
                          h.backing_file_size);
    if (h.backing_file.find('\0') != std::string::npos) {
      return corrupt(what, "the backing file name contains a NUL byte");
    }
  } else if (!h.backing_format.empty()) {
    // A format without a file is harmless; forget it.
    h.backing_format.clear();
  }
  return h;
}

}  // namespace keel::block::qcow2
