#include "block/block_backend.h"

#include <cerrno>
#include <string>

#include <fmt/format.h>

namespace keel::block {

int64_t completion_errno(const Error& error) {
  const int sys_errno = error.sys_errno();
  return -(sys_errno != 0 ? sys_errno : EIO);
}

Result<void> BlockBackend::resize(uint64_t /*new_size_bytes*/) {
  return fail(Errc::Unsupported, fmt::format("{} images cannot be resized", format_name()));
}

Result<void> BlockBackend::set_image_locked(bool /*locked*/) {
  return fail(Errc::Unsupported,
              std::string(format_name()) + " images cannot be handed over to another process yet");
}

}  // namespace keel::block
