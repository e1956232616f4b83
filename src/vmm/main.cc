// keel-vmm: one process per VM. Parses the VM's configuration (flags or a
// JSON file), builds the Machine, runs it, and maps how it stopped to the
// process's exit status.
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "api/command_queue.h"
#include "api/event_log.h"
#include "api/server.h"
#include "base/log.h"
#include "kvm/kvm.h"
#include "machine/machine.h"
#include "machine/migration.h"
#include "migration/snapshot.h"
#include "migration/transport.h"
#include "vmm/console.h"
#include "vmm/control.h"

namespace keel::vmm {
namespace {

constexpr int kExitPowerOff = 0;
constexpr int kExitFailure = 1;
constexpr int kExitBadConfig = 2;
constexpr int kExitRebootRefused = 3;
constexpr int kExitGuestPanic = 4;
constexpr uint32_t kMaxXapicVcpus = 254;

constexpr const char* kFooter = R"(
Exit status:
  0  the guest powered off, keel-vmm was stopped by SIGTERM/SIGINT, or the VM
     was migrated to another keel-vmm (PUT /api/v1/vm/migrate)
  1  the VM failed (triple fault, KVM error, unhandled exit); registers are printed
  2  the configuration is invalid (the message names the field)
  3  the guest rebooted and --no-reboot was given
  4  the guest panicked (reported through pvpanic; the VM is stopped, not rebooted)
  N  with --debug-exit, the byte a test guest wrote to port 0xf4

API: with --api-socket and neither --kernel nor --config, keel-vmm waits for
the VM's configuration (PUT /api/v1/vm/config, keelctl vm create) and
PUT /api/v1/vm/start (keelctl vm start); or for PUT /api/v1/vm/restore
(keelctl vm restore: the machine of a snapshot); or, configured, for
PUT /api/v1/vm/receive (keelctl vm receive: an incoming live migration).

Console: with --serial stdio on a terminal, the terminal is in raw mode; type
Ctrl-A x to stop the VM. The JSON config schema is in docs/vm-config.md.)";

void ignore_signal(int) {}

// SIGUSR1 kicks vCPU threads out of KVM_RUN: it needs a handler (not
// SIG_IGN, which would not interrupt the ioctl) and no SA_RESTART.
// SIGTERM/SIGINT/SIGHUP are blocked in every thread and read via signalfd.
Result<Fd> setup_signals() {
  struct sigaction action {};
  action.sa_handler = ignore_signal;
  sigemptyset(&action.sa_mask);
  if (sigaction(SIGUSR1, &action, nullptr) < 0) return fail_errno("sigaction SIGUSR1");
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGHUP);
  if (pthread_sigmask(SIG_BLOCK, &mask, nullptr) != 0) return fail(Errc::Io, "block signals");
  int fd = ::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  if (fd < 0) return fail_errno("signalfd");
  return Fd(fd);
}

Result<std::string> read_text_file(const std::string& path) {
  std::ifstream file(path);
  if (!file) return fail_errno(fmt::format("config: cannot read '{}'", path));
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

uint64_t host_memory_bytes() {
  long pages = ::sysconf(_SC_PHYS_PAGES);
  long page_size = ::sysconf(_SC_PAGESIZE);
  return pages > 0 && page_size > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size)
                                    : 0;
}

