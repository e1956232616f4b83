// VmConfig: everything that defines a VM, from the command line or a JSON
// file (docs/vm-config.md documents the schema). Validation names the field
// and the value, so `keel-vmm` can say exactly what is wrong.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "base/result.h"

namespace keel::machine {

struct SerialConfig {
  enum class Kind { Stdio, File, Unix, None };
  Kind kind = Kind::Stdio;
  std::string path;  // File and Unix
};

struct VmConfig {
  std::string kernel;
  std::string initrd;
  std::string cmdline = "console=ttyS0 reboot=k panic=-1";
  uint32_t cpus = 1;
  uint64_t memory_mib = 512;
  SerialConfig serial;
  bool reboot = true;        // false: a guest reboot ends keel-vmm (exit status 3)
  bool debug_exit = false;   // map the test-exit port 0xf4
  bool acpi = true;
};

// "stdio", "none", "file:PATH" or "unix:PATH".
Result<SerialConfig> parse_serial(const std::string& text);

// Parses a JSON document into config, overriding only the keys present.
// Unknown keys, wrong types and impossible values are errors naming the key.
Result<void> merge_json(const std::string& json_text, const std::string& source, VmConfig& config);

// Checks the whole config against this host (CPU and memory limits, files).
Result<void> validate(const VmConfig& config, uint32_t max_vcpus, uint64_t host_memory_bytes);

std::string to_json(const VmConfig& config);

}  // namespace keel::machine
