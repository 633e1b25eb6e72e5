// Protocol rules of docs/interop/qmp-spec.rst, each over a real unix socket.
#include "src/log.h"
#include "tests/unit/qmp/qmp_test_util.h"

using namespace qmptest;

TEST_CASE("greeting announces QEMU 7.2.0, pvhost's package and no oob") {
  Fixture f;
  Client c(f);
  auto raw = c.line();
  REQUIRE(raw);
  // QEMU's member order and spacing (the transcript's greeting line).
  CHECK(raw->starts_with(R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "pvhost )"));
  json g = json::parse(*raw);
  CHECK(g["QMP"]["capabilities"] == json::array());
  CHECK(g["QMP"]["version"]["package"].get<std::string>().starts_with("pvhost "));
}

TEST_CASE("before qmp_capabilities every other command is CommandNotFound with QEMU's text") {
  Fixture f;
  Client c(f);
  c.greeting();
  json r = c.cmd("query-status", nullptr, 5);
  CHECK(r == json{{"error", error_of("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")},
                  {"id", 5}});
  // Events are not sent before negotiation.
  f.server->emit_event("TEST");
  CHECK(!c.line(50ms));
  c.send(R"({"execute": "qmp_capabilities", "id": "x"})");
  CHECK(c.next() == json{{"return", json::object()}, {"id", "x"}});
  CHECK(c.cmd("query-status")["return"]["status"] == "running");
}

TEST_CASE("qmp_capabilities twice is CommandNotFound with QEMU's text") {
  Fixture f;
  Client c(f);
  c.negotiate();
  CHECK(c.cmd("qmp_capabilities") ==
        json{{"error", error_of("CommandNotFound", "Capabilities negotiation is already complete, command ignored")}});
}

TEST_CASE("qmp_capabilities refuses capabilities that are not offered") {
  Fixture f;
  Client c(f);
  c.greeting();
  CHECK(c.cmd("qmp_capabilities", {{"enable", {"oob"}}}) ==
        json{{"error", error_of("GenericError", "Capability oob not available")}});
  CHECK(c.cmd("qmp_capabilities", {{"enable", {"bogus"}}}) ==
        json{{"error", error_of("GenericError", "Parameter 'enable[0]' does not accept value 'bogus'")}});
  CHECK(c.cmd("qmp_capabilities", {{"enable", "oob"}}) ==
        json{{"error", error_of("GenericError", "Invalid parameter type for 'enable', expected: array")}});
  CHECK(c.cmd("qmp_capabilities", {{"enable", json::array()}}) == json{{"return", json::object()}});
}

TEST_CASE("id is echoed verbatim whatever its JSON type") {
  Fixture f;
  Client c(f);
  c.negotiate();
  for (const char* id : {"2020372737", "\"abc\"", "{\"a\": [1, 2]}", "[1, \"x\"]", "null", "true", "-7", "1.5"}) {
    c.send(std::string(R"({"execute": "query-name", "id": )") + id + "}");
    auto l = c.line();
    REQUIRE(l);
    CHECK(l->ends_with(std::string(", \"id\": ") + id + "}"));
  }
  // Errors echo it too.
  CHECK(c.cmd("no-such-command", nullptr, {{"k", 1}})["id"] == json{{"k", 1}});
}

TEST_CASE("a missing parameter is a GenericError naming it") {
  Fixture f;
  Client c(f);
  c.negotiate();
  CHECK(c.cmd("human-monitor-command", json::object(), 1) ==
        json{{"error", error_of("GenericError", "Parameter 'command-line' is missing")}, {"id", 1}});
}

TEST_CASE("an unexpected parameter is a GenericError naming it") {
  Fixture f;
  Client c(f);
  c.negotiate();
  CHECK(c.cmd("query-status", {{"x", 1}}) == json{{"error", error_of("GenericError", "Parameter 'x' is unexpected")}});
}

