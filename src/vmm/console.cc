#include "vmm/console.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>

#include "base/log.h"

namespace keel::vmm {
namespace {

constexpr char kEscape = 0x01;  // Ctrl-A, then 'x' quits (as in QEMU)

}  // namespace

Result<std::unique_ptr<Console>> Console::open(const machine::SerialConfig& config) {
  std::unique_ptr<Console> console(new Console(config));
  using Kind = machine::SerialConfig::Kind;
  if (config.kind == Kind::File) {
    console->output_ = TRY_CONTEXT(Fd::open(config.path, O_WRONLY | O_CREAT | O_TRUNC, 0644),
                                   "serial file");
  } else if (config.kind == Kind::Unix) {
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    if (config.path.size() >= sizeof(address.sun_path)) {
      return fail(Errc::InvalidArgument,
                  fmt::format("serial socket path '{}' is longer than {} bytes", config.path,
                              sizeof(address.sun_path) - 1));
    }
    std::memcpy(address.sun_path, config.path.c_str(), config.path.size() + 1);
    int raw = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (raw < 0) return fail_errno("serial socket");
    console->listener_ = Fd(raw);
    ::unlink(config.path.c_str());  // a stale socket from an earlier run
    if (::bind(raw, reinterpret_cast<sockaddr*>(&address), sizeof(address)) < 0) {
      return fail_errno(fmt::format("serial socket: bind {}", config.path));
    }
    if (::listen(raw, 1) < 0) return fail_errno(fmt::format("serial socket: listen {}", config.path));
  } else if (config.kind == Kind::Stdio) {
    // Our own copy of stdout, so the Fd owner never closes the process's.
    int raw = ::fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, 0);
    if (raw < 0) return fail_errno("serial: duplicate stdout");
    console->output_ = Fd(raw);
  }
  if (config.kind == Kind::Stdio && ::isatty(STDIN_FILENO)) {
    termios current{};
    if (::tcgetattr(STDIN_FILENO, &current) == 0) {
      console->saved_terminal_ = current;
      termios raw = current;
      ::cfmakeraw(&raw);
      raw.c_oflag |= OPOST | ONLCR;  // keep newline translation for our own log lines
      ::tcsetattr(STDIN_FILENO, TCSANOW, &raw);
    }
  }
  return console;
}

Console::~Console() {
  if (saved_terminal_) ::tcsetattr(STDIN_FILENO, TCSANOW, &*saved_terminal_);
  if (config_.kind == machine::SerialConfig::Kind::Unix) ::unlink(config_.path.c_str());
}

void Console::write(std::span<const std::byte> bytes) {
  using Kind = machine::SerialConfig::Kind;
  Result<void> result = ok();
  switch (config_.kind) {
    case Kind::Stdio:
    case Kind::File: result = output_.write_all(bytes); break;
    case Kind::Unix: {
      std::lock_guard lock(client_mutex_);
      if (client_.valid()) {
        // A client that stops reading loses output rather than stalling the vCPU.
        ssize_t n = ::send(client_.get(), bytes.data(), bytes.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
        (void)n;
      }
      break;
    }
    case Kind::None: break;
  }
  if (!result) LOG_RATELIMITED(warn, "serial output: {}", result.error().message());
}

int Console::input_fd() const {
  using Kind = machine::SerialConfig::Kind;
  if (input_closed_) return -1;
  if (config_.kind == Kind::Stdio) return STDIN_FILENO;
  if (config_.kind == Kind::Unix) return client_.valid() ? client_.get() : listener_.get();
  return -1;
}

Result<std::string> Console::read_input(bool& quit) {
  using Kind = machine::SerialConfig::Kind;
  quit = false;
  if (config_.kind == Kind::Unix && !client_.valid()) {
    int raw = ::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (raw >= 0) {
      std::lock_guard lock(client_mutex_);
      client_ = Fd(raw);
    }
    return std::string();
  }
  char buffer[512];
  int fd = config_.kind == Kind::Unix ? client_.get() : STDIN_FILENO;
  ssize_t n = ::read(fd, buffer, sizeof(buffer));
  if (n < 0) {
    if (errno == EINTR || errno == EAGAIN) return std::string();
    return fail_errno("serial input");
  }
  if (n == 0) {
    if (config_.kind == Kind::Unix) {
      std::lock_guard lock(client_mutex_);
      client_.reset();  // wait for the next client
    } else {
      input_closed_ = true;  // stdin at end of file: stop polling it
    }
    return std::string();
  }
  std::string out;
  for (ssize_t i = 0; i < n; ++i) {
    char c = buffer[i];
    if (saved_terminal_) {
      if (escape_pending_) {
        escape_pending_ = false;
        if (c == 'x' || c == 'X') {
          quit = true;
          return out;
        }
        if (c != kEscape) out.push_back(kEscape);
      } else if (c == kEscape) {
        escape_pending_ = true;
        continue;
      }
    }
    out.push_back(c);
  }
  return out;
}

}  // namespace keel::vmm
