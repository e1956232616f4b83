// virtio-net: see net.h for the status card.
#include "devices/virtio/net.h"

#include <sys/epoll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "base/log.h"

namespace keel::devices::virtio {
namespace {

constexpr uint32_t kHeaderBytes = net::kVnetHeaderBytes;
constexpr uint32_t kEthernetHeaderBytes = 14;
constexpr uint32_t kWatchIn = static_cast<uint32_t>(Ready::In);
constexpr uint32_t kWatchOut = static_cast<uint32_t>(Ready::Out);

// §5.1.6.1: which gso_type values a side may use, given the features that
// allow it (HOST_* for what the driver sends, GUEST_* for what it receives).
bool gso_allowed(uint8_t gso_type, uint64_t features, uint64_t tso4, uint64_t tso6,
                 uint64_t ecn) {
  const bool with_ecn = (gso_type & kNetHdrGsoEcn) != 0;
  switch (static_cast<uint8_t>(gso_type & ~kNetHdrGsoEcn)) {
    case kNetHdrGsoNone: return !with_ecn;
    case kNetHdrGsoTcpv4:
      return (features & tso4) && (!with_ecn || (features & ecn));
    case kNetHdrGsoTcpv6:
      return (features & tso6) && (!with_ecn || (features & ecn));
    default: return false;  // UDP (UFO) and USO are not offered
  }
}

}  // namespace

Result<std::unique_ptr<Net>> Net::create(std::unique_ptr<net::NetBackend> backend,
                                         NetDeviceConfig config) {
  if (!backend) return fail(Errc::InvalidArgument, "virtio-net: no backend");
  if (config.mtu < 68) {
    return fail(Errc::InvalidArgument,
                fmt::format("virtio-net: mtu {} is below the minimum of 68", config.mtu));
  }
  if (config.mac[0] & 1) {
    return fail(Errc::InvalidArgument, "virtio-net: a multicast MAC cannot be a NIC's own");
  }
  EventFd wakeup = TRY_CONTEXT(EventFd::create(), "virtio-net: wakeup eventfd");
  return std::unique_ptr<Net>(new Net(std::move(backend), config, std::move(wakeup)));
}

Net::Net(std::unique_ptr<net::NetBackend> backend, NetDeviceConfig config, EventFd wakeup)
    : backend_(std::move(backend)), config_(config), wakeup_(std::move(wakeup)) {
  std::memcpy(config_space_.mac, config_.mac.data(), sizeof(config_space_.mac));
  config_space_.status = kNetStatusLinkUp;
  config_space_.max_virtqueue_pairs = 1;
  config_space_.mtu = config_.mtu;
  // One byte more than the largest frame, so a truncated read shows.
  rx_frame_.resize(kHeaderBytes + kMaxFrameBytes + 1);
  tx_iov_.reserve(kMaxTxSegments + 1);
}

Net::~Net() { reset(); }

uint64_t Net::features() const {
  return kNetFeatureCsum | kNetFeatureGuestCsum | kNetFeatureMtu | kNetFeatureMac |
         kNetFeatureGuestTso4 | kNetFeatureGuestTso6 | kNetFeatureGuestEcn |
         kNetFeatureHostTso4 | kNetFeatureHostTso6 | kNetFeatureHostEcn | kNetFeatureMrgRxbuf |
         kNetFeatureStatus;
}

void Net::read_config(uint32_t offset, std::span<std::byte> data) {
  // The transport checked the range; only status changes, under the lock.
  std::lock_guard lock(mutex_);
  std::memcpy(data.data(), reinterpret_cast<const std::byte*>(&config_space_) + offset,
              data.size());
}

Result<void> Net::activate(ActivateContext context) {
  std::lock_guard lock(mutex_);
  if (active_) return fail(Errc::Busy, "virtio-net: activated twice without a reset");
  if (context.memory == nullptr || !context.interrupt || context.queues.size() != 2 ||
      context.event_loop == nullptr) {
    return fail(Errc::InvalidArgument,
                "virtio-net: activate needs memory, an interrupt, 2 queues and an event loop");
  }
  // The backend may now hand over what the driver agreed to receive
  // (§5.1.6.4: GUEST_TSO* only with GUEST_CSUM, which the tap enforces too).
  const uint64_t f = context.features;
  net::Offloads offloads{.csum = (f & kNetFeatureGuestCsum) != 0,
                         .tso4 = (f & kNetFeatureGuestTso4) != 0,
                         .tso6 = (f & kNetFeatureGuestTso6) != 0,
                         .tso_ecn = (f & kNetFeatureGuestEcn) != 0};
  TRY_CONTEXT(backend_->set_offloads(offloads), "virtio-net: offloads");
  memory_ = context.memory;
  features_ = f;
  rx_queue_ = std::move(context.queues[kRxQueue]);
  tx_queue_ = std::move(context.queues[kTxQueue]);
  interrupt_ = std::move(context.interrupt);
  event_loop_ = context.event_loop;
  rx_frame_bytes_ = 0;
  rx_held_ = 0;
  rx_waiting_ = false;
  tx_pending_ = false;
  rx_pushed_ = tx_pushed_ = false;
  broken_ = false;
  watched_ = rx_queue_ ? kWatchIn : 0;
  backend_watch_ = TRY_CONTEXT(
      event_loop_->add(backend_->fd(), static_cast<Ready>(watched_),
                       [this](uint32_t events) {
                         std::lock_guard callback_lock(mutex_);
                         on_backend_ready(events);
                       }),
      "virtio-net: watch the backend");
  Result<EventLoop::WatchId> wakeup = event_loop_->add(wakeup_.get(), Ready::In, [this](uint32_t) {
    (void)wakeup_.consume();
    std::lock_guard callback_lock(mutex_);
    on_wakeup();
  });
  if (!wakeup) {
    event_loop_->remove(*std::exchange(backend_watch_, std::nullopt));
    return fail(Error(wakeup.error()).wrap("virtio-net: watch the wakeup eventfd"));
  }
  wakeup_watch_ = *wakeup;
  active_ = true;
  return ok();
}

void Net::notify(uint16_t queue) {
  std::lock_guard lock(mutex_);
  if (!active_ || broken_) return;
  if (queue == kRxQueue) {
    // New rx buffers: stop asking for notifications and watch the backend
    // again (§2.7.10).
    if (rx_waiting_ && rx_queue_) {
      rx_waiting_ = false;
      if (!rx_queue_->disable_driver_notifications()) return mark_broken("rx notifications");
      update_watch();
    }
    process_rx();
  } else if (queue == kTxQueue) {
    if (!tx_pending_) process_tx();  // else EPOLLOUT resumes it
  } else {
    LOG_RATELIMITED(warn, "virtio-net: notification for queue {}, which does not exist", queue);
  }
  signal_used();
}

void Net::on_backend_ready(uint32_t events) {
  if (!active_ || broken_) return;
  if (events & (EPOLLERR | EPOLLHUP)) return link_lost(events);
  if ((events & EPOLLOUT) && tx_pending_) process_tx();
  if ((events & EPOLLIN) && !broken_) process_rx();
  signal_used();
}

void Net::on_wakeup() {
  if (!active_ || broken_ || tx_pending_) return;
  process_tx();
  signal_used();
}

// --- receive (§5.1.6.3, §5.1.6.4) --------------------------------------------

void Net::process_rx() {
  if (!rx_queue_ || !backend_watch_) return;
  for (int frames = 0; frames < kFramesPerWakeup && !broken_; ++frames) {
    if (rx_frame_bytes_ == 0) {
      // Read only with a buffer in hand: a frame left in the backend waits
      // safely; one read but undeliverable would have to be dropped.
      if (rx_held_ == 0 && !hold_rx_chain()) return;
      ssize_t got = ::read(backend_->fd(), rx_frame_.data(), rx_frame_.size());
      if (got < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
          LOG_RATELIMITED(warn, "virtio-net: {}: read: {}", backend_->name(), std::strerror(errno));
        }
        return;
      }
      if (got == 0) return link_lost(EPOLLHUP);  // a socket backend's peer closed
      const auto bytes = static_cast<size_t>(got);
      if (bytes < kHeaderBytes + kEthernetHeaderBytes || bytes == rx_frame_.size()) {
        ++stats_.rx_dropped;
        LOG_RATELIMITED(warn, "virtio-net: {}: dropped a {}-byte frame ({})", backend_->name(),
                        bytes, bytes == rx_frame_.size() ? "too long" : "too short");
        continue;
      }
      NetHeader header;
      std::memcpy(&header, rx_frame_.data(), sizeof(header));
      // Never hand the driver an offload it did not accept (§5.1.6.4.1:
      // without GUEST_CSUM, flags are 0).
      if (!gso_allowed(header.gso_type, features_, kNetFeatureGuestTso4, kNetFeatureGuestTso6,
                       kNetFeatureGuestEcn) ||
          ((header.flags & kNetHdrFlagNeedsCsum) && !(features_ & kNetFeatureGuestCsum))) {
        ++stats_.rx_dropped;
        LOG_RATELIMITED(warn, "virtio-net: {}: dropped a frame with offloads not negotiated "
                        "(flags {:#x}, gso_type {:#x})", backend_->name(), header.flags,
                        header.gso_type);
        continue;
      }
      if (!(features_ & kNetFeatureGuestCsum)) header.flags = 0;
      header.flags &= kNetHdrFlagNeedsCsum | kNetHdrFlagDataValid;
      std::memcpy(rx_frame_.data(), &header, sizeof(header));
      rx_frame_bytes_ = bytes;
    }
    if (!deliver_frame()) return;
  }
}

