// Test support: a private network namespace for tests that make real tap
// devices and bridges. unshare(CLONE_NEWNET) moves the calling thread (the
// test's) into a fresh namespace; taps created there vanish with it, so the
// host's interfaces are never touched. ctest runs each case as its own
// process; run in one process, every case simply gets another namespace.
#pragma once

#include <sched.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace keel::net::testing {

// Empty if the test can make taps here, else why not (for GTEST_SKIP).
inline std::string enter_private_net_namespace() {
  if (::access("/dev/net/tun", R_OK | W_OK) != 0) {
    return std::string("no usable /dev/net/tun: ") + std::strerror(errno);
  }
  if (::unshare(CLONE_NEWNET) != 0) {
    return std::string("cannot unshare a network namespace (needs CAP_SYS_ADMIN): ") +
           std::strerror(errno);
  }
  return {};
}

}  // namespace keel::net::testing
