#include "machine/vm_config.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace keel::machine {
namespace {

using nlohmann::json;

constexpr uint64_t kMinimumMemoryMib = 16;

Result<const json*> member(const json& object, const char* key, json::value_t type,
                           const std::string& source) {
  auto it = object.find(key);
  if (it == object.end()) return static_cast<const json*>(nullptr);
  bool matches = it->type() == type ||
                 (type == json::value_t::number_unsigned && it->is_number_integer());
  if (!matches) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: \"{}\" must be {}, not {}", source, key,
                            type == json::value_t::string           ? "a string"
                            : type == json::value_t::boolean        ? "true or false"
                            : type == json::value_t::number_unsigned ? "a whole number"
                                                                     : "an object",
                            it->type_name()));
  }
  return &*it;
}

Result<uint64_t> whole_number(const json& value, const char* key, const std::string& source) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  return fail(Errc::InvalidArgument,
              fmt::format("{}: \"{}\" must not be negative (got {})", source, key,
                          value.get<int64_t>()));
}

// Errors here are the user's to fix, so they carry no errno: main reports
// them as configuration errors (exit status 2).
Result<void> check_readable_file(const char* field, const std::string& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) {
    return fail(Errc::NotFound, fmt::format("{}: cannot open '{}': {}", field, path,
                                            std::strerror(errno)));
  }
  if (!S_ISREG(info.st_mode)) {
    return fail(Errc::InvalidArgument, fmt::format("{}: '{}' is not a regular file", field, path));
  }
  if (::access(path.c_str(), R_OK) != 0) {
    return fail(Errc::PermissionDenied, fmt::format("{}: cannot read '{}': {}", field, path,
                                                    std::strerror(errno)));
  }
  return ok();
}

}  // namespace

Result<SerialConfig> parse_serial(const std::string& text) {
  if (text == "stdio") return SerialConfig{SerialConfig::Kind::Stdio, ""};
  if (text == "none") return SerialConfig{SerialConfig::Kind::None, ""};
  auto with_path = [&](std::string_view prefix, SerialConfig::Kind kind) -> Result<SerialConfig> {
    std::string path = text.substr(prefix.size());
    if (path.empty()) {
      return fail(Errc::InvalidArgument, fmt::format("serial '{}': the path is empty", text));
    }
    return SerialConfig{kind, path};
  };
  if (text.starts_with("file:")) return with_path("file:", SerialConfig::Kind::File);
  if (text.starts_with("unix:")) return with_path("unix:", SerialConfig::Kind::Unix);
  return fail(Errc::InvalidArgument,
              fmt::format("serial '{}': expected stdio, none, file:PATH or unix:PATH", text));
}

Result<void> merge_json(const std::string& json_text, const std::string& source,
                        VmConfig& config) {
  json document = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (document.is_discarded()) {
    // Parse again with exceptions only to learn where the syntax error is.
    try {
      json unused = json::parse(json_text);
      (void)unused;
    } catch (const json::parse_error& error) {
      return fail(Errc::InvalidArgument, fmt::format("{}: not valid JSON: {}", source, error.what()));
    }
    return fail(Errc::InvalidArgument, fmt::format("{}: not valid JSON", source));
  }
  if (!document.is_object()) {
    return fail(Errc::InvalidArgument, fmt::format("{}: the top level must be an object", source));
  }
  static const char* const kKnownKeys[] = {"kernel", "initrd",     "cmdline", "cpus", "memory_mib",
                                           "serial", "reboot",     "debug_exit", "acpi"};
  for (const auto& [key, value] : document.items()) {
    if (std::find_if(std::begin(kKnownKeys), std::end(kKnownKeys),
                     [&key](const char* known) { return key == known; }) == std::end(kKnownKeys)) {
      return fail(Errc::InvalidArgument,
                  fmt::format("{}: unknown key \"{}\" (known: kernel, initrd, cmdline, cpus, "
                              "memory_mib, serial, reboot, debug_exit, acpi)",
                              source, key));
    }
  }
  using T = json::value_t;
  if (auto v = TRY(member(document, "kernel", T::string, source))) config.kernel = v->get<std::string>();
  if (auto v = TRY(member(document, "initrd", T::string, source))) config.initrd = v->get<std::string>();
  if (auto v = TRY(member(document, "cmdline", T::string, source))) config.cmdline = v->get<std::string>();
  if (auto v = TRY(member(document, "cpus", T::number_unsigned, source))) {
    uint64_t cpus = TRY(whole_number(*v, "cpus", source));
    if (cpus > 4096) {
      return fail(Errc::InvalidArgument, fmt::format("{}: \"cpus\" {} is absurd", source, cpus));
    }
    config.cpus = static_cast<uint32_t>(cpus);
  }
  if (auto v = TRY(member(document, "memory_mib", T::number_unsigned, source))) {
    config.memory_mib = TRY(whole_number(*v, "memory_mib", source));
  }
  if (auto v = TRY(member(document, "serial", T::string, source))) {
    config.serial = TRY_CONTEXT(parse_serial(v->get<std::string>()), source);
  }
  if (auto v = TRY(member(document, "reboot", T::boolean, source))) config.reboot = v->get<bool>();
  if (auto v = TRY(member(document, "debug_exit", T::boolean, source))) config.debug_exit = v->get<bool>();
  if (auto v = TRY(member(document, "acpi", T::boolean, source))) config.acpi = v->get<bool>();
  return ok();
}

Result<void> validate(const VmConfig& config, uint32_t max_vcpus, uint64_t host_memory_bytes) {
  if (config.kernel.empty()) {
    return fail(Errc::InvalidArgument, "kernel: no kernel given (--kernel PATH or \"kernel\")");
  }
  TRY(check_readable_file("kernel", config.kernel));
  if (!config.initrd.empty()) TRY(check_readable_file("initrd", config.initrd));
  if (config.cpus == 0) return fail(Errc::InvalidArgument, "cpus: must be at least 1 (got 0)");
  uint32_t limit = std::min<uint32_t>(max_vcpus, 254);  // xAPIC IDs in the MADT
  if (config.cpus > limit) {
    return fail(Errc::InvalidArgument,
                fmt::format("cpus: {} is more than this host's KVM allows ({})", config.cpus, limit));
  }
  if (config.memory_mib < kMinimumMemoryMib) {
    return fail(Errc::InvalidArgument,
                fmt::format("memory: {} MiB is too little (at least {} MiB)", config.memory_mib,
                            kMinimumMemoryMib));
  }
  if (config.memory_mib > (host_memory_bytes >> 20)) {
    return fail(Errc::InvalidArgument,
                fmt::format("memory: {} MiB is more than this host has ({} MiB)", config.memory_mib,
                            host_memory_bytes >> 20));
  }
  return ok();
}

std::string to_json(const VmConfig& config) {
  json document;
  document["kernel"] = config.kernel;
  document["initrd"] = config.initrd;
  document["cmdline"] = config.cmdline;
  document["cpus"] = config.cpus;
  document["memory_mib"] = config.memory_mib;
  switch (config.serial.kind) {
    case SerialConfig::Kind::Stdio: document["serial"] = "stdio"; break;
    case SerialConfig::Kind::None: document["serial"] = "none"; break;
    case SerialConfig::Kind::File: document["serial"] = "file:" + config.serial.path; break;
    case SerialConfig::Kind::Unix: document["serial"] = "unix:" + config.serial.path; break;
  }
  document["reboot"] = config.reboot;
  document["debug_exit"] = config.debug_exit;
  document["acpi"] = config.acpi;
  return document.dump(2);
}

}  // namespace keel::machine
