#include "base/fd.h"

#include <unistd.h>

#include <array>
#include <cstdlib>
#include <string>

#include <gtest/gtest.h>

namespace keel {
namespace {

// A temp file that removes itself.
class TempFile {
 public:
  TempFile() {
    path_ = ::testing::TempDir() + "keel_fd_test_XXXXXX";
    int fd = ::mkstemp(path_.data());
    EXPECT_GE(fd, 0);
    Fd owner(fd);
  }
  ~TempFile() { ::unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::span<const std::byte> as_bytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

TEST(FdTest, OpenMissingFileNamesThePath) {
  Result<Fd> fd = Fd::open("/nonexistent/keel", O_RDONLY);
  ASSERT_FALSE(fd);
  EXPECT_EQ(fd.error().code(), Errc::NotFound);
  EXPECT_NE(fd.error().context().find("/nonexistent/keel"), std::string::npos);
}

TEST(FdTest, PositionalRoundTrip) {
  TempFile file;
  Fd fd = *Fd::open(file.path(), O_RDWR);
  ASSERT_TRUE(fd.pwrite_all(as_bytes("hello keel"), 100));
  EXPECT_EQ(*fd.size_bytes(), 110u);
  std::array<std::byte, 4> buffer{};
  ASSERT_TRUE(fd.pread_all(buffer, 106));
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(buffer.data()), buffer.size()), "keel");
}

TEST(FdTest, ReadPastEndIsOutOfRange) {
  TempFile file;
  Fd fd = *Fd::open(file.path(), O_RDWR);
  ASSERT_TRUE(fd.pwrite_all(as_bytes("abc"), 0));
  std::array<std::byte, 8> buffer{};
  Result<void> result = fd.pread_all(buffer, 0);
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code(), Errc::OutOfRange);
}

TEST(FdTest, MoveTransfersOwnershipAndCloses) {
  TempFile file;
  Fd first = *Fd::open(file.path(), O_RDONLY);
  int raw = first.get();
  Fd second = std::move(first);
  EXPECT_FALSE(first.valid());  // NOLINT(bugprone-use-after-move): checking the moved-from state
  EXPECT_EQ(second.get(), raw);
  second.reset();
  EXPECT_EQ(::fcntl(raw, F_GETFD), -1);
  EXPECT_EQ(errno, EBADF);
}

TEST(FdTest, OpenSetsCloexec) {
  TempFile file;
  Fd fd = *Fd::open(file.path(), O_RDONLY);
  EXPECT_TRUE(::fcntl(fd.get(), F_GETFD) & FD_CLOEXEC);
  Fd copy = *fd.duplicate();
  EXPECT_NE(copy.get(), fd.get());
  EXPECT_TRUE(::fcntl(copy.get(), F_GETFD) & FD_CLOEXEC);
}

}  // namespace
}  // namespace keel
