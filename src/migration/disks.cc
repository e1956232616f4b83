#include "migration/disks.h"

#include <sys/stat.h>

#include <fmt/format.h>

#include "base/bytes.h"

namespace keel::migration {
namespace {

constexpr uint32_t kMaxDisks = 256;
constexpr uint16_t kMaxPathBytes = 4096;

}  // namespace

Result<DiskIdentity> identify_disk(const std::string& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) < 0) return fail_errno(fmt::format("disk {}", path));
  return DiskIdentity{
      .path = path,
      .size_bytes = static_cast<uint64_t>(info.st_size),
      .device = static_cast<uint64_t>(info.st_dev),
      .inode = static_cast<uint64_t>(info.st_ino),
      .modified_ns = static_cast<int64_t>(info.st_mtim.tv_sec) * 1'000'000'000 +
                     info.st_mtim.tv_nsec,
  };
}

Result<void> check_disks_unchanged(std::span<const DiskIdentity> saved) {
  for (const DiskIdentity& disk : saved) {
    Result<DiskIdentity> now = identify_disk(disk.path);
    if (!now) {
      return fail(Error(now.error()).wrap("the snapshot's disk is gone"));
    }
    std::string_view change;
    if (now->device != disk.device || now->inode != disk.inode) {
      change = "was replaced by another file";
    } else if (now->size_bytes != disk.size_bytes) {
      change = "changed size";
    } else if (now->modified_ns != disk.modified_ns) {
      change = "was modified";
    }
    if (!change.empty()) {
      return fail(Errc::InvalidArgument,
                  fmt::format("disk {} {} since the snapshot was taken; restoring onto it "
                              "would corrupt it",
                              disk.path, change));
    }
  }
  return ok();
}

std::vector<std::byte> encode_disks(std::span<const DiskIdentity> disks) {
  ByteWriter out;
  out.put(static_cast<uint32_t>(disks.size()));
  for (const DiskIdentity& disk : disks) {
    out.put(disk.size_bytes);
    out.put(disk.device);
    out.put(disk.inode);
    out.put(disk.modified_ns);
    out.put(static_cast<uint16_t>(disk.path.size()));
    out.put_string(disk.path);
  }
  return std::move(out.data());
}

Result<std::vector<DiskIdentity>> decode_disks(std::span<const std::byte> payload,
                                               std::string_view label) {
  ByteReader in(payload);
  std::string context(label);
  auto count = TRY_CONTEXT(in.get<uint32_t>("disk count"), context);
  if (count > kMaxDisks) {
    return fail(Errc::Corrupt, fmt::format("{}: {} disks (at most {})", label, count, kMaxDisks));
  }
  std::vector<DiskIdentity> disks(count);
  for (DiskIdentity& disk : disks) {
    disk.size_bytes = TRY_CONTEXT(in.get<uint64_t>("disk size"), context);
    disk.device = TRY_CONTEXT(in.get<uint64_t>("disk device"), context);
    disk.inode = TRY_CONTEXT(in.get<uint64_t>("disk inode"), context);
    disk.modified_ns = TRY_CONTEXT(in.get<int64_t>("disk mtime"), context);
    auto path_bytes = TRY_CONTEXT(in.get<uint16_t>("disk path length"), context);
    if (path_bytes == 0 || path_bytes > kMaxPathBytes) {
      return fail(Errc::Corrupt, fmt::format("{}: disk path length {}", label, path_bytes));
    }
    auto path = TRY_CONTEXT(in.get_bytes(path_bytes, "disk path"), context);
    disk.path.assign(reinterpret_cast<const char*>(path.data()), path.size());
  }
  if (in.remaining() != 0) {
    return fail(Errc::Corrupt, fmt::format("{}: {} bytes after the last disk", label,
                                           in.remaining()));
  }
  return disks;
}

}  // namespace keel::migration