// Runs the machine while serving console input and signals on this thread.
// host_stop is set when the host asked the VM to stop (a signal, Ctrl-A x):
// the caller must not reboot then, even if the guest reset at the same time
// and its reason reached the machine first.
machine::StopStatus run_machine(machine::Machine& machine, Console& console,
                                Console* virtio_console, const Fd& signals, ApiControl& control,
                                bool& host_stop) {
  machine::StopStatus status{machine::StopReason::Error, 0, "not run"};
  std::thread runner([&] { status = machine.run(); });
  control.running(machine);
  for (;;) {
    // A negative fd is ignored by poll().
    pollfd fds[5] = {
        {machine.stopped_event().get(), POLLIN, 0},
        {signals.get(), POLLIN, 0},
        {console.input_fd(), POLLIN, 0},
        {virtio_console != nullptr ? virtio_console->input_fd() : -1, POLLIN, 0},
        {control.fd(), POLLIN, 0},
    };
    if (::poll(fds, 5, -1) < 0) {
      if (errno == EINTR) continue;
      machine.stop(machine::StopReason::Error, fmt::format("poll: {}", std::strerror(errno)));
      break;
    }
    if (fds[0].revents) {
      control.stopping(machine);
      break;
    }
    if (fds[4].revents) control.serve(machine, host_stop);
    if (fds[1].revents) {
      signalfd_siginfo info{};
      if (::read(signals.get(), &info, sizeof(info)) == sizeof(info)) {
        LOG_INFO("signal {} received: stopping the VM", info.ssi_signo);
        host_stop = true;
        machine.stop(machine::StopReason::Stopped, fmt::format("signal {}", info.ssi_signo));
      }
    }
    for (int index : {2, 3}) {
      if (fds[index].fd < 0 || fds[index].revents == 0) continue;
      Console& source = index == 2 ? console : *virtio_console;
      bool quit = false;
      Result<std::string> input = source.read_input(quit);
      if (!input) {
        LOG_WARN("{}", input.error().message());
      } else if (!input->empty()) {
        auto bytes = std::as_bytes(std::span(input->data(), input->size()));
        if (index == 2) {
          machine.serial().enqueue_input(bytes);
        } else {
          machine.virtio_console_input(bytes);
        }
      }
      if (quit) {
        host_stop = true;
        machine.stop(machine::StopReason::Stopped, "Ctrl-A x on the console");
      }
    }
  }
  runner.join();
  control.machine_ended();
  return status;
}

// Boot's Machine from config, writing to the consoles (which outlive it).
Result<std::unique_ptr<machine::Machine>> build_machine(const machine::VmConfig& config,
                                                        kvm::Kvm& kvm, Console& console,
                                                        Console* virtio_console) {
  return machine::Machine::create(
      config, kvm, [&console](std::span<const std::byte> bytes) { console.write(bytes); },
      [virtio_console](std::span<const std::byte> bytes) {
        if (virtio_console != nullptr) virtio_console->write(bytes);
      });
}

