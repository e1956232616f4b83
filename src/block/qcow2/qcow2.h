// Qcow2Image: a qcow2 image as a BlockBackend.
// Spec: QEMU docs/interop/qcow2.txt (versions 2 and 3).
// Implemented: reads through the L1/L2 tables with a bounded L2 cache;
// unallocated clusters from the backing image (qcow2 or raw, opened through
// open_image, so chains of any depth) or zeroes, zeroes past the end of a
// shorter backing image; zero clusters (v3 bit 0); compressed clusters (zlib,
// zstd). Writes: in place to clusters whose refcount is 1; otherwise a new
// cluster (copy-on-write of the rest of a partial cluster from what the old
// mapping or the backing image held; nothing for a new cluster past the
// file's end whose rest reads as zeroes), new L2 tables, refcount updates,
// discard (drops allocated clusters; in an overlay v3 marks them zero, v2
// leaves them), write_zeroes (v3 zero clusters for whole clusters), flush.
// The dirty bit is honoured by refusing to write an image that has it; Keel
// never sets it (no lazy refcounts). A corrupt image opens read-only only.
// Compressed writes (write_compressed: zlib, into unallocated clusters only,
// packed several to a host cluster as QEMU does), block_status (what each
// range is: keel-img map, convert), resize (grow, with a larger L1 table if
// needed; shrink, dropping the clusters past the new end), make_empty.
// Asynchronous face (virtio-blk; qcow2_async.cc): guest offsets are
// translated through the L2 cache at submit() and the data of allocated
// clusters goes to the image file through io_uring (IoRing, as RawFile), many
// requests in flight. An allocating write takes a contiguous run of new host
// clusters for all the clusters it fills in one allocation, writes the rest of
// partly written new clusters (copy-on-write) synchronously, and its data
// through the ring; the L2 entries change when that data is written. Requests
// that touch a guest cluster being allocated wait until it is (no lost or torn
// writes). Reads of zero, compressed and backing clusters, flush, discard and
// write-zeroes run synchronously at submit().
// Missing: writing images with internal snapshots (opened read-only fine,
// writable refused), zstd compressed writes, asynchronous reads of the
// backing image and of compressed clusters.
//
// Crash safety (kill -9 at any point leaves no corruption, only leaks): a new
// cluster's refcount changes in the cache when it is allocated and reaches
// the file before any sync that orders a table entry pointing at it
// (sync_file), its data then (the
// asynchronous path: through the ring), while the L2 entry pointing at it
// changes in the cache only, after the data write completed; write_back() (on flush, on close,
// and when many tables are dirty) syncs the file, then writes the dirty L2
// tables. An entry that stops pointing at a cluster is written and synced
// before the cluster's refcount drops. New L2 tables are zeroed in the file
// when made, and their L1 entries written by write_back after its sync. Like a disk's write cache, data written
// since the last flush may be lost in a crash; metadata stays consistent.
// Resizing: a grown L1 table is written and synced at its new place before
// one header write switches the size, the L1 size and its offset together;
// the old table is freed after. Clusters are freed (their refcounts dropped)
// only when no asynchronous I/O is in flight, so none reads or writes a
// cluster that was reused meanwhile. Shrinking writes the smaller size first, then
// drops the clusters past it (in the order above), then the L2 tables wholly
// past it (L1 entries synced before the tables' refcounts drop).
//
// Hostile images: every offset, size and index read from the file is checked
// before use; a bad one is an Errc::Corrupt error naming the image and the
// table entry, never an out-of-bounds access or an unbounded allocation.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "block/block_backend.h"
#include "block/image.h"
#include "block/image_lock.h"
#include "block/io_ring.h"
#include "block/qcow2/header.h"
#include "block/qcow2/image_file.h"
#include "block/qcow2/l2_cache.h"
#include "block/qcow2/refcount.h"

