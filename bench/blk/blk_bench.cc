// blk_bench: the virtio-blk device path in one process, for comparison
// with fio on the same file (bench/blk.sh runs both).
// A minimal driver side lays out a split virtqueue (virtio 1.2 §2.7) in a
// GuestMemory, keeps queue_depth requests in flight (each one indirect
// descriptor table: header, data segments, status, as Linux's virtio-blk
// driver sends them), and calls Blk::notify() as a guest's queue kick
// would; completions come through a real EventLoop watching the raw
// backend's io_uring eventfd, as in keel-vmm. Driver and device share one
// thread here, so the figures include the driver's work.
// The image is raw (io_uring, as keel-vmm) or qcow2 (the same Qcow2Image
// keel-vmm serves, --format qcow2), so bench/qcow2.sh can set qcow2 against
// raw and against qemu-img bench on the same image.
// Phases: 4 KiB random reads and writes, 1 MiB sequential reads and writes.
// --step BYTES makes every phase sequential with that distance between
// requests, wrapping at the disk's end (qemu-img bench's -S); --requests N
// ends a phase after N requests (qemu-img bench's -c) or its time, whichever
// comes first.
// Output: one "name iops=N mbps=N errors=N" line per phase.
#include <getopt.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "base/event_loop.h"
#include "base/log.h"
#include "block/image.h"
#include "devices/virtio/blk.h"

namespace keel {
namespace {

using devices::virtio::ActivateContext;
using devices::virtio::Blk;
using devices::virtio::BlkConfig;
using devices::virtio::BlkRequestHeader;
using devices::virtio::Interrupt;
using devices::virtio::QueueConfig;
using devices::virtio::Virtqueue;
using devices::virtio::VirtqDesc;
using devices::virtio::VirtqUsedElem;
using memory::GuestAddr;
using memory::GuestMemory;

constexpr uint16_t kQueueSize = Blk::kQueueSize;
constexpr GuestAddr kDescTable{0x0};
constexpr GuestAddr kAvailRing{0x1000};
constexpr GuestAddr kUsedRing{0x2000};
constexpr uint64_t kTables = 0x10000;     // one 4 KiB indirect table per slot
constexpr uint64_t kHeaders = 0x200000;   // 16 bytes per slot
constexpr uint64_t kStatus = 0x210000;    // 1 byte per slot
constexpr uint64_t kData = 0x1000000;     // kMaxRequestBytes per slot
constexpr uint64_t kMaxRequestBytes = 1 << 20;
constexpr uint32_t kMaxDepth = 128;
constexpr uint64_t kMemoryBytes = kData + kMaxDepth * kMaxRequestBytes;

class CountingInterrupt : public Interrupt {
 public:
  void notify_queue(uint16_t) override { ++notifications; }
  void notify_config() override {}
  void needs_reset() override { ++resets; }
  uint64_t notifications = 0;
  uint64_t resets = 0;
};

struct Phase {
  const char* name;
  uint32_t type;            // kBlkTypeIn or kBlkTypeOut
  uint32_t request_bytes;
  uint32_t segment_bytes;   // data split into segments of this size
  bool random;
};

struct PhaseResult {
  uint64_t requests = 0;
  uint64_t errors = 0;
  double seconds = 0;
};

// The driver side of one queue: fixed buffers and tables per slot.
class Driver {
 public:
  Driver(const GuestMemory& memory, uint32_t depth) : memory_(memory), depth_(depth) {}

  QueueConfig config() const {
    return QueueConfig{.size = kQueueSize, .desc_table = kDescTable, .avail_ring = kAvailRing,
                       .used_ring = kUsedRing,
                       .features = devices::virtio::kFeatureIndirectDesc};
  }

  // Writes every slot's indirect table for phase.
  void prepare(const Phase& phase) {
    uint32_t segments = phase.request_bytes / phase.segment_bytes;
    bool device_writes = phase.type == devices::virtio::kBlkTypeIn;
    for (uint32_t slot = 0; slot < depth_; ++slot) {
      GuestAddr table(kTables + slot * 0x1000ull);
      uint16_t i = 0;
      auto put = [&](uint64_t addr, uint32_t len, uint16_t flags) {
        write(table + 16ull * i, VirtqDesc{addr, len, flags, static_cast<uint16_t>(i + 1)});
        ++i;
      };
      put(kHeaders + 16ull * slot, 16, devices::virtio::kDescFlagNext);
      for (uint32_t s = 0; s < segments; ++s) {
        put(kData + slot * kMaxRequestBytes + uint64_t{s} * phase.segment_bytes,
            phase.segment_bytes,
            static_cast<uint16_t>(devices::virtio::kDescFlagNext |
                                  (device_writes ? devices::virtio::kDescFlagWrite : 0)));
      }
      write(table + 16ull * i,
            VirtqDesc{kStatus + slot, 1, devices::virtio::kDescFlagWrite, 0});
      write(kDescTable + 16ull * slot,
            VirtqDesc{table.value, 16u * (segments + 2), devices::virtio::kDescFlagIndirect, 0});
    }
  }

