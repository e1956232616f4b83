// Tagged records: the layout of the vcpu, vm and device payloads
// (docs/snapshot-format.md, "vCPU and VM payloads"): a u16 tag, u16 zero,
// u32 length, then the bytes. Records::parse rejects unknown tags,
// duplicates and short data; the typed getters check every length.
#pragma once

#include <cstring>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "base/result.h"
#include "base/bytes.h"

namespace keel {

class RecordWriter {
 public:
  template <typename Tag>
  void bytes(Tag tag, std::span<const std::byte> data) {
    out_.put(static_cast<uint16_t>(tag));
    out_.put(uint16_t{0});
    out_.put(static_cast<uint32_t>(data.size()));
    out_.put_bytes(data);
  }
  template <typename Tag, typename T>
  void value(Tag tag, const T& data) {
    bytes(tag, std::as_bytes(std::span(&data, 1)));
  }
  template <typename Tag, typename T>
  void optional(Tag tag, const std::optional<T>& data) {
    if (data) value(tag, *data);
  }
  std::vector<std::byte> take() { return std::move(out_.data()); }

 private:
  ByteWriter out_;
};

// All records of a payload, checked for unknown tags and duplicates.
class Records {
 public:
  static Result<Records> parse(std::span<const std::byte> payload, std::string_view label,
                               uint16_t last_tag) {
    Records records(label);
    ByteReader in(payload);
    while (in.remaining() > 0) {
      auto tag = TRY_CONTEXT(in.get<uint16_t>("record tag"), std::string(label));
      auto reserved = TRY_CONTEXT(in.get<uint16_t>("record reserved"), std::string(label));
      auto length = TRY_CONTEXT(in.get<uint32_t>("record length"), std::string(label));
      if (tag == 0 || tag > last_tag) {
        return fail(Errc::Corrupt, fmt::format("{}: unknown field {}", label, tag));
      }
      if (reserved != 0) {
        return fail(Errc::Corrupt, fmt::format("{}: field {} has reserved bits set", label, tag));
      }
      auto data = TRY_CONTEXT(in.get_bytes(length, fmt::format("field {}", tag)),
                              std::string(label));
      if (!records.fields_.emplace(tag, data).second) {
        return fail(Errc::Corrupt, fmt::format("{}: field {} appears twice", label, tag));
      }
    }
    return records;
  }

  template <typename T, typename Tag>
  Result<std::optional<T>> optional(Tag tag, std::string_view name) const {
    auto it = fields_.find(static_cast<uint16_t>(tag));
    if (it == fields_.end()) return std::optional<T>();
    if (it->second.size() != sizeof(T)) {
      return fail(Errc::Corrupt, fmt::format("{}: {} is {} bytes, expected {}", label_, name,
                                             it->second.size(), sizeof(T)));
    }
    T value;
    std::memcpy(&value, it->second.data(), sizeof(T));
    return std::optional<T>(value);
  }
  template <typename T, typename Tag>
  Result<T> required(Tag tag, std::string_view name) const {
    std::optional<T> value = TRY(optional<T>(tag, name));
    if (!value) return fail(Errc::Corrupt, fmt::format("{}: no {}", label_, name));
    return *value;
  }
  // A field of count elements of T, at most max_count.
  template <typename T, typename Tag>
  Result<std::vector<T>> array(Tag tag, std::string_view name, size_t max_count) const {
    auto it = fields_.find(static_cast<uint16_t>(tag));
    if (it == fields_.end()) return fail(Errc::Corrupt, fmt::format("{}: no {}", label_, name));
    if (it->second.size() % sizeof(T) != 0 || it->second.size() / sizeof(T) > max_count) {
      return fail(Errc::Corrupt,
                  fmt::format("{}: {} is {} bytes, not up to {} entries of {}", label_, name,
                              it->second.size(), max_count, sizeof(T)));
    }
    std::vector<T> values(it->second.size() / sizeof(T));
    if (!values.empty()) std::memcpy(values.data(), it->second.data(), it->second.size());
    return values;
  }
  bool has(uint16_t tag) const { return fields_.contains(tag); }
  std::span<const std::byte> raw(uint16_t tag) const { return fields_.at(tag); }

 private:
  explicit Records(std::string_view label) : label_(label) {}
  std::string label_;
  std::map<uint16_t, std::span<const std::byte>> fields_;
};

}  // namespace keel
