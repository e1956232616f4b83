// Error values for everything Keel does not control: syscalls, guest input,
// images, API requests. A bug of our own aborts through CHECK instead.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace keel {

enum class Errc : uint8_t {
  Io,
  InvalidArgument,
  Corrupt,
  Unsupported,
  OutOfRange,
  NotFound,
  Busy,
  PermissionDenied,
  Timeout,
};

std::string_view errc_name(Errc code);

class Error {
 public:
  Error(Errc code, std::string context, int sys_errno = 0)
      : code_(code), sys_errno_(sys_errno), context_(std::move(context)) {}

  Errc code() const { return code_; }
  // The errno of the failing syscall, or 0 when the error did not come from one.
  int sys_errno() const { return sys_errno_; }
  const std::string& context() const { return context_; }

  // Prepends an outer context: "open disk: qcow2 header: bad magic".
  Error&& wrap(std::string_view outer) &&;

  // "InvalidArgument: --cpus: must be at least 1" or "Io: open /x: No such file (errno 2)".
  std::string message() const;

 private:
  Errc code_;
  int sys_errno_;
  std::string context_;
};

}  // namespace keel
