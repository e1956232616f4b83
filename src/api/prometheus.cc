#include "api/prometheus.h"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

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

// A latency histogram found in a device's counters.
struct Histogram {
  std::vector<std::pair<double, uint64_t>> buckets;  // (upper bound in us, cumulative)
  uint64_t inf = 0;  // every sample
  uint64_t sum_us = 0;
  uint64_t count = 0;
};

constexpr std::string_view kBucketInfix = "_bucket_le_";

// The histograms in counters by NAME, and the counter names they take.
std::map<std::string, Histogram> histograms_in(const nlohmann::json& counters,
                                               std::set<std::string>* taken = nullptr) {
  std::map<std::string, Histogram> found;
  if (!counters.is_object()) return found;
  for (const auto& [key, value] : counters.items()) {
    size_t at = key.rfind(kBucketInfix);
    if (at == std::string::npos || at == 0 || !value.is_number_unsigned()) continue;
    std::string name = key.substr(0, at);
    std::string bound = key.substr(at + kBucketInfix.size());
    Histogram& histogram = found[name];
    if (bound == "inf") {
      histogram.inf = value.get<uint64_t>();
    } else {
      char* end = nullptr;
      double micros = std::strtod(bound.c_str(), &end);
      if (bound.empty() || end != bound.c_str() + bound.size()) continue;
      histogram.buckets.emplace_back(micros, value.get<uint64_t>());
    }
  }
  for (auto& [name, histogram] : found) {
    std::sort(histogram.buckets.begin(), histogram.buckets.end());
    histogram.sum_us = counters.value(name + "_sum_us", uint64_t{0});
    histogram.count = counters.value(name + "_count", histogram.inf);
    if (taken != nullptr) {
      for (const auto& [key, value] : counters.items()) {
        if (key.starts_with(name + std::string(kBucketInfix)) || key == name + "_sum_us" ||
            key == name + "_count") {
          taken->insert(key);
        }
      }
    }
  }
  return found;
}

double quantile_us(const Histogram& histogram, double q) {
  if (histogram.inf == 0) return 0;
  const double rank = q * static_cast<double>(histogram.inf);
  double lower = 0;
  uint64_t below = 0;
  for (const auto& [bound, cumulative] : histogram.buckets) {
    if (static_cast<double>(cumulative) >= rank && cumulative > below) {
      double within = (rank - static_cast<double>(below)) / static_cast<double>(cumulative - below);
      return lower + (bound - lower) * within;
    }
    lower = bound;
    below = cumulative;
  }
  return lower;  // in +Inf: the last finite bound
}

std::string seconds_name(const std::string& name) {
  std::string base = name.ends_with("_us") ? name.substr(0, name.size() - 3) : name;
  return fmt::format("keel_virtio_{}_seconds", base);
}

}  // namespace

nlohmann::json latency_summaries(const nlohmann::json& counters) {
  nlohmann::json summaries = nlohmann::json::object();
  for (const auto& [name, histogram] : histograms_in(counters)) {
    double mean = histogram.count == 0 ? 0.0
                                       : static_cast<double>(histogram.sum_us) /
                                             static_cast<double>(histogram.count);
    summaries[name] = {{"count", histogram.count},
                       {"mean_us", mean},
                       {"p50_us", quantile_us(histogram, 0.5)},
                       {"p99_us", quantile_us(histogram, 0.99)}};
  }
  return summaries;
}

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
    std::map<std::string, std::string> histogram_families;
    for (const nlohmann::json& device : metrics["devices"]) {
      if (!device.contains("counters") || !device["counters"].is_object()) continue;
      const std::string labels =
          fmt::format("device=\"{}\",address=\"{}\"", label_value(device.value("type", "")),
                      label_value(device.value("address", "")));
      std::set<std::string> taken;
      for (const auto& [name, histogram] : histograms_in(device["counters"], &taken)) {
        if (!plain_name(name)) continue;
        const std::string family_name = seconds_name(name);
        std::string& samples = histogram_families[family_name];
        for (const auto& [bound, cumulative] : histogram.buckets) {
          samples += fmt::format("{}_bucket{{{},le=\"{}\"}} {}\n", family_name, labels,
                                 bound / 1e6, cumulative);
        }
        samples += fmt::format("{}_bucket{{{},le=\"+Inf\"}} {}\n", family_name, labels,
                               histogram.inf);
        samples += fmt::format("{}_sum{{{}}} {}\n", family_name, labels,
                               static_cast<double>(histogram.sum_us) / 1e6);
        samples += fmt::format("{}_count{{{}}} {}\n", family_name, labels, histogram.count);
      }
      for (const auto& [name, value] : device["counters"].items()) {
        if (taken.contains(name)) continue;
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
    for (const auto& [name, samples] : histogram_families) {
      family(out, name, "histogram", "Virtio device service time in seconds, by device.");
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
