// libFuzzer target: arbitrary bytes opened as a snapshot file (header,
// sections, end section, then the payload decoders and a RAM verify), and
// the same bytes decoded directly as vcpu, vm, serial, rtc, disks and
// virtio-pci function payloads (and a device section name),
// which random input rarely reaches past the checksums. Whatever the bytes,
// Keel must return errors, never crash, hang or read out of bounds.
#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "base/fd.h"
#include "base/log.h"
#include "migration/device_state.h"
#include "migration/disks.h"
#include "migration/kvm_state.h"
#include "migration/snapshot.h"

namespace {

namespace migration = keel::migration;

keel::Fd memfd_with(const uint8_t* data, size_t size) {
  keel::Fd fd(::memfd_create("snapshot-fuzz", MFD_CLOEXEC));
  if (!fd.valid()) return fd;
  if (size > 0 && !fd.pwrite_all(std::as_bytes(std::span(data, size)), 0)) return keel::Fd();
  return fd;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  keel::log::init(keel::log::Level::Off, "snapshot_reader_fuzz");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto bytes = std::as_bytes(std::span(data, size));
  (void)migration::decode_vcpu_state(bytes, "fuzz vcpu");
  (void)migration::decode_vm_state(bytes, "fuzz vm");
  (void)migration::decode_serial_state(bytes, "fuzz serial0");
  (void)migration::decode_rtc_state(bytes, "fuzz rtc");
  (void)migration::decode_disks(bytes, "fuzz disks");
  (void)migration::decode_virtio_pci_state(bytes, "fuzz pci-0000:00:01.0");
  (void)migration::parse_pci_section_name(
      std::string_view(reinterpret_cast<const char*>(data), std::min<size_t>(size, 64)));

  keel::Fd fd = memfd_with(data, size);
  if (!fd.valid()) return 0;
  std::string path = "/proc/self/fd/" + std::to_string(fd.get());
  keel::Result<migration::Snapshot> snapshot = migration::read_snapshot(path);
  if (snapshot) {
    (void)snapshot->reader.verify(snapshot->memory);
    keel::Result<keel::Mmap> ram = snapshot->map_memory();
    if (ram && ram->size_bytes() > 0) (void)ram->data()[ram->size_bytes() - 1];
  }
  return 0;
}
