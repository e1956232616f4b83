#include "machine/vm_config.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace keel::machine {
namespace {

using nlohmann::json;

constexpr uint64_t kMinimumMemoryMib = 16;

constexpr std::array<std::string_view, 17> kJsonKeys = {
    "kernel",  "initrd", "cmdline", "cpus", "memory_mib", "memory_backend",
    "serial",  "reboot", "debug_exit", "acpi", "disks",   "nets",
    "rng",     "virtio_console", "balloon", "vsock", "slots"};

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
                            : type == json::value_t::array          ? "an array"
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

// key=value pairs in order, from "a=1,b=2" or from a JSON object.
using KeyValues = std::vector<std::pair<std::string, std::string>>;

Result<KeyValues> split_key_values(const std::string& text, const std::string& what) {
  KeyValues pairs;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    std::string item = text.substr(start, end - start);
    start = end + 1;
    if (item.empty()) continue;
    size_t equals = item.find('=');
    if (equals == std::string::npos || equals == 0) {
      return fail(Errc::InvalidArgument,
                  fmt::format("{}: '{}' is not key=value (in '{}')", what, item, text));
    }
    pairs.emplace_back(item.substr(0, equals), item.substr(equals + 1));
  }
  return pairs;
}

Result<KeyValues> key_values_from_json(const json& object, const std::string& what) {
  if (!object.is_object()) {
    return fail(Errc::InvalidArgument, fmt::format("{}: must be an object", what));
  }
  KeyValues pairs;
  for (const auto& [key, value] : object.items()) {
    if (value.is_string()) {
      pairs.emplace_back(key, value.get<std::string>());
    } else if (value.is_boolean()) {
      pairs.emplace_back(key, value.get<bool>() ? "on" : "off");
    } else if (value.is_number_unsigned()) {
      pairs.emplace_back(key, std::to_string(value.get<uint64_t>()));
    } else {
      return fail(Errc::InvalidArgument,
                  fmt::format("{}: \"{}\" must be a string, a boolean or a whole number, not {}",
                              what, key, value.type_name()));
    }
  }
  return pairs;
}

Result<bool> parse_switch(const std::string& value, const std::string& what, const std::string& key) {
  if (value == "on" || value == "true" || value == "yes" || value == "1") return true;
  if (value == "off" || value == "false" || value == "no" || value == "0") return false;
  return fail(Errc::InvalidArgument,
              fmt::format("{}: {}='{}' must be on or off", what, key, value));
}

Result<uint64_t> parse_number(const std::string& value, const std::string& what,
                              const std::string& key, uint64_t max) {
  uint64_t number = 0;
  if (value.empty() || value.size() > 19 ||
      value.find_first_not_of("0123456789") != std::string::npos) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: {}='{}' must be a whole number", what, key, value));
  }
  number = std::stoull(value);
  if (number > max) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: {}={} is more than {}", what, key, number, max));
  }
  return number;
}

Failure unknown_key(const std::string& what, const std::string& key, const char* known) {
  return fail(Errc::InvalidArgument,
              fmt::format("{}: unknown key '{}' (known: {})", what, key, known));
}

// A PCI slot a device may be given (see kFirstDeviceSlot).
Result<uint8_t> parse_slot(const std::string& value, const std::string& what,
                           const std::string& key) {
  uint64_t slot = TRY(parse_number(value, what, key, kLastDeviceSlot));
  if (slot < kFirstDeviceSlot) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: {}={} is the PCI host bridge's (devices take {}-{})", what, key,
                            slot, kFirstDeviceSlot, kLastDeviceSlot));
  }
  return static_cast<uint8_t>(slot);
}

// The same rule as the control API's hotplug ids, so either can name any.
Result<std::string> parse_id(const std::string& value, const std::string& what) {
  constexpr size_t kMaxIdBytes = 32;
  bool valid = !value.empty() && value.size() <= kMaxIdBytes;
  for (char c : value) {
    valid = valid && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                      (c >= '0' && c <= '9') || c == '_' || c == '-');
  }
  if (!valid) {
    return fail(Errc::InvalidArgument,
                fmt::format("{}: id='{}' is not 1-{} letters, digits, '_' or '-'", what, value,
                            kMaxIdBytes));
  }
  return value;
}

