#include "base/event_fd.h"

#include <poll.h>

#include <thread>

#include <gtest/gtest.h>

namespace keel {
namespace {

TEST(EventFdTest, SignalsAccumulateAndConsumeClears) {
  EventFd event = *EventFd::create();
  EXPECT_EQ(*event.consume(), 0u);
  ASSERT_TRUE(event.signal());
  ASSERT_TRUE(event.signal(2));
  EXPECT_EQ(*event.consume(), 3u);
  EXPECT_EQ(*event.consume(), 0u);
}

TEST(EventFdTest, WakesAPollerInAnotherThread) {
  EventFd event = *EventFd::create();
  std::thread signaller([&] { ASSERT_TRUE(event.signal()); });
  pollfd poller{.fd = event.get(), .events = POLLIN, .revents = 0};
  EXPECT_EQ(::poll(&poller, 1, 5000), 1);
  signaller.join();
  EXPECT_EQ(*event.consume(), 1u);
}

}  // namespace
}  // namespace keel
