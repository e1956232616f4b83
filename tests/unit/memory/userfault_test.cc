// memory::Userfault on this process's own anonymous memory: a thread that
// touches a missing page waits until the page is installed, fault() names
// that page, a page already present is left alone (EEXIST), zero pages
// read as zeros, and after unregister() faults are ordinary ones.
#include "memory/userfault.h"

#include <gtest/gtest.h>
#include <poll.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "base/mmap.h"

namespace keel::memory {
namespace {

constexpr uint64_t kPage = Userfault::kPageBytes;

// The next fault, waiting up to 5 s for one.
std::optional<uint64_t> next_fault(Userfault& userfault) {
  pollfd waiting{userfault.fd(), POLLIN, 0};
  if (::poll(&waiting, 1, 5000) <= 0) return std::nullopt;
  Result<std::optional<uint64_t>> fault = userfault.fault();
  EXPECT_TRUE(fault) << fault.error().message();
  return fault ? *fault : std::nullopt;
}

class UserfaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<Mmap> mapping = Mmap::anonymous(8 * kPage);
    ASSERT_TRUE(mapping) << mapping.error().message();
    mapping_ = std::move(*mapping);
    range_ = {static_cast<std::byte*>(mapping_.data()), 8 * kPage};
    Result<Userfault> userfault = Userfault::register_missing(range_);
    if (!userfault) GTEST_SKIP() << "no userfaultfd here: " << userfault.error().message();
    userfault_.emplace(std::move(*userfault));
  }

  Mmap mapping_;
  std::span<std::byte> range_;
  std::optional<Userfault> userfault_;
};

TEST_F(UserfaultTest, AToucherWaitsForThePageInstalled) {
  std::vector<std::byte> page(kPage, std::byte{0x5a});
  std::atomic<bool> read{false};
  std::byte seen{};
  std::thread toucher([&] {
    seen = std::atomic_ref<std::byte>(range_[3 * kPage + 17]).load();
    read.store(true);
  });
  std::optional<uint64_t> fault = next_fault(*userfault_);
  ASSERT_TRUE(fault.has_value()) << "no fault reported";
  EXPECT_EQ(*fault, 3 * kPage);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(read.load()) << "the toucher went on before the page came";
  ASSERT_TRUE(userfault_->install(3 * kPage, page));
  toucher.join();
  EXPECT_EQ(seen, std::byte{0x5a});
  // Installing again over a present page is no error and changes nothing.
  std::vector<std::byte> other(2 * kPage, std::byte{0x11});
  ASSERT_TRUE(userfault_->install(3 * kPage, other));  // page 3 present, page 4 missing
  EXPECT_EQ(range_[3 * kPage], std::byte{0x5a});
  EXPECT_EQ(range_[4 * kPage], std::byte{0x11});
}

TEST_F(UserfaultTest, ZeroPagesReadAsZerosAndUnregisterEndsMissingMode) {
  ASSERT_TRUE(userfault_->install_zero(0, 2 * kPage));
  EXPECT_EQ(range_[0], std::byte{0});
  EXPECT_EQ(range_[2 * kPage - 1], std::byte{0});
  range_[kPage] = std::byte{7};  // a zero page is copied on write as usual
  EXPECT_EQ(range_[kPage], std::byte{7});
  ASSERT_TRUE(userfault_->unregister());
  range_[6 * kPage] = std::byte{9};  // an ordinary fault now, no waiting
  EXPECT_EQ(range_[6 * kPage], std::byte{9});
  Result<std::optional<uint64_t>> fault = userfault_->fault();
  ASSERT_TRUE(fault);
  EXPECT_FALSE(fault->has_value());
}

TEST_F(UserfaultTest, RangesOutsideAreRefused) {
  std::vector<std::byte> page(kPage);
  EXPECT_FALSE(userfault_->install(8 * kPage, page));
  EXPECT_FALSE(userfault_->install(100, page));
  EXPECT_FALSE(userfault_->install_zero(7 * kPage, 2 * kPage));
  EXPECT_FALSE(userfault_->install_zero(~uint64_t{0} & ~(kPage - 1), kPage));
}

}  // namespace
}  // namespace keel::memory
