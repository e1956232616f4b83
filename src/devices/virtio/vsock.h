// virtio-vsock with a Firecracker-style hybrid host side. Spec: virtio 1.2
// §5.10 (socket device): §5.10.2 virtqueues, §5.10.3 feature bits,
// §5.10.4 configuration layout, §5.10.6 device operation (§5.10.6.1 flow
// control between the queues, §5.10.6.3 credit, §5.10.6.4 RST for unknown
// types, §5.10.6.5 stream sockets). Host protocol: docs/vsock.md.
// Implemented: rx, tx and event queues; guest_cid; stream sockets only
// (VIRTIO_VSOCK_F_STREAM offered, which Linux 6.1 does not know and the
// spec implies when nothing is negotiated); the host side on unix
// sockets: a listening socket taking "CONNECT <port>\n" from host clients,
// and "<socket>_<port>" dialed for guest connections to CID 2; bounded
// connections, bounded buffering, everything on the device I/O loop.
// Snapshots: the queues only. Host connections live in this process and
// cannot follow the guest into a restored one (or a migration's
// destination), so, as Firecracker does, the restored device sends
// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio 1.2 §5.10.6, device events) on the event queue as soon
// as the driver has a buffer there: the driver drops every connection and
// re-reads guest_cid, and new connections work. The event queue is popped
// for nothing else.
// Missing: SEQPACKET.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "base/fd.h"
#include "devices/virtio/device.h"
#include "devices/virtio/vsock_connection.h"
#include "devices/virtio/vsock_packet.h"

namespace keel::devices::virtio {

// struct virtio_vsock_config (§5.10.4).
struct VsockConfigSpace {
  uint64_t guest_cid;
};
static_assert(sizeof(VsockConfigSpace) == 8);

struct VsockDeviceConfig {
  uint64_t guest_cid = 3;
  std::string socket_path;  // the listening socket; guest dials go to <path>_<port>
  VsockConnectionLimits connection;
  uint32_t max_connections = 1024;  // established or being set up, both directions
  uint32_t max_pending_clients = 64;  // host clients that have not sent CONNECT yet
  std::chrono::milliseconds handshake_timeout{5000};  // for the CONNECT line
  std::chrono::milliseconds tick{250};  // how often deadlines are checked while any is set
};

class Vsock final : public VirtioDevice {
 public:
  static constexpr uint16_t kQueueSize = 256;
  static constexpr uint16_t kRxQueue = 0;
  static constexpr uint16_t kTxQueue = 1;
  static constexpr uint16_t kEventQueue = 2;
  // Local ports for host-initiated connections start here, as Firecracker.
  static constexpr uint32_t kFirstLocalPort = 1u << 30;
  // RSTs for flows without a connection waiting for rx buffers; more are
  // dropped (the guest times out or retries).
  static constexpr size_t kMaxQueuedResets = 1024;

  // Binds the listening socket (replacing a stale socket file nobody
  // listens on; a live one is an error).
  static Result<std::unique_ptr<Vsock>> create(VsockDeviceConfig config);
  ~Vsock() override;

  DeviceType type() const override { return DeviceType::Vsock; }
  std::string_view name() const override { return "virtio-vsock"; }
  uint64_t features() const override { return kVsockFeatureStream; }
  std::vector<uint16_t> queue_max_sizes() const override {
    return {kQueueSize, kQueueSize, kQueueSize};
  }
  size_t config_size_bytes() const override { return sizeof(VsockConfigSpace); }
  void read_config(uint32_t offset, std::span<std::byte> data) override;

  Result<void> activate(ActivateContext context) override;
  void notify(uint16_t queue) override;
  void reset() override;
  // The queues; nothing of the host connections (see the status card).
  Result<VirtioDeviceState> save_state() const override;
  // Activates on the saved queues with no connections, and owes the
  // driver a TRANSPORT_RESET event, sent from the device loop.
  Result<void> restore_state(ActivateContext context, std::span<const std::byte> extra) override;

  // For tests: counts of live host-side state.
  size_t connection_count() const;
  size_t pending_client_count() const;

 private:
  struct Entry {
    explicit Entry(VsockConnection c) : connection(std::move(c)) {}
    VsockConnection connection;
    std::optional<EventLoop::WatchId> watch;
    Ready watching{};
    bool rx_queued = false;
  };
  // A host client that has not sent its CONNECT line yet.
  struct PendingClient {
    Fd fd;
    std::string line;
    VsockClock::time_point deadline;
    EventLoop::WatchId watch = 0;
  };
  // Connections are keyed by (host port, guest port); the CIDs are fixed.
  using Key = uint64_t;
  static Key key_of(uint32_t host_port, uint32_t guest_port) {
    return (uint64_t{host_port} << 32) | guest_port;
  }

  Vsock(VsockDeviceConfig config, Fd listener);

  // All below run with mutex_ held.
  void process_tx();
  void handle_tx_chain();
  void handle_request(const VsockHeader& header);
  void process_rx();
  void queue_reset(const VsockHeader& header);
  // Settles a connection after anything happened to it: releases it (with
  // an RST if it says so), syncs its watch, queues it for rx.
  void service(Key key);
  void accept_clients();
  void on_client_ready(int fd);
  void close_client(int fd, std::string_view why);
  void on_connection_ready(Key key, uint32_t events);
  void on_tick();
  void update_tick();
  std::optional<uint32_t> allocate_local_port();
  void signal_used();
  // Sends the owed TRANSPORT_RESET if the event queue has a buffer.
  void send_transport_reset();
  void mark_broken(std::string_view why);
  // Removes every watch; with the lock released by the caller first when
  // called from another thread than the loop's.
  std::vector<EventLoop::WatchId> take_watches();

  const VsockDeviceConfig config_;
  const VsockConfigSpace config_space_;
  const Fd listener_;
  Fd timer_;  // a timerfd ticking while any deadline is set

  mutable std::mutex mutex_;  // guards everything below
  bool active_ = false;
  bool broken_ = false;
  const memory::GuestMemory* memory_ = nullptr;
  std::optional<Virtqueue> rx_;
  std::optional<Virtqueue> tx_;
  std::optional<Virtqueue> event_;  // popped only for a TRANSPORT_RESET (see the status card)
  bool transport_reset_owed_ = false;  // restored: the driver must drop its connections
  std::shared_ptr<Interrupt> interrupt_;
  EventLoop* event_loop_ = nullptr;
  std::optional<EventLoop::WatchId> listener_watch_;
  std::optional<EventLoop::WatchId> timer_watch_;
  bool ticking_ = false;
  std::map<Key, Entry> connections_;
  std::map<int, PendingClient> pending_clients_;  // by fd
  std::deque<VsockHeader> resets_;   // RSTs for flows without a connection
  std::deque<Key> rx_ready_;         // connections with something for the guest
  uint32_t next_local_port_ = kFirstLocalPort;
  bool rx_pushed_ = false;
  bool tx_pushed_ = false;
  DescriptorChain chain_;            // reused by every pop
  std::vector<std::byte> payload_;   // one packet's payload, either way
};

}  // namespace keel::devices::virtio
