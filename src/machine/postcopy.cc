#include "machine/postcopy.h"

#include <fmt/format.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "base/event_fd.h"
#include "base/log.h"
#include "machine/machine.h"

namespace keel::machine {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kPageBytes = memory::GuestMemory::kPageBytes;
// The source streams pages without pause: this long with nothing from it
// is a dead connection.
constexpr int kReceiveTimeoutMs = 60'000;
// After a failure once the machine ran: how long the machine has to stop
// and the process to wind down before it exits from here.
constexpr auto kExitGrace = std::chrono::seconds(5);

[[noreturn]] void exit_failed(const std::string& label, const Error& error) {
  LOG_ERROR("{}: post-copy failed after the machine ran here ({}); its memory is incomplete "
            "and the source cannot go on without this host's writes: exiting",
            label, error.message());
  std::fflush(nullptr);
  std::_Exit(PostcopyIncoming::kExitPostcopyFailed);
}

}  // namespace

Result<std::unique_ptr<PostcopyIncoming>> PostcopyIncoming::start(
    const Fd& connection, std::string label, const memory::GuestMemory& memory,
    migration::DirtyBitmap pending) {
  if (memory.backing() != memory::GuestMemory::Backing::Anonymous) {
    return fail(Errc::Unsupported,
                fmt::format("{}: post-copy needs anonymous guest RAM (--memory-backend anon)",
                            label));
  }
  std::span<std::byte> ram = memory.ram();
  if (pending.page_count() != memory.page_count()) {
    return fail(Errc::Corrupt, fmt::format("{}: a post-copy list of {} pages for {} pages of RAM",
                                           label, pending.page_count(), memory.page_count()));
  }
  // What this host holds of a pending page is an older copy: drop it, so
  // a touch faults and waits for the source's. Nothing runs yet.
  Result<void> dropped = ok();
  pending.for_each_run(uint64_t{1} << 20, [&](uint64_t first, uint64_t count) {
    if (dropped &&
        ::madvise(ram.data() + first * kPageBytes, count * kPageBytes, MADV_DONTNEED) < 0) {
      dropped = fail_errno(fmt::format("{}: madvise DONTNEED of pages {}+{}", label, first, count));
    }
  });
  TRY(dropped);
  memory::Userfault userfault = TRY_CONTEXT(memory::Userfault::register_missing(ram), label);
  Fd duplicate = TRY(connection.duplicate());
  EventFd wake = TRY(EventFd::create());
  std::unique_ptr<PostcopyIncoming> incoming(
      new PostcopyIncoming(std::move(duplicate), std::move(wake), std::move(label),
                           std::move(userfault), std::move(pending)));
  incoming->fault_thread_ = std::thread([raw = incoming.get()] { raw->fault_loop(); });
  incoming->stream_thread_ = std::thread([raw = incoming.get()] { raw->stream_loop(); });
  return incoming;
}

PostcopyIncoming::PostcopyIncoming(Fd connection, EventFd wake, std::string label,
                                   memory::Userfault userfault, migration::DirtyBitmap pending)
    : connection_(std::move(connection)),
      label_(std::move(label)),
      userfault_(std::move(userfault)),
      ram_pages_(pending.page_count()),
      wake_(std::move(wake)),
      writer_(connection_),
      listed_(pending),
      pending_(std::move(pending)),
      requested_(ram_pages_) {}

PostcopyIncoming::~PostcopyIncoming() {
  std::optional<Error> failed_after_run;
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    if (error_ && machine_ != nullptr) failed_after_run = *error_;
  }
  changed_.notify_all();
  // Threads (devices, the VMM) may wait for pages that never come; letting
  // them go on would show them zeros where the guest's data was.
  if (failed_after_run) exit_failed(label_, *failed_after_run);
  ::shutdown(connection_.get(), SHUT_RDWR);
  (void)wake_.signal();
  if (stream_thread_.joinable()) stream_thread_.join();
  if (fault_thread_.joinable()) fault_thread_.join();
}

Result<void> PostcopyIncoming::send(migration::FrameType type,
                                    std::span<const std::byte> payload) {
  std::lock_guard lock(write_mutex_);
  return writer_.send(type, payload);
}

Result<void> PostcopyIncoming::running(Machine& machine) {
  {
    std::lock_guard lock(mutex_);
    if (error_) return fail(*error_);
    machine_ = &machine;
  }
  if (Result<void> sent = send(migration::FrameType::Ack, migration::encode_verdict({true,
                                                                                   "running"}));
      !sent) {
    std::lock_guard lock(mutex_);
    machine_ = nullptr;
    return sent;
  }
  changed_.notify_all();
  return ok();
}

