#include "base/result.h"

#include <memory>
#include <string>

#include <gtest/gtest.h>

namespace keel {
namespace {

Result<int> parse_positive(int value) {
  if (value <= 0) return fail(Errc::InvalidArgument, "value must be positive");
  return value;
}

Result<int> doubled(int value) {
  int parsed = TRY(parse_positive(value));
  return parsed * 2;
}

Result<void> check_even(int value) {
  int parsed = TRY_CONTEXT(parse_positive(value), "check_even");
  if (parsed % 2 != 0) return fail(Errc::OutOfRange, "odd");
  return ok();
}

Result<int> via_void(int value) {
  TRY(check_even(value));
  return value / 2;
}

TEST(ResultTest, HoldsValue) {
  Result<int> result = parse_positive(3);
  ASSERT_TRUE(result.has_value());
  EXPECT_EQ(*result, 3);
  EXPECT_EQ(result.value_or(9), 3);
}

TEST(ResultTest, HoldsError) {
  Result<int> result = parse_positive(-1);
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code(), Errc::InvalidArgument);
  EXPECT_EQ(result.error().context(), "value must be positive");
  EXPECT_EQ(result.value_or(9), 9);
}

TEST(ResultTest, TryPropagatesValueAndError) {
  EXPECT_EQ(*doubled(4), 8);
  Result<int> bad = doubled(0);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code(), Errc::InvalidArgument);
}

TEST(ResultTest, TryContextWrapsTheError) {
  Result<void> bad = check_even(-2);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().context(), "check_even: value must be positive");
  EXPECT_EQ(bad.error().message(), "InvalidArgument: check_even: value must be positive");
}

TEST(ResultTest, VoidResultsPropagate) {
  EXPECT_TRUE(check_even(4));
  EXPECT_EQ(*via_void(4), 2);
  Result<int> odd = via_void(3);
  ASSERT_FALSE(odd);
  EXPECT_EQ(odd.error().code(), Errc::OutOfRange);
}

TEST(ResultTest, MoveOnlyValues) {
  auto make = []() -> Result<std::unique_ptr<int>> { return std::make_unique<int>(7); };
  auto use = [&]() -> Result<int> {
    std::unique_ptr<int> owned = TRY(make());
    return *owned;
  };
  EXPECT_EQ(*use(), 7);
}

TEST(ResultTest, ErrnoMapsToCodeAndMessage) {
  Result<void> missing = fail_errno("open /nonexistent", ENOENT);
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code(), Errc::NotFound);
  EXPECT_EQ(missing.error().sys_errno(), ENOENT);
  EXPECT_NE(missing.error().message().find("open /nonexistent"), std::string::npos);
  EXPECT_NE(missing.error().message().find("errno 2"), std::string::npos);
  EXPECT_EQ(Result<void>(fail_errno("x", EACCES)).error().code(), Errc::PermissionDenied);
}

TEST(ResultDeathTest, ValueOfErrorAborts) {
  Result<int> bad = parse_positive(0);
  EXPECT_DEATH((void)bad.value(), "CHECK failed");
}

}  // namespace
}  // namespace keel
