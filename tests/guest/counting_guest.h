// pvh_check.elf's counting ending (`c`): a, b, c, ... z, a, ... on the
// serial console forever, its position kept in guest RAM. The snapshot and
// migration tests run it in one keel-vmm and check that another goes on
// from the next letter.
#pragma once

#include <chrono>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "vmm_process.h"

namespace keel::testing {

inline constexpr std::chrono::seconds kCountingTimeout{20};
inline constexpr std::string_view kCountingBanner = "pvh ok\n";

// The console goes to a file: on real KVM the guest prints far faster than
// a test reads a pipe, and a full pipe would block the vCPU in write().
inline std::vector<std::string> counting_guest(const std::string& socket,
                                               const std::string& console) {
  return {"--kernel",     std::string(KEEL_VMM_GUEST_DIR) + "/pvh_check.elf",
          "--cmdline",    "pvh-test c",
          "--memory",     "64",
          "--debug-exit", "--no-acpi",
          "--serial",     "file:" + console,
          "--api-socket", socket};
}

// Waits until file holds at least bytes bytes; returns what it holds.
inline std::string wait_for_file(const std::string& file, size_t bytes) {
  for (Clock::time_point deadline = Clock::now() + kCountingTimeout; Clock::now() < deadline;) {
    std::string text = read_text(file);
    if (text.size() >= bytes) return text;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return read_text(file);
}

// The letters after the banner.
inline std::string letters_of(const std::string& out) {
  size_t start = out.find(kCountingBanner);
  return start == std::string::npos ? std::string() : out.substr(start + kCountingBanner.size());
}

inline char next_letter(char letter) {
  return letter == 'z' ? 'a' : static_cast<char>(letter + 1);
}

// True if every letter is the one after its predecessor (z wraps to a).
inline bool in_sequence(const std::string& letters, char first) {
  char expected = first;
  for (char letter : letters) {
    if (letter != expected) return false;
    expected = next_letter(expected);
  }
  return true;
}

}  // namespace keel::testing
