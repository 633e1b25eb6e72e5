// The console backend end to end: pvhost-xenemu --strict, pvhost (-backends console) and
// consfront (tests/frontends/consfront) as separate processes; the host side is a real pty
// or a unix socket, read and written by this test.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <termios.h>
#include <unistd.h>

#include <thread>

#include "src/fd.h"
#include "tests/frontends/consfront/pattern.h"
#include "tests/integration/console/console_env.h"

using namespace pvhost;
using namespace pvhost::test;
using namespace std::chrono_literals;

namespace {

std::string be(ConsoleEnv& env, const toolstack::DeviceAddress& d, const std::string& key) {
  return env.read(d.backend_path + "/" + key);
}

UniqueFd connect_retry(const std::string& path) {
  int fd = -1;
  (void)poll_until([&] { return (fd = connect_unix(path)) >= 0; });
  return UniqueFd(fd);
}

void check_exact(const std::vector<std::byte>& got, uint64_t offset, size_t total) {
  CHECK(got.size() == total);
  auto bad = first_mismatch(got, offset);
  INFO("first mismatch at " << (bad ? static_cast<long>(*bad) : -1L));
  CHECK_FALSE(bad.has_value());
}

}  // namespace

TEST_CASE("secondary console over a unix socket: byte-exact both ways under wrap-around and backpressure") {
  ConsoleEnv env;
  const std::string sock = env.rundir() + "/c1.sock";
  auto d = env.add_console("1", {{"be.output", "unix:" + sock + ",server"}});
  env.start_pvhost();
  REQUIRE(env.wait_for(d.backend_path + "/state", "2"));
  // The guest reads `in` slowly too: host input must wait for room, never be dropped.
  auto fe = env.start_consfront({"--devid", "1", "--echo", "--read-delay-ms", "1"});
  REQUIRE(env.wait_for(d.backend_path + "/state", "4"));
  UniqueFd c = connect_retry(sock);
  REQUIRE(c);
  // 300 KiB through a 1 KiB `in` ring and a 2 KiB `out` ring, with a host reader that stalls.
  const size_t total = 300 * 1024;
  auto got = exchange(c.get(), 0, total, /*slow=*/true);
  INFO(env.logs());
  check_exact(got, 0, total);
  CHECK(env.pvhost().running());
}

TEST_CASE("secondary console over a pty: byte-exact both ways, tty node, raw mode") {
  ConsoleEnv env;
  auto d = env.add_console("1");  // output=pty, as libxl writes it
  env.start_pvhost();
  REQUIRE(env.wait_for(d.backend_path + "/state", "2"));
  const std::string tty = env.read(d.frontend_path + "/tty");
  REQUIRE(tty.starts_with("/dev/pts/"));
  UniqueFd slave(::open(tty.c_str(), O_RDWR | O_NOCTTY | O_CLOEXEC));
  REQUIRE(slave);
  termios t{};
  REQUIRE(::tcgetattr(slave.get(), &t) == 0);
  CHECK((t.c_lflag & (ECHO | ICANON)) == 0);
  auto fe = env.start_consfront({"--devid", "1", "--echo"});
  REQUIRE(env.wait_for(d.backend_path + "/state", "4"));
  const size_t total = 200 * 1024;
  auto got = exchange(slave.get(), 7, total, /*slow=*/true);
  INFO(env.logs());
  check_exact(got, 7, total);
}

TEST_CASE("primary console: the ring is a guest frame, no frontend state; guest output reaches the pty") {
  ConsoleEnv env;
  auto d = env.add_console("0");
  REQUIRE(d.frontend_path == fmt::format("/local/domain/{}/console", env.domid()));
  env.start_pvhost();
  REQUIRE(env.wait_for(d.backend_path + "/state", "2"));
  const std::string tty = env.read(d.frontend_path + "/tty");
  REQUIRE(tty.starts_with("/dev/pts/"));
  UniqueFd slave(::open(tty.c_str(), O_RDWR | O_NOCTTY | O_CLOEXEC));
  REQUIRE(slave);
  const size_t total = 100000;
  auto fe = env.start_consfront({"--primary", "--send", std::to_string(total)});
  REQUIRE(env.wait_for(d.backend_path + "/state", "4"));
  auto got = read_bytes(slave.get(), total, 3s);
  INFO(env.logs());
  check_exact(got, 0, total);
  // Unplug: no frontend state to wait for, so the backend closes at once.
  CHECK(toolstack::device_del(env.xs(), d));
  CHECK(env.read(d.backend_path + "/state").empty());
  CHECK(env.pvhost().running());
}

