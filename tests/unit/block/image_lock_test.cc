// ImageLock: QEMU's lock bytes, conflicts between opens of one file in this
// process (OFD locks are per open file description), open_image locking a
// whole chain, and Keel and QEMU seeing each other's locks (with Debian's
// qemu-img and qemu-io; those tests skip, saying why, without them).
#include <string>

#include <gtest/gtest.h>

#include "block/image.h"
#include "block/image_lock.h"
#include "block/qcow2/create.h"
#include "qcow2_support.h"
#include "temp_image.h"

namespace keel::block {
namespace {

using testing::lock_byte_held;
using testing::output_of;
using testing::QemuIoHolder;
using testing::run;
using testing::TempDir;
using testing::TempImage;

constexpr uint64_t kMiB = 1 << 20;

// Which of QEMU's eight lock bytes (100..103, 200..203) another open holds.
std::string held_bytes(const std::string& path) {
  std::string out;
  for (uint64_t base : {ImageLock::kPermissionBase, ImageLock::kSharedBase}) {
    for (uint64_t p = 0; p < 4; ++p) {
      if (lock_byte_held(path, base + p)) out += std::to_string(base + p) + " ";
    }
  }
  return out;
}

void expect_busy(const Result<ImageLock>& lock, const std::string& path) {
  ASSERT_FALSE(lock.has_value()) << path << " was locked twice";
  EXPECT_EQ(lock.error().code(), Errc::Busy);
  EXPECT_NE(lock.error().context().find(path + " is in use by another process (lock held"),
            std::string::npos)
      << lock.error().message();
}

TEST(ImageLockTest, TakesQemusBytesForEachAccess) {
  TempImage image(kMiB);
  {
    auto reader = ImageLock::open(image.path(), Access::ReadOnly);
    ASSERT_TRUE(reader.has_value()) << reader.error().message();
    // Consistent read used; write and resize not shared (as QEMU's qcow2 backing file).
    EXPECT_EQ(held_bytes(image.path()), "100 201 203 ");
  }
  EXPECT_EQ(held_bytes(image.path()), "");
  {
    auto writer = ImageLock::open(image.path(), Access::ReadWrite);
    ASSERT_TRUE(writer.has_value()) << writer.error().message();
    // Also write and resize used (as QEMU's writable qcow2 image).
    EXPECT_EQ(held_bytes(image.path()), "100 101 103 201 203 ");
  }
  EXPECT_EQ(held_bytes(image.path()), "");
}

TEST(ImageLockTest, OpensInOneProcessConflictLikeProcesses) {
  TempImage image(kMiB);
  {
    auto first = ImageLock::open(image.path(), Access::ReadOnly);
    ASSERT_TRUE(first.has_value()) << first.error().message();
    auto second = ImageLock::open(image.path(), Access::ReadOnly);
    EXPECT_TRUE(second.has_value()) << "readers share: " << second.error().message();
    expect_busy(ImageLock::open(image.path(), Access::ReadWrite), image.path());
  }
  auto writer = ImageLock::open(image.path(), Access::ReadWrite);
  ASSERT_TRUE(writer.has_value()) << writer.error().message();
  expect_busy(ImageLock::open(image.path(), Access::ReadWrite), image.path());
  expect_busy(ImageLock::open(image.path(), Access::ReadOnly), image.path());
  // -U looks anyway, holding nothing.
  auto forced = ImageLock::open(image.path(), Access::ReadOnly, Locking::ForceShare);
  ASSERT_TRUE(forced.has_value());
  EXPECT_FALSE(forced->held());
  // A failed attempt leaves nothing behind: once the writer lets go, a
  // second writer gets in.
  writer->release();
  EXPECT_TRUE(ImageLock::open(image.path(), Access::ReadWrite).has_value());
}

TEST(ImageLockTest, MovedLockStaysHeldUntilItsLastOwnerGoes) {
  TempImage image(kMiB);
  ImageLock kept;
  {
    auto writer = ImageLock::open(image.path(), Access::ReadWrite);
    ASSERT_TRUE(writer.has_value());
    kept = std::move(*writer);
  }
  EXPECT_TRUE(kept.held());
  expect_busy(ImageLock::open(image.path(), Access::ReadOnly), image.path());
  kept = ImageLock();
  EXPECT_EQ(held_bytes(image.path()), "");
}

TEST(ImageLockTest, OpenImageLocksTheWholeChain) {
  TempDir dir;
  const std::string base = dir.file("base.qcow2");
  const std::string top = dir.file("top.qcow2");
  const std::string other = dir.file("other.qcow2");
  qcow2::CreateOptions options;
  options.size_bytes = 4 * kMiB;
  ASSERT_TRUE(qcow2::create_image(base, options).has_value());
  options.backing_file = "base.qcow2";
  options.backing_format = "qcow2";
  ASSERT_TRUE(qcow2::create_image(top, options).has_value());
  ASSERT_TRUE(qcow2::create_image(other, options).has_value());
  auto vm = open_image(top, ImageFormat::Qcow2, Access::ReadWrite);
  ASSERT_TRUE(vm.has_value()) << vm.error().message();
  EXPECT_EQ(held_bytes(top), "100 101 103 201 203 ");
  EXPECT_EQ(held_bytes(base), "100 201 203 ");

  // A second VM on the same overlay is refused, naming it ...
  auto second = open_image(top, ImageFormat::Qcow2, Access::ReadWrite);
  ASSERT_FALSE(second.has_value());
  EXPECT_EQ(second.error().code(), Errc::Busy);
  EXPECT_NE(second.error().message().find(top + " is in use"), std::string::npos)
      << second.error().message();
  EXPECT_FALSE(open_image(top, ImageFormat::Qcow2, Access::ReadOnly).has_value());
  // ... as is writing the shared backing file; another overlay on it is fine.
  auto base_writer = open_image(base, ImageFormat::Qcow2, Access::ReadWrite);
  ASSERT_FALSE(base_writer.has_value());
  EXPECT_NE(base_writer.error().message().find(base + " is in use"), std::string::npos)
      << base_writer.error().message();
  EXPECT_TRUE(open_image(other, ImageFormat::Qcow2, Access::ReadWrite).has_value());
  EXPECT_TRUE(open_image(base, ImageFormat::Qcow2, Access::ReadOnly).has_value());
  EXPECT_TRUE(
      open_image(top, ImageFormat::Qcow2, Access::ReadOnly, Locking::ForceShare).has_value());

  vm->reset();
  EXPECT_EQ(held_bytes(top), "");
  EXPECT_EQ(held_bytes(base), "");
  EXPECT_TRUE(open_image(top, ImageFormat::Qcow2, Access::ReadWrite).has_value());
}

TEST(ImageLockTest, RawImagesAreLockedToo) {
  TempImage image(kMiB);
  auto vm = open_image(image.path(), ImageFormat::Raw, Access::ReadWrite);
  ASSERT_TRUE(vm.has_value()) << vm.error().message();
  auto second = open_image(image.path(), ImageFormat::Raw, Access::ReadWrite);
  ASSERT_FALSE(second.has_value());
  EXPECT_EQ(second.error().code(), Errc::Busy);
}

class ImageLockInteropTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!testing::have_program("qemu-img") || !testing::have_program("qemu-io")) {
      GTEST_SKIP() << "qemu-img and qemu-io are not installed (Debian qemu-utils)";
    }
    ASSERT_EQ(run("qemu-img create -f qcow2 " + base_ + " 4M"), 0);
    ASSERT_EQ(run("qemu-img create -f qcow2 -b base.qcow2 -F qcow2 " + top_), 0);
  }
  // qemu-img's or qemu-io's exit status and output.
  int qemu(const std::string& command, std::string* out) {
    std::string text = output_of(command + " 2>&1; echo \"exit=$?\"");
    const size_t marker = text.rfind("exit=");
    if (marker == std::string::npos) return -1;
    const int status = std::stoi(text.substr(marker + 5));
    text.resize(marker);
    *out = std::move(text);
    return status;
  }

  TempDir dir_;
  std::string base_ = dir_.file("base.qcow2");
  std::string top_ = dir_.file("top.qcow2");
};