bool Net::hold_rx_chain() {
  // Bounded: a driver publishing bad chains as fast as they are returned
  // must not keep the loop here; the backend stays watched, so it returns.
  for (uint32_t tries = 0; tries < kQueueSize && !broken_; ++tries) {
    if (rx_held_ == rx_chains_.size()) rx_chains_.emplace_back();
    DescriptorChain& chain = rx_chains_[rx_held_];
    Result<bool> popped = rx_queue_->pop_into(chain);
    if (!popped) {
      mark_broken("rx pop");
      return false;
    }
    if (!*popped) {
      wait_for_rx_buffers();
      if (rx_waiting_ || broken_) return false;
      continue;  // buffers arrived while notifications were being enabled
    }
    // §5.1.6.3.1: receive buffers are device-writable and hold at least
    // the header. Others go back unused, the frame stays.
    if (chain.readable_bytes != 0 || chain.writable_bytes < kHeaderBytes) {
      ++stats_.rx_bad_buffers;
      LOG_RATELIMITED(warn, "virtio-net: rx chain {} ({} readable, {} writable bytes) is not a "
                      "receive buffer; returned unused", chain.head, chain.readable_bytes,
                      chain.writable_bytes);
      if (!rx_queue_->push_used(chain.head, 0)) {
        mark_broken("rx push used");
        return false;
      }
      rx_pushed_ = true;
      continue;
    }
    ++rx_held_;
    return true;
  }
  return false;
}

