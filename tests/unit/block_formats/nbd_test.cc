// NBD driver tests against real servers: qemu-nbd (over a raw file and a qcow2 image) and
// nbdkit's memory plugin, on unix sockets and on TCP loopback; a server restart in the
// middle of a workload.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include <fmt/core.h>

#include "src/block/nbd/nbd_image.h"
#include "tests/unit/block_formats/test_util.h"

namespace pvhost::block::test {
namespace {

constexpr uint64_t kMiB = 1 << 20;

bool have(const char* tool) { return run(std::string("command -v ") + tool + " >/dev/null").status == 0; }

// A server started with a pid file, killed on destruction.
struct Server {
  std::string pid_file;
  explicit Server(std::string pidf) : pid_file(std::move(pidf)) {}
  Server(const Server&) = delete;
  ~Server() { stop(); }
  pid_t pid() const {
    std::ifstream f(pid_file);
    pid_t p = 0;
    f >> p;
    return p;
  }
  void stop() {
    const pid_t p = pid();
    if (p <= 0) return;
    ::kill(p, SIGTERM);
    for (int i = 0; i < 200 && ::kill(p, 0) == 0; ++i) ::usleep(10000);
    ::unlink(pid_file.c_str());
  }
};

void start_qemu_nbd(const TempDir& d, Server& s, const std::string& fmt, const std::string& image,
                    const std::string& sock, const std::string& extra = "") {
  run_ok("qemu-nbd --fork --persistent --cache=writeback --pid-file=" + s.pid_file + " -f " + fmt + " -k " + sock + " " +
         extra + " " + image);
  (void)d;
}

std::unique_ptr<Image> must_open_nbd(const std::string& spec) {
  auto r = open_nbd(spec);
  INFO(spec << ": " << (r ? std::string() : r.error().describe()));
  REQUIRE(r);
  return std::move(*r);
}

TEST_CASE("nbd: reads and writes through qemu-nbd reach the served image", "[nbd]") {
  if (!have("qemu-nbd")) {
    WARN("qemu-nbd not installed: skipped");
    return;
  }
  TempDir d;
  const auto base = pattern(4 * kMiB, 2);
  write_file(d.file("base.raw"), base);
  run_ok("qemu-img convert -f raw -O qcow2 " + d.file("base.raw") + " " + d.file("img.qcow2"));
  Server s(d.file("qemu-nbd.pid"));
  start_qemu_nbd(d, s, "qcow2", d.file("img.qcow2"), d.file("nbd.sock"), "-x disk0");
  std::vector<std::byte> model = base;
  for (const std::string& spec : {"nbd:unix:" + d.file("nbd.sock") + ":exportname=disk0",
                                 "nbd+unix:///disk0?socket=" + d.file("nbd.sock")}) {
    auto img = must_open_nbd(spec);
    CHECK(img->info().size_bytes == 4 * kMiB);
    CHECK(read_all(*img) == model);
    const auto data = pattern(200000, 9);
    REQUIRE(img->write_at(12345, data));
    std::memcpy(model.data() + 12345, data.data(), data.size());
    REQUIRE(img->discard_at(kMiB, 65536));
    std::memset(model.data() + kMiB, 0, 65536);
    REQUIRE(img->flush_all());
    CHECK(read_all(*img) == model);
    CHECK(image_info_json(*img)["format"] == "nbd");
  }
  s.stop();
  CHECK(qemu_img_check("qcow2", d.file("img.qcow2")) == 0);
  CHECK(qemu_img_raw("qcow2", d.file("img.qcow2"), d.file("out.raw")) == model);
}

TEST_CASE("nbd: nbdkit memory exports work, through open_any too", "[nbd]") {
  if (!have("nbdkit")) {
    WARN("nbdkit not installed: skipped");
    return;
  }
  TempDir d;
  Server s(d.file("nbdkit.pid"));
  run_ok("nbdkit -U " + d.file("kit.sock") + " -P " + s.pid_file + " memory 8M");
  for (int i = 0; i < 100 && ::access(d.file("kit.sock").c_str(), F_OK) != 0; ++i) ::usleep(10000);
  OpenOptions o;
  o.path = "nbd:unix:" + d.file("kit.sock");
  auto r = open_any("", o);
  INFO((r ? "" : r.error().describe()));
  REQUIRE(r);
  auto& img = **r;
  std::vector<std::byte> model(8 * kMiB);
  CHECK(read_all(img) == model);
  std::mt19937_64 rng(4);
  for (int i = 0; i < 50; ++i) {
    const uint64_t off = rng() % (8 * kMiB - 100000);
    auto data = pattern(1 + rng() % 100000, rng());
    REQUIRE(img.write_at(off, data));
    std::memcpy(model.data() + off, data.data(), data.size());
  }
  REQUIRE(img.flush_all());
  CHECK(read_all(img) == model);
}

// A TCP port on loopback nobody listens on now (the kernel's choice; a race with another
// process taking it before the server does is possible but harmless: the server fails).
uint16_t free_tcp_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  socklen_t len = sizeof a;
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);
  ::close(fd);
  return ntohs(a.sin_port);
}

// Waits until something accepts on 127.0.0.1:port.
bool tcp_listening(uint16_t port) {
  for (int i = 0; i < 300; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
    if (ok) return true;
    ::usleep(10000);
  }
  return false;
}

