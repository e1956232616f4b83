// virtio-vsock: see vsock.h for the status card.
#include "devices/virtio/vsock.h"

#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "base/log.h"

namespace keel::devices::virtio {
namespace {

constexpr int kListenBacklog = 128;
constexpr int kAcceptsPerWakeup = 16;

Result<sockaddr_un> unix_address(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(address.sun_path)) {
    return fail(Errc::InvalidArgument,
                fmt::format("virtio-vsock: socket path '{}' is empty or longer than {} bytes", path,
                            sizeof(address.sun_path) - 1));
  }
  std::memcpy(address.sun_path, path.data(), path.size());
  return address;
}

// Binds and listens on path. A socket file left by a process that is gone
// (connecting to it is refused) is replaced; one somebody listens on is not.
Result<Fd> listen_unix_stream(const std::string& path) {
  sockaddr_un address = TRY(unix_address(path));
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return fail_errno("virtio-vsock: socket AF_UNIX");
  auto* raw = reinterpret_cast<const sockaddr*>(&address);
  if (::bind(fd.get(), raw, sizeof(address)) < 0) {
    if (errno != EADDRINUSE) return fail_errno(fmt::format("virtio-vsock: bind {}", path));
    Result<Fd> probe = connect_unix_stream(path);
    if (probe || probe.error().sys_errno() != ECONNREFUSED) {
      return fail(Errc::Busy, fmt::format("virtio-vsock: {} exists and is not a stale socket", path));
    }
    if (::unlink(path.c_str()) < 0) return fail_errno(fmt::format("virtio-vsock: unlink {}", path));
    if (::bind(fd.get(), raw, sizeof(address)) < 0) {
      return fail_errno(fmt::format("virtio-vsock: bind {}", path));
    }
  }
  if (::listen(fd.get(), kListenBacklog) < 0) {
    return fail_errno(fmt::format("virtio-vsock: listen {}", path));
  }
  return fd;
}

}  // namespace