TEST_F(ImageLockInteropTest, QemuSeesKeelsLocks) {
  auto vm = open_image(top_, ImageFormat::Qcow2, Access::ReadWrite);
  ASSERT_TRUE(vm.has_value()) << vm.error().message();
  std::string out;
  EXPECT_NE(qemu("qemu-img info " + top_, &out), 0) << out;
  EXPECT_NE(out.find("Failed to get shared \"write\" lock"), std::string::npos) << out;
  EXPECT_NE(out.find("Is another process using the image"), std::string::npos) << out;
  EXPECT_EQ(qemu("qemu-img info -U " + top_, &out), 0) << out;
  EXPECT_NE(qemu("qemu-io -c 'write 0 512' " + top_, &out), 0) << out;
  EXPECT_NE(out.find("Failed to get \"write\" lock"), std::string::npos) << out;
  // The backing file is only read: QEMU may read it, not write it.
  EXPECT_EQ(qemu("qemu-img info " + base_, &out), 0) << out;
  EXPECT_NE(qemu("qemu-io -c 'write 0 512' " + base_, &out), 0) << out;
  EXPECT_NE(out.find("Failed to get \"write\" lock"), std::string::npos) << out;
  vm->reset();
  EXPECT_EQ(qemu("qemu-io -c 'write 0 512' " + top_, &out), 0) << out;
}

TEST_F(ImageLockInteropTest, KeelSeesQemusLocks) {
  {
    QemuIoHolder qemu_vm(top_);
    ASSERT_TRUE(qemu_vm.held()) << "qemu-io did not lock " << top_;
    for (Access access : {Access::ReadWrite, Access::ReadOnly}) {
      auto opened = open_image(top_, ImageFormat::Qcow2, access);
      ASSERT_FALSE(opened.has_value());
      EXPECT_EQ(opened.error().code(), Errc::Busy);
      EXPECT_NE(opened.error().message().find(top_ + " is in use by another process"),
                std::string::npos)
          << opened.error().message();
    }
    EXPECT_TRUE(
        open_image(top_, ImageFormat::Qcow2, Access::ReadOnly, Locking::ForceShare).has_value());
    EXPECT_TRUE(open_image(base_, ImageFormat::Qcow2, Access::ReadOnly).has_value());
    EXPECT_FALSE(open_image(base_, ImageFormat::Qcow2, Access::ReadWrite).has_value());
  }
  {
    QemuIoHolder qemu_reader(top_, "-r");
    ASSERT_TRUE(qemu_reader.held()) << "qemu-io -r did not lock " << top_;
    EXPECT_FALSE(open_image(top_, ImageFormat::Qcow2, Access::ReadWrite).has_value());
    EXPECT_TRUE(open_image(top_, ImageFormat::Qcow2, Access::ReadOnly).has_value());
  }
  EXPECT_TRUE(open_image(top_, ImageFormat::Qcow2, Access::ReadWrite).has_value());
}

}  // namespace
}  // namespace keel::block