Result<DiskConfig> disk_from(const KeyValues& pairs, const std::string& what) {
  DiskConfig disk;
  for (const auto& [key, value] : pairs) {
    if (key == "path") {
      disk.path = value;
    } else if (key == "readonly") {
      disk.read_only = TRY(parse_switch(value, what, key));
    } else if (key == "serial") {
      if (value.size() > 20) {
        return fail(Errc::InvalidArgument,
                    fmt::format("{}: serial='{}' is longer than 20 bytes", what, value));
      }
      disk.serial = value;
    } else if (key == "format") {
      if (value != "auto" && value != "raw" && value != "qcow2") {
        return fail(Errc::InvalidArgument,
                    fmt::format("{}: format='{}' must be auto, raw or qcow2", what, value));
      }
      disk.format = value;
    } else if (key == "id") {
      disk.id = TRY(parse_id(value, what));
    } else if (key == "slot") {
      disk.slot = TRY(parse_slot(value, what, key));
    } else {
      return unknown_key(what, key, "path, readonly, serial, format, id, slot");
    }
  }
  if (disk.path.empty()) return fail(Errc::InvalidArgument, fmt::format("{}: path= is missing", what));
  return disk;
}

Result<NetConfig> net_from(const KeyValues& pairs, const std::string& what) {
  NetConfig net;
  for (const auto& [key, value] : pairs) {
    if (key == "tap") {
      // IFNAMSIZ is 16 with the terminating NUL.
      if (value.empty() || value.size() > 15 || value.find('/') != std::string::npos) {
        return fail(Errc::InvalidArgument,
                    fmt::format("{}: tap='{}' is not a valid interface name (1-15 bytes)", what,
                                value));
      }
      net.tap = value;
    } else if (key == "mac") {
      net.mac = value;
    } else if (key == "mtu") {
      net.mtu = static_cast<uint32_t>(TRY(parse_number(value, what, key, 65535)));
      if (net.mtu < 68) {
        return fail(Errc::InvalidArgument, fmt::format("{}: mtu={} is below 68", what, net.mtu));
      }
    } else if (key == "bridge") {
      net.bridge = value;
    } else if (key == "id") {
      net.id = TRY(parse_id(value, what));
    } else if (key == "slot") {
      net.slot = TRY(parse_slot(value, what, key));
    } else {
      return unknown_key(what, key, "tap, mac, mtu, bridge, id, slot");
    }
  }
  if (net.tap.empty()) return fail(Errc::InvalidArgument, fmt::format("{}: tap= is missing", what));
  return net;
}

Result<BalloonConfig> balloon_from(const KeyValues& pairs, const std::string& what) {
  BalloonConfig balloon;
  for (const auto& [key, value] : pairs) {
    if (key == "target-mib" || key == "target_mib") {
      balloon.target_mib = TRY(parse_number(value, what, key, uint64_t{1} << 40));
    } else if (key == "deflate-on-oom" || key == "deflate_on_oom") {
      balloon.deflate_on_oom = TRY(parse_switch(value, what, key));
    } else if (key == "free-page-reporting" || key == "free_page_reporting") {
      balloon.free_page_reporting = TRY(parse_switch(value, what, key));
    } else if (key == "stats-period" || key == "stats_period_s") {
      balloon.stats_period_s = static_cast<uint32_t>(TRY(parse_number(value, what, key, 86400)));
    } else {
      return unknown_key(what, key, "target-mib, deflate-on-oom, free-page-reporting, stats-period");
    }
  }
  return balloon;
}

Result<VsockConfig> vsock_from(const KeyValues& pairs, const std::string& what) {
  VsockConfig vsock;
  bool have_cid = false;
  for (const auto& [key, value] : pairs) {
    if (key == "cid") {
      vsock.cid = TRY(parse_number(value, what, key, 0xffffffffull - 1));
      have_cid = true;
    } else if (key == "socket") {
      vsock.socket = value;
    } else {
      return unknown_key(what, key, "cid, socket");
    }
  }
  // CIDs 0-2 are the hypervisor, local and host (virtio 1.2 §5.10.4).
  if (have_cid && vsock.cid < 3) {
    return fail(Errc::InvalidArgument, fmt::format("{}: cid={} is reserved (use 3 or more)", what,
                                                   vsock.cid));
  }
  if (vsock.socket.empty()) {
    return fail(Errc::InvalidArgument, fmt::format("{}: socket= is missing", what));
  }
  return vsock;
}

