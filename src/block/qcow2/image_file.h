// The file under a qcow2 image: positional I/O that names the image in its
// errors and tracks the file's size as writes extend it.
#pragma once

#include <sys/uio.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "base/fd.h"
#include "base/result.h"

namespace keel::block::qcow2 {

class ImageFile {
 public:
  ImageFile(std::string path, Fd fd, uint64_t size_bytes)
      : path_(std::move(path)), fd_(std::move(fd)), size_bytes_(size_bytes) {}

  const std::string& path() const { return path_; }
  int fd() const { return fd_.get(); }
  uint64_t size_bytes() const { return size_bytes_; }

  // Reads every byte; bytes past the end of the file read as zeroes (a qcow2
  // writer may leave the last cluster short).
  Result<void> read(uint64_t offset, std::span<std::byte> data) const;
  Result<void> readv(uint64_t offset, std::span<const iovec> iov) const;
  Result<void> write(uint64_t offset, std::span<const std::byte> data);
  Result<void> writev(uint64_t offset, std::span<const iovec> iov);
  // An asynchronous write (not through this class) will extend the file to
  // end: counted now, so a cluster it touches is never taken for one past
  // the end of the file.
  void note_write_end(uint64_t end) { size_bytes_ = std::max(size_bytes_, end); }
  // fdatasync: everything written so far is on stable storage.
  Result<void> sync();

 private:
  Result<void> transfer(bool is_write, uint64_t offset, std::span<const iovec> iov);

  std::string path_;
  Fd fd_;
  uint64_t size_bytes_;
};

}  // namespace keel::block::qcow2
