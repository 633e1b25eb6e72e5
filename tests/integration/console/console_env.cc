#include "tests/integration/console/console_env.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "hw/xen/emu/toolstack/domain.h"
#include "tests/frontends/consfront/pattern.h"

namespace pvhost::test {

using namespace std::chrono_literals;

namespace {

std::string env_or(const char* name, const std::string& def) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : def;
}
std::string build_dir() { return env_or("PVHOST_BUILD_DIR", "."); }

}  // namespace

Child::Child(const std::vector<std::string>& argv, std::string log_path) : log_path_(std::move(log_path)) {
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    int fd = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
}

Child::Child(Child&& o) noexcept
    : pid_(std::exchange(o.pid_, -1)), status_(o.status_), log_path_(std::move(o.log_path_)) {}

Child& Child::operator=(Child&& o) noexcept {
  if (this != &o) {
    kill_now();
    pid_ = std::exchange(o.pid_, -1);
    status_ = o.status_;
    log_path_ = std::move(o.log_path_);
  }
  return *this;
}

Child::~Child() { kill_now(); }

void Child::kill_now() {
  if (pid_ > 0 && !status_) {
    ::kill(pid_, SIGKILL);
    int st = 0;
    ::waitpid(pid_, &st, 0);
    status_ = 128 + SIGKILL;
  }
}

bool Child::running() {
  if (pid_ <= 0 || status_) return false;
  int st = 0;
  if (::waitpid(pid_, &st, WNOHANG) == pid_) {
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return false;
  }
  return true;
}

std::optional<int> Child::wait(std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (running()) {
    if (std::chrono::steady_clock::now() > end) return std::nullopt;
    std::this_thread::sleep_for(5ms);
  }
  return status_;
}

std::string Child::log() const {
  std::ifstream f(log_path_);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

bool poll_until(const std::function<bool()>& cond, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

ConsoleEnv::ConsoleEnv() {
  rundir_ = "/tmp/pvhost-con-XXXXXX";
  if (::mkdtemp(rundir_.data()) == nullptr) throw std::runtime_error("mkdtemp");
  log_files_.push_back(rundir_ + "/xenemu.log");
  xenemu_ = Child({build_dir() + "/hw/xen/emu/broker/pvhost-xenemu", "--rundir", rundir_, "--strict"},
                  log_files_.back());
  // Both sockets accept connections once the daemon is up.
  std::unique_ptr<xen::XsClient> xs;
  if (!poll_until([&] {
        if (::access((rundir_ + "/hv.sock").c_str(), F_OK) != 0) return false;
        auto r = xen::XsClient::open(rundir_ + "/socket");
        if (!r) return false;
        xs = std::move(*r);
        return true;
      }))
    throw std::runtime_error("pvhost-xenemu did not start: " + xenemu_.log());
  xs_ = std::move(xs);
  // The broker socket file exists a moment before it listens: retry.
  std::optional<Error> last;
  if (!poll_until([&] {
        auto ts = xenemu::Toolstack::connect(rundir_);
        if (!ts) {
          last = ts.error();
          return false;
        }
        ts_ = std::move(*ts);
        return true;
      }))
    throw std::runtime_error("toolstack: " + (last ? last->describe() : std::string("?")));
  xenemu::DomainConfig cfg;
  cfg.name = "console-guest";
  auto d = xenemu::domain_create(*ts_, *xs_, cfg);
  if (!d) throw std::runtime_error("domain_create: " + d.error().describe());
  domid_ = *d;
}

ConsoleEnv::~ConsoleEnv() {
  pvhost_.kill_now();
  xs_.reset();
  ts_.reset();
  xenemu_.kill_now();
  std::string cmd = "rm -rf " + rundir_;
  (void)std::system(cmd.c_str());  // a temp directory; leftovers are harmless
}

toolstack::DeviceAddress ConsoleEnv::add_console(const std::string& devid, std::map<std::string, std::string> settings) {
  toolstack::DeviceRequest req{"console", domid_, DomId(0), std::move(settings)};
  req.settings["devid"] = devid;
  auto a = toolstack::device_add(*xs_, req);
  if (!a) throw std::runtime_error("device_add: " + a.error().describe());
  return *a;
}

void ConsoleEnv::start_pvhost(const std::vector<std::string>& extra) {
  std::vector<std::string> argv{env_or("PVHOST_BIN", build_dir() + "/src/app/pvhost"), "-xen-domid",
                                std::to_string(domid_.value()), "--xen=emu:" + rundir_, "-backends", "console",
                                "--log-level", "debug"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  log_files_.push_back(rundir_ + "/pvhost.log");
  pvhost_ = Child(argv, log_files_.back());
}

Child ConsoleEnv::start_consfront(const std::vector<std::string>& args) {
  std::vector<std::string> argv{build_dir() + "/tests/frontends/consfront/consfront", "--rundir", rundir_, "--domid",
                                std::to_string(domid_.value())};
  argv.insert(argv.end(), args.begin(), args.end());
  log_files_.push_back(fmt::format("{}/consfront-{}.log", rundir_, next_log_++));
  return Child(argv, log_files_.back());
}

std::string ConsoleEnv::read(const std::string& path) {
  auto v = xs_->read(xen::kNoTransaction, path);
  return v ? *v : std::string();
}

bool ConsoleEnv::wait_for(const std::string& path, const std::string& value, std::chrono::milliseconds timeout) {
  return poll_until([&] { return read(path) == value; }, timeout);
}

std::string ConsoleEnv::logs() {
  std::string out;
  for (const auto& f : log_files_) {
    std::ifstream in(f);
    std::stringstream s;
    s << in.rdbuf();
    std::string text = s.str();
    if (text.size() > 6000) text = "...\n" + text.substr(text.size() - 6000);
    out += "==== " + f + "\n" + text + "\n";
  }
  return out;
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