  void publish(uint16_t slot, uint32_t type, uint64_t sector) {
    write(GuestAddr(kHeaders + 16ull * slot), BlkRequestHeader{type, 0, sector});
    write(GuestAddr(kStatus + slot), uint8_t{0xff});
    write(kAvailRing + 4 + 2ull * (avail_idx_ % kQueueSize), slot);
    std::atomic_thread_fence(std::memory_order_release);
    ++avail_idx_;
    write(kAvailRing + 2, avail_idx_);
  }

  // Calls done(slot, status) for every used entry since the last call.
  template <typename F>
  uint32_t drain_used(F&& done) {
    uint16_t used_idx = read<uint16_t>(kUsedRing + 2);
    std::atomic_thread_fence(std::memory_order_acquire);
    uint32_t count = 0;
    while (last_used_ != used_idx) {
      auto elem = read<VirtqUsedElem>(kUsedRing + 4 + 8ull * (last_used_ % kQueueSize));
      ++last_used_;
      auto slot = static_cast<uint16_t>(elem.id);
      done(slot, read<uint8_t>(GuestAddr(kStatus + slot)));
      ++count;
    }
    return count;
  }

 private:
  template <typename T>
  void write(GuestAddr addr, const T& value) {
    if (!memory_.write_obj(addr, value)) std::abort();
  }
  template <typename T>
  T read(GuestAddr addr) const {
    auto value = memory_.read_obj<T>(addr);
    if (!value) std::abort();
    return *value;
  }

  const GuestMemory& memory_;
  uint32_t depth_;
  uint16_t avail_idx_ = 0;
  uint16_t last_used_ = 0;
};

class Rng {
 public:
  uint64_t next() {
    state_ ^= state_ << 13;
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    return state_;
  }