Result<std::unique_ptr<Vsock>> Vsock::create(VsockDeviceConfig config) {
  // §5.10.4: 0, 1, 2 and 0xffffffff are reserved; the upper 32 bits are zero.
  if (config.guest_cid < 3 || config.guest_cid >= 0xffffffffull) {
    return fail(Errc::InvalidArgument,
                fmt::format("virtio-vsock: guest CID {} is reserved or too large", config.guest_cid));
  }
  if (config.connection.buf_alloc == 0 || config.max_connections == 0 ||
      config.tick.count() <= 0) {
    return fail(Errc::InvalidArgument, "virtio-vsock: buf_alloc, max_connections and tick must be set");
  }
  Fd listener = TRY(listen_unix_stream(config.socket_path));
  Fd timer(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  if (!timer.valid()) {
    (void)::unlink(config.socket_path.c_str());
    return fail_errno("virtio-vsock: timerfd_create");
  }
  auto device = std::unique_ptr<Vsock>(new Vsock(std::move(config), std::move(listener)));
  device->timer_ = std::move(timer);
  return device;
}

Vsock::Vsock(VsockDeviceConfig config, Fd listener)
    : config_(std::move(config)), config_space_{config_.guest_cid}, listener_(std::move(listener)) {
  chain_.segments.reserve(kQueueSize);
  payload_.resize(kVsockMaxPayloadBytes);
}

Vsock::~Vsock() {
  reset();
  (void)::unlink(config_.socket_path.c_str());
}

void Vsock::read_config(uint32_t offset, std::span<std::byte> data) {
  std::memcpy(data.data(), reinterpret_cast<const std::byte*>(&config_space_) + offset,
              data.size());
}

Result<void> Vsock::activate(ActivateContext context) {
  std::lock_guard lock(mutex_);
  if (active_) return fail(Errc::Busy, "virtio-vsock: activated twice without a reset");
  if (context.memory == nullptr || !context.interrupt || context.event_loop == nullptr ||
      context.queues.size() != 3) {
    return fail(Errc::InvalidArgument,
                "virtio-vsock: activate needs memory, an interrupt, an event loop and 3 queues");
  }
  if (!context.queues[kRxQueue] || !context.queues[kTxQueue]) {
    return fail(Errc::InvalidArgument, "virtio-vsock: the driver left rx or tx disabled");
  }
  memory_ = context.memory;
  rx_ = std::move(context.queues[kRxQueue]);
  tx_ = std::move(context.queues[kTxQueue]);
  event_ = std::move(context.queues[kEventQueue]);
  interrupt_ = std::move(context.interrupt);
  event_loop_ = context.event_loop;
  Result<EventLoop::WatchId> listening =
      event_loop_->add(listener_.get(), Ready::In, [this](uint32_t) {
        std::lock_guard callback_lock(mutex_);
        if (!active_ || broken_) return;
        accept_clients();
        update_tick();
      });
  if (!listening) return fail(std::move(listening).error().wrap("virtio-vsock: watch listener"));
  listener_watch_ = *listening;
  Result<EventLoop::WatchId> ticking = event_loop_->add(timer_.get(), Ready::In, [this](uint32_t) {
    std::lock_guard callback_lock(mutex_);
    uint64_t expirations = 0;
    (void)::read(timer_.get(), &expirations, sizeof(expirations));
    if (!active_ || broken_) return;
    on_tick();
  });
  if (!ticking) {
    event_loop_->remove(*listener_watch_);
    listener_watch_.reset();
    return fail(std::move(ticking).error().wrap("virtio-vsock: watch timer"));
  }
  timer_watch_ = *ticking;
  active_ = true;
  broken_ = false;
  return ok();
}

void Vsock::notify(uint16_t queue) {
  std::lock_guard lock(mutex_);
  if (!active_ || broken_) return;
  // The event queue's buffers stay with us until there is an event.
  if (transport_reset_owed_) send_transport_reset();
  if (queue == kTxQueue) process_tx();
  if (queue == kTxQueue || queue == kRxQueue) process_rx();
  signal_used();
}

size_t Vsock::connection_count() const {
  std::lock_guard lock(mutex_);
  return connections_.size();
}

size_t Vsock::pending_client_count() const {
  std::lock_guard lock(mutex_);
  return pending_clients_.size();
}

void Vsock::process_tx() {
  // §5.10.6.1: tx is always processed; what we owe the guest in return is
  // bounded per connection, and RSTs without one by kMaxQueuedResets.
  while (!broken_) {
    if (!tx_->disable_driver_notifications()) return mark_broken("tx: disable notifications");
    while (!broken_) {
      Result<bool> popped = tx_->pop_into(chain_);
      if (!popped) return mark_broken("tx: pop");
      if (!*popped) break;
      handle_tx_chain();
    }
    if (broken_) return;
    Result<bool> more = tx_->enable_driver_notifications();
    if (!more) return mark_broken("tx: enable notifications");
    if (!*more) return;
  }
}

void Vsock::handle_tx_chain() {
  VsockHeader header{};
  bool have_header = chain_.readable_bytes >= kVsockHeaderBytes &&
                     tx_->read_from_chain(chain_, 0, std::as_writable_bytes(std::span(&header, 1)));
  VsockPacketError error = VsockPacketError::None;
  std::span<const std::byte> payload;
  if (have_header) {
    error = check_tx_header(header, chain_.readable_bytes - kVsockHeaderBytes, config_.guest_cid);
    if (error == VsockPacketError::None && header.op == kVsockOpRw && header.len > 0) {
      std::span<std::byte> room = std::span(payload_).first(header.len);
      if (!tx_->read_from_chain(chain_, kVsockHeaderBytes, room)) {
        error = VsockPacketError::PayloadPastChain;
      } else {
        payload = room;
      }
    }
  }
  // The chain goes back at once: everything we need is copied out.
  if (!tx_->push_used(chain_.head, 0)) return mark_broken("tx: push used");
  tx_pushed_ = true;

  if (!have_header) {
    LOG_RATELIMITED(warn, "virtio-vsock: tx chain {} has {} readable bytes, no header",
                    chain_.head, chain_.readable_bytes);
    return;
  }
  const Key key = key_of(header.dst_port, header.src_port);
  auto it = connections_.find(key);
  if (error != VsockPacketError::None) {
    LOG_RATELIMITED(warn, "virtio-vsock: dropped packet op {} {}:{} -> {}:{}: {}", +header.op,
                    uint64_t{header.src_cid}, +header.src_port, uint64_t{header.dst_cid},
                    +header.dst_port, to_string(error));
    if (error_wants_rst(header, error)) {
      // A broken packet of a live flow breaks the stream: end it both ways.
      if (it != connections_.end() && error != VsockPacketError::WrongDestination) {
        if (it->second.watch) event_loop_->remove(*it->second.watch);
        connections_.erase(it);
      }
      queue_reset(reply_header(header, kVsockOpRst));
    }
    return;
  }
  if (it == connections_.end()) {
    if (header.op == kVsockOpRequest) return handle_request(header);
    if (header.op != kVsockOpRst) {
      LOG_RATELIMITED(debug, "virtio-vsock: op {} for no connection (port {} -> {}); RST",
                      +header.op, +header.src_port, +header.dst_port);
      queue_reset(reply_header(header, kVsockOpRst));
    }
    return;
  }
  it->second.connection.on_guest_packet(header, payload);
  service(key);
}

void Vsock::handle_request(const VsockHeader& header) {
  if (connections_.size() >= config_.max_connections) {
    LOG_RATELIMITED(warn, "virtio-vsock: {} connections already; refusing guest port {}",
                    connections_.size(), +header.src_port);
    return queue_reset(reply_header(header, kVsockOpRst));
  }
  const std::string path = fmt::format("{}_{}", config_.socket_path, header.dst_port);
  Result<Fd> host = connect_unix_stream(path);
  if (!host) {
    LOG_RATELIMITED(debug, "virtio-vsock: guest port {} -> host port {}: {}", +header.src_port,
                    +header.dst_port, host.error().message());
    return queue_reset(reply_header(header, kVsockOpRst));
  }
  const Key key = key_of(header.dst_port, header.src_port);
  connections_.emplace(key, Entry(VsockConnection::from_guest(
                                      std::move(*host), header, config_.connection,
                                      VsockClock::now())));
  LOG_DEBUG("virtio-vsock: guest port {} connected to {}", +header.src_port, path);
  service(key);
  update_tick();
}

void Vsock::queue_reset(const VsockHeader& header) {
  if (resets_.size() >= kMaxQueuedResets) {
    LOG_RATELIMITED(warn, "virtio-vsock: {} RSTs wait for rx buffers; dropping one", resets_.size());
    return;
  }
  resets_.push_back(header);
}

void Vsock::service(Key key) {
  auto it = connections_.find(key);
  if (it == connections_.end()) return;
  Entry& entry = it->second;
  VsockConnection& connection = entry.connection;
  if (connection.fate() == VsockConnection::Fate::Open) {
    std::optional<Ready> interest = connection.host_interest();
    Result<void> watched = ok();
    if (!interest) {
      if (entry.watch) event_loop_->remove(*entry.watch);
      entry.watch.reset();
    } else if (!entry.watch) {
      Result<EventLoop::WatchId> added =
          event_loop_->add(connection.host_fd(), *interest,
                           [this, key](uint32_t events) { on_connection_ready(key, events); });
      if (added) {
        entry.watch = *added;
        entry.watching = *interest;
      } else {
        watched = fail(std::move(added).error());
      }
    } else if (*interest != entry.watching) {
      watched = event_loop_->modify(*entry.watch, *interest);
      entry.watching = *interest;
    }
    if (watched) {
      if (connection.has_rx_packet() && !entry.rx_queued) {
        entry.rx_queued = true;
        rx_ready_.push_back(key);
      }
      return;
    }
    LOG_RATELIMITED(error, "virtio-vsock: watching host port {}: {}", connection.host_port(),
                    watched.error().message());
    queue_reset(connection.rst_header());
  } else {
    LOG_DEBUG("virtio-vsock: connection {}:{} ends: {}", connection.host_port(),
              connection.guest_port(), connection.fate_reason());
    if (connection.fate() == VsockConnection::Fate::ReleaseWithRst) {
      queue_reset(connection.rst_header());
    }
  }
  if (entry.watch) event_loop_->remove(*entry.watch);
  connections_.erase(it);  // closes the host socket
}

void Vsock::process_rx() {
  while (!broken_) {
    while (resets_.empty() && !rx_ready_.empty()) {
      auto it = connections_.find(rx_ready_.front());
      if (it != connections_.end() && it->second.connection.has_rx_packet()) break;
      if (it != connections_.end()) it->second.rx_queued = false;
      rx_ready_.pop_front();
    }
    if (resets_.empty() && rx_ready_.empty()) return;
    Result<bool> popped = rx_->pop_into(chain_);
    if (!popped) return mark_broken("rx: pop");
    if (!*popped) {
      // No buffers: the host sockets stay unread (their data waits in
      // staging or in the kernel) until the driver posts some.
      Result<bool> more = rx_->enable_driver_notifications();
      if (!more) return mark_broken("rx: enable notifications");
      if (!*more) return;
      continue;
    }
    if (chain_.readable_bytes != 0 || chain_.writable_bytes < kVsockHeaderBytes) {
      LOG_RATELIMITED(warn, "virtio-vsock: rx chain {} has {} readable, {} writable bytes",
                      chain_.head, chain_.readable_bytes, chain_.writable_bytes);
      return mark_broken("rx buffer without room for a header");
    }
    VsockHeader header{};
    uint32_t length = 0;
    if (!resets_.empty()) {
      header = resets_.front();
      resets_.pop_front();
    } else {
      const Key key = rx_ready_.front();
      rx_ready_.pop_front();
      Entry& entry = connections_.find(key)->second;
      entry.rx_queued = false;
      uint32_t room = std::min(chain_.writable_bytes - kVsockHeaderBytes, kVsockMaxPayloadBytes);
      length = entry.connection.next_rx_packet(header, std::span(payload_).first(room));
      service(key);
    }
    if (!rx_->write_to_chain(chain_, 0, std::as_bytes(std::span(&header, 1))) ||
        !rx_->write_to_chain(chain_, kVsockHeaderBytes, std::span(payload_).first(length))) {
      return mark_broken("rx: write packet");
    }
    if (!rx_->push_used(chain_.head, kVsockHeaderBytes + length)) return mark_broken("rx: push used");
    rx_pushed_ = true;
  }
}

void Vsock::accept_clients() {
  for (int i = 0; i < kAcceptsPerWakeup; ++i) {
    Fd client(::accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!client.valid()) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        LOG_RATELIMITED(warn, "virtio-vsock: accept on {}: {}", config_.socket_path,
                        std::strerror(errno));
      }
      return;
    }
    if (pending_clients_.size() >= config_.max_pending_clients ||
        connections_.size() + pending_clients_.size() >= config_.max_connections) {
      LOG_RATELIMITED(warn, "virtio-vsock: too many host clients ({} connections, {} waiting); "
                      "closing a new one", connections_.size(), pending_clients_.size());
      continue;
    }
    const int fd = client.get();
    Result<EventLoop::WatchId> watch =
        event_loop_->add(fd, Ready::In, [this, fd](uint32_t) { on_client_ready(fd); });
    if (!watch) {
      LOG_RATELIMITED(error, "virtio-vsock: watching a host client: {}", watch.error().message());
      continue;
    }
    pending_clients_.emplace(fd, PendingClient{.fd = std::move(client),
                                               .line = {},
                                               .deadline = VsockClock::now() + config_.handshake_timeout,
                                               .watch = *watch});
  }
}

