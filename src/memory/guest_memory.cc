#include "memory/guest_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>

#include <fmt/format.h>

namespace keel::memory {

namespace {

// Transparent hugepages are 2 MiB on x86-64: RAM that starts on such a
// boundary can be backed by them from its first byte.
constexpr uint64_t kHugePageBytes = 2 << 20;

}  // namespace

Result<GuestMemory> GuestMemory::create(uint64_t size_bytes, uint64_t hole_start,
                                        uint64_t hole_end, MemoryBackend backend) {
  if (size_bytes == 0 || size_bytes % kPageBytes != 0) {
    return fail(Errc::InvalidArgument,
                fmt::format("guest memory of {} bytes: must be a non-zero multiple of 4 KiB",
                            size_bytes));
  }
  Fd fd;
  Mmap mapping;
  if (backend == MemoryBackend::Anonymous) {
    // Private anonymous memory gets hugepages under the host's usual THP
    // setting (enabled=madvise or always) once asked below, where shmem
    // needs shmem_enabled, which Debian leaves at never. NORESERVE: RAM the
    // guest never touches costs nothing, as a memfd's holes did.
    mapping = TRY_CONTEXT(Mmap::anonymous_aligned(size_bytes, kHugePageBytes, MAP_NORESERVE),
                          "guest RAM");
  } else {
    int raw = ::memfd_create("keel-guest-ram", MFD_CLOEXEC);
    if (raw < 0) return fail_errno("memfd_create for guest RAM");
    fd = Fd(raw);
    if (::ftruncate(fd.get(), static_cast<off_t>(size_bytes)) < 0) {
      return fail_errno(fmt::format("size guest RAM memfd to {} bytes", size_bytes));
    }
    mapping = TRY(Mmap::file(fd, size_bytes, 0, PROT_READ | PROT_WRITE,
                             MAP_SHARED | MAP_NORESERVE));
  }
  // Transparent hugepages cut TLB misses and first-touch faults for guest
  // RAM; advisory only.
  (void)::madvise(mapping.data(), size_bytes, MADV_HUGEPAGE);

  return GuestMemory(std::move(fd), std::move(mapping), size_bytes, hole_start, hole_end,
                     backend == MemoryBackend::Anonymous ? Backing::Anonymous
                                                         : Backing::SharedMemfd);
}

Result<std::vector<ByteRange>> GuestMemory::populated_ranges() const {
  switch (backing_) {
    case Backing::Anonymous:
      return TRY_CONTEXT(resident_ranges(ram()), "guest RAM");
    case Backing::SharedMemfd:
      return TRY_CONTEXT(file_data_ranges(fd_, size_bytes_, kPageBytes), "guest RAM memfd");
    case Backing::PrivateFile:
      break;
  }
  return std::vector<ByteRange>{{0, size_bytes_}};
}

Result<GuestMemory> GuestMemory::map_private(const Fd& file, uint64_t offset, uint64_t size_bytes,
                                             uint64_t hole_start, uint64_t hole_end) {
  if (size_bytes == 0 || size_bytes % kPageBytes != 0 || offset % kPageBytes != 0) {
    return fail(Errc::InvalidArgument,
                fmt::format("guest memory of {} bytes at file offset {}: both must be 4 KiB "
                            "multiples, the size non-zero", size_bytes, offset));
  }
  uint64_t file_bytes = TRY(file.size_bytes());
  if (offset > file_bytes || size_bytes > file_bytes - offset) {
    return fail(Errc::OutOfRange,
                fmt::format("guest memory {}+{} runs past the end of the file ({} bytes)", offset,
                            size_bytes, file_bytes));
  }
  Fd own = TRY(file.duplicate());
  Mmap mapping = TRY(Mmap::file(own, size_bytes, offset, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_NORESERVE));
  return GuestMemory(std::move(own), std::move(mapping), size_bytes, hole_start, hole_end,
                     Backing::PrivateFile);
}

GuestMemory::GuestMemory(Fd fd, Mmap mapping, uint64_t size_bytes, uint64_t hole_start,
                         uint64_t hole_end, Backing backing)
    : backing_(backing), fd_(std::move(fd)), mapping_(std::move(mapping)),
      size_bytes_(size_bytes), dirty_(std::make_unique<DirtyLog>()) {
  dirty_->word_count = (size_bytes / kPageBytes + 63) / 64;
  dirty_->words = std::make_unique<std::atomic<uint64_t>[]>(dirty_->word_count);
  uint64_t low = std::min(size_bytes, hole_start);
  regions_.push_back({GuestAddr(0), low, 0, mapping_.data()});
  if (size_bytes > low) {
    regions_.push_back({GuestAddr(hole_end), size_bytes - low, low, mapping_.data() + low});
  }
}

Result<std::span<std::byte>> GuestMemory::locate(GuestAddr address, uint64_t length,
                                                 uint64_t* file_offset) const {
  for (const MemoryRegion& region : regions_) {
    if (address.value >= region.start.value &&
        address.value - region.start.value < region.size_bytes) {
      uint64_t offset = address.value - region.start.value;
      if (length > region.size_bytes - offset) break;
      if (file_offset != nullptr) *file_offset = region.file_offset + offset;
      return std::span<std::byte>(region.host + offset, length);
    }
  }
  return fail(Errc::OutOfRange,
              fmt::format("guest range {:#x}+{:#x} is not RAM", address.value, length));
}

Result<std::span<std::byte>> GuestMemory::locate_aligned(GuestAddr address, uint64_t length,
                                                         uint64_t* file_offset) const {
  // Regions start on page boundaries of a page-aligned mapping, so an
  // aligned guest address is an aligned host address.
  if (address.value % length != 0) {
    return fail(Errc::OutOfRange, fmt::format("guest address {:#x} is not {}-byte aligned",
                                              address.value, length));
  }
  return locate(address, length, file_offset);
}

Result<std::span<std::byte>> GuestMemory::host_span(GuestAddr address, uint64_t length) const {
  uint64_t file_offset = 0;
  std::span<std::byte> span = TRY(locate(address, length, &file_offset));
  mark_dirty(file_offset, length);
  return span;
}

void GuestMemory::mark_dirty(uint64_t file_offset, uint64_t length) const {
  if (length == 0 || !dirty_->on.load(std::memory_order_acquire)) return;
  uint64_t last = (file_offset + length - 1) / kPageBytes;
  for (uint64_t page = file_offset / kPageBytes; page <= last; ++page) {
    dirty_->words[page / 64].fetch_or(uint64_t{1} << (page % 64), std::memory_order_release);
  }
}

void GuestMemory::set_dirty_tracking(bool on) const {
  dirty_->on.store(on, std::memory_order_release);
}

void GuestMemory::take_dirty_pages(std::span<uint64_t> bitmap) const {
  size_t count = std::min(bitmap.size(), dirty_->word_count);
  for (size_t i = 0; i < count; ++i) {
    bitmap[i] |= dirty_->words[i].exchange(0, std::memory_order_acq_rel);
  }
}

bool GuestMemory::contains(GuestAddr address, uint64_t length) const {
  return locate(address, length, nullptr).has_value();
}

Result<void> GuestMemory::discard(GuestAddr address, uint64_t size_bytes) const {
  if (address.value % kPageBytes != 0 || size_bytes % kPageBytes != 0) {
    return fail(Errc::InvalidArgument,
                fmt::format("discard {:#x}+{:#x}: not 4 KiB aligned", address.value, size_bytes));
  }
  if (size_bytes == 0) return ok();
  for (const MemoryRegion& region : regions_) {
    if (address.value < region.start.value ||
        address.value - region.start.value >= region.size_bytes) {
      continue;
    }
    const uint64_t offset = address.value - region.start.value;
    if (size_bytes > region.size_bytes - offset) break;
    if (backing_ != Backing::SharedMemfd) {
      // Private memory: dropping the pages frees them (KVM's mappings go
      // too, through the MMU notifiers). Anonymous RAM reads back as zeros.
      // RAM restored from a snapshot: the private copies were the only
      // memory this process owned for the range (the snapshot file's pages
      // are page cache, shared and reclaimable); the range reads back
      // as the file's bytes, which neither the balloon nor free page
      // reporting promises the driver otherwise (PAGE_POISON is not offered).
      if (::madvise(region.host + offset, size_bytes, MADV_DONTNEED) < 0) {
        return fail_errno(
            fmt::format("madvise DONTNEED at guest {:#x}+{:#x}", address.value, size_bytes));
      }
      mark_dirty(region.file_offset + offset, size_bytes);  // zeros or the file's bytes again
      return ok();
    }
    // The mapping is MAP_SHARED on a memfd, so MADV_DONTNEED would only drop
    // our page table entries and leave the shmem pages allocated; punching
    // a hole in the file frees them (and zeroes every mapping of them,
    // including KVM's, through the MMU notifiers).
    if (::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(region.file_offset + offset),
                    static_cast<off_t>(size_bytes)) < 0) {
      return fail_errno(
          fmt::format("punch a hole at guest {:#x}+{:#x}", address.value, size_bytes));
    }
    mark_dirty(region.file_offset + offset, size_bytes);  // now zeros, as a migration must send
    return ok();
  }
  return fail(Errc::OutOfRange,
              fmt::format("discard {:#x}+{:#x}: not RAM", address.value, size_bytes));
}

Result<void> GuestMemory::read(GuestAddr address, std::span<std::byte> data) const {
  std::span<std::byte> source = TRY(locate(address, data.size(), nullptr));
  // An empty span may have a null data(); memcpy with it is undefined even
  // for 0 bytes.
  if (!data.empty()) std::memcpy(data.data(), source.data(), data.size());
  return ok();
}

Result<void> GuestMemory::write(GuestAddr address, std::span<const std::byte> data) const {
  uint64_t file_offset = 0;
  std::span<std::byte> target = TRY(locate(address, data.size(), &file_offset));
  if (!data.empty()) std::memcpy(target.data(), data.data(), data.size());
  mark_dirty(file_offset, data.size());
  return ok();
}

}  // namespace keel::memory