TEST_CASE("primary console: host input reaches the guest through the frame-mapped ring") {
  ConsoleEnv env;
  auto d = env.add_console("0");
  env.start_pvhost();
  REQUIRE(env.wait_for(d.backend_path + "/state", "2"));
  const std::string tty = env.read(d.frontend_path + "/tty");
  UniqueFd slave(::open(tty.c_str(), O_RDWR | O_NOCTTY | O_CLOEXEC));
  REQUIRE(slave);
  auto fe = env.start_consfront({"--primary", "--echo"});
  REQUIRE(env.wait_for(d.backend_path + "/state", "4"));
  const size_t total = 64 * 1024;
  auto got = exchange(slave.get(), 99, total, /*slow=*/false);
  INFO(env.logs());
  check_exact(got, 99, total);
}

TEST_CASE("file output appends exactly; the backend log key keeps timestamped lines") {
  ConsoleEnv env;
  const std::string out = env.rundir() + "/out.txt";
  const std::string log = env.rundir() + "/console.log";
  auto d = env.add_console("1", {{"be.output", "file:" + out}, {"be.log", log}});
  env.start_pvhost();
  REQUIRE(env.wait_for(d.backend_path + "/state", "2"));
  const size_t total = 50000;
  auto fe = env.start_consfront({"--devid", "1", "--send", std::to_string(total)});
  auto size_of = [](const std::string& p) {
    UniqueFd fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC));
    return fd ? static_cast<size_t>(::lseek(fd.get(), 0, SEEK_END)) : size_t{0};
  };
  REQUIRE(poll_until([&] { return size_of(out) >= total; }));
  UniqueFd f(::open(out.c_str(), O_RDONLY | O_CLOEXEC));
  auto got = read_bytes(f.get(), total + 1, 200ms);
  INFO(env.logs());
  check_exact(got, 0, total);
  UniqueFd l(::open(log.c_str(), O_RDONLY | O_CLOEXEC));
  auto text = read_bytes(l.get(), 1 << 20, 200ms);
  REQUIRE(text.size() > 26);
  const std::string head(reinterpret_cast<const char*>(text.data()), 26);
  CHECK(head.starts_with("[20"));
  CHECK(head.ends_with("] "));
}

TEST_CASE("limit: with no host reader, the middle of the output is dropped and the rest kept") {
  ConsoleEnv env;
  const std::string sock = env.rundir() + "/lim.sock";
  auto d = env.add_console("1", {{"be.output", "unix:" + sock}, {"limit", "4096"}});
  env.start_pvhost();
  REQUIRE(env.wait_for(d.backend_path + "/state", "2"));
  const size_t total = 64 * 1024;
  auto fe = env.start_consfront({"--devid", "1", "--send", std::to_string(total), "--chunk", "2048"});
  REQUIRE(poll_until([&] { return fe.log().find("sent 65536") != std::string::npos; }));
  std::this_thread::sleep_for(300ms);  // the backend drains the last piece
  UniqueFd c = connect_retry(sock);
  REQUIRE(c);
  auto got = read_bytes(c.get(), total, 700ms);
  INFO(env.logs());
  // At most `limit` unsent bytes were held; each append is at most one ring (2048), so the
  // oldest limit-2048 bytes always survive, and the newest byte is always there.
  REQUIRE(got.size() == 4096);
  std::vector<std::byte> head(got.begin(), got.begin() + 2048);
  check_exact(head, 0, 2048);
  CHECK(got.back() == pattern_byte(total - 1));
}

