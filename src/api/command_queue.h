// CommandQueue: the CommandHandler keel-vmm's main thread serves. submit()
// (API thread) queues the command and signals an eventfd the main loop
// polls; the main loop takes the pending commands and answers each against
// the machine it owns. Bounded, so a flood of requests is refused (Busy)
// instead of growing without limit.
#pragma once

#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "api/command.h"
#include "base/event_fd.h"

namespace keel::api {

class CommandQueue : public CommandHandler {
 public:
  static constexpr size_t kDefaultCapacity = 64;
  static Result<CommandQueue> create(size_t capacity = kDefaultCapacity);

  struct Pending {
    Command command;
    ReplyCallback done;
  };

  void submit(Command command, ReplyCallback done) override;
  // Readable while commands are pending.
  const EventFd& ready_event() const { return ready_; }
  // Clears the eventfd and returns every pending command, oldest first.
  std::vector<Pending> take();
  // Refuses what is pending and everything submitted from now on (Busy,
  // with reason): for when nothing will serve the queue any more.
  void close(const std::string& reason);

  CommandQueue(CommandQueue&& other) noexcept;

 private:
  CommandQueue(EventFd ready, size_t capacity) : ready_(std::move(ready)), capacity_(capacity) {}

  EventFd ready_;
  size_t capacity_;
  std::mutex mutex_;  // guards pending_ and closed_reason_
  std::deque<Pending> pending_;
  std::optional<std::string> closed_reason_;
};

}  // namespace keel::api
