// Test harness: a Server driven by run_once() on the test thread, and blocking-style
// clients over real unix sockets that pump the loop while they wait.
#pragma once

#include <catch2/catch.hpp>

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "qmp/server.h"
#include "src/event_loop.h"
#include "src/fd.h"

namespace qmptest {

using namespace std::chrono_literals;
using nlohmann::json;
using pvhost::EventLoop;
using pvhost::UniqueFd;
namespace qmp = pvhost::qmp;

inline std::string make_temp_dir() {
  char tmpl[] = "/tmp/pvhost-qmp-XXXXXX";
  const char* d = ::mkdtemp(tmpl);
  REQUIRE(d != nullptr);
  return d;
}

struct Fixture {
  explicit Fixture(qmp::ServerLimits limits = {}, qmp::ServerInfo info = default_info()) {
    dir = make_temp_dir();
    path = dir + "/qmp-libxl-1";
    loop = std::move(*EventLoop::create("qmp-test"));
    auto s = qmp::Server::create(*loop, std::move(info), limits);
    REQUIRE(s);
    server = std::move(*s);
    auto m = server->add_monitor(path, "libxl-cmd");
    REQUIRE(m);
  }
  ~Fixture() {
    server.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  static qmp::ServerInfo default_info() {
    qmp::ServerInfo i;
    i.name = "guest1";
    return i;
  }
  void spin(std::chrono::milliseconds t = 1ms) { REQUIRE(loop->run_once(t)); }
  // Spins until `pred` or the deadline; returns pred().
  template <class P>
  bool spin_until(P pred, std::chrono::milliseconds limit = 3000ms) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (!pred() && std::chrono::steady_clock::now() < end) spin(2ms);
    return pred();
  }

  std::string dir, path;
  std::unique_ptr<EventLoop> loop;
  std::unique_ptr<qmp::Server> server;
};

struct Client {
  Client(Fixture& fx, const std::string& p = {}) : f(fx) {
    const std::string& sock = p.empty() ? fx.path : p;
    fd = UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(fd.valid());
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::memcpy(a.sun_path, sock.data(), sock.size());
    REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(pvhost::set_nonblocking(fd.get()));
  }

  void send(std::string_view s) {
    size_t off = 0;
    const auto end = std::chrono::steady_clock::now() + 5s;
    while (off < s.size()) {
      ssize_t n = ::send(fd.get(), s.data() + off, s.size() - off, MSG_NOSIGNAL);
      if (n > 0) {
        off += static_cast<size_t>(n);
        continue;
      }
      REQUIRE((n < 0 && errno == EAGAIN));
      REQUIRE(std::chrono::steady_clock::now() < end);
      f.spin(1ms);
    }
  }

  // One line the server sent, without its "\r\n"; nullopt on EOF or timeout.
  std::optional<std::string> line(std::chrono::milliseconds limit = 3000ms) {
    const auto end = std::chrono::steady_clock::now() + limit;
    for (;;) {
      if (auto pos = in.find("\r\n"); pos != std::string::npos) {
        std::string l = in.substr(0, pos);
        in.erase(0, pos + 2);
        CHECK(l.find('\n') == std::string::npos);  // qmp-spec: lines end in CRLF, not LF
        return l;
      }
      if (eof || std::chrono::steady_clock::now() >= end) return std::nullopt;
      f.spin(1ms);
      char buf[65536];
      ssize_t n = ::recv(fd.get(), buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) in.append(buf, static_cast<size_t>(n));
      else if (n == 0 || (n < 0 && errno != EAGAIN)) eof = true;
    }
  }

  json next(std::chrono::milliseconds limit = 3000ms) {
    auto l = line(limit);
    REQUIRE(l.has_value());
    json j = json::parse(*l, nullptr, false);
    INFO(*l);
    REQUIRE(!j.is_discarded());
    return j;
  }

  json greeting() {
    json g = next();
    REQUIRE(g.contains("QMP"));
    return g;
  }
  void negotiate() {
    greeting();
    send(R"({"execute": "qmp_capabilities"})" "\r\n");
    json r = next();
    REQUIRE(r == json{{"return", json::object()}});
  }
  json cmd(const std::string& execute, json args = nullptr, json id = nullptr) {
    json req{{"execute", execute}};
    if (!args.is_null()) req["arguments"] = args;
    if (!id.is_null()) req["id"] = id;
    send(req.dump() + "\r\n");
    return next();
  }
  // True when the server closed the connection within `limit`.
  bool closed_by_server(std::chrono::milliseconds limit = 3000ms) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (!eof && std::chrono::steady_clock::now() < end) {
      f.spin(1ms);
      char buf[65536];
      ssize_t n = ::recv(fd.get(), buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) in.append(buf, static_cast<size_t>(n));
      else if (n == 0 || (n < 0 && errno != EAGAIN)) eof = true;
    }
    return eof;
  }

  Fixture& f;
  UniqueFd fd;
  std::string in;
  bool eof = false;
};

inline json error_of(const std::string& cls, const std::string& desc) {
  return json{{"class", cls}, {"desc", desc}};
}

}  // namespace qmptest