void Vsock::close_client(int fd, std::string_view why) {
  auto it = pending_clients_.find(fd);
  if (it == pending_clients_.end()) return;
  LOG_RATELIMITED(warn, "virtio-vsock: closing host client on {}: {}", config_.socket_path, why);
  event_loop_->remove(it->second.watch);
  pending_clients_.erase(it);
}

void Vsock::on_client_ready(int fd) {
  std::lock_guard lock(mutex_);
  if (!active_ || broken_) return;
  auto it = pending_clients_.find(fd);
  if (it == pending_clients_.end()) return;
  PendingClient& client = it->second;
  // Peek, then take exactly the line: bytes after the newline are the
  // client's stream data, read once the connection is up.
  char buffer[kVsockConnectLineMaxBytes];
  size_t room = kVsockConnectLineMaxBytes - client.line.size();
  ssize_t n = ::recv(fd, buffer, room, MSG_PEEK | MSG_DONTWAIT);
  if (n == 0) return close_client(fd, "closed before its CONNECT line");
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
    return close_client(fd, std::strerror(errno));
  }
  auto peeked = static_cast<size_t>(n);
  const char* newline = static_cast<const char*>(std::memchr(buffer, '\n', peeked));
  size_t take = newline ? static_cast<size_t>(newline - buffer) + 1 : peeked;
  if (::recv(fd, buffer, take, MSG_DONTWAIT) != static_cast<ssize_t>(take)) {
    return close_client(fd, "reading its CONNECT line failed");
  }
  client.line.append(buffer, take);
  if (!newline) {
    if (client.line.size() >= kVsockConnectLineMaxBytes) return close_client(fd, "line too long");
    return;
  }
  std::optional<uint32_t> port = parse_connect_line(client.line);
  if (!port) return close_client(fd, "not a CONNECT <port> line");
  if (connections_.size() >= config_.max_connections) return close_client(fd, "too many connections");
  std::optional<uint32_t> local_port = allocate_local_port();
  if (!local_port) return close_client(fd, "no free local port");

  event_loop_->remove(client.watch);
  Fd host = std::move(client.fd);
  pending_clients_.erase(it);
  const Key key = key_of(*local_port, *port);
  connections_.emplace(key, Entry(VsockConnection::to_guest(
                                      std::move(host), config_.guest_cid, *port, *local_port,
                                      config_.connection, VsockClock::now())));
  LOG_DEBUG("virtio-vsock: host client -> guest port {} as local port {}", *port, *local_port);
  service(key);
  process_rx();
  signal_used();
}

