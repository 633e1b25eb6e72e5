// Socket glue of the emulated xenstored: unix listeners for dom0 and each introduced
// domain, non-blocking connections on the EventLoop, framing with MessageReader, and
// bounded output buffers. The protocol itself is Server (server.h).
//
// Threading: everything runs on the EventLoop's thread; start(), introduce_domain(),
// release_domain() and the destructor must be called there.
#include "hw/xen/emu/xenstored/xenstored.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <set>

#include "hw/xen/emu/xenstored/server.h"
#include "hw/xen/emu/xenstored/wire.h"
#include "src/fd.h"
#include "src/log.h"

namespace pvhost::xenemu {

namespace {

constexpr size_t kReadChunk = 64 * 1024;

Result<UniqueFd> listen_unix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return fail(ENAMETOOLONG, "socket path " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) return fail_errno("socket");
  // A stale socket from an earlier run would make bind() fail; the rundir is ours.
  (void)::unlink(path.c_str());
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0)
    return fail_errno("bind " + path);
  if (::listen(fd.get(), 64) != 0) return fail_errno("listen " + path);
  return fd;
}

class XenstoredImpl final : public Xenstored {
 public:
  XenstoredImpl(EventLoop& loop, XenstoredOptions options)
      : loop_(loop),
        options_(std::move(options)),
        server_(options_.quotas, Server::Hooks{
                                     [this](DomId d) { on_domain_introduced(d); },
                                     [this](DomId d) { on_domain_released(d); },
                                     [this](Connection& c) { mark_dirty(c.id()); },
                                     [this](DomId d, bool in) {
                                       if (on_domain_change) on_domain_change(d, in);
                                     },
                                 }) {}

  ~XenstoredImpl() override {
    *alive_ = false;
    clients_.clear();
    listeners_.clear();  // Listener's destructor unlinks its socket file
  }

  Result<void> open() {
    if (::mkdir(options_.rundir.c_str(), 0755) != 0 && errno != EEXIST)
      return fail_errno("mkdir " + options_.rundir);
    PVHOST_TRY(add_listener(kDom0, options_.rundir + "/socket"));
    log::info("xenstored: listening on {}/socket", options_.rundir);
    return {};
  }

  Result<void> introduce_domain(DomId domid) override {
    if (server_.is_introduced(domid)) return {};
    if (domid == kDom0 || domid.value() >= kDomidSelf.value())
      return fail(EINVAL, fmt::format("introduce_domain: invalid domid {}", domid));
    PVHOST_TRY_CTX(add_listener(domid, domain_socket_path(domid)), "introduce_domain");
    (void)server_.introduce(domid);  // true: checked above
    return {};
  }

  Result<void> release_domain(DomId domid) override {
    (void)server_.release(domid);  // false: not introduced, nothing to do (idempotent)
    return {};
  }

  std::optional<DomId> target_of(DomId domid) const override { return server_.target_of(domid); }

 private:
  struct Listener {
    DomId domid;
    std::string path;
    UniqueFd fd;
    EventLoop::Watch watch;
    ~Listener() {
      watch.reset();
      // The socket file is ours; a failure leaves a stale file the next bind() removes.
      if (!path.empty()) (void)::unlink(path.c_str());
    }
  };

  struct Client {
    uint64_t conn_id = 0;
    DomId domid;
    UniqueFd fd;
    EventLoop::Watch watch;
    MessageReader reader;
    bool polling_out = false;
  };

  [[nodiscard]] std::string domain_socket_path(DomId domid) const {
    return fmt::format("{}/domain-{}.sock", options_.rundir, domid.value());
  }

  Result<void> add_listener(DomId domid, const std::string& path) {
    if (listeners_.contains(domid.value())) return {};
    auto l = std::make_unique<Listener>();
    l->domid = domid;
    l->fd = PVHOST_TRY(listen_unix(path));
    l->path = path;
    Listener* raw = l.get();
    l->watch = PVHOST_TRY(loop_.watch_fd(l->fd.get(), EPOLLIN, [this, raw](uint32_t) { accept_all(*raw); }));
    listeners_.emplace(domid.value(), std::move(l));
    return {};
  }

  void on_domain_introduced(DomId domid) {
    // Reached for a toolstack's XS_INTRODUCE (introduce_domain() made the socket first).
    if (auto r = add_listener(domid, domain_socket_path(domid)); !r)
      log::error("xenstored: cannot serve domain {}: {}", domid, r.error().describe());
    else
      log::info("xenstored: domain {} introduced", domid);
  }

  void on_domain_released(DomId domid) {
    listeners_.erase(domid.value());
    log::info("xenstored: domain {} released", domid);
    schedule([this] { reap(); });
  }