TEST_CASE("a wrong-typed parameter is a GenericError naming it and the expected type") {
  Fixture f;
  Client c(f);
  c.negotiate();
  CHECK(c.cmd("human-monitor-command", {{"command-line", 1}}) ==
        json{{"error", error_of("GenericError", "Invalid parameter type for 'command-line', expected: string")}});
  CHECK(c.cmd("human-monitor-command", {{"command-line", "info status"}, {"cpu-index", "0"}}) ==
        json{{"error", error_of("GenericError", "Invalid parameter type for 'cpu-index', expected: integer")}});
  CHECK(c.cmd("human-monitor-command", {{"command-line", "info status"}, {"cpu-index", 1.0}}) ==
        json{{"error", error_of("GenericError", "Invalid parameter type for 'cpu-index', expected: integer")}});
  CHECK(c.cmd("xen-set-global-dirty-log", {{"enable", "yes"}}) ==
        json{{"error", error_of("GenericError", "Invalid parameter type for 'enable', expected: boolean")}});
}

TEST_CASE("malformed requests get QEMU's dispatch errors") {
  Fixture f;
  Client c(f);
  c.negotiate();
  c.send("[1, 2]");
  CHECK(c.next() == json{{"error", error_of("GenericError", "QMP input must be a JSON object")}});
  c.send("42 ");
  CHECK(c.next() == json{{"error", error_of("GenericError", "QMP input must be a JSON object")}});
  c.send(R"({"id": 3})");
  CHECK(c.next() == json{{"error", error_of("GenericError", "QMP input lacks member 'execute'")}, {"id", 3}});
  c.send(R"({"execute": 1})");
  CHECK(c.next() == json{{"error", error_of("GenericError", "QMP input member 'execute' must be a string")}});
  c.send(R"({"execute": "query-status", "arguments": []})");
  CHECK(c.next() == json{{"error", error_of("GenericError", "QMP input member 'arguments' must be an object")}});
  c.send(R"({"exec-oob": "query-status"})");
  CHECK(c.next() == json{{"error", error_of("GenericError", "QMP input member 'exec-oob' is unexpected")}});
  c.send(R"({"execute": "nope", "id": 1})");
  CHECK(c.next() == json{{"error", error_of("CommandNotFound", "The command nope has not been found")}, {"id", 1}});
}

TEST_CASE("malformed JSON is answered with an error and the next request on the connection works") {
  Fixture f;
  Client c(f);
  c.negotiate();
  c.send(R"({"execute": "query-status", "id": 1,})" "\r\n");
  json e = c.next();
  CHECK(e["error"]["class"] == "GenericError");
  CHECK(e["error"]["desc"].get<std::string>().starts_with("JSON parse error"));
  c.send("}\r\n");
  CHECK(c.next()["error"]["desc"] == "JSON parse error, expecting value");
  c.send("@@@ garbage\n");
  CHECK(c.next()["error"]["desc"] == "JSON parse error, stray '@'");
  c.send(R"({"execute": "query-status", "id": 2})");
  json ok = c.next();
  CHECK(ok["id"] == 2);
  CHECK(ok["return"]["status"] == "running");
}

TEST_CASE("a 0xFF byte forces the parser back into a known state") {
  Fixture f;
  Client c(f);
  c.negotiate();
  c.send(R"({"execute": "query-status", "arguments": {"a": )");  // never finished
  c.send("\xff");
  CHECK(c.next()["error"]["desc"] == "JSON parse error, stray '\\xFF'");
  c.send(R"({"execute": "query-status", "id": 9})");
  CHECK(c.next()["id"] == 9);
}

TEST_CASE("pipelined requests are answered in order") {
  Fixture f;
  Client c(f);
  c.negotiate();
  std::string batch;
  for (int i = 0; i < 50; ++i)
    batch += fmt::format(R"({{"execute": "{}", "id": {}}})", i % 2 ? "query-status" : "query-name", i);
  c.send(batch);
  for (int i = 0; i < 50; ++i) CHECK(c.next()["id"] == i);
}

