#include "backends/console/host_end.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <termios.h>

#include <cstring>

#include "backends/console/line_stamper.h"
#include "src/log.h"

namespace pvhost::console {
namespace {

// The epoll registration of one fd, following the wanted directions. With nothing wanted
// the fd is taken out of the loop altogether: epoll reports hang-ups even with an empty
// mask, and a hung-up client we are not ready to read from must not spin the loop (its
// last bytes are read, then its EOF seen, once the ring has room again).
class FdInterest {
 public:
  FdInterest(EventLoop& loop, std::function<void(uint32_t)> cb) : loop_(loop), cb_(std::move(cb)) {}
  void set_fd(int fd) {
    fd_ = fd;
    watch_.reset();
    update();
  }
  void want_read(bool on) {
    read_ = on;
    update();
  }
  void want_write(bool on) {
    write_ = on;
    update();
  }

 private:
  void update() {
    const uint32_t mask = (read_ ? EPOLLIN : 0u) | (write_ ? EPOLLOUT : 0u);
    if (fd_ < 0 || mask == 0) {
      watch_.reset();
      return;
    }
    if (watch_.active()) {
      if (auto r = watch_.set_events(mask); !r) log::warn("console: epoll: {}", r.error().describe());
      return;
    }
    auto w = loop_.watch_fd(fd_, mask, cb_);
    if (!w) {
      log::warn("console: epoll: {}", w.error().describe());
      return;
    }
    watch_ = std::move(*w);
  }

  EventLoop& loop_;
  std::function<void(uint32_t)> cb_;
  int fd_ = -1;
  bool read_ = false;
  bool write_ = false;
  EventLoop::Watch watch_;
};

void dispatch(const HostEnd::Events& ev, uint32_t events) {
  // Hang-ups and errors are reported to the reader: read() then sees EOF or the error.
  if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) != 0 && ev.readable) ev.readable();
  if ((events & EPOLLOUT) != 0 && ev.writable) ev.writable();
}

// ---------------------------------------------------------------------------------------

class PtyEnd final : public HostEnd {
 public:
  PtyEnd(EventLoop& loop, Events ev) : ev_(std::move(ev)), interest_(loop, [this](uint32_t e) { dispatch(ev_, e); }) {}

  Result<void> open() {
    master_ = UniqueFd(::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC));
    if (!master_) return fail_errno("posix_openpt");
    if (::grantpt(master_.get()) != 0) return fail_errno("grantpt");
    if (::unlockpt(master_.get()) != 0) return fail_errno("unlockpt");
    char name[128];
    if (::ptsname_r(master_.get(), name, sizeof name) != 0) return fail_errno("ptsname");
    path_ = name;
    // Our own slave fd: keeps the slave's raw settings for every later reader (they reset
    // on the last close, CHANNELS.md) and keeps the master from seeing a hang-up.
    slave_ = UniqueFd(::open(name, O_RDWR | O_NOCTTY | O_CLOEXEC));
    if (!slave_) return fail_errno(fmt::format("open {}", path_));
    termios t{};
    if (::tcgetattr(slave_.get(), &t) != 0) return fail_errno("tcgetattr");
    ::cfmakeraw(&t);
    if (::tcsetattr(slave_.get(), TCSANOW, &t) != 0) return fail_errno("tcsetattr");
    PVHOST_TRY(set_nonblocking(master_.get()));
    interest_.set_fd(master_.get());
    return {};
  }

  std::string filename() const override { return "pty:" + path_; }
  std::optional<std::string> tty_path() const override { return path_; }

  size_t write(std::span<const std::byte> bytes) override {
    ssize_t n = ::write(master_.get(), bytes.data(), bytes.size());
    if (n >= 0) return static_cast<size_t>(n);
    if (errno != EAGAIN && errno != EINTR)
      PVHOST_LOG_RATELIMITED(log::Level::warn, "console {}: write: {}", path_, std::strerror(errno));
    return 0;
  }
  size_t read(std::span<std::byte> dst) override {
    ssize_t n = ::read(master_.get(), dst.data(), dst.size());
    if (n > 0) return static_cast<size_t>(n);
    // EAGAIN: nothing there. EIO cannot happen while our slave fd is open.
    return 0;
  }
  void want_read(bool on) override { interest_.want_read(on); }
  void want_write(bool on) override { interest_.want_write(on); }

 private:
  Events ev_;
  UniqueFd master_;
  UniqueFd slave_;
  std::string path_;
  FdInterest interest_;  // last: unregistered before the fds close
};

// ---------------------------------------------------------------------------------------

class SocketEnd final : public HostEnd {
 public:
  SocketEnd(EventLoop& loop, Events ev, std::string path)
      : ev_(std::move(ev)), path_(std::move(path)),
        listen_interest_(loop, [this](uint32_t) { accept_client(); }),
        client_interest_(loop, [this](uint32_t e) { dispatch(ev_, e); }) {}
  ~SocketEnd() override {
    client_interest_.set_fd(-1);
    listen_interest_.set_fd(-1);
    if (listen_) (void)::unlink(path_.c_str());  // our socket file; a failure leaves a stale name only
  }

