// Test support for running the real keel-vmm binary: a child process with
// its output captured (VmmProcess, Outcome) and a private temp directory.
// Shared by vmm_test.cc and vmm_api_test.cc.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace keel::testing {

using Clock = std::chrono::steady_clock;

// How a keel-vmm run ended, with everything it printed.
struct Outcome {
  std::optional<int> exit_status;  // set if it exited normally
  std::optional<int> signal;       // set if a signal killed it
  bool timed_out = false;
  std::string out;
  std::string err;
};

inline std::ostream& operator<<(std::ostream& stream, const Outcome& outcome) {
  stream << "keel-vmm ";
  if (outcome.exit_status) stream << "exited with " << *outcome.exit_status;
  if (outcome.signal) stream << "was killed by signal " << *outcome.signal;
  if (outcome.timed_out) stream << " (timed out)";
  return stream << "\n--- stdout ---\n" << outcome.out << "\n--- stderr ---\n" << outcome.err;
}

// One keel-vmm child with its stdout and stderr on pipes, and stdin either
// /dev/null, a pipe holding `input` then end of file, or stdin_fd (a
// terminal). The destructor kills (SIGKILL) and reaps a child still running.
class VmmProcess {
 public:
  // program: keel-vmm unless another binary (keelctl) is named.
  explicit VmmProcess(const std::vector<std::string>& args,
                      std::optional<std::string> input = std::nullopt, int stdin_fd = -1,
                      const std::string& program = KEEL_VMM_BINARY) {
    int out_pipe[2], err_pipe[2], in_pipe[2] = {-1, -1};
    if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0 ||
        (input && ::pipe2(in_pipe, O_CLOEXEC) != 0)) {
      ADD_FAILURE() << "pipe2: " << std::strerror(errno);
      return;
    }
    if (input) {
      // Small enough for the pipe buffer, so this never blocks.
      if (::write(in_pipe[1], input->data(), input->size()) != static_cast<ssize_t>(input->size())) {
        ADD_FAILURE() << "write stdin: " << std::strerror(errno);
      }
      ::close(in_pipe[1]);
    }
    std::vector<std::string> argv_strings = {program};
    argv_strings.insert(argv_strings.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& arg : argv_strings) argv.push_back(arg.data());
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      int in_fd = stdin_fd >= 0 ? stdin_fd : input ? in_pipe[0] : ::open("/dev/null", O_RDONLY);
      ::dup2(in_fd, STDIN_FILENO);
      ::dup2(out_pipe[1], STDOUT_FILENO);
      ::dup2(err_pipe[1], STDERR_FILENO);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(out_pipe[1]);
    ::close(err_pipe[1]);
    if (input) ::close(in_pipe[0]);
    out_fd_ = out_pipe[0];
    err_fd_ = err_pipe[0];
    if (pid_ < 0) ADD_FAILURE() << "fork: " << std::strerror(errno);
  }

  ~VmmProcess() {
    if (pid_ > 0 && !outcome_.exit_status && !outcome_.signal) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (out_fd_ >= 0) ::close(out_fd_);
    if (err_fd_ >= 0) ::close(err_fd_);
  }

  VmmProcess(const VmmProcess&) = delete;
  VmmProcess& operator=(const VmmProcess&) = delete;

  // Reads output until stdout contains text; false if the process ended or
  // the timeout passed first.
  bool wait_for_stdout(std::string_view text, Clock::duration timeout) {
    Clock::time_point deadline = Clock::now() + timeout;
    while (outcome_.out.find(text) == std::string::npos) {
      if (Clock::now() >= deadline || (out_fd_ < 0 && err_fd_ < 0)) return false;
      pump(std::chrono::milliseconds(50));
    }
    return true;
  }

  void send_signal(int signal_number) { ::kill(pid_, signal_number); }

  // Waits for the exit (SIGKILL after the timeout) and collects the outcome.
  Outcome wait(Clock::duration timeout) {
    if (pid_ < 0) return outcome_;  // never started: the constructor reported why
    Clock::time_point deadline = Clock::now() + timeout;
    for (;;) {
      pump(std::chrono::milliseconds(20));
      int status = 0;
      pid_t done = ::waitpid(pid_, &status, WNOHANG);
      if (done == pid_) {
        while (out_fd_ >= 0 || err_fd_ >= 0) pump(std::chrono::milliseconds(100));  // the rest of the output
        if (WIFEXITED(status)) outcome_.exit_status = WEXITSTATUS(status);
        if (WIFSIGNALED(status)) outcome_.signal = WTERMSIG(status);
        return outcome_;
      }
      if (Clock::now() >= deadline) {
        outcome_.timed_out = true;
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        outcome_.signal = SIGKILL;
        return outcome_;
      }
    }
  }

 private:
  void pump(std::chrono::milliseconds timeout) {
    pollfd fds[2] = {{out_fd_, POLLIN, 0}, {err_fd_, POLLIN, 0}};
    if (::poll(fds, 2, static_cast<int>(timeout.count())) <= 0) return;
    drain(fds[0], out_fd_, outcome_.out);
    drain(fds[1], err_fd_, outcome_.err);
  }

  static void drain(const pollfd& polled, int& fd, std::string& sink) {
    if (fd < 0 || polled.revents == 0) return;
    char buffer[4096];
    ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n > 0) {
      sink.append(buffer, static_cast<size_t>(n));
    } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
      ::close(fd);
      fd = -1;
    }
  }

  pid_t pid_ = -1;
  int out_fd_ = -1;
  int err_fd_ = -1;
  Outcome outcome_;
};

// A private directory for the files one test writes, removed afterwards.
class TempDir {
 public:
  TempDir() {
    std::string pattern = ::testing::TempDir() + "keel-vmm-test-XXXXXX";
    std::vector<char> path(pattern.begin(), pattern.end());
    path.push_back('\0');
    if (::mkdtemp(path.data()) != nullptr) path_ = path.data();
  }
  ~TempDir() {
    for (const std::string& file : files_) ::unlink(file.c_str());
    if (!path_.empty()) ::rmdir(path_.c_str());
  }
  // A path inside the directory, removed with it.
  std::string file(const std::string& name) {
    files_.push_back(path_ + "/" + name);
    return files_.back();
  }
  std::string write(const std::string& name, std::string_view contents) {
    std::string path = file(name);
    std::ofstream(path, std::ios::binary) << contents;
    return path;
  }

 private:
  std::string path_;
  std::vector<std::string> files_;
};

inline std::string read_text(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

}  // namespace keel::testing
