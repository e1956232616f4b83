// Little-endian encoding of snapshot fields. Keel runs on x86-64 only, so
// the host order is the file order and fields are copied byte for byte;
// ByteReader never reads past its span and says what it was reading.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <fmt/format.h>

#include "base/result.h"

namespace keel {

static_assert(std::endian::native == std::endian::little, "snapshot fields are little-endian");

class ByteWriter {
 public:
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  void put(const T& value) {
    const auto* bytes = reinterpret_cast<const std::byte*>(&value);
    data_.insert(data_.end(), bytes, bytes + sizeof(T));
  }
  void put_bytes(std::span<const std::byte> bytes) {
    data_.insert(data_.end(), bytes.begin(), bytes.end());
  }
  void put_string(std::string_view text) { put_bytes(std::as_bytes(std::span(text))); }
  std::vector<std::byte>& data() { return data_; }

 private:
  std::vector<std::byte> data_;
};

class ByteReader {
 public:
  explicit ByteReader(std::span<const std::byte> data) : data_(data) {}

  template <typename T>
    requires std::is_trivially_copyable_v<T>
  Result<T> get(std::string_view what) {
    T value{};  // GCC 12 cannot always see that take() fills it before use
    TRY(take(what, {reinterpret_cast<std::byte*>(&value), sizeof(T)}));
    return value;
  }
  Result<std::span<const std::byte>> get_bytes(size_t count, std::string_view what) {
    if (count > remaining()) return short_read(what, count);
    std::span<const std::byte> bytes = data_.subspan(offset_, count);
    offset_ += count;
    return bytes;
  }
  size_t remaining() const { return data_.size() - offset_; }
  size_t offset() const { return offset_; }

 private:
  Result<void> take(std::string_view what, std::span<std::byte> out) {
    if (out.size() > remaining()) return short_read(what, out.size());
    std::memcpy(out.data(), data_.data() + offset_, out.size());
    offset_ += out.size();
    return ok();
  }
  Failure short_read(std::string_view what, size_t count) const {
    return fail(Errc::Corrupt, fmt::format("{}: needs {} bytes at offset {}, {} left", what, count,
                                           offset_, remaining()));
  }

  std::span<const std::byte> data_;
  size_t offset_ = 0;
};

}  // namespace keel