namespace keel::block::qcow2 {

// Opens a backing image (read-only, except where keel-img commit writes
// through it); open_image supplies one that counts the chain's depth.
using BackingOpener =
    std::function<Result<std::unique_ptr<BlockBackend>>(const std::string& path, ImageFormat)>;

// L2 table entry bits (also the L1 entry's bit 63).
inline constexpr uint64_t kEntryCopied = 1ull << 63;
inline constexpr uint64_t kEntryCompressed = 1ull << 62;
inline constexpr uint64_t kEntryZero = 1ull << 0;
inline constexpr uint64_t kEntryOffsetMask = 0x00fffffffffffe00ull;

// Where a backing file name recorded in image_path points: absolute names as
// they are, relative ones against image_path's directory.
std::string resolve_backing_path(const std::string& image_path, const std::string& backing_name);

class Qcow2Image final : public BlockBackend {
 public:
  // L2 tables cached per image (at least 4 tables whatever the cluster size).
  static constexpr uint64_t kL2CacheBudgetBytes = 4ull << 20;

  // Replaced clusters awaiting their refcount drop; more trigger write_back.
  static constexpr size_t kMaxPendingFrees = 4096;
  // io_uring submission entries, and data operations in flight at once (a
  // guest request may need several); past that, submit() waits for some.
  static constexpr uint32_t kQueueDepth = 256;
  static constexpr uint32_t kMaxHostOps = 4096;

  // Takes the file's image lock for access (block/image_lock.h) before
  // reading it, unless locking is ForceShare; open_backing locks the rest.
  static Result<std::unique_ptr<Qcow2Image>> open(const std::string& path, Access access,
                                                  const BackingOpener& open_backing,
                                                  Locking locking = Locking::Lock);
  // Writes dirty metadata back (errors are logged).
  ~Qcow2Image() override;
  Qcow2Image(const Qcow2Image&) = delete;
  Qcow2Image& operator=(const Qcow2Image&) = delete;

  uint64_t size_bytes() const override { return size_bytes_; }
  Access access() const override { return access_; }
  std::string_view format_name() const override { return "qcow2"; }

  Result<size_t> read_at(uint64_t offset, std::span<const iovec> iov) override;
  Result<size_t> write_at(uint64_t offset, std::span<const iovec> iov) override;
  Result<void> flush() override;
  Result<void> discard(uint64_t offset, uint64_t length_bytes) override;
  Result<void> write_zeroes(uint64_t offset, uint64_t length_bytes, Unmap unmap) override;

  Result<void> submit(const BlockRequest& request) override;
  Result<void> kick() override;
  int completion_fd() const override { return ring_->completion_fd(); }
  size_t reap(std::vector<BlockCompletion>& out) override;
  size_t in_flight() const override { return active_requests_ + waiting_.size() + done_.size(); }

  // Writes one whole cluster compressed (zlib, raw deflate). offset is
  // cluster-aligned and data is one cluster (zeroes past the disk's end).
  // Only an unallocated cluster is compressed, as QEMU does; an allocated
  // one, or data that does not shrink, is written as is.
  Result<void> write_compressed(uint64_t offset, std::span<const std::byte> data);

  // What the range from offset holds in this image alone, for at most
  // max_length bytes: the returned extent covers a run of clusters that read
  // the same way (Data: contiguous host clusters).
  enum class Status : uint8_t { Unallocated, Zero, Data, Compressed };
  struct Extent {
    Status status = Status::Unallocated;
    uint64_t length_bytes = 0;
    // Data, and Zero clusters that keep their allocation; 0 for none.
    uint64_t host_offset = 0;
  };
  Result<Extent> block_status(uint64_t offset, uint64_t max_length);

  // Changes the virtual size (a multiple of 512). Shrinking drops the data
  // past the new end; callers ask the user first (keel-img resize --shrink).
  Result<void> resize(uint64_t new_size_bytes) override;

  // Drops every cluster: the image reads its backing image (or zeroes)
  // everywhere again (keel-img commit, after the backing image took the data).
  Result<void> make_empty();

