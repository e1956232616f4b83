// GuestMemory: the guest's RAM, in one or two regions around the 32-bit PCI
// hole. A fresh machine's RAM is private anonymous memory by default (it
// gets transparent hugepages under the host's usual THP setting, madvise or
// always), or a memfd when asked (MemoryBackend::Memfd: for sharing it with
// another process later, e.g. vhost-user); a restored machine's is a private
// mapping of its snapshot. Devices and loaders reach RAM only through here:
// every access is bounds-checked against the regions, and a range that is not
// wholly inside one region is an error, never a host out-of-bounds access.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "base/fd.h"
#include "base/mmap.h"
#include "base/result.h"
#include "memory/populated_ranges.h"

namespace keel::memory {

// A guest-physical address; a distinct type so it cannot mix with host pointers.
struct GuestAddr {
  uint64_t value = 0;
  constexpr GuestAddr() = default;
  constexpr explicit GuestAddr(uint64_t v) : value(v) {}
  constexpr GuestAddr operator+(uint64_t offset) const { return GuestAddr(value + offset); }
  constexpr auto operator<=>(const GuestAddr&) const = default;
};

struct MemoryRegion {
  GuestAddr start;
  uint64_t size_bytes;
  uint64_t file_offset;  // where this region starts in RAM (ram(), the memfd)
  std::byte* host;       // the mapping of this region
};

// What a fresh machine's RAM is made of.
enum class MemoryBackend {
  Anonymous,  // MAP_PRIVATE|MAP_ANONYMOUS: THP under the host's default setting
  Memfd,      // MAP_SHARED of a memfd: shareable; THP only if shmem_enabled allows
};
// "anon" or "memfd", as the config's memory_backend spells it.
constexpr std::string_view memory_backend_name(MemoryBackend backend) {
  return backend == MemoryBackend::Memfd ? "memfd" : "anon";
}

class GuestMemory {
 public:
  // RAM of size_bytes laid out below hole_start, the rest from hole_end up.
  static Result<GuestMemory> create(uint64_t size_bytes, uint64_t hole_start, uint64_t hole_end,
                                    MemoryBackend backend = MemoryBackend::Anonymous);
  // RAM restored from a snapshot: size_bytes of file from offset (a page
  // multiple), mapped MAP_PRIVATE, so a page is read only when first
  // touched and the guest's writes never reach the file. A page such RAM
  // gives back (discard()) reads as the file's again, not as zeros.
  static Result<GuestMemory> map_private(const Fd& file, uint64_t offset, uint64_t size_bytes,
                                         uint64_t hole_start, uint64_t hole_end);

  enum class Backing { Anonymous, SharedMemfd, PrivateFile };
  Backing backing() const { return backing_; }

  uint64_t size_bytes() const { return size_bytes_; }
  const std::vector<MemoryRegion>& regions() const { return regions_; }
  // The memfd (SharedMemfd) or the snapshot file (PrivateFile); invalid for
  // anonymous RAM.
  const Fd& fd() const { return fd_; }

  // The ranges of ram() (byte offsets, page aligned, in order) that may
  // hold anything but zeros; every other page reads as zeros and need not be
  // read, written to a snapshot or sent. Anonymous RAM: the pages present or
  // swapped out (/proc/self/pagemap); a memfd: its data extents (SEEK_DATA);
  // a snapshot's private mapping: all of it (an untouched page reads the
  // file). May over-report, never under-reports. The guest may touch more
  // pages while this runs: callers pause it or track dirty pages first.
  Result<std::vector<ByteRange>> populated_ranges() const;

  // The host span behind [address, address + length), or an error if any of
  // it is outside RAM or straddles two regions.
  Result<std::span<std::byte>> host_span(GuestAddr address, uint64_t length) const;

  Result<void> read(GuestAddr address, std::span<std::byte> data) const;
  Result<void> write(GuestAddr address, std::span<const std::byte> data) const;

  template <typename T>
  Result<T> read_obj(GuestAddr address) const {
    static_assert(std::is_trivially_copyable_v<T>);
    T value;
    TRY(read(address, std::as_writable_bytes(std::span(&value, 1))));
    return value;
  }
  template <typename T>
  Result<void> write_obj(GuestAddr address, const T& value) const {
    static_assert(std::is_trivially_copyable_v<T>);
    return write(address, std::as_bytes(std::span(&value, 1)));
  }