TEST_CASE("a request split into 1-byte writes is answered") {
  Fixture f;
  Client c(f);
  c.negotiate();
  std::string req = R"({"execute": "query-status", "id": "split \"quoted\" {not a brace}"})" "\r\n";
  for (char ch : req) {
    c.send(std::string_view(&ch, 1));
    f.spin(0ms);
  }
  json r = c.next();
  CHECK(r["id"] == "split \"quoted\" {not a brace}");
  CHECK(r["return"]["running"] == true);
}

TEST_CASE("a 1 MiB request is accepted; one over the 4 MiB bound is refused and the stream continues") {
  Fixture f;
  Client c(f);
  c.negotiate();
  std::string big(1u << 20, 'a');
  c.send(R"({"execute": "human-monitor-command", "id": 1, "arguments": {"command-line": ")" + big + "\"}}");
  json r = c.next(10000ms);
  CHECK(r["id"] == 1);
  CHECK(r["return"] == "unknown command: '" + big + "'\r\n");

  std::string huge((4u << 20) + 10, 'b');
  c.send(R"({"execute": "human-monitor-command", "id": 2, "arguments": {"command-line": ")" + huge + "\"}}");
  c.send(R"({"execute": "query-status", "id": 3})");
  CHECK(c.next(10000ms) ==
        json{{"error", error_of("GenericError", "JSON message size limit exceeded (4194304 bytes)")}});
  CHECK(c.next(10000ms)["id"] == 3);
}

TEST_CASE("nesting deeper than 1024 is refused and the stream continues") {
  Fixture f;
  Client c(f);
  c.negotiate();
  std::string ok_deep = R"({"execute": "query-status", "id": )" + std::string(1000, '[') + std::string(1000, ']') + "}";
  c.send(ok_deep);
  CHECK(c.next().contains("return"));
  std::string deep = R"({"execute": "query-status", "id": )" + std::string(5000, '[') + std::string(5000, ']') + "}";
  c.send(deep);
  c.send(R"({"execute": "query-status", "id": 4})");
  CHECK(c.next() == json{{"error", error_of("GenericError", "JSON nesting depth limit exceeded")}});
  CHECK(c.next()["id"] == 4);
}

TEST_CASE("every negotiated monitor on every socket gets events") {
  Fixture f;
  const std::string second = f.dir + "/qmp-libxenstat-1";
  REQUIRE(f.server->add_monitor(second, "libxenstat-cmd"));
  Client a(f), b(f), c(f, second), waiting(f);
  a.negotiate();
  b.negotiate();
  c.negotiate();
  waiting.greeting();
  f.server->emit_event("SHUTDOWN", json{{"guest", true}, {"reason", "guest-shutdown"}});
  for (Client* cl : {&a, &b, &c}) {
    json e = cl->next();
    CHECK(e["event"] == "SHUTDOWN");
    CHECK(e["data"] == json{{"guest", true}, {"reason", "guest-shutdown"}});
    CHECK(e["timestamp"]["seconds"].is_number_integer());
    CHECK(e["timestamp"]["microseconds"].is_number_integer());
  }
  CHECK(!waiting.line(50ms));
}

TEST_CASE("a client vanishing while stop waits on a quiesce hook does not crash") {
  Fixture f;
  std::function<void()> pending;
  auto hook = f.server->run_state().add_quiesce_hook([&](std::function<void()> done) { pending = std::move(done); });
  {
    Client c(f);
    c.negotiate();
    c.send(R"({"execute": "stop", "id": 1})");
    REQUIRE(f.spin_until([&] { return static_cast<bool>(pending); }));
  }  // the client closes with the command in flight
  REQUIRE(f.spin_until([&] { return f.server->client_count() == 0; }));
  pending();  // the backend finishes draining later
  f.spin(5ms);
  CHECK(f.server->run_state().status() == qmp::RunStatus::paused);
  Client d(f);
  d.negotiate();
  CHECK(d.cmd("query-status")["return"]["status"] == "paused");
}

