// virtio-blk: see blk.h for the status card.
#include "devices/virtio/blk.h"

#include <poll.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>

#include <fmt/format.h>

#include "base/log.h"

namespace keel::devices::virtio {
namespace {

constexpr uint64_t kSectorBytes = 512;
constexpr uint32_t kHeaderBytes = sizeof(BlkRequestHeader);
// How long reset() waits for the backend between progress reports.
constexpr int kDrainPollMs = 1000;

}  // namespace

Result<std::unique_ptr<Blk>> Blk::create(std::unique_ptr<block::BlockBackend> backend,
                                         BlkConfig config) {
  if (!backend) return fail(Errc::InvalidArgument, "virtio-blk: no backend");
  if (config.serial.size() > kBlkIdBytes) {
    return fail(Errc::InvalidArgument,
                fmt::format("virtio-blk: serial '{}' is longer than {} bytes", config.serial,
                            kBlkIdBytes));
  }
  if (config.access == block::Access::ReadWrite &&
      backend->access() == block::Access::ReadOnly) {
    return fail(Errc::InvalidArgument,
                "virtio-blk: a writable disk needs a backend opened read-write");
  }
  if (backend->size_bytes() % kSectorBytes != 0) {
    return fail(Errc::InvalidArgument,
                fmt::format("virtio-blk: backend size {} is not a multiple of 512",
                            backend->size_bytes()));
  }
  return std::unique_ptr<Blk>(new Blk(std::move(backend), std::move(config)));
}

Blk::Blk(std::unique_ptr<block::BlockBackend> backend, BlkConfig config)
    : backend_(std::move(backend)), config_(std::move(config)) {
  // §5.2.4. Discard and write-zeroes take one segment per request, which is
  // all Linux sends when told so and all a file's fallocate takes anyway.
  config_space_.capacity = backend_->size_bytes() / kSectorBytes;
  config_space_.seg_max = kSegMax;
  config_space_.blk_size = kSectorBytes;
  config_space_.num_queues = 1;
  config_space_.max_discard_sectors = kMaxDiscardSectors;
  config_space_.max_discard_seg = 1;
  config_space_.discard_sector_alignment = kDiscardSectorAlignment;
  config_space_.max_write_zeroes_sectors = kMaxDiscardSectors;
  config_space_.max_write_zeroes_seg = 1;
  config_space_.write_zeroes_may_unmap = 1;
  chain_.segments.reserve(kMaxChainSegments);
}

Blk::~Blk() { reset(); }

uint64_t Blk::features() const {
  uint64_t features = kBlkFeatureSegMax | kBlkFeatureBlkSize | kBlkFeatureFlush;
  if (config_.access == block::Access::ReadOnly) {
    features |= kBlkFeatureRo;
  } else {
    features |= kBlkFeatureDiscard | kBlkFeatureWriteZeroes;
  }
  return features;
}

void Blk::read_config(uint32_t offset, std::span<std::byte> data) {
  // The transport checked the range; only resize() changes the capacity.
  std::lock_guard lock(mutex_);
  std::memcpy(data.data(), reinterpret_cast<const std::byte*>(&config_space_) + offset,
              data.size());
}

Result<void> Blk::resize(uint64_t new_size_bytes) {
  std::lock_guard lock(mutex_);
  const uint64_t old_size_bytes = config_space_.capacity * kSectorBytes;
  if (config_.access == block::Access::ReadOnly) {
    return fail(Errc::InvalidArgument, "virtio-blk: a read-only disk cannot be resized");
  }
  if (new_size_bytes % kSectorBytes != 0) {
    return fail(Errc::InvalidArgument,
                fmt::format("virtio-blk: size {} is not a multiple of 512", new_size_bytes));
  }
  if (new_size_bytes < old_size_bytes) {
    return fail(Errc::InvalidArgument,
                fmt::format("virtio-blk: size {} is smaller than the disk's {} bytes (shrinking "
                            "would drop data the guest has)",
                            new_size_bytes, old_size_bytes));
  }
  if (new_size_bytes == old_size_bytes) return ok();
  if (write_tracker_) {
    return fail(Errc::Busy, "virtio-blk: the disk is being copied by a live migration");
  }
  // Under mutex_, so no request is being submitted meanwhile.
  TRY_CONTEXT(backend_->resize(new_size_bytes), "virtio-blk: resize");
  config_space_.capacity = backend_->size_bytes() / kSectorBytes;
  if (active_ && !broken_) interrupt_->notify_config();
  return ok();
}

uint64_t Blk::size_bytes() const {
  std::lock_guard lock(mutex_);
  return config_space_.capacity * kSectorBytes;
}

Result<void> Blk::activate(ActivateContext context) {
  std::lock_guard lock(mutex_);
  if (active_) return fail(Errc::Busy, "virtio-blk: activated twice without a reset");
  if (context.memory == nullptr || !context.interrupt || context.queues.size() != 1) {
    return fail(Errc::InvalidArgument, "virtio-blk: activate needs memory, an interrupt and 1 queue");
  }
  memory_ = context.memory;
  features_ = context.features;
  queue_ = std::move(context.queues[0]);
  interrupt_ = std::move(context.interrupt);
  event_loop_ = context.event_loop;
  slots_.resize(kQueueSize);
  free_slots_.clear();
  for (uint32_t i = kQueueSize; i > 0; --i) free_slots_.push_back(i - 1);
  for (InFlight& slot : slots_) slot.iov.reserve(kMaxChainSegments);
  completions_.reserve(kQueueSize);
  if (event_loop_ != nullptr) {
    watch_ = TRY_CONTEXT(event_loop_->add(backend_->completion_fd(), Ready::In,
                                          [this](uint32_t) { process_completions(); }),
                         "virtio-blk: watch backend completions");
  }
  active_ = true;
  broken_ = false;
  stalled_ = false;
  pushed_ = false;
  return ok();
}

void Blk::notify(uint16_t queue) {
  std::lock_guard lock(mutex_);
  if (!active_ || broken_ || queue != 0 || !queue_) return;
  process_queue();
  signal_used();
}

void Blk::process_completions() {
  std::lock_guard lock(mutex_);
  take_completions();
  if (!active_ || broken_ || !queue_) return;
  if (stalled_) process_queue();
  signal_used();
}

size_t Blk::in_flight() const {
  std::lock_guard lock(mutex_);
  return slots_.size() - free_slots_.size();
}

void Blk::process_queue() {
  // §2.7.10: no notifications while we drain; re-enable, then look again
  // for chains that arrived in between.
  while (true) {
    if (!queue_->disable_driver_notifications()) return mark_broken("disable notifications");
    while (!free_slots_.empty()) {
      Result<bool> popped = queue_->pop_into(chain_);
      if (!popped) return mark_broken("pop");
      if (!*popped) break;
      handle_chain();
      if (broken_) return;
    }
    if (Result<void> kicked = backend_->kick(); !kicked) {
      // The requests stay queued in the backend and go with the next kick.
      LOG_RATELIMITED(warn, "virtio-blk: kick: {}", kicked.error().message());
    }
    if (free_slots_.empty()) {
      // Every slot is busy: leave the rest in the ring, notifications off;
      // completions pick it up.
      stalled_ = true;
      return;
    }
    stalled_ = false;
    Result<bool> more = queue_->enable_driver_notifications();
    if (!more) return mark_broken("enable notifications");
    if (!*more) return;
  }
}

void Blk::handle_chain() {
  const DescriptorChain& chain = chain_;
  // §5.2.6: the status is the last byte the device writes. Without one we
  // cannot even report an error.
  if (chain.writable_bytes == 0) {
    LOG_RATELIMITED(warn, "virtio-blk: chain {} has no writable status byte", chain.head);
    return mark_broken("request without a status byte");
  }
  const Segment& last = chain.segments.back();
  Result<std::span<std::byte>> status_span = memory_->host_span(last.addr + (last.len - 1), 1);
  if (!status_span) return mark_broken("status byte outside RAM");
  std::byte* status = status_span->data();
  auto error = [&](uint8_t value, std::string_view why) {
    LOG_RATELIMITED(warn, "virtio-blk: request {}: {}", chain.head, why);
    complete_now(chain.head, status, value, 1);
  };

  if (chain.segments.size() > kMaxChainSegments) return error(kBlkStatusIoErr, "too many segments");
  if (chain.readable_bytes < kHeaderBytes) return error(kBlkStatusIoErr, "header too short");
  BlkRequestHeader header{};
  if (!queue_->read_from_chain(chain, 0, std::as_writable_bytes(std::span(&header, 1)))) {
    return error(kBlkStatusIoErr, "unreadable header");
  }
  const uint64_t capacity = config_space_.capacity;
  const bool read_only = config_.access == block::Access::ReadOnly;
  block::BlockRequest request;

  switch (header.type) {
    case kBlkTypeIn:
    case kBlkTypeOut: {
      bool is_read = header.type == kBlkTypeIn;
      // Data flows one way: after the header for OUT, before the status for IN.
      if (is_read && chain.readable_bytes != kHeaderBytes) {
        return error(kBlkStatusIoErr, "read with device-readable data");
      }
      if (!is_read && chain.writable_bytes != 1) {
        return error(kBlkStatusIoErr, "write with device-writable data");
      }
      if (!is_read && read_only) return error(kBlkStatusIoErr, "write to a read-only disk");
      uint32_t data_bytes = is_read ? chain.writable_bytes - 1 : chain.readable_bytes - kHeaderBytes;
      if (data_bytes % kSectorBytes != 0) return error(kBlkStatusIoErr, "partial sector");
      if (header.sector > capacity || data_bytes / kSectorBytes > capacity - header.sector) {
        return error(kBlkStatusIoErr, "past the end of the disk");
      }
      if (data_bytes == 0) return complete_now(chain.head, status, kBlkStatusOk, 1);
      uint32_t index = free_slots_.back();
      InFlight& slot = slots_[index];
      slot.iov.clear();
      // Readable bytes to skip (the header), then data up to the status byte.
      uint64_t skip = is_read ? 0 : kHeaderBytes;
      uint64_t remaining = data_bytes;
      for (const Segment& segment : chain.segments) {
        if (remaining == 0) break;
        if (segment.device_writable != is_read) continue;
        if (skip >= segment.len) {
          skip -= segment.len;
          continue;
        }
        uint64_t len = std::min<uint64_t>(segment.len - skip, remaining);
        Result<std::span<std::byte>> host = memory_->host_span(segment.addr + skip, len);
        if (!host) return error(kBlkStatusIoErr, "data outside RAM");
        slot.iov.push_back(iovec{host->data(), host->size()});
        remaining -= len;
        skip = 0;
      }
      request.op = is_read ? block::BlockOp::Read : block::BlockOp::Write;
      request.offset = header.sector * kSectorBytes;
      request.iov = slot.iov;
      (is_read ? counters_.read_bytes : counters_.write_bytes)
          .fetch_add(data_bytes, std::memory_order_relaxed);
      return submit(request, status, is_read ? data_bytes : 0);
    }
    case kBlkTypeFlush:
      request.op = block::BlockOp::Flush;
      return submit(request, status, 0);
    case kBlkTypeGetId: {
      uint32_t room = chain.writable_bytes - 1;
      std::array<std::byte, kBlkIdBytes> id{};
      std::memcpy(id.data(), config_.serial.data(), config_.serial.size());
      uint32_t count = std::min(room, kBlkIdBytes);
      if (!queue_->write_to_chain(chain, 0, std::span(id).first(count))) {
        return error(kBlkStatusIoErr, "unwritable id buffer");
      }
      return complete_now(chain.head, status, kBlkStatusOk, count + 1);
    }
    case kBlkTypeDiscard:
    case kBlkTypeWriteZeroes: {
      bool discard = header.type == kBlkTypeDiscard;
      uint64_t feature = discard ? kBlkFeatureDiscard : kBlkFeatureWriteZeroes;
      if (!(features_ & feature)) return error(kBlkStatusUnsupp, "discard/write-zeroes not negotiated");
      if (read_only) return error(kBlkStatusIoErr, "discard/write-zeroes on a read-only disk");
      uint32_t data_bytes = chain.readable_bytes - kHeaderBytes;
      if (data_bytes == 0 || data_bytes % sizeof(BlkDiscardWriteZeroes) != 0) {
        return error(kBlkStatusIoErr, "discard/write-zeroes segments of a bad size");
      }
      if (data_bytes / sizeof(BlkDiscardWriteZeroes) > 1) {
        return error(kBlkStatusIoErr, "more discard/write-zeroes segments than offered");
      }
      BlkDiscardWriteZeroes range{};
      if (!queue_->read_from_chain(chain, kHeaderBytes,
                                   std::as_writable_bytes(std::span(&range, 1)))) {
        return error(kBlkStatusIoErr, "unreadable discard/write-zeroes segment");
      }
      // §5.2.6.2: unknown flags, and unmap on a discard, are UNSUPP.
      uint32_t allowed_flags = discard ? 0 : kBlkDiscardFlagUnmap;
      if (range.flags & ~allowed_flags) return error(kBlkStatusUnsupp, "unsupported flags");
      if (range.num_sectors > kMaxDiscardSectors) {
        return error(kBlkStatusIoErr, "more sectors than max_discard/write_zeroes_sectors");
      }
      if (range.sector > capacity || range.num_sectors > capacity - range.sector) {
        return error(kBlkStatusIoErr, "past the end of the disk");
      }
      if (discard) {
        request.op = block::BlockOp::Discard;
      } else {
        request.op = (range.flags & kBlkDiscardFlagUnmap) ? block::BlockOp::WriteZeroesUnmap
                                                          : block::BlockOp::WriteZeroes;
      }
      request.offset = range.sector * kSectorBytes;
      request.length_bytes = uint64_t{range.num_sectors} * kSectorBytes;
      return submit(request, status, 0);
    }
    default:
      return error(kBlkStatusUnsupp, fmt::format("request type {}", header.type));
  }
}

void Blk::submit(block::BlockRequest& request, std::byte* status, uint32_t data_bytes) {
  uint32_t index = free_slots_.back();
  request.user_data = index;
  if (Result<void> submitted = backend_->submit(request); !submitted) {
    LOG_RATELIMITED(warn, "virtio-blk: request {}: {}", chain_.head,
                    submitted.error().message());
    return complete_now(chain_.head, status, kBlkStatusIoErr, 1);
  }
  free_slots_.pop_back();
  InFlight& slot = slots_[index];
  slot.head = chain_.head;
  slot.status = status;
  slot.data_bytes = data_bytes;
  slot.submitted = std::chrono::steady_clock::now();
  slot.written_offset = request.offset;
  switch (request.op) {
    case block::BlockOp::Write:
      slot.written_bytes = 0;
      for (const iovec& part : request.iov) slot.written_bytes += part.iov_len;
      break;
    case block::BlockOp::Discard:
    case block::BlockOp::WriteZeroes:
    case block::BlockOp::WriteZeroesUnmap:
      slot.written_bytes = request.length_bytes;
      break;
    case block::BlockOp::Read:
    case block::BlockOp::Flush:
      slot.written_bytes = 0;
      break;
  }
}

void Blk::set_write_tracker(std::shared_ptr<block::DirtyTracker> tracker) {
  std::lock_guard lock(mutex_);
  write_tracker_ = std::move(tracker);
}

Result<void> Blk::read_tracked_chunk(uint64_t chunk, std::span<std::byte> out) {
  std::lock_guard lock(mutex_);
  if (!write_tracker_) return fail(Errc::InvalidArgument, "virtio-blk: no write tracker");
  const uint64_t length = write_tracker_->chunk_length(chunk);
  if (length == 0 || out.size() != length) {
    return fail(Errc::OutOfRange, fmt::format("virtio-blk: chunk {} of {} bytes (buffer {})",
                                              chunk, length, out.size()));
  }
  const uint64_t offset = write_tracker_->chunk_offset(chunk);
  write_tracker_->clear(chunk);
  // The synchronous face while asynchronous requests may be in flight: a
  // raw file is a pread; qcow2 changes an L2 entry only after the data it
  // points at is written, so a cluster reads old or new, and a write still
  // in flight marks the chunk again when it completes.
  const iovec part{out.data(), out.size()};
  if (Result<size_t> read = backend_->read_at(offset, std::span(&part, 1)); !read) {
    write_tracker_->mark(offset, length);
    return fail(read.error().code(),
                fmt::format("virtio-blk: read for the disk copy: {}", read.error().message()));
  }
  return ok();
}

void Blk::complete_now(uint16_t head, std::byte* status, uint8_t value, uint32_t written_len) {
  *status = std::byte{value};
  counters_.requests.fetch_add(1, std::memory_order_relaxed);
  if (value != kBlkStatusOk) counters_.errors.fetch_add(1, std::memory_order_relaxed);
  if (!queue_->push_used(head, written_len)) return mark_broken("push used");
  pushed_ = true;
}

void Blk::take_completions() {
  completions_.clear();
  backend_->reap(completions_);
  bool deliver = active_ && !broken_ && queue_.has_value();
  for (const block::BlockCompletion& completion : completions_) {
    CHECK(completion.user_data < slots_.size(), "virtio-blk: completion for an unknown slot");
    auto index = static_cast<uint32_t>(completion.user_data);
    InFlight& slot = slots_[index];
    free_slots_.push_back(index);
    if (write_tracker_) write_tracker_->mark(slot.written_offset, slot.written_bytes);
    if (!deliver) continue;
    request_latency_.record(std::chrono::steady_clock::now() - slot.submitted);
    if (completion.result < 0) {
      LOG_RATELIMITED(warn, "virtio-blk: backend request failed: {}",
                      std::strerror(static_cast<int>(-completion.result)));
      complete_now(slot.head, slot.status, kBlkStatusIoErr, 1);
    } else {
      complete_now(slot.head, slot.status, kBlkStatusOk, slot.data_bytes + 1);
    }
    deliver = !broken_;
  }
}

VirtioDevice::Counters Blk::counters() const {
  VirtioDevice::Counters all = {
      {"requests", counters_.requests.load(std::memory_order_relaxed)},
      {"errors", counters_.errors.load(std::memory_order_relaxed)},
      {"read_bytes", counters_.read_bytes.load(std::memory_order_relaxed)},
      {"write_bytes", counters_.write_bytes.load(std::memory_order_relaxed)}};
  request_latency_.append_to(all);
  return all;
}

void Blk::signal_used() {
  if (!pushed_ || broken_) return;
  pushed_ = false;
  if (queue_->needs_notification()) interrupt_->notify_queue(0);
}

void Blk::mark_broken(std::string_view why) {
  if (broken_) return;
  broken_ = true;
  LOG_RATELIMITED(warn, "virtio-blk: {}: the driver broke the spec; device needs reset", why);
  interrupt_->needs_reset();
}

bool Blk::drain_backend(std::optional<std::chrono::milliseconds> limit) {
  // The kernel may still be writing into guest RAM; nothing may be reused
  // or torn down until every request is back.
  const auto start = std::chrono::steady_clock::now();
  auto waited_ms = [&start] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                 start).count();
  };
  while (backend_->in_flight() > 0) {
    int poll_ms = kDrainPollMs;
    if (limit) {
      const auto left = limit->count() - waited_ms();
      if (left <= 0) return false;
      poll_ms = static_cast<int>(std::min<int64_t>(left, kDrainPollMs));
    }
    (void)backend_->kick();
    pollfd pfd{backend_->completion_fd(), POLLIN, 0};
    int rc = ::poll(&pfd, 1, poll_ms);
    if (rc == 0 && !limit) {
      LOG_WARN("virtio-blk: reset waits for {} backend requests ({} ms so far)",
               backend_->in_flight(), waited_ms());
    }
    take_completions();
  }
  return true;
}