  Result<void> open() {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path_.size() >= sizeof addr.sun_path) return fail(ENAMETOOLONG, fmt::format("socket path {}", path_));
    std::memcpy(addr.sun_path, path_.c_str(), path_.size() + 1);
    listen_ = UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!listen_) return fail_errno("socket");
    // A stale socket file from an earlier run would make bind fail; only sockets are removed.
    struct stat st{};
    if (::lstat(path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) (void)::unlink(path_.c_str());
    if (::bind(listen_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
      return fail_errno(fmt::format("bind {}", path_));
    if (::listen(listen_.get(), 4) != 0) return fail_errno(fmt::format("listen {}", path_));
    listen_interest_.set_fd(listen_.get());
    listen_interest_.want_read(true);
    return {};
  }

  std::string filename() const override {
    return client_ ? fmt::format("unix:{},server=on connected", path_) : fmt::format("unix:{},server=on", path_);
  }
  bool peer_connected() const override { return client_.valid(); }
  uint64_t reconnects() const override { return accepted_ == 0 ? 0 : accepted_ - 1; }

  size_t write(std::span<const std::byte> bytes) override {
    if (!client_) return 0;
    ssize_t n = ::send(client_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EAGAIN || errno == EINTR) return 0;
    drop_client(std::strerror(errno));
    return 0;
  }
  size_t read(std::span<std::byte> dst) override {
    if (!client_) return 0;
    ssize_t n = ::recv(client_.get(), dst.data(), dst.size(), MSG_DONTWAIT);
    if (n > 0) return static_cast<size_t>(n);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    drop_client(n == 0 ? "closed" : std::strerror(errno));
    return 0;
  }
  void want_read(bool on) override {
    want_read_ = on;
    client_interest_.want_read(on);
  }
  void want_write(bool on) override {
    want_write_ = on;
    client_interest_.want_write(on);
  }

 private:
  void accept_client() {
    if (client_) return;
    UniqueFd c(::accept4(listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!c) return;  // EAGAIN or the client went away already
    client_ = std::move(c);
    ++accepted_;
    log::info("console {}: client connected", path_);
    listen_interest_.want_read(false);  // one client at a time; others wait in the backlog
    client_interest_.set_fd(client_.get());
    if (ev_.changed) ev_.changed();
  }
  void drop_client(const char* why) {
    log::info("console {}: client left ({})", path_, why);
    client_interest_.set_fd(-1);
    client_.reset();
    listen_interest_.want_read(true);
    if (ev_.changed) ev_.changed();
  }

  Events ev_;
  std::string path_;
  UniqueFd listen_;
  UniqueFd client_;
  uint64_t accepted_ = 0;
  bool want_read_ = false;
  bool want_write_ = false;
  FdInterest listen_interest_;
  FdInterest client_interest_;
};

// ---------------------------------------------------------------------------------------

class FileEnd final : public HostEnd {
 public:
  FileEnd(std::string path, bool stamped) : path_(std::move(path)), stamped_(stamped) {}
  Result<void> open() {
    fd_ = UniqueFd(::open(path_.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640));
    if (!fd_) return fail_errno(fmt::format("open {}", path_));
    return {};
  }
  std::string filename() const override { return (stamped_ ? "log:" : "file:") + path_; }
  size_t write(std::span<const std::byte> bytes) override {
    std::string stamped;
    std::span<const std::byte> out = bytes;
    if (stamped_) {
      stamped = stamper_.feed(bytes, std::chrono::system_clock::now());
      out = std::as_bytes(std::span(stamped));
    }
    // A regular file: writes complete (blocking). A failing disk loses console output, which
    // is logged, never held: the guest must not stall on our disk.
    if (auto r = write_all(fd_.get(), out); !r)
      PVHOST_LOG_RATELIMITED(log::Level::warn, "console {}: {}", path_, r.error().describe());
    return bytes.size();
  }
  size_t read(std::span<std::byte>) override { return 0; }

 private:
  std::string path_;
  bool stamped_;
  LineStamper stamper_;
  UniqueFd fd_;
};

class NullEnd final : public HostEnd {
 public:
  std::string filename() const override { return "null"; }
  size_t write(std::span<const std::byte> bytes) override { return bytes.size(); }
  size_t read(std::span<std::byte>) override { return 0; }
};

}  // namespace

Result<std::unique_ptr<HostEnd>> open_host_end(const OutputSpec& spec, EventLoop& loop, HostEnd::Events events) {
  if (std::holds_alternative<PtyOutput>(spec)) {
    auto e = std::make_unique<PtyEnd>(loop, std::move(events));
    PVHOST_TRY_CTX(e->open(), "pty");
    return e;
  }
  if (std::holds_alternative<NullOutput>(spec)) return std::make_unique<NullEnd>();
  if (const auto* f = std::get_if<FileOutput>(&spec)) {
    auto e = std::make_unique<FileEnd>(f->path, false);
    PVHOST_TRY_CTX(e->open(), "file");
    return e;
  }
  if (const auto* l = std::get_if<LogOutput>(&spec)) {
    auto e = std::make_unique<FileEnd>(l->path, true);
    PVHOST_TRY_CTX(e->open(), "log");
    return e;
  }
  const auto& s = std::get<SocketOutput>(spec);
  auto e = std::make_unique<SocketEnd>(loop, std::move(events), s.path);
  PVHOST_TRY_CTX(e->open(), "unix socket");
  return e;
}

}  // namespace pvhost::console