  const Header& header() const { return header_; }
  const std::string& path() const { return file_.path(); }
  // The backing image, or null; its path as resolved from the header.
  BlockBackend* backing() const { return backing_.get(); }
  const std::string& backing_path() const { return backing_path_; }

 private:
  enum class Kind : uint8_t { Unallocated, Zero, Normal, Compressed };
  struct Mapping {
    Kind kind = Kind::Unallocated;
    uint64_t host_offset = 0;       // Normal, Compressed, Zero (0: no preallocation)
    uint64_t compressed_bytes = 0;  // Compressed: bytes from host_offset
    uint64_t compressed_sectors = 0;
    bool copied = false;            // bit 63: refcount exactly 1
  };

  // One guest request of the asynchronous face, from submit() to reap().
  struct AsyncRequest {
    BlockRequest request;
    uint64_t bytes = 0;         // what a success reports
    uint32_t outstanding = 0;   // host operations in flight, +1 while submit() builds it
    int64_t error = 0;          // the first -errno
  };
  // One data operation on the ring: part of a guest request.
  struct HostOp {
    uint32_t request = 0;       // index into requests_
    bool write = false;
    uint64_t host_offset = 0;
    uint64_t expected_bytes = 0;
    std::vector<iovec> iov;
    // An allocating write: on success, guest clusters from alloc_cluster
    // (alloc_count of them) map to host clusters from alloc_host.
    uint64_t alloc_cluster = 0;
    uint64_t alloc_count = 0;
    uint64_t alloc_host = 0;
    std::vector<Mapping> replaced;  // what those clusters mapped before
  };

  Qcow2Image(ImageFile file, ImageLock lock, Access access, Header header,
             std::vector<uint64_t> l1, std::unique_ptr<IoRing> ring);

  Result<void> check_range(uint64_t offset, uint64_t length_bytes) const;
  Result<void> check_writable() const;
  Failure corrupt(std::string_view detail) const;

  // The L2 table for l1_index: its checked offset, 0 if none.
  Result<uint64_t> l2_offset(uint64_t l1_index) const;
  Result<Mapping> lookup(uint64_t guest_cluster);
  // The run of clusters from pos (before end) that read the same way
  // (contiguous data, backing, zeroes; one compressed cluster): its mapping
  // and length. next carries a lookup past the run to the following call.
  Result<uint64_t> read_run(uint64_t pos, uint64_t end, std::optional<Mapping>& next,
                            Mapping& mapping);
  Result<void> read_mapped(const Mapping& mapping, uint64_t guest_offset, uint64_t length,
                           std::span<const iovec> iov);
  Result<void> read_backing(uint64_t guest_offset, uint64_t length, std::span<const iovec> iov);
  Result<std::span<const std::byte>> decompressed(const Mapping& mapping);

  // Writes length bytes of iov at guest_offset, all inside one cluster.
  Result<void> write_in_cluster(uint64_t guest_offset, uint64_t length,
                                std::span<const iovec> iov, std::vector<Mapping>& to_free);
  // The L2 table for l1_index, allocated if missing; writable in place.
  Result<uint64_t> writable_l2(uint64_t l1_index);
  // Changes an entry in the cached table and marks it dirty.
  Result<void> set_l2_entry(uint64_t l2_table, uint64_t index, uint64_t entry);
  // Queues clusters no entry points at any more; write_back frees them.
  void release(std::vector<Mapping>& to_free);
  // The crash-safe order: sync, dirty L2 tables, sync, refcount drops.
  Result<void> write_back();
  // Writes the refcounts allocations changed, then fdatasync.
  Result<void> sync_file();
  // Its first two steps: they need no quiet ring.
  Result<void> write_back_tables();
  Result<void> write_back_if_due();
  // Whether writing in place is allowed (refcount 1).
  Result<bool> exclusively_owned(const Mapping& mapping);
  Result<void> grow(uint64_t new_size_bytes);
  Result<void> shrink(uint64_t new_size_bytes);
  // Unmaps every guest cluster from first_cluster on (entries, then refcounts).
  Result<void> drop_clusters_from(uint64_t first_cluster);
  // Writes the header's size, L1 size and L1 offset in one write, synced.
  Result<void> write_size_and_l1(uint64_t size_bytes, uint64_t l1_entries, uint64_t l1_offset);

