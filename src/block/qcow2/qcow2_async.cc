// Qcow2Image's asynchronous face: see qcow2.h for the status card and the
// crash-safety rules it keeps.
//
// Decisions:
// - Translation runs at submit() on the device thread, through the same L2
//   cache as the synchronous face; only data moves on the ring.
// - An allocating write's L2 entries change (in the cache) when its data
//   write completed, never before, so write_back's sync always covers the
//   data an entry on disk points at, and a failed data write leaves the old
//   mapping (its new clusters are freed again).
// - A request touching a guest cluster an allocating write in flight fills
//   waits, whole, until no such write is left; it is then started as if just
//   submitted. Waiting requests hold nothing, so they cannot deadlock.
// - Anything that drops a refcount, and every call of the synchronous face,
//   first waits for every data operation on the ring (quiesce): a reused
//   cluster is never read or written by an operation meant for its old use.
#include <algorithm>
#include <cerrno>
#include <climits>

#include <fmt/format.h>

#include "base/log.h"
#include "block/iov.h"
#include "block/qcow2/qcow2.h"

namespace keel::block::qcow2 {
namespace {

// Reads at least this large are handed to io_uring's workers (see queue_host_op).
constexpr uint64_t kWorkerReadBytes = 256 << 10;

}  // namespace

Result<void> Qcow2Image::submit(const BlockRequest& request) {
  uint64_t length = request.length_bytes;
  if (request.op == BlockOp::Read || request.op == BlockOp::Write) {
    length = iov_bytes(request.iov);
    if (request.iov.size() > IOV_MAX) {
      return fail(Errc::InvalidArgument, fmt::format("qcow2 image {}: {} iovecs (at most {})",
                                                     file_.path(), request.iov.size(), IOV_MAX));
    }
  }
  if (request.op != BlockOp::Read && request.op != BlockOp::Flush) TRY(check_writable());
  if (request.op != BlockOp::Flush) TRY(check_range(request.offset, length));
  if (overlaps_allocation(request.offset, length)) {
    waiting_.push_back(request);
    return ok();
  }
  start(request);
  return ok();
}

Result<void> Qcow2Image::kick() { return ring_->kick(); }

size_t Qcow2Image::reap(std::vector<BlockCompletion>& out) {
  drain_ring(false);
  start_waiting();
  if (Result<void> written = write_back_if_due(); !written) {
    // The tables stay dirty and go with the next write-back; a flush
    // reports the error to the guest.
    LOG_RATELIMITED(warn, "{}", written.error().message());
  }
  const size_t count = done_.size();
  out.insert(out.end(), done_.begin(), done_.end());
  done_.clear();
  return count;
}

bool Qcow2Image::overlaps_allocation(uint64_t offset, uint64_t length_bytes) const {
  if (allocating_.empty() || length_bytes == 0) return false;
  const uint64_t first = offset >> cluster_bits_;
  const uint64_t last = (offset + length_bytes - 1) >> cluster_bits_;
  for (uint32_t index : allocating_) {
    const HostOp& op = host_ops_[index];
    if (first < op.alloc_cluster + op.alloc_count && op.alloc_cluster <= last) return true;
  }
  return false;
}

void Qcow2Image::start(const BlockRequest& request) {
  uint32_t index = 0;
  if (free_requests_.empty()) {
    index = static_cast<uint32_t>(requests_.size());
    requests_.emplace_back();
  } else {
    index = free_requests_.back();
    free_requests_.pop_back();
  }
  requests_[index] = AsyncRequest{request, 0, 1, 0};
  ++active_requests_;
  Result<void> result = ok();
  switch (request.op) {
    case BlockOp::Read: result = start_read(index); break;
    case BlockOp::Write: result = start_write(index); break;
    case BlockOp::Flush: result = flush(); break;
    case BlockOp::Discard: result = discard(request.offset, request.length_bytes); break;
    case BlockOp::WriteZeroes:
      result = write_zeroes(request.offset, request.length_bytes, Unmap::No);
      break;
    case BlockOp::WriteZeroesUnmap:
      result = write_zeroes(request.offset, request.length_bytes, Unmap::Yes);
      break;
  }
  if (!result) {
    LOG_RATELIMITED(warn, "{}", result.error().message());
    if (requests_[index].error == 0) requests_[index].error = completion_errno(result.error());
  }
  put_request(index);
}

Result<void> Qcow2Image::start_read(uint32_t index) {
  const BlockRequest request = requests_[index].request;
  const uint64_t total = iov_bytes(request.iov);
  requests_[index].bytes = total;
  IovCursor cursor(request.iov);
  std::optional<Mapping> next;
  uint64_t pos = request.offset;
  const uint64_t end = pos + total;
  while (pos < end) {
    Mapping m;
    const uint64_t length = TRY(read_run(pos, end, next, m));
    if (m.kind == Kind::Normal) {
      const uint32_t op = TRY(take_host_op());
      HostOp& host_op = host_ops_[op];
      cursor.take(length, host_op.iov);
      host_op.host_offset = m.host_offset + (pos & (cluster_size_ - 1));
      host_op.expected_bytes = length;
      TRY(queue_host_op(index, op));
    } else {
      // Zeroes, the backing image, a compressed cluster: synchronous.
      cursor.take(length, piece_);
      TRY(read_mapped(m, pos, length, piece_));
    }
    pos += length;
  }
  return ok();
}

Result<void> Qcow2Image::start_write(uint32_t index) {
  const BlockRequest request = requests_[index].request;
  const uint64_t total = iov_bytes(request.iov);
  requests_[index].bytes = total;
  IovCursor cursor(request.iov);
  uint64_t pos = request.offset;
  const uint64_t end = pos + total;
  std::vector<Mapping>& olds = run_mappings_;
  while (pos < end) {
    const uint64_t cluster = pos >> cluster_bits_;
    const uint64_t in_cluster = pos & (cluster_size_ - 1);
    uint64_t length = std::min(cluster_size_ - in_cluster, end - pos);
    const Mapping m = TRY(lookup(cluster));
    if (TRY(exclusively_owned(m))) {
      // In place, as far as the host clusters stay contiguous and ours.
      for (uint64_t following = cluster + 1; pos + length < end; ++following) {
        const Mapping n = TRY(lookup(following));
        if (n.kind != Kind::Normal ||
            n.host_offset != m.host_offset + ((following - cluster) << cluster_bits_) ||
            !TRY(exclusively_owned(n))) {
          break;
        }
        length += std::min(cluster_size_, end - pos - length);
      }
      const uint32_t op = TRY(take_host_op());
      HostOp& host_op = host_ops_[op];
      cursor.take(length, host_op.iov);
      host_op.write = true;
      host_op.host_offset = m.host_offset + in_cluster;
      host_op.expected_bytes = length;
      TRY(queue_host_op(index, op));
      pos += length;
      continue;
    }

    // New clusters for this one and every following one the request
    // reaches that is not ours to write in place: one allocation.
    olds.assign(1, m);
    for (uint64_t following = cluster + 1; pos + length < end; ++following) {
      const Mapping n = TRY(lookup(following));
      if (TRY(exclusively_owned(n))) break;
      olds.push_back(n);
      length += std::min(cluster_size_, end - pos - length);
    }
    const uint64_t count = olds.size();
    const uint64_t file_end = file_.size_bytes();
    const uint64_t host = TRY(refcounts_->allocate(count));
    auto undo = [&] {
      for (uint64_t i = 0; i < count; ++i) {
        (void)refcounts_->decrement((host >> cluster_bits_) + i);
      }
    };
    // A partly written new cluster keeps what the rest of it read before
    // (copy-on-write), written now, synchronously; where that is zeroes and
    // the new cluster lies past the file's end, nothing needs writing (the
    // file reads as zeroes there, as in write_in_cluster).
    auto keep_rest = [&](uint64_t i, uint64_t keep_before, uint64_t keep_from) -> Result<void> {
      const Mapping& old = olds[i];
      const uint64_t host_cluster = host + (i << cluster_bits_);
      const bool rest_reads_zero =
          old.kind == Kind::Zero || (old.kind == Kind::Unallocated && backing_ == nullptr);
      if (rest_reads_zero && host_cluster >= file_end) return ok();
      const uint64_t cluster_start = (cluster + i) << cluster_bits_;
      const uint64_t valid = std::min(cluster_size_, size_bytes_ - cluster_start);
      std::fill(scratch_.begin() + static_cast<ptrdiff_t>(valid), scratch_.end(), std::byte{0});
      const iovec whole{scratch_.data(), valid};
      TRY(read_mapped(old, cluster_start, valid, std::span(&whole, 1)));
      if (keep_before > 0) TRY(file_.write(host_cluster, std::span(scratch_).first(keep_before)));
      if (keep_from < cluster_size_) {
        TRY(file_.write(host_cluster + keep_from, std::span(scratch_).subspan(keep_from)));
      }
      return ok();
    };
    const uint64_t tail = (in_cluster + length) - ((count - 1) << cluster_bits_);
    Result<void> kept = ok();
    if (count == 1) {
      if (in_cluster != 0 || tail < cluster_size_) kept = keep_rest(0, in_cluster, tail);
    } else {
      if (in_cluster != 0) kept = keep_rest(0, in_cluster, cluster_size_);
      if (kept && tail < cluster_size_) kept = keep_rest(count - 1, 0, tail);
    }
    if (!kept) {
      undo();
      return kept;
    }
    Result<uint32_t> op = take_host_op();
    if (!op) {
      undo();
      return fail(std::move(op).error());
    }
    HostOp& host_op = host_ops_[*op];
    cursor.take(length, host_op.iov);
    host_op.write = true;
    host_op.host_offset = host + in_cluster;
    host_op.expected_bytes = length;
    host_op.alloc_cluster = cluster;
    host_op.alloc_count = count;
    host_op.alloc_host = host;
    host_op.replaced.clear();
    for (const Mapping& old : olds) {
      if (old.kind == Kind::Compressed || old.host_offset != 0) host_op.replaced.push_back(old);
    }
    if (Result<void> queued = queue_host_op(index, *op); !queued) {
      undo();
      return queued;
    }
    pos += length;
  }
  return ok();
}

Result<uint32_t> Qcow2Image::take_host_op() {
  if (free_host_ops_.empty() && host_ops_.size() < kMaxHostOps) {
    host_ops_.emplace_back();
    free_host_ops_.push_back(static_cast<uint32_t>(host_ops_.size() - 1));
  }
  // Every operation is in flight: wait for some to finish.
  while (free_host_ops_.empty()) {
    TRY(ring_->wait_one());
    drain_ring(true);
  }
  const uint32_t op = free_host_ops_.back();
  free_host_ops_.pop_back();
  HostOp& host_op = host_ops_[op];
  host_op.write = false;
  host_op.alloc_cluster = 0;
  host_op.alloc_count = 0;
  host_op.alloc_host = 0;
  return op;
}

Result<void> Qcow2Image::queue_host_op(uint32_t index, uint32_t op) {
  HostOp& host_op = host_ops_[op];
  io_uring_sqe* sqe = ring_->next_sqe();
  if (sqe == nullptr) {
    host_op.iov.clear();
    free_host_ops_.push_back(op);
    return fail(Errc::Busy, fmt::format("qcow2 image {}: io_uring submission failed",
                                        file_.path()));
  }
  const auto count = static_cast<unsigned>(host_op.iov.size());
  if (host_op.write) {
    io_uring_prep_writev(sqe, file_.fd(), host_op.iov.data(), count, host_op.host_offset);
    file_.note_write_end(host_op.host_offset + host_op.expected_bytes);
  } else {
    io_uring_prep_readv(sqe, file_.fd(), host_op.iov.data(), count, host_op.host_offset);
    // A page-cached read completes inline, its copy on the device thread;
    // large ones go to the kernel's workers instead, which copy on every
    // core (qemu-img bench's thread pool does the same). Small ones stay
    // inline: a worker hand-off costs more than a 4 KiB copy.
    if (host_op.expected_bytes >= kWorkerReadBytes) io_uring_sqe_set_flags(sqe, IOSQE_ASYNC);
  }
  io_uring_sqe_set_data64(sqe, op);
  host_op.request = index;
  ++requests_[index].outstanding;
  ++host_ops_in_flight_;
  if (host_op.alloc_count != 0) allocating_.push_back(op);
  return ok();
}

void Qcow2Image::on_host_op_done(uint32_t op, int32_t res) {
  CHECK(op < host_ops_.size(), "qcow2: io_uring completion for an unknown operation");
  HostOp& host_op = host_ops_[op];
  --host_ops_in_flight_;
  Result<void> result = ok();
  if (res < 0) {
    result = fail(Error(Errc::Io, fmt::format("qcow2 image {}: {} at {}", file_.path(),
                                              host_op.write ? "writev" : "readv",
                                              host_op.host_offset),
                        -res));
  } else if (static_cast<uint64_t>(res) < host_op.expected_bytes) {
    // A short transfer (a signal, the end of the file): the rest
    // synchronously; past the end of the file reads see zeroes.
    const auto done = static_cast<uint64_t>(res);
    IovCursor cursor(host_op.iov);
    cursor.take(done, piece_);
    cursor.take(host_op.expected_bytes - done, piece_);
    result = host_op.write ? file_.writev(host_op.host_offset + done, piece_)
                           : file_.readv(host_op.host_offset + done, piece_);
  }
  if (host_op.alloc_count != 0) {
    allocating_.erase(std::find(allocating_.begin(), allocating_.end(), op));
    if (result) {
      result = map_allocation(host_op);
    } else {
      drop_allocation(host_op);
    }
  }
  const uint32_t index = host_op.request;
  if (!result) {
    LOG_RATELIMITED(warn, "{}", result.error().message());
    if (requests_[index].error == 0) requests_[index].error = completion_errno(result.error());
  }
  host_op.iov.clear();
  host_op.replaced.clear();
  free_host_ops_.push_back(op);
  put_request(index);
}

Result<void> Qcow2Image::map_allocation(HostOp& op) {
  const uint64_t l2_entries = header_.l2_entries();
  for (uint64_t i = 0; i < op.alloc_count; ++i) {
    const uint64_t cluster = op.alloc_cluster + i;
    const uint64_t table = TRY(writable_l2(cluster / l2_entries));
    TRY(set_l2_entry(table, cluster % l2_entries,
                     (op.alloc_host + (i << cluster_bits_)) | kEntryCopied));
  }
  release(op.replaced);
  // Dirty tables must not fill the cache (l2_cache.h); writing them needs
  // no quiet ring, unlike freeing clusters (reap does that).
  if (l2_cache_.dirty_count() * 2 >= l2_cache_.capacity()) TRY(write_back_tables());
  return ok();
}

void Qcow2Image::drop_allocation(const HostOp& op) {
  // No entry points at the new clusters and nothing is in flight on them.
  for (uint64_t i = 0; i < op.alloc_count; ++i) {
    if (Result<void> dropped = refcounts_->decrement((op.alloc_host >> cluster_bits_) + i);
        !dropped) {
      LOG_RATELIMITED(warn, "{} (the cluster leaks)", dropped.error().message());
    }
  }
}

void Qcow2Image::put_request(uint32_t index) {
  AsyncRequest& request = requests_[index];
  CHECK(request.outstanding > 0, "qcow2: request completed twice");
  if (--request.outstanding > 0) return;
  finish_request(request.request.user_data,
                 request.error != 0 ? request.error : static_cast<int64_t>(request.bytes));
  request.request.iov = {};
  free_requests_.push_back(index);
  --active_requests_;
}

void Qcow2Image::finish_request(uint64_t user_data, int64_t result) {
  done_.push_back(BlockCompletion{user_data, result});
  // reap() takes every queued completion, so one signal per batch is enough.
  if (done_.size() == 1 && !in_drain_) (void)ring_->signal();
}

void Qcow2Image::start_waiting() {
  if (waiting_.empty()) return;
  for (size_t n = waiting_.size(); n > 0 && !waiting_.empty(); --n) {
    const BlockRequest request = waiting_.front();
    waiting_.pop_front();
    const uint64_t length = request.op == BlockOp::Read || request.op == BlockOp::Write
                                ? iov_bytes(request.iov)
                                : request.length_bytes;
    if (overlaps_allocation(request.offset, length)) {
      waiting_.push_back(request);
    } else {
      start(request);
    }
  }
  if (Result<void> kicked = ring_->kick(); !kicked) {
    LOG_RATELIMITED(warn, "{}", kicked.error().message());
  }
}

void Qcow2Image::drain_ring(bool signal) {
  CHECK(!in_drain_, "qcow2: ring drained from a completion");
  in_drain_ = true;
  ring_->drain([this](uint64_t op, int32_t res) { on_host_op_done(static_cast<uint32_t>(op), res); });
  in_drain_ = false;
  // The drain consumed the eventfd; completions it queued must still wake
  // the device (reap takes them itself).
  if (signal && !done_.empty()) (void)ring_->signal();
}

Result<void> Qcow2Image::quiesce() {
  CHECK(!in_drain_, "qcow2: quiesce from a completion");
  while (host_ops_in_flight_ > 0) {
    TRY(ring_->wait_one());
    drain_ring(true);
  }
  return ok();
}

}  // namespace keel::block::qcow2
