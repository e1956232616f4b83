#include "base/event_loop.h"

#include <sys/epoll.h>

#include <array>
#include <cerrno>
#include <thread>

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

void EventLoop::run() {
  while (!stopping_.load()) {
    Result<int> ran = run_once(-1);
    if (!ran) {
      LOG_RATELIMITED(error, "event loop: {}", ran.error().message());
    }
  }
}

void EventLoop::stop() {
  stopping_.store(true);
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
