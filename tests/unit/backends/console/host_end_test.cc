// Host ends with real ptys and unix sockets (no Xen): raw mode, both directions, and a
// socket's one-client-at-a-time reconnects.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <termios.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "backends/console/host_end.h"

using namespace pvhost;
using namespace pvhost::console;
using namespace std::chrono_literals;

namespace {

std::span<const std::byte> bytes(const std::string& s) { return std::as_bytes(std::span(s)); }

std::string temp_dir() {
  std::string t = "/tmp/pvhost-contest-XXXXXX";
  REQUIRE(::mkdtemp(t.data()) != nullptr);
  return t;
}

int connect_unix(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  return fd;
}

template <class Pred>
bool run_until(EventLoop& loop, Pred pred) {
  for (int i = 0; i < 200 && !pred(); ++i) REQUIRE(loop.run_once(10ms));
  return pred();
}

}  // namespace

TEST_CASE("pty: raw mode, output to the slave and input from it, path as pty:/dev/pts/N") {
  auto loop = EventLoop::create("t");
  REQUIRE(loop);
  int readable = 0;
  auto end = open_host_end(PtyOutput{}, **loop, {[&] { ++readable; }, {}, {}});
  REQUIRE(end);
  auto path = (*end)->tty_path();
  REQUIRE(path);
  CHECK((*end)->filename() == "pty:" + *path);
  UniqueFd slave(::open(path->c_str(), O_RDWR | O_NOCTTY | O_CLOEXEC));
  REQUIRE(slave);
  termios t{};
  REQUIRE(::tcgetattr(slave.get(), &t) == 0);
  CHECK((t.c_lflag & (ECHO | ICANON)) == 0);  // raw
  CHECK((t.c_oflag & OPOST) == 0);

  CHECK((*end)->write(bytes("a\nb")) == 3);
  char buf[16] = {};
  ssize_t n = ::read(slave.get(), buf, sizeof buf);
  CHECK(std::string(buf, static_cast<size_t>(n)) == "a\nb");  // no \r\n translation

  REQUIRE(::write(slave.get(), "in\n", 3) == 3);
  (*end)->want_read(true);
  REQUIRE(run_until(**loop, [&] { return readable > 0; }));
  std::array<std::byte, 2> small{};
  CHECK((*end)->read(small) == 2);  // never more than asked
  std::array<std::byte, 16> rest{};
  CHECK((*end)->read(rest) == 1);
  CHECK((*end)->read(rest) == 0);
}

TEST_CASE("unix socket: output waits for a client; clients come and go; reconnects are counted") {
  auto loop = EventLoop::create("t");
  REQUIRE(loop);
  const std::string dir = temp_dir();
  const std::string path = dir + "/c.sock";
  int changed = 0, readable = 0;
  auto end = open_host_end(SocketOutput{path}, **loop, {[&] { ++readable; }, {}, [&] { ++changed; }});
  REQUIRE(end);
  CHECK((*end)->filename() == "unix:" + path + ",server=on");
  CHECK_FALSE((*end)->peer_connected());
  CHECK((*end)->write(bytes("early")) == 0);  // nobody to take it: the caller keeps it

  for (int round = 0; round < 3; ++round) {
    UniqueFd c(connect_unix(path));
    REQUIRE(run_until(**loop, [&] { return (*end)->peer_connected(); }));
    CHECK((*end)->write(bytes("hi")) == 2);
    char buf[8] = {};
    CHECK(::read(c.get(), buf, sizeof buf) == 2);
    REQUIRE(::write(c.get(), "k", 1) == 1);
    (*end)->want_read(true);
    REQUIRE(run_until(**loop, [&] { return readable > 0; }));
    std::array<std::byte, 8> in{};
    CHECK((*end)->read(in) == 1);
    readable = 0;
    c.reset();  // the client leaves
    REQUIRE(run_until(**loop, [&] {
      if (readable > 0) {
        std::array<std::byte, 8> x{};
        (void)(*end)->read(x);  // sees EOF: the end drops the client
        readable = 0;
      }
      return !(*end)->peer_connected();
    }));
  }
  CHECK((*end)->reconnects() == 2);
  CHECK(changed == 6);
  end->reset();
  CHECK(::access(path.c_str(), F_OK) != 0);  // socket file removed
  ::rmdir(dir.c_str());
}

TEST_CASE("file and log ends append; the log stamps lines") {
  auto loop = EventLoop::create("t");
  REQUIRE(loop);
  const std::string dir = temp_dir();
  {
    auto f = open_host_end(FileOutput{dir + "/f"}, **loop, {});
    REQUIRE(f);
    CHECK((*f)->write(bytes("one\n")) == 4);
    auto l = open_host_end(LogOutput{dir + "/l"}, **loop, {});
    REQUIRE(l);
    CHECK((*l)->write(bytes("x\r\ny\n")) == 5);
    CHECK((*l)->filename() == "log:" + dir + "/l");
  }
  auto f2 = open_host_end(FileOutput{dir + "/f"}, **loop, {});
  REQUIRE(f2);
  CHECK((*f2)->write(bytes("two\n")) == 4);
  f2->reset();
  auto slurp = [](const std::string& p) {
    std::string s;
    UniqueFd fd(::open(p.c_str(), O_RDONLY));
    char b[256];
    ssize_t n;
    while ((n = ::read(fd.get(), b, sizeof b)) > 0) s.append(b, static_cast<size_t>(n));
    return s;
  };
  CHECK(slurp(dir + "/f") == "one\ntwo\n");
  std::string log = slurp(dir + "/l");
  CHECK(log.size() == 2 * 26 + 4);
  CHECK(log.find("] x\n[") != std::string::npos);
  CHECK(log.ends_with("] y\n"));
  std::string cmd = "rm -rf " + dir;
  CHECK(std::system(cmd.c_str()) == 0);
}
