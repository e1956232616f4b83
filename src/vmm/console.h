// The host side of the guest's serial console: where guest output goes and
// where host input comes from (stdio with the terminal in raw mode, a file,
// a unix socket with one client at a time, or nothing). Lives across guest
// reboots, so it is owned by main, not by the Machine.
#pragma once

#include <termios.h>

#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>

#include "base/fd.h"
#include "base/result.h"
#include "machine/vm_config.h"

namespace keel::vmm {

class Console {
 public:
  static Result<std::unique_ptr<Console>> open(const machine::SerialConfig& config);
  ~Console();

  // Guest output (called on vCPU threads).
  void write(std::span<const std::byte> bytes);

  // The fd the event loop polls for input, or -1.
  int input_fd() const;
  // Reads what is available. Returns the bytes for the guest; sets quit when
  // the user typed the escape sequence (Ctrl-A x) on a terminal.
  Result<std::string> read_input(bool& quit);

 private:
  explicit Console(machine::SerialConfig config) : config_(std::move(config)) {}

  machine::SerialConfig config_;
  Fd output_;     // File, or a duplicate of stdout for Stdio
  Fd listener_;   // Unix: listening socket
  Fd client_;     // Unix: the connected client, if any
  std::mutex client_mutex_;  // guards client_ against vCPU-thread writes
  std::optional<termios> saved_terminal_;  // restored on destruction
  bool input_closed_ = false;
  bool escape_pending_ = false;
};

}  // namespace keel::vmm