Result<void> Blk::quiesce(std::chrono::milliseconds timeout) {
  std::lock_guard lock(mutex_);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  // With the vCPUs paused the available ring no longer grows, so finishing
  // what it holds is bounded. Requests the driver made available before
  // the pause are done now rather than after the save: their data is then
  // on the disk whose identity the snapshot records, and the source,
  // stopped or resumed, writes nothing the snapshot does not know of.
  while (true) {
    const bool live = active_ && !broken_ && queue_.has_value();
    if (live) process_queue();
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (!drain_backend(std::max(left, std::chrono::milliseconds(0)))) {
      return fail(Errc::Timeout,
                  fmt::format("virtio-blk: {} backend requests still in flight after {} ms",
                              backend_->in_flight(), timeout.count()));
    }
    if (!live || broken_) break;
    Result<bool> more = queue_->has_available();
    if (!more || !*more) break;
  }
  // Completions were pushed used; the driver hears of them now, not after
  // the snapshot.
  if (active_ && !broken_ && queue_) signal_used();
  return ok();
}

Result<VirtioDeviceState> Blk::save_state() const {
  std::lock_guard lock(mutex_);
  if (slots_.size() != free_slots_.size()) {
    return fail(Errc::Busy, fmt::format("virtio-blk: {} requests in flight (quiesce first)",
                                        slots_.size() - free_slots_.size()));
  }
  return VirtioDeviceState{.queues = {saved_queue(queue_)}, .extra = {}};
}

Result<void> Blk::restore_state(ActivateContext context, std::span<const std::byte> extra) {
  TRY(expect_no_extra(name(), extra));
  return activate(std::move(context));
}

void Blk::reset() {
  std::optional<EventLoop::WatchId> watch;
  EventLoop* loop = nullptr;
  {
    std::lock_guard lock(mutex_);
    active_ = false;
    watch = std::exchange(watch_, std::nullopt);
    loop = event_loop_;
  }
  // Outside the lock: remove() waits for a running callback, which may be
  // waiting for our lock.
  if (watch) loop->remove(*watch);
  std::lock_guard lock(mutex_);
  drain_backend();
  queue_.reset();
  interrupt_.reset();
  memory_ = nullptr;
  event_loop_ = nullptr;
  features_ = 0;
  broken_ = false;
  stalled_ = false;
  pushed_ = false;
}

}  // namespace keel::devices::virtio
