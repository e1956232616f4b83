// EventLoop: one thread waiting on many file descriptors (epoll), running a
// callback for each that becomes ready. keel-vmm runs one for device I/O:
// virtqueue notifications (ioeventfds), io_uring completions, tap and
// socket readiness.
// Implemented: level-triggered watches added and removed from any thread,
// including from inside a callback; run() on a thread of the caller's;
// stop(); hold(), which parks run() between callbacks so another thread may
// own what the callbacks touch (a snapshot quiescing the devices).
// Missing: timers (use a timerfd), edge-triggered watches.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "base/event_fd.h"
#include "base/fd.h"
#include "base/result.h"

namespace keel {

// What a watch waits for; combine with |.
enum class Ready : uint32_t { In = 1, Out = 4 };  // EPOLLIN, EPOLLOUT
constexpr Ready operator|(Ready a, Ready b) {
  return static_cast<Ready>(static_cast<uint32_t>(a) | static_cast<uint32_t>(b));
}

class EventLoop {
 public:
  // Called on the loop thread with the epoll events that fired (EPOLLIN,
  // EPOLLOUT, EPOLLERR, EPOLLHUP bits).
  using Callback = std::function<void(uint32_t events)>;
  using WatchId = uint64_t;

  static Result<std::unique_ptr<EventLoop>> create();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;
  ~EventLoop();

  // Watches fd (which must outlive the watch) until remove(). Thread-safe.
  Result<WatchId> add(int fd, Ready ready, Callback callback);
  // Changes what an existing watch waits for.
  Result<void> modify(WatchId id, Ready ready);
  // After remove() returns, the callback is not started again; if called
  // from another thread while the callback runs, it waits for it to end
  // (so the callback's captures may be destroyed right after), unless
  // called from the callback itself.
  void remove(WatchId id);

  // While a Hold lives, run() starts no callback: its thread waits between
  // two batches of callbacks, and the Hold's owner may use what callbacks
  // use without their locks racing (and without new work arriving from
  // them). Destroying the Hold lets run() go on.
  class Hold {
   public:
    Hold(Hold&& other) noexcept : loop_(std::exchange(other.loop_, nullptr)) {}
    Hold& operator=(Hold&&) = delete;
    ~Hold();

   private:
    friend class EventLoop;
    explicit Hold(EventLoop* loop) : loop_(loop) {}
    EventLoop* loop_;
  };
  // Waits at most timeout for the running callback (if any) to return and
  // run() to park. A loop not in run() is held at once (run() parks before
  // its first callback). Busy if already held or called from a callback;
  // Timeout (the hold withdrawn) if a callback runs longer than timeout.
  // run_once() called directly does not honour holds.
  Result<Hold> hold(std::chrono::milliseconds timeout);

  // Runs callbacks until stop(). Call from one thread only.
  void run();
  // Makes run() return soon; thread-safe.
  void stop();
  // Runs callbacks for ready fds, waiting at most timeout_ms (-1: forever)
  // for the first; returns how many ran. For tests and for run().
  Result<int> run_once(int timeout_ms);

 private:
  struct Watch {
    int fd;
    Callback callback;
  };
  EventLoop(Fd epoll, EventFd wake) : epoll_(std::move(epoll)), wake_(std::move(wake)) {}
  void release_hold();
  // In run(), between batches: waits while a hold is requested.
  void park_while_held();

  Fd epoll_;
  EventFd wake_;  // stop() signals it
  std::atomic<bool> stopping_{false};
  std::mutex mutex_;  // guards watches_, next_id_, running_id_ and the hold state
  std::condition_variable_any callback_done_;
  std::condition_variable_any hold_changed_;  // hold_requested_, parked_ or in_run_ changed
  bool hold_requested_ = false;
  bool parked_ = false;  // run() waits for the hold's release
  bool in_run_ = false;  // a thread is inside run()
  std::unordered_map<WatchId, std::shared_ptr<Watch>> watches_;
  WatchId next_id_ = 1;
  WatchId running_id_ = 0;       // the watch whose callback runs now, 0 if none
  std::atomic<uint64_t> loop_thread_id_{0};  // a hash of the thread in run_once
};

}  // namespace keel
