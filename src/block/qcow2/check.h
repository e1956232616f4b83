// Checking a qcow2 image's metadata (keel-img check): every cluster the
// image references, counted from the header, the active L1/L2 tables, the
// internal snapshots' tables and the refcount structures, against the stored
// refcounts. Spec: QEMU docs/interop/qcow2.txt, "Host cluster management",
// "Cluster mapping", "Snapshots".
// Implemented: leaks (a refcount above the references), corruptions (below
// them, references outside the file, unaligned entries, bit 63 "copied"
// set on a cluster whose refcount is not 1). Missing: --repair, bitmaps
// (images with a bitmaps extension are refused).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/result.h"

namespace keel::block::qcow2 {

struct CheckReport {
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t allocated_clusters = 0;  // guest clusters with data in this image
  uint64_t total_clusters = 0;      // guest clusters of the virtual disk
  uint64_t image_end_offset = 0;    // one past the last referenced cluster
  std::vector<std::string> messages;  // one per problem found (the first few thousand)
};

// An error means the check could not run (an unreadable or unparsable
// header); problems found in the tables are in the report.
Result<CheckReport> check_image(const std::string& path);

}  // namespace keel::block::qcow2
