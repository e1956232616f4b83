// The destination's half of a post-copy migration (docs/migration-protocol.md,
// "Post-copy"). Once the machine state and the list of pages still to come
// arrived, PostcopyIncoming drops those pages from guest RAM and registers
// RAM with userfaultfd (memory/userfault.h) before anything runs; a fault
// thread asks the source for each missing page a thread (a vCPU through
// KVM, a device, the VMM) waits for, and a stream thread installs every
// page that arrives, asked for or streamed behind. Pages that were never
// sent and are not coming read as zeros (a zero page is mapped on a fault).
// The machine runs meanwhile. After the source's end and once every page
// is in, it acks and the threads end. A failure once the machine ran
// cannot be undone: the guest's RAM is incomplete and the source holds no
// newer copy, so the process reports it and exits (kExitPostcopyFailed).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>

#include "base/event_fd.h"
#include "base/fd.h"
#include "base/result.h"
#include "memory/guest_memory.h"
#include "memory/userfault.h"
#include "migration/dirty_bitmap.h"
#include "migration/stream.h"

namespace keel::machine {

class Machine;

class PostcopyIncoming {
 public:
  // The status the process exits with when post-copy fails after the
  // machine ran.
  static constexpr int kExitPostcopyFailed = 1;

  // connection: the migration's socket (duplicated: this keeps it);
  // memory: the prebuilt machine's RAM, anonymous (Unsupported otherwise);
  // pending: the source's list, of RAM's page count. Starts the threads.
  static Result<std::unique_ptr<PostcopyIncoming>> start(const Fd& connection, std::string label,
                                                         const memory::GuestMemory& memory,
                                                         migration::DirtyBitmap pending);
  // Stops the threads. If post-copy failed after the machine ran, exits
  // the process instead (threads still wait for pages that never come).
  ~PostcopyIncoming();

  // The machine was restored on this RAM: acks "running" to the source and
  // from now on a failure stops it (StopReason::Error) and ends the
  // process. Fails if post-copy already failed (then nothing ran).
  Result<void> running(Machine& machine);
  // A frame to the source, between the fault thread's requests.
  Result<void> send(migration::FrameType type, std::span<const std::byte> payload);

 private:
  PostcopyIncoming(Fd connection, EventFd wake, std::string label, memory::Userfault userfault,
                   migration::DirtyBitmap pending);
  void fault_loop();
  void stream_loop();
  Result<void> receive();  // the stream thread's work until every page is in
  // Records the first error; once the machine ran, stops it.
  void failed(const Error& error);

  Fd connection_;
  const std::string label_;
  memory::Userfault userfault_;
  const uint64_t ram_pages_;
  EventFd wake_;  // the fault thread's cue to end
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();

  std::mutex write_mutex_;  // the fault thread's requests and the acks
  migration::StreamWriter writer_;

  mutable std::mutex mutex_;  // guards everything below
  std::condition_variable changed_;
  const migration::DirtyBitmap listed_;  // the source's list: no other page may come
  migration::DirtyBitmap pending_;    // still to come: the source's list less what arrived
  migration::DirtyBitmap requested_;  // asked for and not arrived yet
  uint64_t requests_ = 0;
  uint64_t pages_installed_ = 0;
  Machine* machine_ = nullptr;  // set by running()
  bool complete_ = false;
  bool stopping_ = false;
  std::optional<Error> error_;

  std::thread fault_thread_;
  std::thread stream_thread_;
};

}  // namespace keel::machine
