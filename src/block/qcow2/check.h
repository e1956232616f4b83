// Checking a qcow2 image's metadata (keel-img check): every cluster the
// image references, counted from the header, the active L1/L2 tables, the
// internal snapshots' tables and the refcount structures, against the stored
// refcounts. Spec: QEMU docs/interop/qcow2.txt, "Host cluster management",
// "Cluster mapping", "Snapshots".
// Implemented: leaks (a refcount above the references), corruptions (below
// them, references outside the file, unaligned entries, bit 63 "copied"
// set on a cluster whose refcount is not 1); repairing leaks (refcounts
// lowered to the references found). Missing: repairing corruptions, bitmaps
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
  struct Leak {
    uint64_t cluster = 0;
    uint64_t refcount = 0;    // stored
    uint64_t references = 0;  // what the refcount should be
  };
  std::vector<Leak> leaked;  // every leak (not capped like messages)
};

// An error means the check could not run (an unreadable or unparsable
// header); problems found in the tables are in the report.
Result<CheckReport> check_image(const std::string& path);

// Lowers each leaked cluster's refcount (from report, a check of the same
// unchanged image) to its references, then syncs. Leaks only: a lower
// refcount than the references (corruption) is never touched, and no table
// entry changes. The image must not be in use. Returns the leaks fixed.
Result<uint64_t> repair_leaks(const std::string& path, const CheckReport& report);

}  // namespace keel::block::qcow2