Result<DeviceSlots> slots_from(const KeyValues& pairs, const std::string& what) {
  DeviceSlots slots;
  for (const auto& [key, value] : pairs) {
    if (key == "rng") {
      slots.rng = TRY(parse_slot(value, what, key));
    } else if (key == "virtio_console") {
      slots.virtio_console = TRY(parse_slot(value, what, key));
    } else if (key == "balloon") {
      slots.balloon = TRY(parse_slot(value, what, key));
    } else if (key == "vsock") {
      slots.vsock = TRY(parse_slot(value, what, key));
    } else {
      return unknown_key(what, key, "rng, virtio_console, balloon, vsock");
    }
  }
  return slots;
}

std::string serial_text(const SerialConfig& serial) {
  switch (serial.kind) {
    case SerialConfig::Kind::Stdio: return "stdio";
    case SerialConfig::Kind::None: return "none";
    case SerialConfig::Kind::File: return "file:" + serial.path;
    case SerialConfig::Kind::Unix: return "unix:" + serial.path;
  }
  return "none";
}

}  // namespace

Result<memory::MemoryBackend> parse_memory_backend(const std::string& text) {
  if (text == "anon") return memory::MemoryBackend::Anonymous;
  if (text == "memfd") return memory::MemoryBackend::Memfd;
  return fail(Errc::InvalidArgument,
              fmt::format("memory_backend '{}': expected anon or memfd", text));
}

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

