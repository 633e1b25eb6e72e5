#include "hw/xen/xs_client.h"

extern "C" {  // libxenstore's header has no C++ guards
#include <xenstore.h>
}

#include <charconv>
#include <cstdlib>

#include "src/log.h"

namespace pvhost::xen {
namespace {

std::string str(std::string_view s) { return std::string(s); }

Error xs_error(std::string_view op, std::string_view path) {
  return Error::from_errno(fmt::format("xenstore {} {}", op, path));
}

}  // namespace

Result<std::unique_ptr<XsClient>> XsClient::open(std::optional<std::string> socket_path) {
  struct xs_handle* h = nullptr;
  if (socket_path) {
    // libxenstore reads XENSTORED_PATH at open time; set it only around the call.
    const char* old = ::getenv("XENSTORED_PATH");
    std::optional<std::string> saved = old ? std::optional<std::string>(old) : std::nullopt;
    ::setenv("XENSTORED_PATH", socket_path->c_str(), 1);
    h = ::xs_open(XS_OPEN_SOCKETONLY);
    const int err = errno;
    if (saved) ::setenv("XENSTORED_PATH", saved->c_str(), 1);
    else ::unsetenv("XENSTORED_PATH");
    errno = err;
    if (h == nullptr) return fail_errno(fmt::format("connect to xenstored at {}", *socket_path));
  } else {
    h = ::xs_open(0);
    if (h == nullptr) return fail_errno("open xenstore (xenstored socket or /dev/xen/xenbus)");
  }
  return std::unique_ptr<XsClient>(new XsClient(h));
}

XsClient::~XsClient() {
  fd_watch_.reset();
  for (auto& [id, reg] : watches_) (void)::xs_unwatch(h_, reg.path.c_str(), std::to_string(id).c_str());
  ::xs_close(h_);
}

Result<std::string> XsClient::read(Transaction t, std::string_view path) {
  unsigned int len = 0;
  void* v = ::xs_read(h_, t.id, str(path).c_str(), &len);
  if (v == nullptr) return std::unexpected(xs_error("read", path));
  std::string out(static_cast<char*>(v), len);
  ::free(v);
  return out;
}

Result<void> XsClient::write(Transaction t, std::string_view path, std::string_view value) {
  if (!::xs_write(h_, t.id, str(path).c_str(), value.data(), static_cast<unsigned>(value.size())))
    return std::unexpected(xs_error("write", path));
  return {};
}

Result<std::vector<std::string>> XsClient::directory(Transaction t, std::string_view path) {
  unsigned int n = 0;
  char** entries = ::xs_directory(h_, t.id, str(path).c_str(), &n);
  if (entries == nullptr) return std::unexpected(xs_error("directory", path));
  std::vector<std::string> out(entries, entries + n);
  ::free(entries);  // one allocation holds the array and the strings (xenstore.h)
  return out;
}

Result<void> XsClient::mkdir(Transaction t, std::string_view path) {
  if (!::xs_mkdir(h_, t.id, str(path).c_str())) return std::unexpected(xs_error("mkdir", path));
  return {};
}

Result<void> XsClient::rm(Transaction t, std::string_view path) {
  if (!::xs_rm(h_, t.id, str(path).c_str())) return std::unexpected(xs_error("rm", path));
  return {};
}

Result<std::vector<Permission>> XsClient::get_permissions(Transaction t, std::string_view path) {
  unsigned int n = 0;
  struct xs_permissions* p = ::xs_get_permissions(h_, t.id, str(path).c_str(), &n);
  if (p == nullptr) return std::unexpected(xs_error("get_permissions", path));
  std::vector<Permission> out;
  for (unsigned i = 0; i < n; ++i) {
    Permission::Kind k = Permission::Kind::none;
    if ((p[i].perms & XS_PERM_READ) && (p[i].perms & XS_PERM_WRITE)) k = Permission::Kind::both;
    else if (p[i].perms & XS_PERM_READ) k = Permission::Kind::read;
    else if (p[i].perms & XS_PERM_WRITE) k = Permission::Kind::write;
    out.push_back({DomId(static_cast<uint16_t>(p[i].id)), k});
  }
  ::free(p);
  return out;
}

Result<void> XsClient::set_permissions(Transaction t, std::string_view path, std::span<const Permission> perms) {
  std::vector<struct xs_permissions> p;
  for (const Permission& perm : perms) {
    unsigned bits = XS_PERM_NONE;
    switch (perm.kind) {
      case Permission::Kind::none: bits = XS_PERM_NONE; break;
      case Permission::Kind::read: bits = XS_PERM_READ; break;
      case Permission::Kind::write: bits = XS_PERM_WRITE; break;
      case Permission::Kind::both: bits = XS_PERM_READ | XS_PERM_WRITE; break;
    }
    p.push_back({perm.domid.value(), bits});
  }
  if (!::xs_set_permissions(h_, t.id, str(path).c_str(), p.data(), static_cast<unsigned>(p.size())))
    return std::unexpected(xs_error("set_permissions", path));
  return {};
}

Result<Transaction> XsClient::transaction_start() {
  xs_transaction_t t = ::xs_transaction_start(h_);
  if (t == XBT_NULL) return fail_errno("xenstore transaction_start");
  return Transaction{t};
}

Result<void> XsClient::transaction_end(Transaction t, bool abort) {
  if (!::xs_transaction_end(h_, t.id, abort)) return fail_errno("xenstore transaction_end");
  return {};
}

Result<XenStore::Watch> XsClient::watch(std::string_view path, WatchCallback cb) {
  const uint64_t id = next_id_++;
  if (!::xs_watch(h_, str(path).c_str(), std::to_string(id).c_str()))
    return std::unexpected(xs_error("watch", path));
  watches_.emplace(id, Registration{str(path), std::make_shared<WatchCallback>(std::move(cb))});
  return Watch(this, id);
}

void XsClient::unwatch(uint64_t id) noexcept {
  auto it = watches_.find(id);
  if (it == watches_.end()) return;
  if (!::xs_unwatch(h_, it->second.path.c_str(), std::to_string(id).c_str()))
    log::debug("xenstore unwatch {}: {}", it->second.path, errno_name(errno));
  watches_.erase(it);
}

Result<std::string> XsClient::get_domain_path(DomId domid) {
  char* p = ::xs_get_domain_path(h_, domid.value());
  if (p == nullptr) return fail_errno(fmt::format("xenstore get_domain_path {}", domid));
  std::string out(p);
  ::free(p);
  return out;
}

Result<void> XsClient::attach(EventLoop& loop) {
  const int fd = ::xs_fileno(h_);
  if (fd < 0) return fail_errno("xs_fileno");
  fd_watch_ = PVHOST_TRY(loop.watch_fd(fd, EPOLLIN, [this](uint32_t) { dispatch_watches(); }));
  return {};
}

void XsClient::dispatch_watches() {
  // xs_check_watch returns queued events without blocking; each is looked up by token so a
  // callback may remove any watch, itself included, while we iterate.
  while (char** ev = ::xs_check_watch(h_)) {
    std::string path = ev[XS_WATCH_PATH];
    uint64_t id = 0;
    const char* tok = ev[XS_WATCH_TOKEN];
    std::from_chars(tok, tok + std::strlen(tok), id);
    ::free(ev);
    auto it = watches_.find(id);
    if (it == watches_.end()) continue;  // unwatched while the event was queued
    std::shared_ptr<WatchCallback> cb = it->second.cb;
    (*cb)(path);
  }
}

// ---------------------------------------------------------------------------------------

Result<void> transact(XenStore& xs, const std::function<Result<void>(Transaction)>& body, int max_attempts) {
  for (int attempt = 0; attempt < max_attempts; ++attempt) {
    Transaction t = PVHOST_TRY(xs.transaction_start());
    if (auto r = body(t); !r) {
      // Aborting only releases the transaction; the body's error is what matters.
      (void)xs.transaction_end(t, /*abort=*/true);
      return r;
    }
    auto end = xs.transaction_end(t, /*abort=*/false);
    if (end) return {};
    if (end.error().code() != EAGAIN) return end;
  }
  return fail(EAGAIN, fmt::format("xenstore transaction still conflicting after {} attempts", max_attempts));
}

Result<uint64_t> read_uint(XenStore& xs, Transaction t, std::string_view path) {
  std::string v = PVHOST_TRY(xs.read(t, path));
  uint64_t out = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec != std::errc() || p != v.data() + v.size() || v.empty())
    return fail(EINVAL, fmt::format("{}: '{}' is not an unsigned integer", path, v));
  return out;
}

Result<std::optional<std::string>> read_optional(XenStore& xs, Transaction t, std::string_view path) {
  auto r = xs.read(t, path);
  if (r) return std::optional<std::string>(std::move(*r));
  if (r.error().code() == ENOENT) return std::optional<std::string>();
  return std::unexpected(std::move(r).error());
}

void PortBinding::reset() noexcept {
  if (ch_ == nullptr) return;
  if (auto r = std::exchange(ch_, nullptr)->unbind(port_); !r)
    log::warn("unbind event channel {}: {}", port_, r.error().describe());
}

}  // namespace pvhost::xen