  // One load or store of a naturally aligned 1, 2, 4 or 8-byte value that
  // the guest may change at the same moment (virtqueue indices and event
  // fields): never torn. read_obj/write_obj copy with memcpy, which may
  // read a 2-byte value as two loads, so a guest moving idx from 0x21ff to
  // 0x2200 could be seen as 0x22ff. A misaligned address is OutOfRange.
  template <typename T>
  Result<T> load_atomic(GuestAddr address) const {
    static_assert(std::is_integral_v<T> && (sizeof(T) == 1 || sizeof(T) == 2 ||
                                            sizeof(T) == 4 || sizeof(T) == 8));
    std::span<std::byte> bytes = TRY(locate_aligned(address, sizeof(T), nullptr));
    return std::atomic_ref<T>(*reinterpret_cast<T*>(bytes.data())).load(std::memory_order_relaxed);
  }
  template <typename T>
  Result<void> store_atomic(GuestAddr address, T value) const {
    static_assert(std::is_integral_v<T> && (sizeof(T) == 1 || sizeof(T) == 2 ||
                                            sizeof(T) == 4 || sizeof(T) == 8));
    uint64_t file_offset = 0;
    std::span<std::byte> bytes = TRY(locate_aligned(address, sizeof(T), &file_offset));
    std::atomic_ref<T>(*reinterpret_cast<T*>(bytes.data())).store(value, std::memory_order_relaxed);
    mark_dirty(file_offset, sizeof(T));
    return ok();
  }

  // True if [address, address + length) is RAM (in one region).
  bool contains(GuestAddr address, uint64_t length) const;

  // Gives the host memory behind [address, address + size_bytes) back: the
  // anonymous pages are dropped (MADV_DONTNEED) or the memfd's freed (a hole
  // punched), and the range reads as zero on the next touch, by the guest or
  // by us; for RAM mapped from a snapshot,
  // the private copies are dropped and the range reads as the file's bytes. For the balloon and free page
  // reporting. address and size_bytes must be multiples of kPageBytes and
  // the range wholly inside one region; zero bytes is a no-op.
  Result<void> discard(GuestAddr address, uint64_t size_bytes) const;

  static constexpr uint64_t kPageBytes = 4096;

  // VMM-side dirty tracking for migration. KVM's dirty log sees only the
  // guest's own writes; device emulation writes RAM from host threads, so
  // while tracking is on every page that write() changes, host_span() hands
  // out (its callers may write through the span) or discard() zeroes is
  // marked here. Pages are numbered by their offset in ram(),
  // the same numbering as the migration stream.
  void set_dirty_tracking(bool on) const;
  // ORs the marked pages into bitmap (one bit per page, at least
  // page_count() bits) and clears the marks.
  void take_dirty_pages(std::span<uint64_t> bitmap) const;
  uint64_t page_count() const { return size_bytes_ / kPageBytes; }
  // All of RAM by that offset (the low region, then the high one): what a
  // migration sends and receives.
  std::span<std::byte> ram() const { return {mapping_.data(), size_bytes_}; }

 private:
  struct DirtyLog {
    std::atomic<bool> on{false};
    std::unique_ptr<std::atomic<uint64_t>[]> words;
    size_t word_count = 0;
  };
  // The region and offset behind a range, without marking it dirty.
  Result<std::span<std::byte>> locate(GuestAddr address, uint64_t length,
                                      uint64_t* file_offset) const;
  // locate(), for an address that must be a multiple of length.
  Result<std::span<std::byte>> locate_aligned(GuestAddr address, uint64_t length,
                                              uint64_t* file_offset) const;
  void mark_dirty(uint64_t file_offset, uint64_t length) const;

  GuestMemory(Fd fd, Mmap mapping, uint64_t size_bytes, uint64_t hole_start, uint64_t hole_end,
              Backing backing);

  Backing backing_;

  Fd fd_;
  Mmap mapping_;  // all of RAM (anonymous, the memfd shared, or the file private); regions point into it
  std::vector<MemoryRegion> regions_;
  uint64_t size_bytes_;
  std::unique_ptr<DirtyLog> dirty_;  // a pointer so GuestMemory stays movable
};

}  // namespace keel::memory
