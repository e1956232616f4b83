// Test support for qcow2: a temporary directory, file helpers, and running
// qemu-img when it is installed.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "base/fd.h"
#include "block/block_backend.h"
#include "block/image.h"
#include "block/qcow2/create.h"
#include "block/qcow2/qcow2.h"

namespace keel::block::testing {

class TempDir {
 public:
  TempDir() {
    char name[] = "/tmp/keel-qcow2-test-XXXXXX";
    EXPECT_NE(::mkdtemp(name), nullptr);
    path_ = name;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A deterministic pattern: byte i of a stream seeded with seed.
inline std::vector<std::byte> pattern(size_t length, uint8_t seed) {
  std::vector<std::byte> out(length);
  uint32_t x = 0x9e3779b9u * (seed + 1u);
  for (size_t i = 0; i < length; ++i) {
    x = x * 1664525u + 1013904223u;
    out[i] = std::byte(static_cast<uint8_t>(x >> 24));
  }
  return out;
}

inline void write_file(const std::string& path, const std::vector<std::byte>& data) {
  auto fd = Fd::open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  ASSERT_TRUE(fd.has_value()) << fd.error().message();
  ASSERT_TRUE(fd->pwrite_all(data, 0).has_value());
}

inline std::vector<std::byte> read_file(const std::string& path) {
  auto fd = Fd::open(path, O_RDONLY);
  EXPECT_TRUE(fd.has_value());
  if (!fd) return {};
  auto size = fd->size_bytes();
  std::vector<std::byte> out(size.value_or(0));
  EXPECT_TRUE(fd->pread_all(out, 0).has_value());
  return out;
}

inline Result<void> write_bytes(BlockBackend& disk, uint64_t offset,
                                const std::vector<std::byte>& data) {
  iovec v{const_cast<std::byte*>(data.data()), data.size()};
  auto result = disk.write_at(offset, std::span(&v, 1));
  if (!result) return fail(std::move(result).error());
  return ok();
}

inline std::vector<std::byte> read_bytes(BlockBackend& disk, uint64_t offset, size_t length) {
  std::vector<std::byte> out(length, std::byte{0xee});
  iovec v{out.data(), out.size()};
  auto result = disk.read_at(offset, std::span(&v, 1));
  EXPECT_TRUE(result.has_value()) << result.error().message();
  return out;
}

inline void create_qcow2(const std::string& path, uint64_t size, uint32_t cluster_bits,
                         const std::string& backing = "", const std::string& backing_format = "") {
  qcow2::CreateOptions options;
  options.size_bytes = size;
  options.cluster_bits = cluster_bits;
  options.backing_file = backing;
  options.backing_format = backing_format;
  auto created = qcow2::create_image(path, options);
  ASSERT_TRUE(created.has_value()) << created.error().message();
}

// A qcow2 image as itself, for the calls beyond BlockBackend.
inline std::unique_ptr<qcow2::Qcow2Image> open_qcow2(const std::string& path,
                                                     Access access = Access::ReadWrite) {
  auto disk = open_image(path, ImageFormat::Qcow2, access);
  EXPECT_TRUE(disk.has_value()) << disk.error().message();
  if (!disk) return nullptr;
  return std::unique_ptr<qcow2::Qcow2Image>(dynamic_cast<qcow2::Qcow2Image*>(disk->release()));
}

// Big-endian 64-bit values in a file, for making damaged images.
inline uint64_t read_be64(const std::string& path, uint64_t offset) {
  auto bytes = read_file(path);
  uint64_t value = 0;
  for (uint64_t i = 0; i < 8; ++i) value = (value << 8) | static_cast<uint8_t>(bytes.at(offset + i));
  return value;
}

inline void write_be64(const std::string& path, uint64_t offset, uint64_t value) {
  auto fd = Fd::open(path, O_WRONLY);
  ASSERT_TRUE(fd.has_value());
  std::byte bytes[8];
  for (int i = 7; i >= 0; --i, value >>= 8) bytes[i] = std::byte(static_cast<uint8_t>(value));
  ASSERT_TRUE(fd->pwrite_all(bytes, offset).has_value());
}

// Runs a shell command; returns its exit status (-1 if it did not run).
inline int run(const std::string& command) {
  int status = std::system((command + " >/dev/null 2>&1").c_str());
  if (status == -1 || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

// Runs a command and returns its standard output.
inline std::string output_of(const std::string& command) {
  std::string out;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return out;
  char buffer[4096];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) out.append(buffer, n);
  ::pclose(pipe);
  return out;
}

// Runs a command once; returns its exit status (-1 if it did not run or
// did not exit) and fills out with its stdout and stderr.
inline int run_capturing(const std::string& command, std::string* out) {
  std::string text;
  FILE* pipe = ::popen(("(" + command + ") 2>&1").c_str(), "r");
  if (pipe == nullptr) return -1;
  char buffer[4096];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) text.append(buffer, n);
  int status = ::pclose(pipe);
  if (out != nullptr) *out = std::move(text);
  if (status == -1 || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

inline bool have_program(const std::string& name) {
  return run("command -v " + name) == 0;
}

// Whether another open file description holds a lock on the byte at offset
// of path (block/image_lock.h's lock bytes).
inline bool lock_byte_held(const std::string& path, uint64_t offset) {
  auto fd = Fd::open(path, O_RDONLY);
  if (!fd) return false;
  struct flock lock {};
  lock.l_type = F_WRLCK;
  lock.l_whence = SEEK_SET;
  lock.l_start = static_cast<off_t>(offset);
  lock.l_len = 1;
  if (::fcntl(fd->get(), F_OFD_GETLK, &lock) < 0) return false;
  return lock.l_type != F_UNLCK;
}

// A qemu-io process that holds image open (read-write, or read-only with
// "-r") until this goes away. held() says whether QEMU took its locks
// (waited for, up to 10 s).
class QemuIoHolder {
 public:
  explicit QemuIoHolder(const std::string& image, const std::string& mode = "") {
    pid_ = ::fork();
    if (pid_ == 0) {
      auto null = Fd::open("/dev/null", O_WRONLY);
      if (null) {
        ::dup2(null->get(), STDOUT_FILENO);
        ::dup2(null->get(), STDERR_FILENO);
      }
      if (mode.empty()) {
        ::execlp("qemu-io", "qemu-io", "-c", "sleep 600000", image.c_str(), nullptr);
      } else {
        ::execlp("qemu-io", "qemu-io", mode.c_str(), "-c", "sleep 600000", image.c_str(), nullptr);
      }
      ::_exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (pid_ > 0 && std::chrono::steady_clock::now() < deadline) {
      if (lock_byte_held(image, 100)) {
        held_ = true;
        break;
      }
      if (::waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;  // it ended (could not open the image)
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  QemuIoHolder(const QemuIoHolder&) = delete;
  QemuIoHolder& operator=(const QemuIoHolder&) = delete;
  ~QemuIoHolder() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  bool held() const { return held_; }

 private:
  pid_t pid_ = -1;
  bool held_ = false;
};

}  // namespace keel::block::testing
