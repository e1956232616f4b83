// api_bench: latency of keel-vmm's control API under concurrent clients.
// For each client count, that many threads each hold one kept-alive
// connection to the API socket and send requests back to back (after a
// short warm-up), timing each from the first byte written to the last byte
// of the reply read. Prints one line per (operation, clients): requests,
// p50, p99, max, throughput and the statuses seen. Operations:
//   get           GET /api/v1/vm (the VM's state)
//   pause-resume  PUT /api/v1/vm/pause then PUT /api/v1/vm/resume, in turn;
//                 with several clients many are 409s (already paused, not
//                 paused), timed all the same.
// bench/api.sh starts keel-vmm on a tiny guest and runs this.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <CLI/CLI.hpp>
#include <fmt/format.h>

namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using Protocol = net::local::stream_protocol;
using Clock = std::chrono::steady_clock;

struct Sample {
  std::chrono::nanoseconds elapsed;
  unsigned status;
};

// One kept-alive connection; I/O errors throw (boost::system::system_error).
class Connection {
 public:
  explicit Connection(const std::string& path) : socket_(io_) {
    socket_.connect(Protocol::endpoint(path));
  }

  Sample request(http::verb method, const std::string& target) {
    http::request<http::empty_body> request(method, target, 11);
    request.set(http::field::host, "localhost");
    request.keep_alive(true);
    Clock::time_point start = Clock::now();
    http::write(socket_, request);
    http::response<http::string_body> response;
    http::read(socket_, buffer_, response);
    return {Clock::now() - start, response.result_int()};
  }

 private:
  net::io_context io_;
  Protocol::socket socket_;
  beast::flat_buffer buffer_;
};

struct Level {
  std::vector<Sample> samples;
  std::chrono::nanoseconds wall{};
  std::atomic<int> failures{0};
};

void run_level(const std::string& socket, const std::string& operation, int clients,
               int requests, int warmup, Level& level) {
  std::vector<std::vector<Sample>> per_client(static_cast<size_t>(clients));
  std::barrier ready(clients + 1);
  std::barrier done(clients + 1);
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      std::vector<Sample>& samples = per_client[static_cast<size_t>(c)];
      samples.reserve(static_cast<size_t>(requests));
      std::optional<Connection> connection;
      try {
        connection.emplace(socket);
        for (int i = 0; i < warmup; ++i) connection->request(http::verb::get, "/api/v1/vm");
      } catch (const std::exception& error) {
        std::fprintf(stderr, "api_bench: client %d: %s\n", c, error.what());
        level.failures.fetch_add(1);
        connection.reset();
      }
      ready.arrive_and_wait();
      try {
        for (int i = 0; connection && i < requests; ++i) {
          if (operation == "get") {
            samples.push_back(connection->request(http::verb::get, "/api/v1/vm"));
          } else {
            samples.push_back(connection->request(
                http::verb::put, i % 2 == 0 ? "/api/v1/vm/pause" : "/api/v1/vm/resume"));
          }
        }
      } catch (const std::exception& error) {
        std::fprintf(stderr, "api_bench: client %d: %s\n", c, error.what());
        level.failures.fetch_add(1);
      }
      done.arrive_and_wait();
    });
  }
  ready.arrive_and_wait();
  Clock::time_point start = Clock::now();
  done.arrive_and_wait();
  level.wall = Clock::now() - start;
  for (std::thread& thread : threads) thread.join();
  for (const auto& samples : per_client) {
    level.samples.insert(level.samples.end(), samples.begin(), samples.end());
  }
}

// Clients interleave, so the last request may have been a pause: resume
// (a 409 if it runs already), retrying while the server still counts the
// closed connections against its cap.
void leave_running(const std::string& socket) {
  for (int attempt = 0; attempt < 50; ++attempt) {
    try {
      Connection connection(socket);
      unsigned status = connection.request(http::verb::put, "/api/v1/vm/resume").status;
      if (status == 200 || status == 409) return;
    } catch (const std::exception&) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::fprintf(stderr, "api_bench: could not resume the VM\n");
}

double percentile_us(std::vector<Sample>& samples, double q) {
  if (samples.empty()) return 0;
  auto index = static_cast<size_t>(q * static_cast<double>(samples.size() - 1) + 0.5);
  std::nth_element(samples.begin(), samples.begin() + static_cast<ptrdiff_t>(index), samples.end(),
                   [](const Sample& a, const Sample& b) { return a.elapsed < b.elapsed; });
  return static_cast<double>(samples[index].elapsed.count()) / 1e3;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"api_bench: p50/p99 latency of keel-vmm's control API with concurrent clients"};
  std::string socket;
  std::vector<std::string> operations = {"get", "pause-resume"};
  std::vector<int> client_counts = {1, 2, 4, 8, 16, 32, 64};
  int requests = 2000;
  int warmup = 20;
  app.add_option("--socket", socket, "keel-vmm's --api-socket")->required();
  app.add_option("--operation", operations, "get, pause-resume (default: both)")
      ->check(CLI::IsMember({"get", "pause-resume"}));
  app.add_option("--clients", client_counts, "Client counts (default 1 2 4 8 16 32 64)");
  app.add_option("--requests", requests, "Requests per client at each count (default 2000)");
  app.add_option("--warmup", warmup, "Unmeasured requests per client first (default 20)");
  CLI11_PARSE(app, argc, argv);

  std::printf("%-13s %7s %9s %9s %9s %10s %10s  %s\n", "operation", "clients", "requests",
              "p50_us", "p99_us", "max_us", "req/s", "statuses");
  int exit_status = 0;
  for (const std::string& operation : operations) {
    for (int clients : client_counts) {
      Level level;
      run_level(socket, operation, clients, requests, warmup, level);
      if (operation == "pause-resume") leave_running(socket);
      std::map<unsigned, size_t> statuses;
      for (const Sample& sample : level.samples) ++statuses[sample.status];
      std::string status_text;
      for (const auto& [status, count] : statuses) {
        status_text += fmt::format("{}{}:{}", status_text.empty() ? "" : " ", status, count);
      }
      if (level.failures > 0) {
        status_text += fmt::format(" failed-clients:{}", level.failures.load());
        exit_status = 1;
      }
      double seconds = std::chrono::duration<double>(level.wall).count();
      double max_us = percentile_us(level.samples, 1.0);
      double p99 = percentile_us(level.samples, 0.99);
      double p50 = percentile_us(level.samples, 0.5);
      std::printf("%-13s %7d %9zu %9.1f %9.1f %10.1f %10.0f  %s\n", operation.c_str(), clients,
                  level.samples.size(), p50, p99, max_us,
                  seconds > 0 ? static_cast<double>(level.samples.size()) / seconds : 0.0,
                  status_text.c_str());
      std::fflush(stdout);
    }
  }
  return exit_status;
}
