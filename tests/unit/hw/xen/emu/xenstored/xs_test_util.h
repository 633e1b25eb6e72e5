// Test scaffolding for the emulated xenstored: a server on a LoopThread over a temporary
// rundir, the real xenstore-* tools run through the shell, libxenstore handles, and a
// raw socket client speaking xs_wire.h by hand.
#pragma once

#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

extern "C" {
#include <xenstore.h>
}

#include "hw/xen/emu/xenstored/wire.h"
#include "hw/xen/emu/xenstored/xenstored.h"
#include "src/event_loop.h"
#include "src/fd.h"

namespace xstest {

using namespace pvhost;
using namespace pvhost::xenemu;

inline std::string make_tempdir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "pvhost-xs-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) std::abort();
  return tmpl;
}

// The server under test, in this process, on its own loop thread.
class Server {
 public:
  explicit Server(XenstoredQuotas quotas = {}) : dir_(make_tempdir()) {
    thread_ = std::move(*LoopThread::start("xenstored-test"));
    thread_->run_sync([&] {
      auto r = Xenstored::start(thread_->loop(), XenstoredOptions{dir_, quotas});
      if (r) xs_ = std::move(*r);
    });
    if (!xs_) std::abort();
  }
  ~Server() {
    thread_->run_sync([&] { xs_.reset(); });
    thread_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  [[nodiscard]] std::string socket() const { return dir_ + "/socket"; }
  [[nodiscard]] std::string domain_socket(int domid) const {
    return dir_ + "/domain-" + std::to_string(domid) + ".sock";
  }
  [[nodiscard]] const std::string& dir() const { return dir_; }
  bool introduce(int domid) {
    bool ok = false;
    thread_->run_sync([&] { ok = xs_->introduce_domain(DomId(static_cast<uint16_t>(domid))).has_value(); });
    return ok;
  }
  bool release(int domid) {
    bool ok = false;
    thread_->run_sync([&] { ok = xs_->release_domain(DomId(static_cast<uint16_t>(domid))).has_value(); });
    return ok;
  }
  std::optional<DomId> target_of(int domid) {
    std::optional<DomId> t;
    thread_->run_sync([&] { t = xs_->target_of(DomId(static_cast<uint16_t>(domid))); });
    return t;
  }
  // Runs `fn` on the loop thread (e.g. to read on_domain_change results).
  void sync(const std::function<void()>& fn) { thread_->run_sync(fn); }
  Xenstored& xenstored() { return *xs_; }

 private:
  std::string dir_;
  std::unique_ptr<LoopThread> thread_;
  std::unique_ptr<Xenstored> xs_;
};

struct ToolResult {
  int status = -1;  // exit code
  std::string out;  // stdout and stderr
};

inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'') q += "'\\''";
    else q += c;
  }
  return q + "'";
}

// Runs a real xenstore-* tool against `socket` (XENSTORED_PATH, as the tools honour it).
inline ToolResult tool(const std::string& socket, const std::vector<std::string>& argv) {
  std::string cmd = "XENSTORED_PATH=" + shell_quote(socket) + " timeout 20";
  for (const auto& a : argv) cmd += " " + shell_quote(a);
  cmd += " 2>&1";
  ToolResult r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

// libxenstore handle on `socket`.
struct XsCloser {
  void operator()(xs_handle* h) const { xs_close(h); }
};
using XsHandle = std::unique_ptr<xs_handle, XsCloser>;

inline XsHandle xs_connect(const std::string& socket) {
  // xs_open() reads XENSTORED_PATH when called; the test thread is the only user.
  ::setenv("XENSTORED_PATH", socket.c_str(), 1);
  return XsHandle(xs_open(XS_OPEN_SOCKETONLY));
}

inline std::optional<std::string> xs_read_str(xs_handle* h, const std::string& path,
                                              xs_transaction_t t = XBT_NULL) {
  unsigned len = 0;
  void* v = xs_read(h, t, path.c_str(), &len);
  if (!v) return std::nullopt;
  std::string s(static_cast<char*>(v), len);
  std::free(v);
  return s;
}

inline bool xs_write_str(xs_handle* h, const std::string& path, const std::string& value,
                         xs_transaction_t t = XBT_NULL) {
  return xs_write(h, t, path.c_str(), value.data(), static_cast<unsigned>(value.size()));
}

inline std::optional<std::vector<std::string>> xs_ls(xs_handle* h, const std::string& path) {
  unsigned num = 0;
  char** d = xs_directory(h, XBT_NULL, path.c_str(), &num);
  if (!d) return std::nullopt;
  std::vector<std::string> out(d, d + num);
  std::free(d);
  return out;
}

// Waits for one watch event on `h` (xs_fileno becomes readable), with a timeout.
inline std::optional<std::pair<std::string, std::string>> xs_next_event(xs_handle* h,
                                                                        int timeout_ms = 2000) {
  const int fd = xs_fileno(h);
  fd_set set;
  FD_ZERO(&set);
  FD_SET(fd, &set);
  timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  if (::select(fd + 1, &set, nullptr, nullptr, &tv) <= 0) return std::nullopt;
  unsigned num = 0;
  char** v = xs_read_watch(h, &num);
  if (!v) return std::nullopt;
  std::pair<std::string, std::string> ev{v[XS_WATCH_PATH], v[XS_WATCH_TOKEN]};
  std::free(v);
  return ev;
}

// A raw client: hand-made frames, for malformed input and exact wire checks.
class RawClient {
 public:
  explicit RawClient(const std::string& path) {
    fd_ = UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    connected_ = ::connect(fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    timeval tv{3, 0};
    (void)::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }
  [[nodiscard]] bool connected() const { return connected_; }
  bool send_raw(std::string_view bytes) {
    return ::send(fd_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL) ==
           static_cast<ssize_t>(bytes.size());
  }
  bool send(uint32_t type, std::string_view payload, uint32_t req_id = 1, uint32_t tx_id = 0) {
    return send_raw(encode_message(type, req_id, tx_id, payload));
  }
  // Next message, or nullopt on EOF/timeout.
  std::optional<WireMessage> recv() {
    for (;;) {
      auto n = reader_.next();
      if (auto* m = std::get_if<WireMessage>(&n)) return std::move(*m);
      if (std::holds_alternative<FrameError>(n)) return std::nullopt;
      char buf[8192];
      const ssize_t got = ::recv(fd_.get(), buf, sizeof(buf), 0);
      if (got <= 0) return std::nullopt;
      reader_.feed(std::string_view(buf, static_cast<size_t>(got)));
    }
  }
  // True when the server closed the connection (EOF), false on data or timeout.
  bool closed_by_peer() {
    char c;
    const ssize_t got = ::recv(fd_.get(), &c, 1, 0);
    return got == 0 || (got < 0 && errno == ECONNRESET);
  }
  // Request/response, skipping watch events.
  std::optional<WireMessage> call(uint32_t type, std::string_view payload, uint32_t tx_id = 0) {
    const uint32_t id = next_req_++;
    if (!send(type, payload, id, tx_id)) return std::nullopt;
    for (;;) {
      auto m = recv();
      if (!m) return std::nullopt;
      if (m->type != XS_WATCH_EVENT && m->req_id == id) return m;
    }
  }

 private:
  UniqueFd fd_;
  bool connected_ = false;
  MessageReader reader_;
  uint32_t next_req_ = 100;
};

inline std::string z(std::string_view s) {
  std::string out(s);
  out += '\0';
  return out;
}

inline std::string err_of(const WireMessage& m) {
  if (m.type != XS_ERROR) return "";
  return std::string(m.payload.c_str());
}

}  // namespace xstest