 private:
  uint64_t state_ = 0x9e3779b97f4a7c15ull;
};

struct Options {
  std::string path;
  block::ImageFormat format = block::ImageFormat::Raw;
  double seconds = 5;
  uint32_t depth = 32;
  uint64_t step_bytes = 0;  // 0: each phase's own pattern
  uint64_t requests = 0;    // stop after this many (0: only the time limit)
};

Result<PhaseResult> run_phase(const Options& options, const Phase& phase) {
  const uint32_t depth = options.depth;
  GuestMemory memory = TRY(GuestMemory::create(kMemoryBytes, 0xc000'0000, 0x1'0000'0000));
  std::unique_ptr<EventLoop> loop = TRY(EventLoop::create());
  std::unique_ptr<block::BlockBackend> disk =
      TRY(block::open_image(options.path, options.format, block::Access::ReadWrite));
  const uint64_t disk_bytes = disk->size_bytes();
  std::unique_ptr<Blk> blk = TRY(Blk::create(std::move(disk), BlkConfig{"bench", block::Access::ReadWrite}));
  auto interrupt = std::make_shared<CountingInterrupt>();

  Driver driver(memory, depth);
  driver.prepare(phase);
  ActivateContext context;
  context.memory = &memory;
  context.features = blk->features();
  context.queues.emplace_back(TRY(Virtqueue::create(memory, driver.config())));
  context.interrupt = interrupt;
  context.event_loop = loop.get();
  TRY(blk->activate(std::move(context)));

  const uint64_t request_sectors = phase.request_bytes / 512;
  const uint64_t positions = disk_bytes / phase.request_bytes;
  Rng rng;
  uint64_t next_position = 0;
  uint64_t next_offset = 0;
  auto next_sector = [&]() -> uint64_t {
    if (options.step_bytes != 0) {  // as qemu-img bench: wrap when a request would not fit
      if (next_offset + phase.request_bytes > disk_bytes) next_offset = 0;
      const uint64_t offset = next_offset;
      next_offset += options.step_bytes;
      return offset / 512;
    }
    uint64_t position = phase.random ? rng.next() % positions : next_position++ % positions;
    return position * request_sectors;
  };

  PhaseResult result;
  uint64_t issued = 0;
  auto more = [&] { return options.requests == 0 || issued < options.requests; };
  uint32_t outstanding = 0;
  for (uint16_t slot = 0; slot < depth && more(); ++slot, ++issued, ++outstanding) {
    driver.publish(slot, phase.type, next_sector());
  }
  auto start = std::chrono::steady_clock::now();
  auto deadline = start + std::chrono::duration<double>(options.seconds);
  blk->notify(0);
  bool stopping = false;
  while (outstanding > 0) {
    TRY(loop->run_once(1000));
    bool published = false;
    driver.drain_used([&](uint16_t slot, uint8_t status) {
      ++result.requests;
      --outstanding;
      if (status != 0) ++result.errors;
      if (!stopping && more()) {
        driver.publish(slot, phase.type, next_sector());
        ++issued;
        ++outstanding;
        published = true;
      }
    });
    if (published) blk->notify(0);
    if (!stopping && std::chrono::steady_clock::now() >= deadline) stopping = true;
    if (interrupt->resets > 0) return fail(Errc::Io, "device asked for a reset");
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  blk->reset();
  return result;
}

int usage() {
  std::fprintf(stderr,
               "usage: blk_bench --file PATH [--format raw|qcow2] [--seconds S] [--depth N]\n"
               "                 [--step BYTES] [--requests N] [--phase NAME]...\n"
               "  phases: randread-4k, randwrite-4k, seqread-1m, seqwrite-1m (default: all)\n");
  return 2;
}

int run(int argc, char** argv) {
  log::init(log::Level::Warn, "blk_bench");
  Options options;
  std::vector<std::string> wanted;
  static const option kOptions[] = {{"file", required_argument, nullptr, 'f'},
                                    {"format", required_argument, nullptr, 'F'},
                                    {"seconds", required_argument, nullptr, 's'},
                                    {"depth", required_argument, nullptr, 'd'},
                                    {"step", required_argument, nullptr, 'S'},
                                    {"requests", required_argument, nullptr, 'n'},
                                    {"phase", required_argument, nullptr, 'p'},
                                    {nullptr, 0, nullptr, 0}};
  int opt = 0;
  while ((opt = getopt_long(argc, argv, "f:F:s:d:S:n:p:", kOptions, nullptr)) != -1) {
    switch (opt) {
      case 'f': options.path = optarg; break;
      case 'F': {
        auto format = block::parse_image_format(optarg);
        if (!format) return usage();
        options.format = *format;
        break;
      }
      case 's': options.seconds = std::atof(optarg); break;
      case 'd': options.depth = static_cast<uint32_t>(std::atoi(optarg)); break;
      case 'S': options.step_bytes = std::strtoull(optarg, nullptr, 10); break;
      case 'n': options.requests = std::strtoull(optarg, nullptr, 10); break;
      case 'p': wanted.emplace_back(optarg); break;
      default: return usage();
    }
  }
  if (options.path.empty() || options.depth == 0 || options.depth > kMaxDepth ||
      options.seconds <= 0 || options.step_bytes % 512 != 0) {
    return usage();
  }

  const Phase phases[] = {
      {"randread-4k", devices::virtio::kBlkTypeIn, 4096, 4096, true},
      {"randwrite-4k", devices::virtio::kBlkTypeOut, 4096, 4096, true},
      {"seqread-1m", devices::virtio::kBlkTypeIn, 1 << 20, 64 << 10, false},
      {"seqwrite-1m", devices::virtio::kBlkTypeOut, 1 << 20, 64 << 10, false},
  };
  for (const Phase& phase : phases) {
    if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), phase.name) == wanted.end()) {
      continue;
    }
    Result<PhaseResult> result = run_phase(options, phase);
    if (!result) {
      std::fprintf(stderr, "blk_bench: %s: %s\n", phase.name, result.error().message().c_str());
      return 1;
    }
    double iops = static_cast<double>(result->requests) / result->seconds;
    std::printf("%s iops=%.0f mbps=%.1f errors=%llu\n", phase.name, iops,
                iops * phase.request_bytes / 1e6,
                static_cast<unsigned long long>(result->errors));
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace keel

int main(int argc, char** argv) { return keel::run(argc, argv); }