void Net::wait_for_rx_buffers() {
  Result<bool> more = rx_queue_->enable_driver_notifications();
  if (!more) return mark_broken("rx notifications");
  if (*more) {
    if (!rx_queue_->disable_driver_notifications()) mark_broken("rx notifications");
    return;
  }
  rx_waiting_ = true;
  update_watch();
}

bool Net::deliver_frame() {
  const size_t frame_bytes = rx_frame_bytes_;
  const bool mergeable = (features_ & kNetFeatureMrgRxbuf) != 0;
  if (rx_held_ == 0 && !hold_rx_chain()) return false;
  size_t chains = 1;
  if (mergeable) {
    // §5.1.6.4: as many buffers as the frame needs, num_buffers of them.
    size_t room = 0;
    for (chains = 0; room < frame_bytes; ++chains) {
      if (chains == rx_held_ && rx_held_ >= rx_queue_->size()) {
        // Every buffer the ring can hold is ours and the frame still does
        // not fit: waiting would stall the NIC for good. Drop the frame and
        // keep the buffers for the next ones.
        ++stats_.rx_dropped;
        LOG_RATELIMITED(warn, "virtio-net: dropped a {}-byte frame: all {} rx buffers hold {} "
                        "bytes", frame_bytes, rx_held_, room);
        rx_frame_bytes_ = 0;
        return true;
      }
      if (chains == rx_held_ && !hold_rx_chain()) return false;  // the frame waits
      room += rx_chains_[chains].writable_bytes;
    }
  } else if (rx_chains_[0].writable_bytes < frame_bytes) {
    // Without MRG_RXBUF each buffer must hold a whole frame (§5.1.6.3.1);
    // keep the buffer for the next, smaller one.
    ++stats_.rx_dropped;
    LOG_RATELIMITED(warn, "virtio-net: dropped a {}-byte frame: the rx buffer holds {} bytes",
                    frame_bytes, rx_chains_[0].writable_bytes);
    rx_frame_bytes_ = 0;
    return true;
  }
  const auto num_buffers = static_cast<uint16_t>(chains);
  std::memcpy(rx_frame_.data() + offsetof(NetHeader, num_buffers), &num_buffers,
              sizeof(num_buffers));
  size_t offset = 0;
  for (size_t i = 0; i < chains; ++i) {
    const DescriptorChain& chain = rx_chains_[i];
    size_t len = std::min<size_t>(chain.writable_bytes, frame_bytes - offset);
    if (!rx_queue_->write_to_chain(chain, 0, std::span(rx_frame_).subspan(offset, len)) ||
        !rx_queue_->push_used(chain.head, static_cast<uint32_t>(len))) {
      mark_broken("rx write");
      return false;
    }
    offset += len;
  }
  rx_pushed_ = true;
  // The used chains' slots go to the back, keeping their segment vectors.
  std::rotate(rx_chains_.begin(), rx_chains_.begin() + static_cast<ptrdiff_t>(chains),
              rx_chains_.begin() + static_cast<ptrdiff_t>(rx_held_));
  rx_held_ -= chains;
  ++stats_.rx_frames;
  stats_.rx_bytes += frame_bytes - kHeaderBytes;
  rx_frame_bytes_ = 0;
  return true;
}