std::optional<uint32_t> Vsock::allocate_local_port() {
  for (uint32_t tries = 0; tries <= config_.max_connections; ++tries) {
    uint32_t port = next_local_port_;
    next_local_port_ = port == 0xffffffffu ? kFirstLocalPort : port + 1;
    auto it = connections_.lower_bound(key_of(port, 0));
    if (it == connections_.end() || (it->first >> 32) != port) return port;
  }
  return std::nullopt;
}

void Vsock::on_connection_ready(Key key, uint32_t events) {
  std::lock_guard lock(mutex_);
  if (!active_ || broken_) return;
  auto it = connections_.find(key);
  if (it == connections_.end()) return;
  it->second.connection.on_host_ready(events);
  service(key);
  process_rx();
  signal_used();
  update_tick();
}

void Vsock::on_tick() {
  const VsockClock::time_point now = VsockClock::now();
  std::vector<int> expired;
  for (const auto& [fd, client] : pending_clients_) {
    if (now >= client.deadline) expired.push_back(fd);
  }
  for (int fd : expired) close_client(fd, "no CONNECT line in time");
  std::vector<Key> keys;
  for (auto& [key, entry] : connections_) {
    if (!entry.connection.has_deadline()) continue;
    entry.connection.on_tick(now);
    keys.push_back(key);
  }
  for (Key key : keys) service(key);
  process_rx();
  signal_used();
  update_tick();
}

