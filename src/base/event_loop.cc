#include "base/event_loop.h"

#include <sys/epoll.h>

#include <array>
#include <cerrno>
#include <thread>

#include <fmt/format.h>

#include "base/check.h"
#include "base/log.h"

namespace keel {
namespace {

constexpr EventLoop::WatchId kWakeId = 0;

uint64_t this_thread_tag() {
  return std::hash<std::thread::id>{}(std::this_thread::get_id()) | 1;
}

}  // namespace

Result<std::unique_ptr<EventLoop>> EventLoop::create() {
  int epoll = ::epoll_create1(EPOLL_CLOEXEC);
  if (epoll < 0) return fail_errno("epoll_create1");
  Fd epoll_fd(epoll);
  EventFd wake = TRY(EventFd::create());
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.u64 = kWakeId;
  if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, wake.get(), &event) < 0) {
    return fail_errno("epoll_ctl add wake eventfd");
  }
  return std::unique_ptr<EventLoop>(new EventLoop(std::move(epoll_fd), std::move(wake)));
}

EventLoop::~EventLoop() = default;

Result<EventLoop::WatchId> EventLoop::add(int fd, Ready ready, Callback callback) {
  std::lock_guard lock(mutex_);
  WatchId id = next_id_++;
  epoll_event event{};
  event.events = static_cast<uint32_t>(ready);
  event.data.u64 = id;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &event) < 0) {
    return fail_errno("epoll_ctl add fd " + std::to_string(fd));
  }
  watches_.emplace(id, std::make_shared<Watch>(Watch{fd, std::move(callback)}));
  return id;
}

Result<void> EventLoop::modify(WatchId id, Ready ready) {
  std::lock_guard lock(mutex_);
  auto it = watches_.find(id);
  if (it == watches_.end()) return fail(Errc::NotFound, "event loop watch");
  epoll_event event{};
  event.events = static_cast<uint32_t>(ready);
  event.data.u64 = id;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, it->second->fd, &event) < 0) {
    return fail_errno("epoll_ctl modify fd " + std::to_string(it->second->fd));
  }
  return ok();
}

void EventLoop::remove(WatchId id) {
  std::unique_lock lock(mutex_);
  auto it = watches_.find(id);
  if (it == watches_.end()) return;
  // The fd may already be closed by its owner, which removes it from the
  // epoll set by itself; ENOENT/EBADF are then expected.
  (void)::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, it->second->fd, nullptr);
  watches_.erase(it);
  if (loop_thread_id_.load() == this_thread_tag()) return;  // from a callback
  callback_done_.wait(lock, [&] { return running_id_ != id; });
}

EventLoop::Hold::~Hold() {
  if (loop_ != nullptr) loop_->release_hold();
}

Result<EventLoop::Hold> EventLoop::hold(std::chrono::milliseconds timeout) {
  if (loop_thread_id_.load() == this_thread_tag()) {
    return fail(Errc::Busy, "event loop: hold() from one of its own callbacks");
  }
  std::unique_lock lock(mutex_);
  if (hold_requested_) return fail(Errc::Busy, "event loop: already held");
  hold_requested_ = true;
  if (in_run_) {
    (void)wake_.signal();  // out of epoll_wait, so that run() parks
    if (!hold_changed_.wait_for(lock, timeout, [this] { return parked_ || !in_run_; })) {
      hold_requested_ = false;
      hold_changed_.notify_all();
      return fail(Errc::Timeout, fmt::format("event loop: a callback still runs after {} ms",
                                             timeout.count()));
    }
  }
  return Hold(this);
}

void EventLoop::release_hold() {
  {
    std::lock_guard lock(mutex_);
    hold_requested_ = false;
  }
  hold_changed_.notify_all();
}

void EventLoop::park_while_held() {
  std::unique_lock lock(mutex_);
  if (!hold_requested_) return;
  parked_ = true;
  hold_changed_.notify_all();
  hold_changed_.wait(lock, [this] { return !hold_requested_ || stopping_.load(); });
  parked_ = false;
}

void EventLoop::run() {
  {
    std::lock_guard lock(mutex_);
    in_run_ = true;
  }
  while (!stopping_.load()) {
    park_while_held();
    if (stopping_.load()) break;
    Result<int> ran = run_once(-1);
    if (!ran) {
      LOG_RATELIMITED(error, "event loop: {}", ran.error().message());
    }
  }
  {
    std::lock_guard lock(mutex_);
    in_run_ = false;
  }
  hold_changed_.notify_all();
}

void EventLoop::stop() {
  {
    // Under the lock, so a parked run() cannot miss it between its check
    // and its wait.
    std::lock_guard lock(mutex_);
    stopping_.store(true);
  }
  hold_changed_.notify_all();
  (void)wake_.signal();
}

Result<int> EventLoop::run_once(int timeout_ms) {
  std::array<epoll_event, 64> events;
  int count = ::epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), timeout_ms);
  if (count < 0) {
    if (errno == EINTR) return 0;
    return fail_errno("epoll_wait");
  }
  loop_thread_id_.store(this_thread_tag());
  int ran = 0;
  for (int i = 0; i < count; ++i) {
    WatchId id = events[static_cast<size_t>(i)].data.u64;
    if (id == kWakeId) {
      (void)wake_.consume();
      continue;
    }
    std::shared_ptr<Watch> watch;
    {
      std::lock_guard lock(mutex_);
      auto it = watches_.find(id);
      if (it == watches_.end()) continue;  // removed by an earlier callback
      watch = it->second;
      running_id_ = id;
    }
    watch->callback(events[static_cast<size_t>(i)].events);
    ++ran;
    {
      std::lock_guard lock(mutex_);
      running_id_ = 0;
    }
    callback_done_.notify_all();
  }
  loop_thread_id_.store(0);
  return ran;
}

}  // namespace keel
