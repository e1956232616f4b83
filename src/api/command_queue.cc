#include "api/command_queue.h"

#include <iterator>

#include <fmt/format.h>

namespace keel::api {

std::string_view command_name(CommandKind kind) {
  switch (kind) {
    case CommandKind::GetVm: return "get-vm";
    case CommandKind::GetDevices: return "get-devices";
    case CommandKind::GetMetrics: return "get-metrics";
    case CommandKind::Pause: return "pause";
    case CommandKind::Resume: return "resume";
    case CommandKind::Reset: return "reset";
    case CommandKind::Stop: return "stop";
    case CommandKind::SetBalloon: return "set-balloon";
    case CommandKind::PowerButton: return "power-button";
    case CommandKind::Snapshot: return "snapshot";
    case CommandKind::AddDisk: return "add-disk";
    case CommandKind::RemoveDisk: return "remove-disk";
    case CommandKind::ResizeDisk: return "resize-disk";
    case CommandKind::AddNet: return "add-net";
    case CommandKind::RemoveNet: return "remove-net";
    case CommandKind::GetConfig: return "get-config";
    case CommandKind::Configure: return "configure";
    case CommandKind::Start: return "start";
    case CommandKind::Migrate: return "migrate";
    case CommandKind::GetMigration: return "get-migration";
    case CommandKind::CancelMigration: return "cancel-migration";
    case CommandKind::Restore: return "restore";
    case CommandKind::Receive: return "receive";
  }
  return "?";
}

unsigned http_status_for(Errc code) {
  switch (code) {
    case Errc::InvalidArgument:
    case Errc::OutOfRange: return 400;
    case Errc::PermissionDenied: return 403;
    case Errc::NotFound: return 404;
    case Errc::Busy: return 409;
    case Errc::Unsupported: return 501;
    case Errc::Timeout: return 503;
    // A file the request named (a snapshot, a disk image) is malformed:
    // the request cannot be carried out as it is, the server is fine.
    case Errc::Corrupt: return 422;
    case Errc::Io: return 500;
  }
  return 500;
}

Result<CommandQueue> CommandQueue::create(size_t capacity) {
  EventFd ready = TRY(EventFd::create());
  return CommandQueue(std::move(ready), capacity);
}

CommandQueue::CommandQueue(CommandQueue&& other) noexcept
    : ready_(std::move(other.ready_)), capacity_(other.capacity_) {
  std::lock_guard lock(other.mutex_);
  pending_ = std::move(other.pending_);
  closed_reason_ = std::move(other.closed_reason_);
}

void CommandQueue::submit(Command command, ReplyCallback done) {
  std::unique_lock lock(mutex_);
  if (closed_reason_) {
    std::string reason = *closed_reason_;
    lock.unlock();
    done(fail(Errc::Busy, reason));
    return;
  }
  if (pending_.size() >= capacity_) {
    lock.unlock();
    done(fail(Errc::Timeout, fmt::format("{} commands are already waiting for the VM", capacity_)));
    return;
  }
  pending_.push_back({command, std::move(done)});
  lock.unlock();
  (void)ready_.signal();
}

std::vector<CommandQueue::Pending> CommandQueue::take() {
  (void)ready_.consume();
  std::lock_guard lock(mutex_);
  std::vector<Pending> taken(std::make_move_iterator(pending_.begin()),
                             std::make_move_iterator(pending_.end()));
  pending_.clear();
  return taken;
}

void CommandQueue::close(const std::string& reason) {
  std::deque<Pending> refused;
  {
    std::lock_guard lock(mutex_);
    closed_reason_ = reason;
    refused.swap(pending_);
  }
  for (Pending& pending : refused) pending.done(fail(Errc::Busy, reason));
}

}  // namespace keel::api