void Vsock::update_tick() {
  // Deadlines exist only while something is being set up or torn down, but
  // checking for them costs a scan; a tick while anything is open is cheap.
  bool wanted = active_ && !broken_ && (!pending_clients_.empty() || !connections_.empty());
  if (wanted == ticking_) return;
  itimerspec spec{};
  if (wanted) {
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(config_.tick).count();
    spec.it_interval.tv_sec = ns / 1'000'000'000;
    spec.it_interval.tv_nsec = ns % 1'000'000'000;
    spec.it_value = spec.it_interval;
  }
  if (::timerfd_settime(timer_.get(), 0, &spec, nullptr) < 0) {
    LOG_RATELIMITED(error, "virtio-vsock: timerfd_settime: {}", std::strerror(errno));
    return;
  }
  ticking_ = wanted;
}

void Vsock::signal_used() {
  if (broken_) return;
  if (rx_pushed_ && rx_->needs_notification()) interrupt_->notify_queue(kRxQueue);
  if (tx_pushed_ && tx_->needs_notification()) interrupt_->notify_queue(kTxQueue);
  rx_pushed_ = false;
  tx_pushed_ = false;
}

void Vsock::mark_broken(std::string_view why) {
  if (broken_) return;
  broken_ = true;
  LOG_RATELIMITED(warn, "virtio-vsock: {}: the driver broke the spec; device needs reset", why);
  interrupt_->needs_reset();
  // Nothing runs until reset(): drop the host side now so no watch fires
  // (level-triggered) for a device that will not serve it. This runs on the
  // loop thread, where remove() does not wait.
  for (EventLoop::WatchId watch : take_watches()) event_loop_->remove(watch);
  connections_.clear();
  pending_clients_.clear();
  resets_.clear();
  rx_ready_.clear();
  update_tick();
}

