// virtio-net. Spec: virtio 1.2 §5.1 (network device): §5.1.2 virtqueues,
// §5.1.3 feature bits, §5.1.4 configuration layout, §5.1.6 device operation
// (§5.1.6.1 the packet header, §5.1.6.2 transmission, §5.1.6.3/§5.1.6.4
// receive buffers and incoming packets, §5.1.6.3.1/§5.1.6.4.1 the merged
// buffer and checksum rules).
// Implemented: one rx/tx queue pair on a net::NetBackend (a tap in
// keel-vmm); MAC, MTU, STATUS (link up; down if the tap goes away), CSUM,
// GUEST_CSUM, GUEST_TSO4/6/ECN (passed to the tap as TUNSETOFFLOAD after
// negotiation), HOST_TSO4/6/ECN, MRG_RXBUF. TX writes each frame with
// writev straight from guest RAM (only the 12-byte header is copied, to
// validate it); a full backend leaves the chain for an EPOLLOUT wakeup. RX
// reads each frame into one 64 KiB+ host buffer and scatters it over one
// chain, or several with MRG_RXBUF (num_buffers): one copy, but a frame is
// only read once a buffer is held, and a frame waiting for more buffers is
// kept, never dropped. Without rx buffers the tap is not watched until the
// driver notifies queue 0. Each wakeup handles a bounded number of frames.
// Frames dropped (bad chains, too big for the buffers) are counted.
// Snapshots: the queues, with held rx buffers and a blocked transmit given
// back as still available (a frame read for those buffers is lost).
// Missing: CTRL_VQ (promiscuous/MAC filters, announce, GUEST_OFFLOADS; so
// no gratuitous ARP after a restore elsewhere), MQ,
// GUEST/HOST_UFO (Linux accepts but ignores TUN_F_UFO since 4.14; 6.1's
// tap has no USO), RSS/hash reports, SPEED_DUPLEX.
#pragma once

#include <sys/uio.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "base/event_fd.h"
#include "devices/virtio/device.h"
#include "net/net_backend.h"

namespace keel::devices::virtio {

// Feature bits (§5.1.3).
inline constexpr uint64_t kNetFeatureCsum = 1ull << 0;
inline constexpr uint64_t kNetFeatureGuestCsum = 1ull << 1;
inline constexpr uint64_t kNetFeatureMtu = 1ull << 3;
inline constexpr uint64_t kNetFeatureMac = 1ull << 5;
inline constexpr uint64_t kNetFeatureGuestTso4 = 1ull << 7;
inline constexpr uint64_t kNetFeatureGuestTso6 = 1ull << 8;
inline constexpr uint64_t kNetFeatureGuestEcn = 1ull << 9;
inline constexpr uint64_t kNetFeatureHostTso4 = 1ull << 11;
inline constexpr uint64_t kNetFeatureHostTso6 = 1ull << 12;
inline constexpr uint64_t kNetFeatureHostEcn = 1ull << 13;
inline constexpr uint64_t kNetFeatureMrgRxbuf = 1ull << 15;
inline constexpr uint64_t kNetFeatureStatus = 1ull << 16;

// Configuration status bits (§5.1.4).
inline constexpr uint16_t kNetStatusLinkUp = 1;

// struct virtio_net_hdr flags and gso_type values (§5.1.6).
inline constexpr uint8_t kNetHdrFlagNeedsCsum = 1;
inline constexpr uint8_t kNetHdrFlagDataValid = 2;
inline constexpr uint8_t kNetHdrGsoNone = 0;
inline constexpr uint8_t kNetHdrGsoTcpv4 = 1;
inline constexpr uint8_t kNetHdrGsoUdp = 3;
inline constexpr uint8_t kNetHdrGsoTcpv6 = 4;
inline constexpr uint8_t kNetHdrGsoEcn = 0x80;

// struct virtio_net_hdr with num_buffers: the 12-byte header VERSION_1
// always uses (§5.1.6.1).
struct NetHeader {
  uint8_t flags = 0;
  uint8_t gso_type = 0;
  uint16_t hdr_len = 0;
  uint16_t gso_size = 0;
  uint16_t csum_start = 0;
  uint16_t csum_offset = 0;
  uint16_t num_buffers = 0;
};
static_assert(sizeof(NetHeader) == net::kVnetHeaderBytes);

// struct virtio_net_config (§5.1.4); fields of features we do not offer
// read as 0.
struct NetConfigSpace {
  uint8_t mac[6];
  uint16_t status;
  uint16_t max_virtqueue_pairs;
  uint16_t mtu;
  uint32_t speed;
  uint8_t duplex;
  uint8_t rss_max_key_size;
  uint16_t rss_max_indirection_table_length;
  uint32_t supported_hash_types;
};
static_assert(sizeof(NetConfigSpace) == 24);
static_assert(offsetof(NetConfigSpace, status) == 6);
static_assert(offsetof(NetConfigSpace, mtu) == 10);

struct NetDeviceConfig {
  std::array<uint8_t, 6> mac{};
  uint16_t mtu = 1500;  // offered with VIRTIO_NET_F_MTU; 68 or more
};

// Counters for the host and tests; frames are whole Ethernet frames.
struct NetStats {
  uint64_t rx_frames = 0;
  uint64_t rx_bytes = 0;            // without the virtio header
  uint64_t rx_dropped = 0;          // frames read but not delivered
  uint64_t rx_bad_buffers = 0;      // rx chains returned unused (wrong direction, too short)
  uint64_t tx_frames = 0;
  uint64_t tx_bytes = 0;            // without the virtio header
  uint64_t tx_dropped = 0;          // chains returned unsent (malformed, refused by the backend)
};

class Net final : public VirtioDevice {
 public:
  static constexpr uint16_t kQueueSize = 256;
  static constexpr uint16_t kRxQueue = 0;
  static constexpr uint16_t kTxQueue = 1;
  // The largest frame either way: a 64 KiB TSO packet after its Ethernet
  // header (GSO_MAX_SIZE is 65536 including it) plus a VLAN tag.
  static constexpr uint32_t kMaxFrameBytes = 14 + 4 + 65535;
  // writev's limit (IOV_MAX) less the header's own iovec.
  static constexpr uint32_t kMaxTxSegments = 1023;
  // Frames handled per wakeup in each direction before yielding to the
  // loop, so one busy NIC cannot starve the other devices.
  static constexpr int kFramesPerWakeup = 64;