// libxl-style `nbd:HOST:PORT[:exportname=NAME]` and the URI form, as a host using network
// storage writes them.
void exercise_tcp(const std::string& spec, uint64_t size, std::vector<std::byte>& model) {
  auto img = must_open_nbd(spec);
  CHECK(img->info().size_bytes == size);
  CHECK((read_all(*img) == model));
  std::mt19937_64 rng(size);
  for (int i = 0; i < 20; ++i) {
    const uint64_t off = rng() % (size - 70000);
    auto data = pattern(1 + rng() % 70000, rng());
    REQUIRE(img->write_at(off, data));
    std::memcpy(model.data() + off, data.data(), data.size());
  }
  REQUIRE(img->flush_all());
  CHECK((read_all(*img) == model));
}

TEST_CASE("nbd: TCP loopback, qemu-nbd and nbdkit, both spec forms", "[nbd]") {
  TempDir d;
  if (have("qemu-nbd")) {
    const auto base = pattern(4 * kMiB, 5);
    write_file(d.file("disk.raw"), base);
    run_ok("qemu-img convert -f raw -O qcow2 " + d.file("disk.raw") + " " + d.file("disk.qcow2"));
    Server s(d.file("qemu-nbd.pid"));
    const uint16_t port = free_tcp_port();
    run_ok(fmt::format("qemu-nbd --fork --persistent --pid-file={} -f qcow2 -b 127.0.0.1 -p {} -x disk0 {}", s.pid_file,
                       port, d.file("disk.qcow2")));
    REQUIRE(tcp_listening(port));
    std::vector<std::byte> model = base;
    exercise_tcp(fmt::format("nbd:127.0.0.1:{}:exportname=disk0", port), 4 * kMiB, model);
    exercise_tcp(fmt::format("nbd://127.0.0.1:{}/disk0", port), 4 * kMiB, model);
    s.stop();
    CHECK(qemu_img_check("qcow2", d.file("disk.qcow2")) == 0);
    CHECK((qemu_img_raw("qcow2", d.file("disk.qcow2"), d.file("out.raw")) == model));
  } else {
    WARN("qemu-nbd not installed: skipped");
  }
  if (have("nbdkit")) {
    Server s(d.file("nbdkit.pid"));
    const uint16_t port = free_tcp_port();
    run_ok(fmt::format("nbdkit -i 127.0.0.1 -p {} -P {} memory 2M", port, s.pid_file));
    REQUIRE(tcp_listening(port));
    std::vector<std::byte> model(2 * kMiB);
    exercise_tcp(fmt::format("nbd:127.0.0.1:{}", port), 2 * kMiB, model);
    exercise_tcp(fmt::format("nbd://127.0.0.1:{}", port), 2 * kMiB, model);  // memory is kept across connections
  } else {
    WARN("nbdkit not installed: skipped");
  }
}

TEST_CASE("nbd: a server restart in the middle of a workload fails no request", "[nbd]") {
  if (!have("qemu-nbd")) {
    WARN("qemu-nbd not installed: skipped");
    return;
  }
  // Every operation is followed by a flush: tmpfs keeps that cheap.
  TempDir d(::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  write_file(d.file("disk.raw"), std::vector<std::byte>(8 * kMiB));
  Server s(d.file("qemu-nbd.pid"));
  start_qemu_nbd(d, s, "raw", d.file("disk.raw"), d.file("nbd.sock"));
  auto img = must_open_nbd("nbd:unix:" + d.file("nbd.sock"));
  std::vector<std::byte> model(8 * kMiB);
  std::atomic<bool> stop{false};
  std::atomic<int> errors{0}, ops{0};
  std::thread worker([&] {
    std::mt19937_64 rng(77);
    while (!stop) {
      const uint64_t off = (rng() % (8 * kMiB / 512 - 200)) * 512;
      auto data = pattern(512 * (1 + rng() % 200), rng());
      if (!img->write_at(off, data)) ++errors;
      std::memcpy(model.data() + off, data.data(), data.size());
      if (!img->flush_all()) ++errors;
      std::vector<std::byte> back(data.size());
      if (!img->read_at(off, back) || back != data) ++errors;
      ++ops;
    }
  });
  for (int restart = 0; restart < 2; ++restart) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    s.stop();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    start_qemu_nbd(d, s, "raw", d.file("disk.raw"), d.file("nbd.sock"));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  stop = true;
  worker.join();
  INFO("operations " << ops);
  CHECK(errors == 0);
  CHECK(ops > 10);
  CHECK(read_all(*img) == model);
  img.reset();
  s.stop();
  CHECK(read_file(d.file("disk.raw")) == model);
}

TEST_CASE("nbd: bad specs and absent servers are clear errors", "[nbd]") {
  auto r = open_nbd("nbd:unix:");
  REQUIRE(!r);
  CHECK(r.error().describe().find("socket path") != std::string::npos);
  r = open_nbd("/not/an/nbd/spec");
  REQUIRE(!r);
  r = open_nbd("nbd:unix:/nonexistent/socket");
  REQUIRE(!r);
  CHECK(r.error().describe().find("connecting to nbd:unix:/nonexistent/socket") != std::string::npos);
}

}  // namespace
}  // namespace pvhost::block::test
