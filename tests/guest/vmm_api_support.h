// Test support for tests that drive keel-vmm's control API: waiting for the
// API socket to answer. Shared by vmm_api_test.cc and vmm_snapshot_test.cc
// (both link keel_api; vmm_process.h stays free of it for vmm_test.cc).
#pragma once

#include <chrono>
#include <string>
#include <thread>

#include "api/client.h"
#include "vmm_process.h"

namespace keel::testing {

// True once GET /api/v1/version answers 200 on socket, false if it does not
// within timeout.
inline bool api_answers(const std::string& socket, Clock::duration timeout) {
  Clock::time_point deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    Result<api::HttpReply> reply =
        api::Client(socket, std::chrono::seconds(10)).request("GET", "/api/v1/version");
    if (reply && reply->status == 200) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

}  // namespace keel::testing