TEST_CASE("100 connect/disconnect cycles leave no clients behind") {
  Fixture f;
  for (int i = 0; i < 100; ++i) {
    Client c(f);
    if (i % 2) c.negotiate();
    else c.send(R"({"execute": "qmp_capa)");  // half a request, then gone
  }
  REQUIRE(f.spin_until([&] { return f.server->client_count() == 0; }));
  Client c(f);
  c.negotiate();
  CHECK(c.cmd("query-status").contains("return"));
}

namespace {
std::vector<std::string> g_log_lines;
void capture_log(pvhost::log::Level, std::string_view line) { g_log_lines.emplace_back(line); }
}  // namespace

TEST_CASE("a client that never reads is disconnected past the output bound while others are served") {
  qmp::ServerLimits limits;
  limits.max_output_bytes = 256u << 10;
  Fixture f(limits);
  g_log_lines.clear();
  pvhost::log::set_tap(capture_log);
  Client stuck(f), good(f);
  stuck.negotiate();
  good.negotiate();
  // ~100 bytes of reply per request; far more than socket buffers + 256 KiB.
  std::string batch;
  for (int i = 0; i < 200; ++i) batch += R"({"execute": "query-qmp-schema"})";
  bool disconnected = false;
  for (int round = 0; round < 200 && !disconnected; ++round) {
    ssize_t n = ::send(stuck.fd.get(), batch.data(), batch.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno != EAGAIN) disconnected = true;
    f.spin(1ms);
    CHECK(good.cmd("query-status", nullptr, round)["id"] == round);
    disconnected = disconnected || f.server->client_count() == 1;
  }
  CHECK(disconnected);
  CHECK(f.server->client_count() == 1);
  pvhost::log::set_tap(nullptr);
  bool logged = false;
  for (const auto& l : g_log_lines) logged = logged || l.find("is not reading its replies") != std::string::npos;
  CHECK(logged);
}

TEST_CASE("a client that half-closes still gets the replies to what it sent") {
  Fixture f;
  Client c(f);
  c.greeting();
  c.send(R"({"execute": "qmp_capabilities"}{"execute": "query-status", "id": 1})");
  REQUIRE(::shutdown(c.fd.get(), SHUT_WR) == 0);
  CHECK(c.next() == json{{"return", json::object()}});
  CHECK(c.next()["id"] == 1);
  CHECK(c.closed_by_server());
}

TEST_CASE("a stale socket file is replaced at start") {
  std::string dir = make_temp_dir();
  std::string path = dir + "/qmp";
  {
    auto loop = std::move(*EventLoop::create("a"));
    auto s = std::move(*qmp::Server::create(*loop, {}));
    REQUIRE(s->add_monitor(path, "m"));
    // Simulate a crash: the file stays behind.
    REQUIRE(::link(path.c_str(), (path + ".keep").c_str()) == 0);
  }
  REQUIRE(::rename((path + ".keep").c_str(), path.c_str()) == 0);
  auto loop = std::move(*EventLoop::create("b"));
  auto s = std::move(*qmp::Server::create(*loop, {}));
  CHECK(s->add_monitor(path, "m"));
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

TEST_CASE("a quiesce hook finishing after the server is destroyed is harmless") {
  Fixture f;
  std::function<void()> pending;
  qmp::Registration hook =
      f.server->run_state().add_quiesce_hook([&](std::function<void()> done) { pending = std::move(done); });
  {
    Client c(f);
    c.negotiate();
    c.send(R"({"execute": "stop", "id": 1})");
    REQUIRE(f.spin_until([&] { return static_cast<bool>(pending); }));
  }
  f.server.reset();
  pending();  // completes the transition: no event, no reply, no access to the server
  f.spin(5ms);
  hook.reset();
  CHECK(!f.server);
}