  static Result<std::unique_ptr<Net>> create(std::unique_ptr<net::NetBackend> backend,
                                             NetDeviceConfig config);
  ~Net() override;

  DeviceType type() const override { return DeviceType::Net; }
  std::string_view name() const override { return "virtio-net"; }
  uint64_t features() const override;
  std::vector<uint16_t> queue_max_sizes() const override { return {kQueueSize, kQueueSize}; }
  size_t config_size_bytes() const override { return sizeof(NetConfigSpace); }
  void read_config(uint32_t offset, std::span<std::byte> data) override;

  Result<void> activate(ActivateContext context) override;
  void notify(uint16_t queue) override;
  void reset() override;
  Result<VirtioDeviceState> save_state() const override;
  Result<void> restore_state(ActivateContext context, std::span<const std::byte> extra) override;

  NetStats stats() const;
  // What the device waits for on the backend fd now (for tests): In while
  // it has or may get rx buffers, Out while a frame waits to be sent.
  bool watching_input() const;
  bool watching_output() const;

 private:
  Net(std::unique_ptr<net::NetBackend> backend, NetDeviceConfig config, EventFd wakeup);

  // All below run with mutex_ held.
  void on_backend_ready(uint32_t events);
  void on_wakeup();
  void process_rx();
  // Pops one more valid rx chain into rx_chains_; false if the driver has
  // none (then the device waits for a notification) or the device broke.
  bool hold_rx_chain();
  // Delivers the frame in rx_frame_; false if it needs more buffers.
  bool deliver_frame();
  void wait_for_rx_buffers();
  void process_tx();
  // Checks the popped tx_chain_ and builds tx_iov_; false (and the chain
  // returned) if it is dropped.
  bool prepare_tx();
  void complete_tx(uint16_t head);
  void update_watch();
  void link_lost(uint32_t events);
  void signal_used();
  void mark_broken(std::string_view why);

  const std::unique_ptr<net::NetBackend> backend_;
  const NetDeviceConfig config_;
  EventFd wakeup_;  // signalled to come back for more tx work after a full batch

  mutable std::mutex mutex_;  // guards everything below
  NetConfigSpace config_space_{};
  bool active_ = false;
  bool broken_ = false;  // needs_reset() sent; the queues are not touched again
  uint64_t features_ = 0;
  const memory::GuestMemory* memory_ = nullptr;
  std::optional<Virtqueue> rx_queue_;
  std::optional<Virtqueue> tx_queue_;
  std::shared_ptr<Interrupt> interrupt_;
  EventLoop* event_loop_ = nullptr;
  std::optional<EventLoop::WatchId> backend_watch_;
  std::optional<EventLoop::WatchId> wakeup_watch_;
  uint32_t watched_ = 0;  // the Ready bits backend_watch_ waits for
  bool rx_pushed_ = false;
  bool tx_pushed_ = false;
  NetStats stats_;

  // RX: the frame read from the backend (header first) and the chains
  // popped for it, in pop order.
  std::vector<std::byte> rx_frame_;
  size_t rx_frame_bytes_ = 0;  // 0: no frame waiting
  // rx_chains_[0, rx_held_) are held; the rest are spare slots keeping
  // their segment vectors' capacity.
  std::vector<DescriptorChain> rx_chains_;
  size_t rx_held_ = 0;
  bool rx_waiting_ = false;  // out of rx buffers; until the driver notifies queue 0

  // TX: the chain being sent; pending while the backend is full.
  DescriptorChain tx_chain_;
  bool tx_pending_ = false;
  NetHeader tx_header_{};
  std::vector<iovec> tx_iov_;
  uint32_t tx_frame_bytes_ = 0;
};

}  // namespace keel::devices::virtio