std::vector<EventLoop::WatchId> Vsock::take_watches() {
  std::vector<EventLoop::WatchId> watches;
  if (listener_watch_) watches.push_back(*std::exchange(listener_watch_, std::nullopt));
  if (timer_watch_) watches.push_back(*std::exchange(timer_watch_, std::nullopt));
  for (auto& [key, entry] : connections_) {
    if (entry.watch) watches.push_back(*std::exchange(entry.watch, std::nullopt));
  }
  for (auto& [fd, client] : pending_clients_) watches.push_back(client.watch);
  return watches;
}

void Vsock::reset() {
  std::vector<EventLoop::WatchId> watches;
  EventLoop* loop = nullptr;
  {
    std::lock_guard lock(mutex_);
    active_ = false;
    watches = take_watches();
    loop = event_loop_;
  }
  // Outside the lock: remove() waits for a running callback, which may be
  // waiting for our lock.
  for (EventLoop::WatchId watch : watches) loop->remove(watch);
  std::lock_guard lock(mutex_);
  connections_.clear();  // closes every host socket: their clients see end of file
  pending_clients_.clear();
  resets_.clear();
  rx_ready_.clear();
  itimerspec off{};
  (void)::timerfd_settime(timer_.get(), 0, &off, nullptr);
  ticking_ = false;
  rx_.reset();
  tx_.reset();
  event_.reset();
  transport_reset_owed_ = false;
  interrupt_.reset();
  memory_ = nullptr;
  event_loop_ = nullptr;
  broken_ = false;
  rx_pushed_ = false;
  tx_pushed_ = false;
  next_local_port_ = kFirstLocalPort;
}

Result<VirtioDeviceState> Vsock::save_state() const {
  std::lock_guard lock(mutex_);
  // No chain is held between callbacks: rx and tx chains go back used in
  // the callback that popped them, event buffers are never popped.
  return VirtioDeviceState{.queues = {saved_queue(rx_), saved_queue(tx_), saved_queue(event_)},
                           .extra = {}};
}

Result<void> Vsock::restore_state(ActivateContext context, std::span<const std::byte> extra) {
  TRY(expect_no_extra(name(), extra));
  TRY(activate(std::move(context)));
  std::lock_guard lock(mutex_);
  // Sent from notify(), which the restoring machine's first kick of every
  // queue runs on the device loop: only then may an interrupt reach the
  // guest, whose interrupt controller state is restored after the devices.
  transport_reset_owed_ = true;
  return ok();
}

void Vsock::send_transport_reset() {
  // §5.10.6 device events: struct virtio_vsock_event { le32 id; } in a device-writable
  // buffer; the driver puts a new one back after handling it. Without an
  // event queue or a buffer it stays owed until the driver adds one.
  if (!event_) return;
  Result<bool> popped = event_->pop_into(chain_);
  if (!popped) return mark_broken("event: pop");
  if (!*popped) return;
  if (chain_.readable_bytes != 0 || chain_.writable_bytes < sizeof(uint32_t)) {
    LOG_RATELIMITED(warn, "virtio-vsock: event chain {} has {} readable, {} writable bytes",
                    chain_.head, chain_.readable_bytes, chain_.writable_bytes);
    return mark_broken("event buffer without room for an event");
  }
  const uint32_t id = kVsockEventTransportReset;
  if (!event_->write_to_chain(chain_, 0, std::as_bytes(std::span(&id, 1))) ||
      !event_->push_used(chain_.head, sizeof(id))) {
    return mark_broken("event: write");
  }
  transport_reset_owed_ = false;
  LOG_INFO("virtio-vsock: restored; sent TRANSPORT_RESET so the guest drops its connections");
  if (event_->needs_notification()) interrupt_->notify_queue(kEventQueue);
}

}  // namespace keel::devices::virtio