  // The asynchronous face (qcow2_async.cc).
  // Waits for every data operation on the ring and handles its completion.
  Result<void> quiesce();
  // Whether a request on [offset, offset + length) touches a guest cluster
  // an allocating write in flight is filling.
  bool overlaps_allocation(uint64_t offset, uint64_t length_bytes) const;
  // Runs (or starts) one request; its completion goes to done_ or follows
  // from the ring.
  void start(const BlockRequest& request);
  Result<void> start_read(uint32_t index);
  Result<void> start_write(uint32_t index);
  // A free slot in host_ops_ (waiting for operations to finish if none is).
  Result<uint32_t> take_host_op();
  // Puts host_ops_[op], filled in, on the ring for request index.
  Result<void> queue_host_op(uint32_t index, uint32_t op);
  void on_host_op_done(uint32_t op, int32_t res);
  // An allocating write's data is written: its entries change; or it
  // failed: its new clusters are freed.
  Result<void> map_allocation(HostOp& op);
  void drop_allocation(const HostOp& op);
  // A reference to request index is gone; the last one completes it.
  void put_request(uint32_t index);
  void finish_request(uint64_t user_data, int64_t result);
  // Starts waiting requests whose clusters are no longer being allocated.
  void start_waiting();
  // Handles every completion on the ring; signal: make completion_fd()
  // readable again if that left completions to reap.
  void drain_ring(bool signal);

  ImageFile file_;
  ImageLock lock_;
  Access access_;
  Header header_;
  uint64_t size_bytes_;
  uint32_t cluster_bits_;
  uint64_t cluster_size_;
  std::vector<uint64_t> l1_;
  // L1 entries pointing at new L2 tables, not yet written (write_back_tables).
  std::vector<uint64_t> pending_l1_;
  TableCache l2_cache_;
  std::optional<Refcounts> refcounts_;  // writable images only
  std::unique_ptr<BlockBackend> backing_;
  std::string backing_path_;
  // The last compressed cluster decompressed (sequential reads hit it).
  uint64_t decompressed_host_ = UINT64_MAX;
  std::vector<std::byte> decompressed_;
  // Reused by every request, so the guest's I/O path allocates nothing once
  // they have grown: the compressed stream of a cluster, one cluster's
  // share of a request's iovecs, the clusters a write replaced.
  std::vector<std::byte> compressed_input_;
  std::vector<iovec> piece_;
  std::vector<Mapping> to_free_;
  std::vector<std::byte> scratch_;  // one cluster, for copy-on-write
  std::vector<Mapping> pending_free_;
  // Where the next compressed cluster may go: the end of the last one, in a
  // host cluster compressed data shares (0: start a new host cluster).
  uint64_t compressed_next_ = 0;
  std::vector<std::byte> compressed_output_;

  // The asynchronous face.
  std::unique_ptr<IoRing> ring_;
  std::vector<AsyncRequest> requests_;
  std::vector<uint32_t> free_requests_;
  size_t active_requests_ = 0;       // started, not yet finished
  std::vector<HostOp> host_ops_;
  std::vector<uint32_t> free_host_ops_;
  uint32_t host_ops_in_flight_ = 0;
  std::deque<BlockRequest> waiting_;  // touch a cluster being allocated
  std::vector<uint32_t> allocating_;  // host_ops_ indices of allocating writes in flight
  std::vector<BlockCompletion> done_;
  std::vector<Mapping> run_mappings_;  // start_write: an allocation's old mappings
  bool in_drain_ = false;
};

}  // namespace keel::block::qcow2
