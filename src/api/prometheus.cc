#include "api/prometheus.h"

#include <map>
#include <string>

#include <fmt/format.h>

namespace keel::api {
namespace {

void family(std::string& out, std::string_view name, std::string_view type, std::string_view help) {
  out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

// Label values are our own words, but escape as the format says anyway.
std::string label_value(std::string_view text) {
  std::string escaped;
  for (char c : text) {
    if (c == '\\' || c == '"') escaped += '\\';
    if (c == '\n') {
      escaped += "\\n";
      continue;
    }
    escaped += c;
  }
  return escaped;
}

// A counter name that can go into a metric name as it is.
bool plain_name(std::string_view name) {
  if (name.empty()) return false;
  for (char c : name) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) return false;
  }
  return true;
}

}  // namespace

std::string prometheus_text(const nlohmann::json& metrics) {
  std::string out;
  if (metrics.contains("vcpus") && metrics["vcpus"].is_array()) {
    family(out, "keel_vcpu_exits_total", "counter",
           "Exits from KVM_RUN to keel-vmm, by vCPU and reason.");
    for (const nlohmann::json& vcpu : metrics["vcpus"]) {
      if (!vcpu.contains("exits") || !vcpu["exits"].is_object()) continue;
      uint64_t index = vcpu.value("index", uint64_t{0});
      for (const auto& [reason, count] : vcpu["exits"].items()) {
        out += fmt::format("keel_vcpu_exits_total{{vcpu=\"{}\",reason=\"{}\"}} {}\n", index,
                           label_value(reason), count.get<uint64_t>());
      }
    }
  }
  if (metrics.contains("devices") && metrics["devices"].is_array()) {
    // One family per counter name (keel_virtio_read_bytes_total, ...), each
    // sample labelled with the device and its PCI address.
    std::map<std::string, std::string> families;
    for (const nlohmann::json& device : metrics["devices"]) {
      if (!device.contains("counters") || !device["counters"].is_object()) continue;
      const std::string labels =
          fmt::format("device=\"{}\",address=\"{}\"", label_value(device.value("type", "")),
                      label_value(device.value("address", "")));
      for (const auto& [name, value] : device["counters"].items()) {
        if (!plain_name(name) || !value.is_number_unsigned()) continue;
        families[name] += fmt::format("keel_virtio_{}_total{{{}}} {}\n", name, labels,
                                      value.get<uint64_t>());
      }
    }
    for (const auto& [name, samples] : families) {
      family(out, fmt::format("keel_virtio_{}_total", name), "counter",
             fmt::format("Virtio device counter {}, by device.", name));
      out += samples;
    }
  }
  if (metrics.contains("memory") && metrics["memory"].is_object()) {
    const nlohmann::json& memory = metrics["memory"];
    if (memory.contains("guest_bytes")) {
      family(out, "keel_guest_memory_bytes", "gauge", "Guest RAM size.");
      out += fmt::format("keel_guest_memory_bytes {}\n", memory["guest_bytes"].get<uint64_t>());
    }
    if (memory.contains("resident_bytes")) {
      family(out, "keel_process_resident_memory_bytes", "gauge",
             "Resident memory of the keel-vmm process, guest RAM it touched included.");
      out += fmt::format("keel_process_resident_memory_bytes {}\n",
                         memory["resident_bytes"].get<uint64_t>());
    }
  }
  if (metrics.contains("state") && metrics["state"].is_string()) {
    family(out, "keel_vm_state", "gauge", "1 for the state the VM is in.");
    std::string state = metrics["state"].get<std::string>();
    for (std::string_view name : {"not-configured", "configured", "running", "paused"}) {
      out += fmt::format("keel_vm_state{{state=\"{}\"}} {}\n", name, state == name ? 1 : 0);
    }
  }
  if (metrics.contains("boot")) {
    family(out, "keel_vm_boots_total", "counter", "Boots of the guest, reboots included.");
    out += fmt::format("keel_vm_boots_total {}\n", metrics["boot"].get<uint64_t>());
  }
  if (metrics.contains("uptime_seconds")) {
    family(out, "keel_vm_uptime_seconds", "gauge", "Seconds since the current boot started.");
    out += fmt::format("keel_vm_uptime_seconds {}\n", metrics["uptime_seconds"].get<double>());
  }
  return out;
}

}  // namespace keel::api