// --- transmit (§5.1.6.2) ------------------------------------------------------

void Net::process_tx() {
  if (!tx_queue_) return;
  int budget = kFramesPerWakeup;
  while (!broken_) {
    // §2.7.10: no notifications while draining; a chain held for EPOLLOUT
    // was taken with them already off.
    if (!tx_pending_ && !tx_queue_->disable_driver_notifications()) {
      return mark_broken("tx notifications");
    }
    for (; budget > 0 && !broken_; --budget) {
      if (!tx_pending_) {
        Result<bool> popped = tx_queue_->pop_into(tx_chain_);
        if (!popped) return mark_broken("tx pop");
        if (!*popped) break;
        if (!prepare_tx()) continue;
      }
      ssize_t sent = ::writev(backend_->fd(), tx_iov_.data(), static_cast<int>(tx_iov_.size()));
      if (sent < 0 && errno == EINTR) {
        tx_pending_ = true;
        ++budget;
        continue;
      }
      if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        // The backend is full: keep the chain, wait for EPOLLOUT.
        tx_pending_ = true;
        return update_watch();
      }
      if (sent < 0) {
        // EINVAL: the tap refused the header (bad GSO or checksum fields).
        ++stats_.tx_dropped;
        LOG_RATELIMITED(warn, "virtio-net: {} refused a {}-byte frame: {}", backend_->name(),
                        tx_frame_bytes_ - kHeaderBytes, std::strerror(errno));
      } else {
        ++stats_.tx_frames;
        stats_.tx_bytes += tx_frame_bytes_ - kHeaderBytes;
      }
      tx_pending_ = false;
      complete_tx(tx_chain_.head);
    }
    update_watch();
    if (broken_) return;
    if (budget == 0) {
      // More may wait: come back after the loop served the others, with
      // notifications still off.
      if (Result<void> signalled = wakeup_.signal(); !signalled) {
        LOG_RATELIMITED(error, "virtio-net: wakeup: {}", signalled.error().message());
      }
      return;
    }
    Result<bool> more = tx_queue_->enable_driver_notifications();
    if (!more) return mark_broken("tx notifications");
    if (!*more) return;
  }
}