Result<DiskConfig> parse_disk(const std::string& text) {
  return disk_from(TRY(split_key_values(text, "--disk")), "--disk");
}
Result<NetConfig> parse_net(const std::string& text) {
  return net_from(TRY(split_key_values(text, "--net")), "--net");
}
Result<BalloonConfig> parse_balloon(const std::string& text) {
  return balloon_from(TRY(split_key_values(text == "on" ? "" : text, "--balloon")), "--balloon");
}
Result<VsockConfig> parse_vsock(const std::string& text) {
  return vsock_from(TRY(split_key_values(text, "--vsock")), "--vsock");
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
  for (const auto& [key, value] : document.items()) {
    if (std::find(kJsonKeys.begin(), kJsonKeys.end(), key) == kJsonKeys.end()) {
      return fail(Errc::InvalidArgument,
                  fmt::format("{}: unknown key \"{}\" (known: kernel, initrd, cmdline, cpus, "
                              "memory_mib, memory_backend, serial, reboot, debug_exit, acpi, disks, nets, rng, "
                              "virtio_console, "
                              "balloon, vsock, slots)",
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
  if (auto v = TRY(member(document, "memory_backend", T::string, source))) {
    config.memory_backend = TRY_CONTEXT(parse_memory_backend(v->get<std::string>()), source);
  }
  if (auto v = TRY(member(document, "serial", T::string, source))) {
    config.serial = TRY_CONTEXT(parse_serial(v->get<std::string>()), source);
  }
  if (auto v = TRY(member(document, "reboot", T::boolean, source))) config.reboot = v->get<bool>();
  if (auto v = TRY(member(document, "debug_exit", T::boolean, source))) config.debug_exit = v->get<bool>();
  if (auto v = TRY(member(document, "acpi", T::boolean, source))) config.acpi = v->get<bool>();
  if (auto v = TRY(member(document, "disks", T::array, source))) {
    config.disks.clear();
    for (size_t i = 0; i < v->size(); ++i) {
      const std::string what = fmt::format("{}: disks[{}]", source, i);
      config.disks.push_back(TRY(disk_from(TRY(key_values_from_json((*v)[i], what)), what)));
    }
  }
  if (auto v = TRY(member(document, "nets", T::array, source))) {
    config.nets.clear();
    for (size_t i = 0; i < v->size(); ++i) {
      const std::string what = fmt::format("{}: nets[{}]", source, i);
      config.nets.push_back(TRY(net_from(TRY(key_values_from_json((*v)[i], what)), what)));
    }
  }
  if (auto v = TRY(member(document, "rng", T::boolean, source))) config.rng = v->get<bool>();
  if (auto v = TRY(member(document, "virtio_console", T::string, source))) {
    config.virtio_console = TRY_CONTEXT(parse_serial(v->get<std::string>()), source);
  }
  if (auto v = TRY(member(document, "balloon", T::object, source))) {
    const std::string what = source + ": balloon";
    config.balloon = TRY(balloon_from(TRY(key_values_from_json(*v, what)), what));
  }
  if (auto v = TRY(member(document, "vsock", T::object, source))) {
    const std::string what = source + ": vsock";
    config.vsock = TRY(vsock_from(TRY(key_values_from_json(*v, what)), what));
  }
  if (auto v = TRY(member(document, "slots", T::object, source))) {
    const std::string what = source + ": slots";
    config.slots = TRY(slots_from(TRY(key_values_from_json(*v, what)), what));
  }
  return ok();
}

std::string disk_id(const VmConfig& config, size_t index) {
  const std::string& id = index < config.disks.size() ? config.disks[index].id : std::string();
  return id.empty() ? fmt::format("disk{}", index) : id;
}

std::string net_id(const VmConfig& config, size_t index) {
  const std::string& id = index < config.nets.size() ? config.nets[index].id : std::string();
  return id.empty() ? fmt::format("net{}", index) : id;
}

Result<void> check_device_slots(const VmConfig& config) {
  // Which field holds each slot, for the error naming both.
  std::array<std::string, kLastDeviceSlot + 1> holders;
  auto take = [&holders](std::optional<uint8_t> slot, const std::string& field) -> Result<void> {
    if (!slot) return ok();
    if (*slot < kFirstDeviceSlot || *slot > kLastDeviceSlot) {
      return fail(Errc::InvalidArgument, fmt::format("{}: slot {} is not one of {}-{}", field,
                                                     *slot, kFirstDeviceSlot, kLastDeviceSlot));
    }
    if (!holders[*slot].empty()) {
      return fail(Errc::InvalidArgument, fmt::format("{}: slot {} is {}'s too", field, *slot,
                                                     holders[*slot]));
    }
    holders[*slot] = field;
    return ok();
  };
  auto unique_ids = [](const std::vector<std::string>& ids, const char* list) -> Result<void> {
    for (size_t i = 0; i < ids.size(); ++i) {
      for (size_t j = 0; j < i; ++j) {
        if (ids[i] == ids[j]) {
          return fail(Errc::InvalidArgument, fmt::format("{}[{}].id: '{}' is {}[{}]'s too", list,
                                                         i, ids[i], list, j));
        }
      }
    }
    return ok();
  };
  std::vector<std::string> ids;
  for (size_t i = 0; i < config.disks.size(); ++i) {
    TRY(take(config.disks[i].slot, fmt::format("disks[{}].slot", i)));
    ids.push_back(disk_id(config, i));
  }
  TRY(unique_ids(ids, "disks"));
  ids.clear();
  for (size_t i = 0; i < config.nets.size(); ++i) {
    TRY(take(config.nets[i].slot, fmt::format("nets[{}].slot", i)));
    ids.push_back(net_id(config, i));
  }
  TRY(unique_ids(ids, "nets"));
  // A slot for a device the config does not have is a mistake to report,
  // not to ignore.
  auto single = [&take](std::optional<uint8_t> slot, bool present,
                        const char* field) -> Result<void> {
    if (slot && !present) {
      return fail(Errc::InvalidArgument,
                  fmt::format("slots.{}: slot {} given, but there is no {}", field, *slot, field));
    }
    return take(slot, fmt::format("slots.{}", field));
  };
  TRY(single(config.slots.rng, config.rng, "rng"));
  TRY(single(config.slots.virtio_console, config.virtio_console.has_value(), "virtio_console"));
  TRY(single(config.slots.balloon, config.balloon.has_value(), "balloon"));
  TRY(single(config.slots.vsock, config.vsock.has_value(), "vsock"));
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
  for (size_t i = 0; i < config.disks.size(); ++i) {
    const std::string field = fmt::format("disks[{}] ({})", i, config.disks[i].path);
    if (::access(config.disks[i].path.c_str(), config.disks[i].read_only ? R_OK : R_OK | W_OK) != 0) {
      return fail(Errc::NotFound, fmt::format("{}: cannot open for {}: {}", field,
                                              config.disks[i].read_only ? "reading" : "writing",
                                              std::strerror(errno)));
    }
  }
  TRY(check_device_slots(config));
  int stdio_users = (config.serial.kind == SerialConfig::Kind::Stdio) +
                    (config.virtio_console && config.virtio_console->kind == SerialConfig::Kind::Stdio);
  if (stdio_users > 1) {
    return fail(Errc::InvalidArgument,
                "virtio_console: stdio is already the serial console (use --serial none)");
  }
  if (config.memory_mib < kMinimumMemoryMib) {
    return fail(Errc::InvalidArgument,
                fmt::format("memory_mib: {} MiB is too little (at least {} MiB)", config.memory_mib,
                            kMinimumMemoryMib));
  }
  if (config.memory_mib > (host_memory_bytes >> 20)) {
    return fail(Errc::InvalidArgument,
                fmt::format("memory_mib: {} MiB is more than this host has ({} MiB)", config.memory_mib,
                            host_memory_bytes >> 20));
  }
  return ok();
}

std::span<const std::string_view> json_keys() { return kJsonKeys; }

Result<VmConfig> config_from_json(const std::string& json_text, uint32_t max_vcpus,
                                  uint64_t host_memory_bytes) {
  json document = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (document.is_discarded()) return fail(Errc::InvalidArgument, "body: not valid JSON");
  if (!document.is_object()) {
    return fail(Errc::InvalidArgument, "body: the configuration must be a JSON object");
  }
  // One key at a time, with the key as the source, so that every error
  // starts with the key at fault.
  VmConfig config;
  for (const auto& [key, value] : document.items()) {
    TRY(merge_json(json{{key, value}}.dump(), key, config));
  }
  // A missing or unreadable file is still a bad request (400), not a
  // missing route.
  if (Result<void> valid = validate(config, max_vcpus, host_memory_bytes); !valid) {
    return fail(Errc::InvalidArgument, valid.error().context());
  }
  return config;
}

std::string to_json(const VmConfig& config) {
  json document;
  document["kernel"] = config.kernel;
  document["initrd"] = config.initrd;
  document["cmdline"] = config.cmdline;
  document["cpus"] = config.cpus;
  document["memory_mib"] = config.memory_mib;
  document["memory_backend"] = memory::memory_backend_name(config.memory_backend);
  document["serial"] = serial_text(config.serial);
  document["reboot"] = config.reboot;
  document["debug_exit"] = config.debug_exit;
  document["acpi"] = config.acpi;
  document["disks"] = json::array();
  // id and slot only where set: a config without them prints as before.
  for (const DiskConfig& disk : config.disks) {
    json entry = {{"path", disk.path},
                  {"readonly", disk.read_only},
                  {"serial", disk.serial},
                  {"format", disk.format}};
    if (!disk.id.empty()) entry["id"] = disk.id;
    if (disk.slot) entry["slot"] = *disk.slot;
    document["disks"].push_back(std::move(entry));
  }
  document["nets"] = json::array();
  for (const NetConfig& net : config.nets) {
    json entry = {{"tap", net.tap}, {"mac", net.mac}, {"mtu", net.mtu}, {"bridge", net.bridge}};
    if (!net.id.empty()) entry["id"] = net.id;
    if (net.slot) entry["slot"] = *net.slot;
    document["nets"].push_back(std::move(entry));
  }
  document["rng"] = config.rng;
  if (config.virtio_console) document["virtio_console"] = serial_text(*config.virtio_console);
  if (config.balloon) {
    document["balloon"] = {{"target_mib", config.balloon->target_mib},
                           {"deflate_on_oom", config.balloon->deflate_on_oom},
                           {"free_page_reporting", config.balloon->free_page_reporting},
                           {"stats_period_s", config.balloon->stats_period_s}};
  }
  if (config.vsock) {
    document["vsock"] = {{"cid", config.vsock->cid}, {"socket", config.vsock->socket}};
  }
  json slots = json::object();
  if (config.slots.rng) slots["rng"] = *config.slots.rng;
  if (config.slots.virtio_console) slots["virtio_console"] = *config.slots.virtio_console;
  if (config.slots.balloon) slots["balloon"] = *config.slots.balloon;
  if (config.slots.vsock) slots["vsock"] = *config.slots.vsock;
  if (!slots.empty()) document["slots"] = std::move(slots);
  return document.dump(2);
}

}  // namespace keel::machine
