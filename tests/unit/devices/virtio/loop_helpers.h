// Test support: drives an EventLoop on the test's thread, for devices that
// resume work through their own eventfd on the device I/O loop.
#pragma once

#include <gtest/gtest.h>

#include "base/event_loop.h"

namespace keel::devices::virtio::testing {

// Runs ready callbacks until none is ready (a device that keeps waking
// itself forever fails the test).
inline void run_until_idle(EventLoop& loop) {
  for (int round = 0; round < 100; ++round) {
    auto ran = loop.run_once(0);
    ASSERT_TRUE(ran.has_value());
    if (*ran == 0) return;
  }
  FAIL() << "the event loop never went idle";
}

}  // namespace keel::devices::virtio::testing