  void accept_all(Listener& l) {
    for (;;) {
      UniqueFd fd(::accept4(l.fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
      if (!fd) {
        if (errno == EAGAIN || errno == EINTR) return;  // EWOULDBLOCK == EAGAIN on Linux
        PVHOST_LOG_RATELIMITED(log::Level::warn, "xenstored: accept on {}: {}", l.path,
                               std::strerror(errno));
        return;
      }
      auto c = std::make_unique<Client>();
      c->domid = l.domid;
      c->fd = std::move(fd);
      Connection& conn = server_.add_connection(l.domid);
      c->conn_id = conn.id();
      const uint64_t id = conn.id();
      auto w = loop_.watch_fd(c->fd.get(), EPOLLIN, [this, id](uint32_t ev) { on_client(id, ev); });
      if (!w) {
        log::error("xenstored: watching a connection: {}", w.error().describe());
        server_.remove_connection(id);
        continue;
      }
      c->watch = std::move(*w);
      log::debug("xenstored: connection {} for domain {}", id, l.domid);
      clients_.emplace(id, std::move(c));
    }
  }

  void on_client(uint64_t id, uint32_t events) {
    auto it = clients_.find(id);
    if (it == clients_.end()) return;
    Client& cl = *it->second;
    Connection* conn = server_.connection(id);
    if (conn == nullptr) return close_client(id);

    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
      bool eof = false;
      char buf[kReadChunk];
      const ssize_t n = ::recv(cl.fd.get(), buf, sizeof(buf), MSG_DONTWAIT);
      if (n > 0) {
        cl.reader.feed(std::string_view(buf, static_cast<size_t>(n)));
      } else if (n == 0) {
        eof = true;
      } else if (errno != EAGAIN && errno != EINTR) {
        eof = true;
      }
      for (;;) {
        auto next = cl.reader.next();
        if (std::holds_alternative<std::monostate>(next)) break;
        if (auto* err = std::get_if<FrameError>(&next)) {
          PVHOST_LOG_RATELIMITED(log::Level::warn,
                                 "xenstored: closing connection {} (domain {}): {}", id,
                                 cl.domid, describe(*err));
          return close_client(id);
        }
        server_.handle(*conn, std::get<WireMessage>(next));
        if (conn->closing) break;
      }
      if (eof) return close_client(id);
    }
    flush(id);
  }

  void mark_dirty(uint64_t id) {
    dirty_.insert(id);
    if (!flush_scheduled_) {
      flush_scheduled_ = true;
      schedule([this] {
        flush_scheduled_ = false;
        std::set<uint64_t> d;
        d.swap(dirty_);
        for (uint64_t i : d) flush(i);
      });
    }
  }

  void flush(uint64_t id) {
    auto it = clients_.find(id);
    if (it == clients_.end()) return;
    Client& cl = *it->second;
    Connection* conn = server_.connection(id);
    if (conn == nullptr) return close_client(id);
    while (!conn->out.empty()) {
      const ssize_t n = ::send(cl.fd.get(), conn->out.data(), conn->out.size(),
                               MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        conn->out.erase(0, static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) break;
      return close_client(id);  // peer gone
    }
    if (conn->closing) return close_client(id);
    const bool want_out = !conn->out.empty();
    if (want_out != cl.polling_out) {
      if (auto r = cl.watch.set_events(EPOLLIN | (want_out ? EPOLLOUT : 0u)); !r) {
        log::error("xenstored: {}", r.error().describe());
        return close_client(id);
      }
      cl.polling_out = want_out;
    }
  }

  void close_client(uint64_t id) {
    dirty_.erase(id);
    server_.remove_connection(id);
    clients_.erase(id);  // destroys the Watch, even from inside its own callback
  }

  void reap() {
    std::vector<uint64_t> dead;
    for (const auto& [id, cl] : clients_) {
      Connection* c = server_.connection(id);
      if (c == nullptr || c->closing) dead.push_back(id);
    }
    for (uint64_t id : dead) close_client(id);
  }

  // Runs `fn` after the current dispatch round, unless this object is gone by then.
  void schedule(std::function<void()> fn) {
    std::weak_ptr<bool> alive = alive_;
    loop_.defer([alive, fn = std::move(fn)] {
      if (auto a = alive.lock(); a && *a) fn();
    });
  }

  EventLoop& loop_;
  XenstoredOptions options_;
  Server server_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  std::map<uint16_t, std::unique_ptr<Listener>> listeners_;
  std::map<uint64_t, std::unique_ptr<Client>> clients_;
  std::set<uint64_t> dirty_;
  bool flush_scheduled_ = false;
};

}  // namespace

Result<std::unique_ptr<Xenstored>> Xenstored::start(EventLoop& loop, XenstoredOptions options) {
  auto impl = std::make_unique<XenstoredImpl>(loop, std::move(options));
  PVHOST_TRY_CTX(impl->open(), "xenstored");
  return std::unique_ptr<Xenstored>(std::move(impl));
}

}  // namespace pvhost::xenemu
