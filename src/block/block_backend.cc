#include "block/block_backend.h"

#include <cerrno>

namespace keel::block {

int64_t completion_errno(const Error& error) {
  const int sys_errno = error.sys_errno();
  return -(sys_errno != 0 ? sys_errno : EIO);
}

}  // namespace keel::block