TEST_CASE("hostile indices: a producer more than a ring ahead closes the device, not the process") {
  ConsoleEnv env;
  auto d = env.add_console("1", {{"be.output", "null"}});
  env.start_pvhost();
  REQUIRE(env.wait_for(d.backend_path + "/state", "2"));
  auto fe = env.start_consfront({"--devid", "1", "--hostile", "out-prod"});
  // Closing, and Closed once consfront answers: either proves the device was closed.
  const bool closed = poll_until([&] {
    const std::string st = be(env, d, "state");
    return st == "5" || st == "6";
  });
  INFO(env.logs());
  REQUIRE(closed);
  CHECK(be(env, d, "error").find("out ring") != std::string::npos);
  CHECK(fe.wait(10s) == 0);
  CHECK(env.pvhost().running());
}

TEST_CASE("hostile indices: an in consumer ahead of our producer closes the device") {
  ConsoleEnv env;
  const std::string sock = env.rundir() + "/h.sock";
  auto d = env.add_console("1", {{"be.output", "unix:" + sock}});
  env.start_pvhost();
  REQUIRE(env.wait_for(d.backend_path + "/state", "2"));
  auto fe = env.start_consfront({"--devid", "1", "--hostile", "in-cons"});
  // Closing, and Closed once consfront answers: either proves the device was closed.
  const bool closed = poll_until([&] {
    const std::string st = be(env, d, "state");
    return st == "5" || st == "6";
  });
  INFO(env.logs());
  REQUIRE(closed);
  CHECK(be(env, d, "error").find("in ring") != std::string::npos);
  CHECK(env.pvhost().running());
}

TEST_CASE("host-side clients come and go; the console survives and each session is exact") {
  ConsoleEnv env;
  const std::string sock = env.rundir() + "/r.sock";
  auto d = env.add_console("1", {{"be.output", "unix:" + sock}});
  env.start_pvhost();
  auto fe = env.start_consfront({"--devid", "1", "--echo"});
  REQUIRE(env.wait_for(d.backend_path + "/state", "4"));
  uint64_t offset = 0;
  for (int round = 0; round < 4; ++round) {
    UniqueFd c = connect_retry(sock);
    REQUIRE(c);
    const size_t n = 20000 + 3000 * static_cast<size_t>(round);
    auto got = exchange(c.get(), offset, n, /*slow=*/false);
    INFO("round " << round << "\n" << env.logs());
    check_exact(got, offset, n);
    offset += n;
  }
  CHECK(be(env, d, "state") == "4");
  CHECK(env.pvhost().running());
}

TEST_CASE("lifecycle: connect, frontend close, reconnect (three times), then unplug with device_del") {
  ConsoleEnv env;
  const std::string sock = env.rundir() + "/l.sock";
  auto d = env.add_console("1", {{"be.output", "unix:" + sock}});
  env.start_pvhost();
  REQUIRE(env.wait_for(d.backend_path + "/state", "2"));
  UniqueFd c = connect_retry(sock);
  REQUIRE(c);
  const size_t per_cycle = 30000;
  auto fe = env.start_consfront({"--devid", "1", "--send", std::to_string(per_cycle), "--cycles", "3"});
  auto got = read_bytes(c.get(), 3 * per_cycle, 5s);
  INFO(env.logs());
  check_exact(got, 0, 3 * per_cycle);
  CHECK(fe.log().find("connected 3") != std::string::npos);
  REQUIRE(env.wait_for(d.backend_path + "/state", "4"));
  // Unplug as libxl does: online=0, state=Closing, wait for Closed, remove.
  auto r = toolstack::device_del(env.xs(), d);
  CHECK(r);
  CHECK(fe.wait(10s) == 0);
  CHECK(env.read(d.backend_path + "/state").empty());
  CHECK(env.pvhost().running());
  // The socket is gone with the device.
  CHECK(poll_until([&] { return ::access(sock.c_str(), F_OK) != 0; }));
}