bool Net::prepare_tx() {
  const DescriptorChain& chain = tx_chain_;
  auto drop = [&](std::string_view why) {
    ++stats_.tx_dropped;
    LOG_RATELIMITED(warn, "virtio-net: tx chain {} dropped: {}", chain.head, why);
    complete_tx(chain.head);
    return false;
  };
  if (chain.writable_bytes != 0) return drop("device-writable descriptors in a tx chain");
  if (chain.readable_bytes < kHeaderBytes + kEthernetHeaderBytes) {
    return drop("shorter than the header and an Ethernet header");
  }
  if (chain.readable_bytes - kHeaderBytes > kMaxFrameBytes) return drop("frame longer than 64 KiB");
  if (chain.segments.size() > kMaxTxSegments) return drop("too many descriptors");
  // The header is copied and checked; the tap gets the checked copy, so a
  // driver changing it meanwhile changes nothing.
  if (!tx_queue_->read_from_chain(chain, 0, std::as_writable_bytes(std::span(&tx_header_, 1)))) {
    return drop("unreadable header");
  }
  if (!gso_allowed(tx_header_.gso_type, features_, kNetFeatureHostTso4, kNetFeatureHostTso6,
                   kNetFeatureHostEcn)) {
    return drop(fmt::format("gso_type {:#x} not negotiated", tx_header_.gso_type));
  }
  if ((tx_header_.flags & kNetHdrFlagNeedsCsum) && !(features_ & kNetFeatureCsum)) {
    return drop("NEEDS_CSUM without VIRTIO_NET_F_CSUM");
  }
  // §5.1.6.2.1: the driver sets no other flag, and num_buffers is 0.
  tx_header_.flags &= kNetHdrFlagNeedsCsum;
  tx_header_.num_buffers = 0;
  tx_iov_.clear();
  tx_iov_.push_back(iovec{&tx_header_, sizeof(tx_header_)});
  uint64_t skip = kHeaderBytes;
  for (const Segment& segment : chain.segments) {
    if (skip >= segment.len) {
      skip -= segment.len;
      continue;
    }
    Result<std::span<std::byte>> host = memory_->host_span(segment.addr + skip, segment.len - skip);
    if (!host) return drop("data outside RAM");
    tx_iov_.push_back(iovec{host->data(), host->size()});
    skip = 0;
  }
  tx_frame_bytes_ = chain.readable_bytes;
  return true;
}

void Net::complete_tx(uint16_t head) {
  // The device writes nothing into a tx chain (§5.1.6.2).
  if (!tx_queue_->push_used(head, 0)) return mark_broken("tx push used");
  tx_pushed_ = true;
}

// --- common --------------------------------------------------------------------

void Net::update_watch() {
  if (!backend_watch_) return;
  uint32_t want = (rx_queue_ && !rx_waiting_ ? kWatchIn : 0) | (tx_pending_ ? kWatchOut : 0);
  if (want == watched_) return;
  if (Result<void> modified = event_loop_->modify(*backend_watch_, static_cast<Ready>(want));
      !modified) {
    LOG_RATELIMITED(error, "virtio-net: {}: {}", backend_->name(), modified.error().message());
    return;
  }
  watched_ = want;
}

void Net::link_lost(uint32_t events) {
  // The tap was deleted (EPOLLERR) or a socket peer went away: the link is
  // down for good. Stop watching, or the loop would spin on the error.
  LOG_WARN("virtio-net: {} failed (events {:#x}): link down", backend_->name(), events);
  if (backend_watch_) event_loop_->remove(*std::exchange(backend_watch_, std::nullopt));
  watched_ = 0;
  config_space_.status = static_cast<uint16_t>(config_space_.status & ~kNetStatusLinkUp);
  if (features_ & kNetFeatureStatus) interrupt_->notify_config();  // §5.1.4.2
}

