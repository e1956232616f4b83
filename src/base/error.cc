#include "base/error.h"

#include <cstring>

#include <fmt/format.h>

namespace keel {

std::string_view errc_name(Errc code) {
  switch (code) {
    case Errc::Io: return "Io";
    case Errc::InvalidArgument: return "InvalidArgument";
    case Errc::Corrupt: return "Corrupt";
    case Errc::Unsupported: return "Unsupported";
    case Errc::OutOfRange: return "OutOfRange";
    case Errc::NotFound: return "NotFound";
    case Errc::Busy: return "Busy";
    case Errc::PermissionDenied: return "PermissionDenied";
    case Errc::Timeout: return "Timeout";
  }
  return "Unknown";
}

Error&& Error::wrap(std::string_view outer) && {
  context_ = fmt::format("{}: {}", outer, context_);
  return std::move(*this);
}

std::string Error::message() const {
  if (sys_errno_ != 0) {
    return fmt::format("{}: {}: {} (errno {})", errc_name(code_), context_,
                       std::strerror(sys_errno_), sys_errno_);
  }
  return fmt::format("{}: {}", errc_name(code_), context_);
}

}  // namespace keel

#include "base/result.h"

namespace keel {

Failure fail_errno(std::string context, int sys_errno) {
  Errc code = Errc::Io;
  switch (sys_errno) {
    case ENOENT: code = Errc::NotFound; break;
    case EACCES:
    case EPERM: code = Errc::PermissionDenied; break;
    case EINVAL: code = Errc::InvalidArgument; break;
    case EBUSY:
    case EAGAIN: code = Errc::Busy; break;
    case ENOSYS:
    case EOPNOTSUPP: code = Errc::Unsupported; break;
    case ERANGE:
    case EOVERFLOW: code = Errc::OutOfRange; break;
    case ETIMEDOUT: code = Errc::Timeout; break;
    default: break;
  }
  return Failure{Error(code, std::move(context), sys_errno)};
}

}  // namespace keel