// keel-vmm --api-socket without --kernel or --config: serves the API on this
// thread until PUT /api/v1/vm/start has built the first Machine (true), or a
// signal or PUT /api/v1/vm/stop ends the wait (false).
bool wait_for_start(ApiControl& control, ApiControl::Setup& setup, const Fd& signals) {
  for (;;) {
    pollfd fds[2] = {{signals.get(), POLLIN, 0}, {control.fd(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      LOG_ERROR("poll: {}", std::strerror(errno));
      return false;
    }
    if (fds[0].revents) {
      signalfd_siginfo info{};
      if (::read(signals.get(), &info, sizeof(info)) == sizeof(info)) {
        LOG_INFO("signal {} received before start: exiting", info.ssi_signo);
        return false;
      }
    }
    if (fds[1].revents) {
      bool host_stop = false;
      control.serve_setup(setup, host_stop);
      if (setup.started) return true;
      if (host_stop) return false;
    }
  }
}

// --incoming: waits for a source's connection and receives the machine.
// Nothing runs until the whole state arrived and was rebuilt.
Result<std::unique_ptr<machine::Machine>> receive_incoming(
    const migration::StreamAddress& address, const Fd& listener, const machine::VmConfig& config,
    const kvm::Kvm& kvm, devices::Serial::Output serial_output,
    std::unique_ptr<machine::PostcopyIncoming>& postcopy) {
  LOG_INFO("waiting for a migration on {}", address.text);
  // No machine runs yet, so no signalfd is watched: let SIGTERM/SIGINT/
  // SIGHUP end the wait (their default action) instead of being ignored.
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGHUP);
  pthread_sigmask(SIG_UNBLOCK, &mask, nullptr);
  Result<Fd> connection = migration::accept_stream(listener, address);
  Result<std::unique_ptr<machine::Machine>> machine =
      connection ? machine::receive_migration(*connection, address.text, config, kvm,
                                              std::move(serial_output), &postcopy)
                 : Result<std::unique_ptr<machine::Machine>>(fail(connection.error()));
  pthread_sigmask(SIG_BLOCK, &mask, nullptr);
  return machine;
}

int run(int argc, char** argv) {
  CLI::App app{
      "keel-vmm: runs one virtual machine on /dev/kvm. Boots a Linux kernel (bzImage or an ELF "
      "vmlinux with a PVH entry) with an optional initrd, a serial console, ACPI, SMP and "
      "virtio devices on PCI (disks, NICs, console, rng, balloon, vsock).",
      "keel-vmm"};
  app.footer(kFooter);
  machine::VmConfig config;
  std::string config_file, serial_text, log_level = "warn";
  std::optional<uint32_t> cpus;
  std::optional<uint64_t> memory_mib;
  std::optional<std::string> memory_backend;
  std::optional<std::string> kernel, initrd, cmdline;
  bool no_reboot = false, debug_exit = false, no_acpi = false, print_config = false, rng = false;
  std::vector<std::string> disk_texts, net_texts;
  std::string virtio_console_text, balloon_text, vsock_text, api_socket;
  app.add_option("--config", config_file, "VM configuration as JSON (docs/vm-config.md); flags given too override it");
  app.add_option("--kernel", kernel, "Linux kernel: a bzImage, or an ELF vmlinux with a PVH entry note");
  app.add_option("--initrd", initrd, "Initial ramdisk (cpio archive, compressed or not)");
  app.add_option("--cmdline", cmdline, "Kernel command line (default: \"" + config.cmdline + "\")");
  app.add_option("--cpus", cpus, "Number of vCPUs (default 1)");
  app.add_option("--memory", memory_mib, "Guest memory in MiB (default 512)");
  app.add_option("--memory-backend", memory_backend,
                 "What guest RAM is: anon (default; private anonymous memory, transparent "
                 "hugepages under the host's default THP setting) or memfd (shareable with "
                 "another process; hugepages only if shmem_enabled allows)");
  app.add_option("--serial", serial_text, "Serial console: stdio (default), none, file:PATH or unix:PATH");
  app.add_option("--disk", disk_texts,
                 "A virtio-blk disk: path=FILE[,readonly=on][,serial=ID][,format=auto|raw|qcow2]; "
                 "repeat for more disks");
  app.add_option("--net", net_texts,
                 "A virtio-net NIC on a tap device: tap=NAME[,mac=52:54:00:..][,mtu=1500]"
                 "[,bridge=BR]; the tap is created if missing; repeat for more NICs");
  app.add_flag("--rng", rng, "Add a virtio-rng device fed by getrandom() (the guest's /dev/hwrng)");
  app.add_option("--virtio-console", virtio_console_text,
                 "Add a virtio console (the guest's hvc0): stdio, none, file:PATH or unix:PATH; "
                 "stdio needs --serial none");
  app.add_option("--balloon", balloon_text,
                 "Add a virtio-balloon: on, or target-mib=N[,deflate-on-oom=on]"
                 "[,free-page-reporting=on][,stats-period=SECONDS]");
  app.add_option("--vsock", vsock_text,
                 "Add a virtio-vsock device: cid=N,socket=PATH (host side is a unix socket proxy, "
                 "see docs/vsock.md)");
  app.add_option("--api-socket", api_socket,
                 "Serve the control API (HTTP/1.1 + JSON, docs/api/openapi.json) on this unix "
                 "socket; keelctl talks to it");
  app.add_flag("--no-reboot", no_reboot, "Exit with status 3 when the guest reboots, instead of rebooting it");
  app.add_flag("--no-acpi", no_acpi, "Do not give the guest ACPI tables");
  app.add_flag("--debug-exit", debug_exit, "Map the test-exit port 0xf4: a byte written there ends the VM with it as exit status");
  app.add_flag("--print-config", print_config, "Print the resulting configuration as JSON and exit");
  std::string restore_path;
  bool restore_paused = false;
  app.add_option("--restore", restore_path,
                 "Go on running the machine a snapshot file holds (PUT /api/v1/vm/snapshot, "
                 "keelctl vm snapshot); the machine comes from the file, so only --serial, "
                 "--no-reboot, --api-socket, --dirty-log, --dirty-ring-entries and --log-level "
                 "may be given with it");
  app.add_flag("--restore-paused", restore_paused,
               "With --restore: hold the vCPUs until PUT /api/v1/vm/resume (default: run at once)");
  std::string incoming_text;
  app.add_option("--incoming", incoming_text,
                 "Receive a live migration on unix:PATH or tcp:HOST:PORT instead of booting: give "
                 "the source's machine flags (--cpus, --memory, devices; host paths may differ); "
                 "the VM runs once the whole state arrived (docs/migration-protocol.md)");
  std::string dirty_log_text = "auto";
  app.add_option("--dirty-log", dirty_log_text,
                 "How live migration learns which pages the guest wrote: ring (KVM's per-vCPU "
                 "dirty ring, see --dirty-ring-entries), bitmap (KVM's per-slot dirty "
                 "bitmap) or auto (default: the ring where KVM has it); fixed when the VM is made")
      ->check(CLI::IsMember({"auto", "ring", "bitmap"}));
  uint32_t dirty_ring_entries = kvm::kDirtyRingEntries;
  app.add_option("--dirty-ring-entries", dirty_ring_entries,
                 fmt::format("Entries of each vCPU's dirty ring (16 bytes of kernel memory each; "
                             "a power of two from {} to {}, default {}): a guest that dirties "
                             "more pages than this between two harvests stops until its vCPU "
                             "thread empties the ring",
                             kvm::kMinDirtyRingEntries, kvm::kMaxDirtyRingEntries,
                             kvm::kDirtyRingEntries))
      ->check([](const std::string& text) -> std::string {
        uint32_t entries = 0;
        const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), entries);
        if (error != std::errc{} || end != text.data() + text.size() ||
            !kvm::valid_dirty_ring_entries(entries)) {
          return fmt::format("--dirty-ring-entries {}: not a power of two from {} to {}", text,
                             kvm::kMinDirtyRingEntries, kvm::kMaxDirtyRingEntries);
        }
        return "";
      });
  app.add_option("--log-level", log_level, "trace, debug, info, warn (default) or error; logs go to stderr");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    int code = app.exit(error);
    return code == 0 ? 0 : kExitBadConfig;
  }

  Result<log::Level> level = log::parse_level(log_level);
  if (!level) {
    std::fprintf(stderr, "keel-vmm: --log-level: %s\n", level.error().message().c_str());
    return kExitBadConfig;
  }
  log::init(*level, "keel-vmm");

  auto config_error = [](const Error& error) {
    std::fprintf(stderr, "keel-vmm: %s\n", error.message().c_str());
    return kExitBadConfig;
  };
  std::optional<migration::Snapshot> snapshot;
  if (!restore_path.empty()) {
    for (const char* name : {"--config", "--kernel", "--initrd", "--cmdline", "--cpus", "--memory",
                             "--memory-backend", "--disk", "--net", "--rng", "--virtio-console", "--balloon", "--vsock",
                             "--no-acpi", "--debug-exit"}) {
      if (app.count(name) > 0) {
        std::fprintf(stderr, "keel-vmm: --restore takes the machine from the snapshot: drop %s\n",
                     name);
        return kExitBadConfig;
      }
    }
    Result<migration::Snapshot> read = migration::read_snapshot(restore_path);
    if (!read) return config_error(Error(read.error()).wrap(fmt::format("--restore '{}'", restore_path)));
    if (Result<void> merged = machine::merge_json(read->machine.config_json, restore_path, config);
        !merged) {
      return config_error(merged.error());
    }
    snapshot = std::move(*read);
  } else if (restore_paused) {
    std::fprintf(stderr, "keel-vmm: --restore-paused needs --restore\n");
    return kExitBadConfig;
  }
  std::optional<migration::StreamAddress> incoming;
  if (!incoming_text.empty()) {
    if (!restore_path.empty()) {
      std::fprintf(stderr, "keel-vmm: --incoming and --restore exclude each other\n");
      return kExitBadConfig;
    }
    Result<migration::StreamAddress> address = migration::parse_stream_address(incoming_text);
    if (!address) return config_error(Error(address.error()).wrap("--incoming"));
    incoming = std::move(*address);
  }
  if (!config_file.empty()) {
    Result<std::string> text = read_text_file(config_file);
    if (!text) return config_error(text.error());
    if (Result<void> merged = machine::merge_json(*text, config_file, config); !merged) {
      return config_error(merged.error());
    }
  }
  if (kernel) config.kernel = *kernel;
  if (initrd) config.initrd = *initrd;
  if (cmdline) config.cmdline = *cmdline;
  if (cpus) config.cpus = *cpus;
  if (memory_mib) config.memory_mib = *memory_mib;
  if (memory_backend) {
    Result<memory::MemoryBackend> backend = machine::parse_memory_backend(*memory_backend);
    if (!backend) return config_error(Error(backend.error()).wrap("--memory-backend"));
    config.memory_backend = *backend;
  }
  if (!serial_text.empty()) {
    Result<machine::SerialConfig> serial = machine::parse_serial(serial_text);
    if (!serial) return config_error(Error(serial.error()).wrap("--serial"));
    config.serial = *serial;
  }
  for (const std::string& text : disk_texts) {
    Result<machine::DiskConfig> disk = machine::parse_disk(text);
    if (!disk) return config_error(disk.error());
    config.disks.push_back(*disk);
  }
  for (const std::string& text : net_texts) {
    Result<machine::NetConfig> net = machine::parse_net(text);
    if (!net) return config_error(net.error());
    config.nets.push_back(*net);
  }
  if (rng) config.rng = true;
  if (!virtio_console_text.empty()) {
    Result<machine::SerialConfig> console = machine::parse_serial(virtio_console_text);
    if (!console) return config_error(Error(console.error()).wrap("--virtio-console"));
    config.virtio_console = *console;
  }
  if (!balloon_text.empty()) {
    Result<machine::BalloonConfig> balloon = machine::parse_balloon(balloon_text);
    if (!balloon) return config_error(balloon.error());
    config.balloon = *balloon;
  }
  if (!vsock_text.empty()) {
    Result<machine::VsockConfig> vsock = machine::parse_vsock(vsock_text);
    if (!vsock) return config_error(vsock.error());
    config.vsock = *vsock;
  }
  if (no_reboot) config.reboot = false;
  if (debug_exit) config.debug_exit = true;
  if (no_acpi) config.acpi = false;
  if (print_config) {
    std::printf("%s\n", machine::to_json(config).c_str());
    return 0;
  }
  // Without a kernel or a config file, the API configures the VM and starts
  // it (PUT /api/v1/vm/config, PUT /api/v1/vm/start); the body is the whole
  // configuration, so flags that would make part of it are refused.
  const bool await_config =
      !api_socket.empty() && !snapshot && !incoming && config_file.empty() && !kernel;
  if (await_config) {
    for (const char* name : {"--initrd", "--cmdline", "--cpus", "--memory", "--serial", "--disk",
                             "--net", "--rng", "--virtio-console", "--balloon", "--vsock",
                             "--no-reboot", "--no-acpi", "--debug-exit"}) {
      if (app.count(name) > 0) {
        std::fprintf(stderr,
                     "keel-vmm: %s needs --kernel or --config; without them the VM is "
                     "configured through the API (PUT /api/v1/vm/config)\n",
                     name);
        return kExitBadConfig;
      }
    }
  }

  // Everything that does not need KVM is checked first, so a bad
  // configuration is reported as such on any host.
  if (Result<void> valid = machine::validate(config, kMaxXapicVcpus, host_memory_bytes());
      !await_config && !valid) {
    return config_error(valid.error());
  }
  Result<kvm::Kvm> kvm = kvm::Kvm::open();
  if (!kvm) {
    std::fprintf(stderr, "keel-vmm: %s\n", kvm.error().message().c_str());
    return kExitFailure;
  }
  kvm->set_dirty_log_mode(dirty_log_text == "ring"     ? kvm::DirtyLogMode::Ring
                          : dirty_log_text == "bitmap" ? kvm::DirtyLogMode::Bitmap
                                                       : kvm::DirtyLogMode::Auto);
  kvm->set_dirty_ring_entries(dirty_ring_entries);
  uint32_t max_vcpus = static_cast<uint32_t>(kvm->check_extension(kvm::Capability::MaxVcpus).value_or(1));
  if (Result<void> valid = machine::validate(config, max_vcpus, host_memory_bytes());
      !await_config && !valid) {
    return config_error(valid.error());
  }

  Result<Fd> signals = setup_signals();
  if (!signals) {
    std::fprintf(stderr, "keel-vmm: %s\n", signals.error().message().c_str());
    return kExitFailure;
  }
  // The consoles outlive every Machine; opened once the config is known.
  std::unique_ptr<Console> console;
  std::unique_ptr<Console> virtio_console;
  auto open_consoles = [&console, &virtio_console](const machine::VmConfig& chosen) -> Result<void> {
    std::unique_ptr<Console> serial = TRY_CONTEXT(Console::open(chosen.serial), "serial");
    std::unique_ptr<Console> virtio;
    if (chosen.virtio_console) {
      virtio = TRY_CONTEXT(Console::open(*chosen.virtio_console), "--virtio-console");
    }
    console = std::move(serial);
    virtio_console = std::move(virtio);
    return ok();
  };
  if (!await_config) {
    if (Result<void> opened = open_consoles(config); !opened) return config_error(opened.error());
  }

  api::EventLog events;
  Result<api::CommandQueue> commands = api::CommandQueue::create();
  if (!commands) {
    std::fprintf(stderr, "keel-vmm: %s\n", commands.error().message().c_str());
    return kExitFailure;
  }
  api::VmStatus vm_status;
  ApiControl control(*commands, events, vm_status);
  std::unique_ptr<api::ApiServer> api_server;
  if (!api_socket.empty()) {
    Result<std::unique_ptr<api::ApiServer>> server = api::ApiServer::start(
        api_socket, *commands, events, api::ServerOptions{.vm_status = &vm_status});
    if (!server) return config_error(Error(server.error()).wrap("--api-socket"));
    api_server = std::move(*server);
  }

  // Built by PUT /api/v1/vm/start or restore, so that a start that fails is
  // refused and the VM stays as it was.
  std::unique_ptr<machine::Machine> first_machine;
  // --incoming's (or PUT /api/v1/vm/receive's) socket.
  Fd incoming_listener;
  if (await_config) {
    ApiControl::Setup setup{
        .max_vcpus = max_vcpus,
        .host_memory_bytes = host_memory_bytes(),
        .config = std::nullopt,
        .start = [&](const machine::VmConfig& chosen) -> Result<void> {
          TRY(open_consoles(chosen));
          Result<std::unique_ptr<machine::Machine>> built =
              build_machine(chosen, *kvm, *console, virtio_console.get());
          if (!built) {
            console.reset();
            virtio_console.reset();
            return fail(std::move(built).error());
          }
          config = chosen;
          first_machine = std::move(*built);
          return ok();
        },
        .restore = [&](const api::RestoreRequest& request) -> Result<machine::VmConfig> {
          migration::Snapshot read = TRY(migration::read_snapshot(request.path));
          machine::VmConfig chosen;
          TRY(machine::merge_json(read.machine.config_json, request.path, chosen));
          if (!request.serial.empty()) {
            chosen.serial = TRY_CONTEXT(machine::parse_serial(request.serial), "serial");
          }
          TRY(machine::validate(chosen, max_vcpus, host_memory_bytes()));
          TRY(open_consoles(chosen));
          Result<std::unique_ptr<machine::Machine>> restored = machine::Machine::restore(
              request.path, read, chosen, *kvm,
              [sink = console.get()](std::span<const std::byte> bytes) { sink->write(bytes); });
          if (!restored) {
            console.reset();
            virtio_console.reset();
            return fail(std::move(restored).error());
          }
          if (request.paused) (*restored)->start_paused();
          config = chosen;
          first_machine = std::move(*restored);
          return chosen;
        },
        .receive = [&](const std::string& source,
                       const machine::VmConfig& chosen) -> Result<void> {
          migration::StreamAddress address = TRY(migration::parse_stream_address(source));
          Fd listener = TRY(migration::listen_stream(address));
          // The configuration was checked when it was set.
          if (Result<void> opened = open_consoles(chosen); !opened) {
            if (address.kind == migration::StreamAddress::Kind::Unix) ::unlink(address.path.c_str());
            return fail(std::move(opened).error());
          }
          config = chosen;
          incoming = std::move(address);
          incoming_listener = std::move(listener);
          return ok();
        },
    };
    LOG_INFO("waiting for PUT /api/v1/vm/config and PUT /api/v1/vm/start on {}", api_socket);
    if (!wait_for_start(control, setup, *signals)) return kExitPowerOff;
  }
  // Listening before anything else can fail late, so a source may connect
  // as soon as keel-vmm is up.
  if (incoming && !incoming_listener.valid()) {
    Result<Fd> listener = migration::listen_stream(*incoming);
    if (!listener) return config_error(Error(listener.error()).wrap("--incoming"));
    incoming_listener = std::move(*listener);
  }

  for (uint64_t boot = 1;; ++boot) {
    // A post-copy migration still fetching pages while the machine runs;
    // reset before the machine goes (below).
    std::unique_ptr<machine::PostcopyIncoming> postcopy;
    // The snapshot is the first boot; a guest reset after it boots afresh.
    Result<std::unique_ptr<machine::Machine>> machine =
        first_machine ? Result<std::unique_ptr<machine::Machine>>(std::move(first_machine))
        : boot == 1 && snapshot
            ? machine::Machine::restore(restore_path, *snapshot, config, *kvm,
                                        [sink = console.get()](std::span<const std::byte> bytes) {
                                          sink->write(bytes);
                                        })
        : boot == 1 && incoming
            ? receive_incoming(*incoming, incoming_listener, config, *kvm,
                               [sink = console.get()](std::span<const std::byte> bytes) {
                                 sink->write(bytes);
                               },
                               postcopy)
            : build_machine(config, *kvm, *console, virtio_console.get());
    if (boot == 1 && incoming) {
      incoming_listener.reset();
      if (incoming->kind == migration::StreamAddress::Kind::Unix) {
        ::unlink(incoming->path.c_str());
      }
    }
    if (machine && boot == 1 && snapshot) {
      snapshot.reset();  // the RAM mapping keeps what it needs of the file
      if (restore_paused) (*machine)->start_paused();
    }
    if (!machine) {
      console.reset();  // restore the terminal before printing
      virtio_console.reset();  // whichever of the two holds the terminal
      std::fprintf(stderr, "keel-vmm: %s\n", machine.error().message().c_str());
      // A syscall that failed (KVM, memory) is the host's problem; an error
      // without errno is about the input (a bad kernel image, sizes).
      // An incoming migration that failed is a failure, whatever the cause.
      if (boot == 1 && incoming) return kExitFailure;
      return machine.error().sys_errno() != 0 ? kExitFailure : kExitBadConfig;
    }
    control.created(boot);
    bool host_stop = false;
    machine::StopStatus status =
        run_machine(**machine, *console, virtio_console.get(), *signals, control, host_stop);
    if (host_stop && status.reason == machine::StopReason::Reset) {
      status = {machine::StopReason::Stopped, 0, "stopped by the host during a guest reset"};
    }
    LOG_INFO("VM stopped: {} {}", machine::stop_reason_name(status.reason), status.detail);
    LOG_INFO("userspace exits: {}", (*machine)->exit_summary());
    control.stopped(status, status.reason == machine::StopReason::Reset && config.reboot);
    // Before the machine: its threads install pages into the machine's RAM
    // (a post-copy that failed after the machine ran exits from here).
    postcopy.reset();
    switch (status.reason) {
      case machine::StopReason::PowerOff:
      case machine::StopReason::Stopped:
      case machine::StopReason::Migrated: return kExitPowerOff;
      case machine::StopReason::DebugExit: return status.debug_exit_code;
      case machine::StopReason::GuestPanic:
        console.reset();
        std::fprintf(stderr, "keel-vmm: the guest panicked: %s\n", status.detail.c_str());
        return kExitGuestPanic;
      case machine::StopReason::Reset:
        if (!config.reboot) {
          // Not silent: a guest that resets unasked (a crash that Linux
          // turns into a reboot) must say so to whoever sees the exit.
          console.reset();
          std::fprintf(stderr, "keel-vmm: the guest reset (%s); --no-reboot: exiting\n",
                       status.detail.c_str());
          return kExitRebootRefused;
        }
        LOG_INFO("guest reset: rebooting (boot {})", boot + 1);
        continue;
      case machine::StopReason::TripleFault:
      case machine::StopReason::Error:
        console.reset();
        std::fprintf(stderr, "keel-vmm: VM failed: %s: %s\n",
                     std::string(machine::stop_reason_name(status.reason)).c_str(),
                     status.detail.c_str());
        return kExitFailure;
    }
  }
}

}  // namespace
}  // namespace keel::vmm

int main(int argc, char** argv) { return keel::vmm::run(argc, argv); }
