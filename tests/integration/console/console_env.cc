#include "tests/integration/console/console_env.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "tests/frontends/consfront/pattern.h"

namespace pvhost::test {

using namespace std::chrono_literals;

ConsoleEnv::ConsoleEnv() : GuestEnv({.name = "console-guest"}, "console") {}

toolstack::DeviceAddress ConsoleEnv::add_console(const std::string& devid, std::map<std::string, std::string> settings) {
  settings["devid"] = devid;
  return add_device(std::move(settings));
}

int connect_unix(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

std::vector<std::byte> exchange(int fd, uint64_t offset, size_t total, bool slow, std::chrono::milliseconds timeout) {
  const int flags = ::fcntl(fd, F_GETFL);
  (void)::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  std::vector<std::byte> got;
  size_t sent = 0;
  size_t next_pause = 48 * 1024;
  const auto end = std::chrono::steady_clock::now() + timeout;
  std::vector<std::byte> buf(16384);
  while (got.size() < total && std::chrono::steady_clock::now() < end) {
    pollfd p{fd, static_cast<short>(POLLIN | (sent < total ? POLLOUT : 0)), 0};
    if (::poll(&p, 1, 50) < 0) break;
    if ((p.revents & POLLOUT) != 0 && sent < total) {
      const size_t n = std::min<size_t>(total - sent, 3000 + sent % 5000);
      for (size_t i = 0; i < n; ++i) buf[i] = pattern_byte(offset + sent + i);
      ssize_t w = ::write(fd, buf.data(), n);
      if (w > 0) sent += static_cast<size_t>(w);
    }
    if ((p.revents & POLLIN) != 0) {
      ssize_t r = ::read(fd, buf.data(), buf.size());
      if (r > 0) got.insert(got.end(), buf.begin(), buf.begin() + r);
      if (slow && got.size() >= next_pause) {
        next_pause += 48 * 1024;
        std::this_thread::sleep_for(150ms);  // a slow host reader: everything behind us backs up
      }
    }
    if ((p.revents & (POLLHUP | POLLERR)) != 0 && (p.revents & POLLIN) == 0) break;
  }
  return got;
}

std::vector<std::byte> read_bytes(int fd, size_t total, std::chrono::milliseconds quiet, std::chrono::milliseconds timeout) {
  std::vector<std::byte> got;
  std::vector<std::byte> buf(16384);
  const auto end = std::chrono::steady_clock::now() + timeout;
  auto last = std::chrono::steady_clock::now();
  while (got.size() < total && std::chrono::steady_clock::now() < end) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 20) < 0) break;
    if ((p.revents & POLLIN) != 0) {
      ssize_t r = ::read(fd, buf.data(), std::min(buf.size(), total - got.size()));
      if (r > 0) {
        got.insert(got.end(), buf.begin(), buf.begin() + r);
        last = std::chrono::steady_clock::now();
        continue;
      }
      if (r == 0) break;
    }
    if (std::chrono::steady_clock::now() - last > quiet) break;
  }
  return got;
}

std::optional<size_t> first_mismatch(const std::vector<std::byte>& got, uint64_t offset) {
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != pattern_byte(offset + i)) return i;
  return std::nullopt;
}

}  // namespace pvhost::test
