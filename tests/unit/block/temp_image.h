// Test support: a temporary disk image file filled with a known pattern,
// removed when the object goes away.
#pragma once

#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "base/fd.h"
#include "block/block_backend.h"

namespace keel::block::testing {

// A read or write for the asynchronous face.
inline BlockRequest transfer(BlockOp op, uint64_t offset, std::span<const iovec> iov,
                      uint64_t user_data = 0) {
  BlockRequest request;
  request.op = op;
  request.offset = offset;
  request.iov = iov;
  request.user_data = user_data;
  return request;
}

class TempImage {
 public:
  explicit TempImage(uint64_t size_bytes, uint8_t seed = 3) {
    char name[] = "/tmp/keel-image-test-XXXXXX";
    int fd = ::mkstemp(name);
    EXPECT_GE(fd, 0);
    Fd file(fd);
    path_ = name;
    contents_.resize(size_bytes);
    for (size_t i = 0; i < contents_.size(); ++i) {
      contents_[i] = std::byte(static_cast<uint8_t>(seed + i + i / 512));
    }
    EXPECT_TRUE(file.pwrite_all(contents_, 0).has_value());
  }
  TempImage(const TempImage&) = delete;
  TempImage& operator=(const TempImage&) = delete;
  ~TempImage() { ::unlink(path_.c_str()); }

  const std::string& path() const { return path_; }
  // What the file held when created.
  const std::vector<std::byte>& contents() const { return contents_; }

  // What the file holds now.
  std::vector<std::byte> read_back(uint64_t offset, size_t length) const {
    Fd file = std::move(*Fd::open(path_, O_RDONLY));
    std::vector<std::byte> out(length);
    EXPECT_TRUE(file.pread_all(out, offset).has_value());
    return out;
  }

 private:
  std::string path_;
  std::vector<std::byte> contents_;
};

}  // namespace keel::block::testing
