// libFuzzer target: arbitrary bytes read as a migration stream, as the
// destination does (preamble, frames, each payload decoded and pages
// applied to a small RAM), and the same bytes decoded directly as each
// payload, which random input rarely reaches past the frame checksums.
// Whatever the bytes, Keel must return errors, never crash, hang or write
// outside RAM.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "base/fd.h"
#include "base/log.h"
#include "migration/disk_records.h"
#include "migration/snapshot.h"
#include "migration/stream.h"

namespace {

namespace migration = keel::migration;

constexpr size_t kRamPages = 64;

void decode_payload(migration::FrameType type, std::span<const std::byte> payload,
                    std::span<std::byte> ram) {
  switch (type) {
    case migration::FrameType::Hello:
      (void)migration::decode_hello(payload);
      break;
    case migration::FrameType::Pages:
      (void)migration::apply_pages(payload, ram);
      break;
    case migration::FrameType::MachineState:
      (void)migration::decode_machine_state(payload, "fuzz");
      break;
    case migration::FrameType::End:
      (void)migration::decode_end(payload);
      break;
    case migration::FrameType::Ack:
    case migration::FrameType::Abort:
      (void)migration::decode_verdict(payload);
      break;
    case migration::FrameType::DiskInfo:
      (void)migration::decode_disk_info(payload);
      break;
    case migration::FrameType::DiskChunk:
      (void)migration::decode_disk_chunk(payload);
      break;
    case migration::FrameType::PostcopyStart:
      (void)migration::decode_postcopy_start(payload, kRamPages);
      break;
    case migration::FrameType::PageRequest:
      (void)migration::decode_page_request(payload, kRamPages);
      break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  keel::log::init(keel::log::Level::Off, "migration_stream_fuzz");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static std::vector<std::byte> ram(kRamPages * migration::kPageBytes);
  auto bytes = std::as_bytes(std::span(data, size));
  for (auto type :
       {migration::FrameType::Hello, migration::FrameType::Pages,
        migration::FrameType::MachineState, migration::FrameType::End, migration::FrameType::Ack,
        migration::FrameType::DiskInfo, migration::FrameType::DiskChunk,
        migration::FrameType::PostcopyStart, migration::FrameType::PageRequest}) {
    decode_payload(type, bytes, ram);
  }

  // A memfd reads like a connection that ends where the input ends.
  keel::Fd fd(::memfd_create("migration-stream-fuzz", MFD_CLOEXEC));
  if (!fd.valid()) return 0;
  if (size > 0 && !fd.pwrite_all(bytes, 0)) return 0;
  migration::StreamReader reader(fd, "fuzz");
  if (!reader.read_preamble(0)) return 0;
  while (true) {
    keel::Result<migration::Frame> frame = reader.next(0);
    if (!frame) break;
    decode_payload(frame->type, frame->payload, ram);
  }
  return 0;
}
