// CHECK aborts on a broken invariant of our own. Never use it on a value a
// guest, an image, a stream or an API client supplied: return an Error.
#pragma once

namespace keel::detail {
[[noreturn]] void check_failed(const char* condition, const char* message, const char* file,
                               int line);
}  // namespace keel::detail

#define CHECK(condition, message)                                               \
  do {                                                                          \
    if (!(condition)) [[unlikely]] {                                            \
      ::keel::detail::check_failed(#condition, (message), __FILE__, __LINE__);  \
    }                                                                           \
  } while (0)
