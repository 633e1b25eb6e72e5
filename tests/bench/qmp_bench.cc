// bench-qmp: QMP latency on this machine, printed as one JSON object.
//
//   build-qmp/tests/bench-qmp [iterations]      (default 20000)
//
// The server runs on its own loop thread (as in pvhost); the client is this thread with
// blocking sockets. Measured in the same run:
//   startup_us          Server::create + add_monitor + connect until the greeting arrives
//   sequential_*        query-status round trips, one at a time
//   pipelined_*         batches of 32 query-status sent at once; per-request time
//   floor_echo_*        a raw unix-socket echo round trip (a thread echoing bytes): the
//                       floor no QMP server on this machine can beat
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "qmp/server.h"
#include "src/event_loop.h"
#include "src/fd.h"

using namespace pvhost;
using Clock = std::chrono::steady_clock;

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "bench-qmp: %s\n", what.c_str());
  std::exit(1);
}

UniqueFd connect_to(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.data(), path.size());
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) die("connect " + path);
  return fd;
}

class LineReader {
 public:
  explicit LineReader(int fd) : fd_(fd) {}
  std::string line() {
    for (;;) {
      if (auto p = buf_.find("\r\n", scan_); p != std::string::npos) {
        std::string l = buf_.substr(0, p);
        buf_.erase(0, p + 2);
        scan_ = 0;
        return l;
      }
      scan_ = buf_.size() > 0 ? buf_.size() - 1 : 0;
      char tmp[65536];
      ssize_t n = ::read(fd_, tmp, sizeof tmp);
      if (n <= 0) die("read: connection closed");
      buf_.append(tmp, static_cast<size_t>(n));
    }
  }

 private:
  int fd_;
  std::string buf_;
  size_t scan_ = 0;
};

void send_all(int fd, std::string_view s) {
  if (!write_all(fd, s)) die("write");
}

struct Stats {
  double median_us, p99_us;
};
Stats stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v[std::min(v.size() - 1, v.size() * 99 / 100)]};
}
double us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

}  // namespace

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::atoi(argv[1]) : 20000;
  char tmpl[] = "/tmp/bench-qmp-XXXXXX";
  if (!::mkdtemp(tmpl)) die("mkdtemp");
  const std::string dir = tmpl;
  const std::string path = dir + "/qmp.sock";

  auto lt = LoopThread::start("qmp");
  if (!lt) die(lt.error().describe());
  std::unique_ptr<qmp::Server> server;

  // Start-up: create the server on its loop thread, connect, read the greeting.
  const auto t0 = Clock::now();
  (*lt)->run_sync([&] {
    auto s = qmp::Server::create((*lt)->loop(), qmp::ServerInfo{});
    if (!s) die(s.error().describe());
    server = std::move(*s);
    if (auto r = server->add_monitor(path, "bench"); !r) die(r.error().describe());
  });
  UniqueFd fd = connect_to(path);
  LineReader reader(fd.get());
  std::string greeting = reader.line();
  const double startup = us(Clock::now() - t0);
  send_all(fd.get(), "{\"execute\": \"qmp_capabilities\"}\r\n");
  reader.line();

  const std::string req = "{\"execute\": \"query-status\", \"id\": 1}\r\n";
  for (int i = 0; i < 1000; ++i) {  // warm-up
    send_all(fd.get(), req);
    reader.line();
  }
  std::vector<double> seq;
  seq.reserve(static_cast<size_t>(iterations));
  for (int i = 0; i < iterations; ++i) {
    const auto a = Clock::now();
    send_all(fd.get(), req);
    reader.line();
    seq.push_back(us(Clock::now() - a));
  }

  constexpr int kBatch = 32;
  std::string batch;
  for (int i = 0; i < kBatch; ++i) batch += req;
  std::vector<double> pipe;
  for (int i = 0; i < iterations / kBatch; ++i) {
    const auto a = Clock::now();
    send_all(fd.get(), batch);
    for (int k = 0; k < kBatch; ++k) reader.line();
    pipe.push_back(us(Clock::now() - a) / kBatch);
  }

  // The floor: an echo thread on a unix socketpair, same message size.
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
  UniqueFd a(sv[0]), b(sv[1]);
  std::thread echo([&] {
    char tmp[4096];
    for (;;) {
      ssize_t n = ::read(b.get(), tmp, sizeof tmp);
      if (n <= 0) return;
      if (!write_all(b.get(), std::string_view(tmp, static_cast<size_t>(n)))) return;
    }
  });
  std::vector<double> floor;
  char tmp[4096];
  for (int i = 0; i < iterations + 1000; ++i) {
    const auto s = Clock::now();
    send_all(a.get(), req);
    size_t got = 0;
    while (got < req.size()) {
      ssize_t n = ::read(a.get(), tmp, sizeof tmp);
      if (n <= 0) die("echo read");
      got += static_cast<size_t>(n);
    }
    if (i >= 1000) floor.push_back(us(Clock::now() - s));
  }
  ::shutdown(a.get(), SHUT_RDWR);
  echo.join();

  fd.reset();
  (*lt)->run_sync([&] { server.reset(); });
  lt->reset();
  ::rmdir(dir.c_str());

  const Stats s1 = stats(seq), s2 = stats(pipe), s3 = stats(floor);
  std::printf("%s\n",
              fmt::format(R"({{"iterations": {}, "startup_us": {:.1f}, )"
                          R"("sequential_median_us": {:.2f}, "sequential_p99_us": {:.2f}, )"
                          R"("pipelined_batch": {}, "pipelined_median_us": {:.2f}, "pipelined_p99_us": {:.2f}, )"
                          R"("floor_echo_median_us": {:.2f}, "floor_echo_p99_us": {:.2f}}})",
                          iterations, startup, s1.median_us, s1.p99_us, kBatch, s2.median_us, s2.p99_us,
                          s3.median_us, s3.p99_us)
                  .c_str());
  return 0;
}