void Net::signal_used() {
  if (broken_) return;
  if (rx_pushed_) {
    rx_pushed_ = false;
    if (rx_queue_->needs_notification()) interrupt_->notify_queue(kRxQueue);
  }
  if (tx_pushed_) {
    tx_pushed_ = false;
    if (tx_queue_->needs_notification()) interrupt_->notify_queue(kTxQueue);
  }
}

void Net::mark_broken(std::string_view why) {
  if (broken_) return;
  broken_ = true;
  LOG_RATELIMITED(warn, "virtio-net: {}: the driver broke the spec; device needs reset", why);
  // Nothing more is read or sent until reset: stop watching, or a readable
  // backend would wake the loop for ever.
  if (backend_watch_ && watched_ != 0) {
    if (Result<void> modified = event_loop_->modify(*backend_watch_, static_cast<Ready>(0));
        modified) {
      watched_ = 0;
    }
  }
  interrupt_->needs_reset();
}

NetStats Net::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

bool Net::watching_input() const {
  std::lock_guard lock(mutex_);
  return backend_watch_ && (watched_ & kWatchIn);
}

bool Net::watching_output() const {
  std::lock_guard lock(mutex_);
  return backend_watch_ && (watched_ & kWatchOut);
}

Result<VirtioDeviceState> Net::save_state() const {
  std::lock_guard lock(mutex_);
  VirtioDeviceState state{.queues = {saved_queue(rx_queue_), saved_queue(tx_queue_)}, .extra = {}};
  // Chains popped but not used go back to the driver's side of the ring:
  // the rx buffers held for the next frame (the last ones popped; a frame
  // already read from the tap is lost with them, as a full ring would
  // lose it) and a transmit the tap had no room for.
  if (state.queues[kRxQueue]) {
    state.queues[kRxQueue]->last_avail_idx =
        static_cast<uint16_t>(state.queues[kRxQueue]->last_avail_idx - rx_held_);
  }
  if (state.queues[kTxQueue] && tx_pending_) --state.queues[kTxQueue]->last_avail_idx;
  return state;
}

Result<void> Net::restore_state(ActivateContext context, std::span<const std::byte> extra) {
  TRY(expect_no_extra(name(), extra));
  return activate(std::move(context));
}

void Net::reset() {
  std::optional<EventLoop::WatchId> backend_watch;
  std::optional<EventLoop::WatchId> wakeup_watch;
  EventLoop* loop = nullptr;
  {
    std::lock_guard lock(mutex_);
    active_ = false;
    backend_watch = std::exchange(backend_watch_, std::nullopt);
    wakeup_watch = std::exchange(wakeup_watch_, std::nullopt);
    loop = event_loop_;
  }
  // Outside the lock: remove() waits for a running callback, which may be
  // waiting for our lock.
  if (backend_watch) loop->remove(*backend_watch);
  if (wakeup_watch) loop->remove(*wakeup_watch);
  std::lock_guard lock(mutex_);
  if (rx_frame_bytes_ != 0) ++stats_.rx_dropped;  // read, never delivered
  rx_frame_bytes_ = 0;
  rx_held_ = 0;
  rx_waiting_ = false;
  tx_pending_ = false;
  rx_pushed_ = tx_pushed_ = false;
  watched_ = 0;
  rx_queue_.reset();
  tx_queue_.reset();
  interrupt_.reset();
  memory_ = nullptr;
  event_loop_ = nullptr;
  broken_ = false;
  // The backend stays open for the next activation; until then it hands
  // over nothing the next driver might not accept.
  if (features_ != 0) {
    if (Result<void> cleared = backend_->set_offloads(net::Offloads{}); !cleared) {
      LOG_WARN("virtio-net: {}", cleared.error().message());
    }
  }
  features_ = 0;
  (void)wakeup_.consume();
}

}  // namespace keel::devices::virtio