void PostcopyIncoming::failed(const Error& error) {
  Machine* machine = nullptr;
  {
    std::lock_guard lock(mutex_);
    if (error_ || stopping_) return;  // the first error counts; shutting down is no error
    error_ = error;
    machine = machine_;
  }
  changed_.notify_all();
  LOG_ERROR("{}: post-copy failed: {}", label_, error.message());
  (void)wake_.signal();
  ::shutdown(connection_.get(), SHUT_RDWR);
  if (machine == nullptr) return;  // nothing ran: receive_migration reports it
  machine->stop(StopReason::Error,
                fmt::format("post-copy failed: {}; the guest's memory is incomplete",
                            error.message()));
  // The process should wind down (the destructor exits it); a vCPU stuck in
  // a fault for a page that never comes may keep it from doing so.
  std::unique_lock lock(mutex_);
  if (!changed_.wait_for(lock, kExitGrace, [&] { return stopping_; })) {
    exit_failed(label_, error);
  }
}

void PostcopyIncoming::fault_loop() {
  for (;;) {
    pollfd fds[2] = {{userfault_.fd(), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      failed(Error(Errc::Io, "poll on the userfaultfd", errno));
      return;
    }
    if (fds[1].revents != 0) return;
    for (;;) {
      Result<std::optional<uint64_t>> fault = userfault_.fault();
      if (!fault) {
        failed(fault.error());
        return;
      }
      if (!*fault) break;
      const uint64_t page = **fault / kPageBytes;
      bool ask = false;
      bool zero = false;
      {
        std::lock_guard lock(mutex_);
        if (!pending_.test(page)) {
          // Never sent and not coming: a page that reads as zeros (or one
          // that was just installed, where this is a no-op).
          zero = true;
        } else if (!requested_.test(page)) {
          requested_.set(page);
          ++requests_;
          ask = true;
        }
      }
      Result<void> done = ok();
      if (zero) done = userfault_.install_zero(page * kPageBytes, kPageBytes);
      if (ask) {
        done = send(migration::FrameType::PageRequest,
                    migration::encode_page_request({page, 1}));
      }
      if (!done) {
        failed(done.error());
        return;
      }
    }
  }
}

void PostcopyIncoming::stream_loop() {
  Result<void> received = receive();
  if (!received) {
    failed(received.error());
    return;
  }
  std::lock_guard lock(mutex_);
  LOG_INFO("{}: post-copy complete in {} ms: {} pages asked for, {} pages installed", label_,
           std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started_).count(),
           requests_, pages_installed_);
}

Result<void> PostcopyIncoming::receive() {
  migration::StreamReader reader(connection_, label_);
  for (;;) {
    migration::Frame frame = TRY(reader.next(kReceiveTimeoutMs));
    switch (frame.type) {
      case migration::FrameType::Pages: {
        migration::DecodedPages pages =
            TRY_CONTEXT(migration::decode_pages(frame.payload, ram_pages_), label_);
        const uint64_t end = pages.first_page + pages.page_count;
        for (uint64_t page = pages.first_page; page < end; ++page) {
          if (!listed_.test(page)) {
            return fail(Errc::Corrupt,
                        fmt::format("{}: page {} arrived in post-copy, not on the source's list",
                                    label_, page));
          }
        }
        const uint64_t offset = pages.first_page * kPageBytes;
        if (pages.zero) {
          TRY_CONTEXT(userfault_.install_zero(offset, uint64_t{pages.page_count} * kPageBytes),
                      label_);
        } else {
          TRY_CONTEXT(userfault_.install(offset, pages.data), label_);
        }
        std::lock_guard lock(mutex_);
        for (uint64_t page = pages.first_page; page < end; ++page) {
          pending_.reset(page);
          requested_.reset(page);
        }
        pages_installed_ += pages.page_count;
        continue;
      }
      case migration::FrameType::End: {
        TRY_CONTEXT(migration::decode_end(frame.payload), label_);
        {
          std::unique_lock lock(mutex_);
          if (uint64_t missing = pending_.count(); missing != 0) {
            return fail(Errc::Corrupt, fmt::format("{}: the source ended post-copy with {} pages "
                                                   "not sent",
                                                   label_, missing));
          }
          // The source takes "running" first, then this.
          changed_.wait(lock, [&] { return machine_ != nullptr || stopping_ || error_; });
          if (machine_ == nullptr) return fail(Errc::Busy, "shutting down");
        }
        // Every page is in: faults from now on are ordinary ones.
        TRY_CONTEXT(userfault_.unregister(), label_);
        (void)wake_.signal();
        TRY(send(migration::FrameType::Ack, migration::encode_verdict({true, "complete"})));
        return ok();
      }
      case migration::FrameType::Abort: {
        migration::Verdict verdict = TRY(migration::decode_verdict(frame.payload));
        return fail(Errc::Io,
                    fmt::format("{}: the source gave up: {}", label_, verdict.message));
      }
      default:
        return fail(Errc::Corrupt, fmt::format("{}: an unexpected {} frame in post-copy", label_,
                                               migration::frame_type_name(frame.type)));
    }
  }
}

}  // namespace keel::machine
