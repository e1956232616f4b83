#include "base/check.h"

#include <cstdio>
#include <cstdlib>

namespace keel::detail {

void check_failed(const char* condition, const char* message, const char* file, int line) {
  // stdio rather than the logger: the logger may be what is broken.
  std::fprintf(stderr, "keel: CHECK failed at %s:%d: %s (%s)\n", file, line, condition, message);
  std::fflush(stderr);
  std::abort();
}

}  // namespace keel::detail
