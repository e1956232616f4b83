// Result<T>: a value or an Error, in the shape of C++23 std::expected so that
// the switch to it is a rename once the toolchain has it (g++ 12 does not in
// C++20 mode). Propagate with TRY; make errors with fail()/fail_errno().
#pragma once

#include <cerrno>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include "base/check.h"
#include "base/error.h"

namespace keel {

// What fail() returns; converts to any Result<T>.
struct Failure {
  Error error;
};

inline Failure fail(Errc code, std::string context) {
  return Failure{Error(code, std::move(context))};
}

// Captures errno now, so call it right after the failing syscall. The code
// follows the errno where one fits (ENOENT -> NotFound, EACCES -> PermissionDenied).
Failure fail_errno(std::string context, int sys_errno = errno);

inline Failure fail(Error error) { return Failure{std::move(error)}; }

template <typename T>
class [[nodiscard]] Result {
 public:
  using value_type = T;

  template <typename U = T>
    requires std::is_constructible_v<T, U&&> && (!std::is_same_v<std::remove_cvref_t<U>, Result>)
  Result(U&& value) : storage_(std::in_place_index<0>, std::forward<U>(value)) {}  // NOLINT
  Result(Failure failure) : storage_(std::in_place_index<1>, std::move(failure.error)) {}  // NOLINT

  bool has_value() const { return storage_.index() == 0; }
  explicit operator bool() const { return has_value(); }

  T& value() & { return checked_value(); }
  const T& value() const& {
    CHECK(has_value(), "Result::value() on an error");
    return std::get<0>(storage_);
  }
  T&& value() && { return std::move(checked_value()); }
  T& operator*() & { return checked_value(); }
  T&& operator*() && { return std::move(checked_value()); }
  T* operator->() { return &checked_value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const& {
    CHECK(!has_value(), "Result::error() on a value");
    return std::get<1>(storage_);
  }
  Error&& error() && {
    CHECK(!has_value(), "Result::error() on a value");
    return std::get<1>(std::move(storage_));
  }

  template <typename U>
  T value_or(U&& fallback) const& {
    return has_value() ? std::get<0>(storage_) : static_cast<T>(std::forward<U>(fallback));
  }

 private:
  T& checked_value() {
    CHECK(has_value(), "Result::value() on an error");
    return std::get<0>(storage_);
  }

  std::variant<T, Error> storage_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  using value_type = void;

  Result() = default;
  Result(Failure failure) : error_(std::move(failure.error)), failed_(true) {}  // NOLINT

  bool has_value() const { return !failed_; }
  explicit operator bool() const { return has_value(); }
  void value() const { CHECK(has_value(), "Result::value() on an error"); }

  const Error& error() const& {
    CHECK(failed_, "Result::error() on a value");
    return error_;
  }
  Error&& error() && {
    CHECK(failed_, "Result::error() on a value");
    return std::move(error_);
  }

 private:
  Error error_{Errc::Io, ""};
  bool failed_ = false;
};

inline Result<void> ok() { return {}; }

namespace detail {
template <typename T>
decltype(auto) take_value(Result<T>&& result) {
  if constexpr (std::is_void_v<T>) {
    return;
  } else {
    return std::move(result).value();
  }
}
}  // namespace detail

}  // namespace keel

// TRY(expr): evaluates a Result; on error returns it from the enclosing
// function (which must return some Result), else yields the value. Uses a
// GNU statement expression, which g++ and clang both support; each expansion
// gets its own variable name so TRY(f(TRY(g()))) does not shadow.
#define KEEL_CONCAT_INNER(a, b) a##b
#define KEEL_CONCAT(a, b) KEEL_CONCAT_INNER(a, b)

#define KEEL_TRY_IMPL(expr, outer, name)                                  \
  ({                                                                      \
    auto name = (expr);                                                   \
    if (!name.has_value()) {                                              \
      if constexpr (sizeof(outer) > 1) {                                  \
        return ::keel::fail(std::move(name).error().wrap(outer));         \
      } else {                                                            \
        return ::keel::fail(std::move(name).error());                     \
      }                                                                   \
    }                                                                     \
    ::keel::detail::take_value(std::move(name));                          \
  })

#define TRY(expr) KEEL_TRY_IMPL(expr, "", KEEL_CONCAT(keel_try_, __COUNTER__))
// TRY_CONTEXT(expr, "what we were doing"): like TRY, wrapping the error.
#define TRY_CONTEXT(expr, outer) KEEL_TRY_IMPL(expr, outer, KEEL_CONCAT(keel_try_, __COUNTER__))
