#include "hw/xen/emu/xenstored/server.h"

#include <cerrno>
#include <cstdlib>

#include <fmt/format.h>

#include "src/error.h"
#include "src/log.h"

namespace pvhost::xenemu {

namespace {

constexpr uint16_t kDomidFirstReserved = 0x7FF0;  // DOMID_FIRST_RESERVED == DOMID_SELF

uint32_t c_atoi(const std::string& s) { return static_cast<uint32_t>(std::atoi(s.c_str())); }

std::string with_nul(std::string_view s) {
  std::string out(s);
  out += '\0';
  return out;
}

const std::string kOk = with_nul("OK");

bool privileged_only(Op op) {
  switch (op) {
    case Op::control:
    case Op::introduce:
    case Op::release:
    case Op::is_domain_introduced:
    case Op::resume:
    case Op::set_target:
      return true;
    case Op::directory:
    case Op::read:
    case Op::get_perms:
    case Op::watch:
    case Op::unwatch:
    case Op::transaction_start:
    case Op::transaction_end:
    case Op::get_domain_path:
    case Op::write:
    case Op::mkdir:
    case Op::rm:
    case Op::set_perms:
    case Op::reset_watches:
    case Op::directory_part:
      return false;
  }
  return true;
}

// The path a watch event reports (get_watch_path()): relative watches see the path
// relative to the connection's implicit path.
std::string watch_path(const WatchReg& w, DomId domid, std::string_view name) {
  if (!w.relative) return std::string(name);
  const std::string prefix = implicit_path(domid);
  std::string_view p = name;
  if (p.starts_with(prefix)) p.remove_prefix(prefix.size());
  if (p.starts_with('/')) p.remove_prefix(1);
  return std::string(p);
}

}  // namespace

Server::Server(XenstoredQuotas quotas, Hooks hooks)
    : store_(quotas), quotas_(quotas), hooks_(std::move(hooks)) {
  store_.set_event_sink([this](const ChangeEvent& ev) { deliver(ev); });
}

Connection& Server::add_connection(DomId domid) {
  const uint64_t id = next_conn_id_++;
  auto [it, ok] = conns_.emplace(id, std::make_unique<Connection>(id, domid));
  return *it->second;
}

void Server::remove_connection(uint64_t id) { conns_.erase(id); }

Connection* Server::connection(uint64_t id) {
  auto it = conns_.find(id);
  return it == conns_.end() ? nullptr : it->second.get();
}

std::optional<DomId> Server::target_of(DomId domid) const {
  auto it = domains_.find(domid.value());
  if (it == domains_.end()) return std::nullopt;
  return it->second.target;
}

Caller Server::caller_for(const Connection& c) const { return Caller{c.domid(), target_of(c.domid())}; }

void Server::reply(Connection& c, const Request& r, uint32_t type, std::string_view payload) {
  // send_reply(): a reply that does not fit one payload is an E2BIG error instead (this
  // is how a long DIRECTORY sends libxenstore to DIRECTORY_PART).
  if (payload.size() > kPayloadMax) {
    reply_error(c, r.req_id, r.tx_id, E2BIG);
    return;
  }
  if (c.out.size() > 2 * kMaxPendingOutput) {
    PVHOST_LOG_RATELIMITED(log::Level::warn,
                           "xenstored: connection {} (dom{}) does not read its replies; closing",
                           c.id(), c.domid());
    c.closing = true;
    return;
  }
  c.out += encode_message(type, r.req_id, r.tx_id, payload);
  if (hooks_.output_ready) hooks_.output_ready(c);
}

void Server::reply_error(Connection& c, uint32_t req_id, uint32_t tx_id, int code) {
  ++stats_.errors;
  c.out += encode_message(XS_ERROR, req_id, tx_id, error_payload(code));
  if (hooks_.output_ready) hooks_.output_ready(c);
}

void Server::send_event(Connection& c, std::string_view path, std::string_view token) {
  std::string payload(path);
  payload += '\0';
  payload += token;
  payload += '\0';
  if (payload.size() > kPayloadMax) return;  // send_event(): over-long events are not sent
  if (c.closing) return;
  if (c.out.size() > kMaxPendingOutput) {
    ++stats_.events_dropped;
    PVHOST_LOG_RATELIMITED(log::Level::warn,
                           "xenstored: dropping watch event {} for connection {} (dom{}): "
                           "output backlog",
                           path, c.id(), c.domid());
    return;
  }
  ++stats_.events;
  // req_id and tx_id are both 0 (xenstore.txt WATCH_EVENT).
  c.out += encode_message(XS_WATCH_EVENT, 0, 0, payload);
  if (hooks_.output_ready) hooks_.output_ready(c);
}

bool Server::watch_permitted(const Connection& c, const ChangeEvent& ev) const {
  // watch_permitted(): the node (with its old or new permissions) or its parent must be
  // readable by the watching connection.
  const Caller caller = caller_for(c);
  if (ev.old_perms && (perm_for(caller, *ev.old_perms) & kPermRead)) return true;
  if (!ev.node_perms) return false;
  if (perm_for(caller, *ev.node_perms) & kPermRead) return true;
  return ev.parent_perms && (perm_for(caller, *ev.parent_perms) & kPermRead);
}

bool Server::special_readable(const Connection& c, const std::string& name) const {
  const PermList& p = name == "@introduceDomain" ? introduce_perms_ : release_perms_;
  return perm_for(caller_for(c), p) & kPermRead;
}

void Server::deliver(const ChangeEvent& ev) {
  for (auto& [id, conn] : conns_) {
    Connection& c = *conn;
    if (c.closing || c.watches_.empty()) continue;
    if (!watch_permitted(c, ev)) continue;
    for (const auto& w : c.watches_) {
      const bool match = ev.exact ? w.node == ev.path : is_child(ev.path, w.node);
      if (match) send_event(c, watch_path(w, c.domid(), ev.path), w.token);
    }
  }
}

void Server::fire_special(const std::string& name) {
  for (auto& [id, conn] : conns_) {
    Connection& c = *conn;
    if (c.closing || !special_readable(c, name)) continue;
    for (const auto& w : c.watches_)
      if (w.node == name) send_event(c, name, w.token);
  }
}

bool Server::introduce(DomId domid) {
  if (domains_.contains(domid.value())) return false;
  domains_.emplace(domid.value(), DomainState{});
  if (hooks_.domain_introduced) hooks_.domain_introduced(domid);
  fire_special("@introduceDomain");
  return true;
}

bool Server::release(DomId domid) {
  if (domains_.erase(domid.value()) == 0) return false;
  // The domain's connections go first, with their watches and transactions
  // (destroy_conn() before destroy_domain() in xenstored).
  for (auto& [id, conn] : conns_) {
    if (conn->domid() == domid) {
      reset_connection(*conn);
      conn->closing = true;
    }
  }
  for (auto& [d, st] : domains_)
    if (st.target == domid) st.target.reset();
  if (hooks_.domain_released) hooks_.domain_released(domid);
  store_.remove_domain_nodes(domid);
  // remove_domid_from_perm() on the special nodes.
  for (PermList* p : {&introduce_perms_, &release_perms_}) {
    if ((*p)[0].domid == domid.value()) (*p)[0].domid = 0;
    std::erase_if(*p, [&](const Perm& e) { return &e != &(*p)[0] && e.domid == domid.value(); });
  }
  fire_special("@releaseDomain");
  return true;
}

void Server::reset_connection(Connection& c) {
  c.watches_.clear();
  c.transactions_.clear();
}

void Server::handle(Connection& conn, const WireMessage& msg) {
  ++stats_.requests;
  auto decoded = decode_request(msg);
  if (auto* e = std::get_if<RequestError>(&decoded)) {
    PVHOST_LOG_RATELIMITED(log::Level::debug, "xenstored: dom{} sent type {} ({}): {}",
                           conn.domid(), msg.type, op_name(msg.type), e->why);
    reply_error(conn, msg.req_id, msg.tx_id, e->code);
    return;
  }
  dispatch(conn, std::get<Request>(decoded));
}

void Server::dispatch(Connection& c, const Request& r) {
  const Caller caller = caller_for(c);
  if (privileged_only(r.op) && !caller.privileged()) return reply_error(c, r.req_id, r.tx_id, EACCES);

  // process_message(): WATCH/UNWATCH ignore tx_id; everything else must name a live
  // transaction of this connection when it is non-zero.
  Store::Transaction* tx = nullptr;
  if (r.op != Op::watch && r.op != Op::unwatch && r.tx_id != 0) {
    auto it = c.transactions_.find(r.tx_id);
    if (it == c.transactions_.end()) return reply_error(c, r.req_id, r.tx_id, ENOENT);
    tx = it->second.get();
  }
  if (r.invalid) {
    PVHOST_LOG_RATELIMITED(log::Level::debug, "xenstored: dom{} {}: {}", c.domid(),
                           op_name(static_cast<uint32_t>(r.op)), r.invalid);
    return reply_error(c, r.req_id, r.tx_id, EINVAL);
  }

  auto done = [&](const XsResult<void>& res) {
    if (res) return reply(c, r, static_cast<uint32_t>(r.op), kOk);
    reply_error(c, r.req_id, r.tx_id, res.error());
  };
  const uint32_t type = static_cast<uint32_t>(r.op);

  switch (r.op) {
    case Op::read: {
      auto v = store_.read(caller, tx, r.args[0]);
      if (!v) return reply_error(c, r.req_id, r.tx_id, v.error());
      return reply(c, r, type, *v);
    }
    case Op::write:
      return done(store_.write(caller, tx, r.args[0], r.value));
    case Op::mkdir:
      return done(store_.mkdir(caller, tx, r.args[0]));
    case Op::rm:
      return done(store_.rm(caller, tx, r.args[0]));
    case Op::directory: {
      auto v = store_.directory(caller, tx, r.args[0]);
      if (!v) return reply_error(c, r.req_id, r.tx_id, v.error());
      std::string payload;
      for (const auto& ch : *v) payload += with_nul(ch);
      return reply(c, r, type, payload);
    }
    case Op::directory_part: {
      auto v = store_.directory_part(caller, tx, r.args[0], r.args[1]);
      if (!v) return reply_error(c, r.req_id, r.tx_id, v.error());
      return reply(c, r, type, *v);
    }
    case Op::get_perms: {
      auto v = store_.get_perms(caller, tx, r.args[0]);
      if (!v) return reply_error(c, r.req_id, r.tx_id, v.error());
      std::string payload;
      for (const auto& p : *v) payload += with_nul(perm_to_string(p));
      return reply(c, r, type, payload);
    }
    case Op::set_perms:
      return do_set_perms(c, r, tx);
    case Op::watch:
      return do_watch(c, r);
    case Op::unwatch:
      return do_unwatch(c, r);
    case Op::transaction_start:
      if (tx) return reply_error(c, r.req_id, r.tx_id, EBUSY);  // no nesting
      return do_transaction_start(c, r);
    case Op::transaction_end:
      return do_transaction_end(c, r);
    case Op::reset_watches:
      reset_connection(c);
      return reply(c, r, type, kOk);
    case Op::get_domain_path:
      return reply(c, r, type, with_nul(fmt::format("/local/domain/{}", c_atoi(r.args[0]))));
    case Op::is_domain_introduced: {
      const uint32_t d = c_atoi(r.args[0]);
      const bool yes = d == kDomidFirstReserved || d == 0 ||
                       (d < kDomidFirstReserved && is_introduced(DomId(static_cast<uint16_t>(d))));
      return reply(c, r, type, with_nul(yes ? "T" : "F"));
    }
    case Op::introduce: {
      const uint32_t d = c_atoi(r.args[0]);
      const int port = std::atoi(r.args[2].c_str());
      if (port <= 0 || d == 0 || d >= kDomidFirstReserved)
        return reply_error(c, r.req_id, r.tx_id, EINVAL);
      const DomId domid(static_cast<uint16_t>(d));
      if (!introduce(domid)) {
        // Re-introduction resets the domain's connection state (domain_conn_reset()).
        for (auto& [id, conn] : conns_)
          if (conn->domid() == domid) reset_connection(*conn);
      }
      if (hooks_.client_domain_change) hooks_.client_domain_change(domid, true);
      return reply(c, r, type, kOk);
    }
    case Op::release:
    case Op::resume: {
      const uint32_t d = c_atoi(r.args[0]);
      if (d == 0) return reply_error(c, r.req_id, r.tx_id, EINVAL);
      if (d >= kDomidFirstReserved || !is_introduced(DomId(static_cast<uint16_t>(d))))
        return reply_error(c, r.req_id, r.tx_id, ENOENT);
      const DomId domid(static_cast<uint16_t>(d));
      if (r.op == Op::release) {
        // Reply first: the releasing connection is never the released domain's (RELEASE
        // is privileged), but keep the order independent of that.
        reply(c, r, type, kOk);
        (void)release(domid);  // true: checked introduced above
        if (hooks_.client_domain_change) hooks_.client_domain_change(domid, false);
        return;
      }
      return reply(c, r, type, kOk);  // no shutdown tracking here: nothing to re-arm
    }
    case Op::set_target: {
      const uint32_t d = c_atoi(r.args[0]);
      const uint32_t t = c_atoi(r.args[1]);
      if (d >= kDomidFirstReserved || t >= kDomidFirstReserved)
        return reply_error(c, r.req_id, r.tx_id, ENOENT);
      auto dit = domains_.find(static_cast<uint16_t>(d));
      if (dit == domains_.end() || !domains_.contains(static_cast<uint16_t>(t)))
        return reply_error(c, r.req_id, r.tx_id, ENOENT);
      dit->second.target = DomId(static_cast<uint16_t>(t));
      if (hooks_.client_domain_change) hooks_.client_domain_change(DomId(static_cast<uint16_t>(d)), true);
      return reply(c, r, type, kOk);
    }
    case Op::control:
      return do_control(c, r);
  }
}

void Server::do_set_perms(Connection& c, const Request& r, Store::Transaction* tx) {
  const Caller caller = caller_for(c);
  PermList perms;
  for (size_t i = 1; i < r.args.size(); ++i) {
    auto p = parse_perm(r.args[i]);
    if (!p) return reply_error(c, r.req_id, r.tx_id, EINVAL);
    perms.push_back(*p);
  }
  const std::string& path = r.args[0];
  if (path.starts_with('@')) {
    // set_perms_special(): only @introduceDomain and @releaseDomain have permissions.
    PermList* target = path == "@introduceDomain" ? &introduce_perms_
                       : path == "@releaseDomain" ? &release_perms_
                                                  : nullptr;
    if (!target) return reply_error(c, r.req_id, r.tx_id, EINVAL);
    if ((perm_for(caller, *target) & (kPermWrite | kPermOwner)) != (kPermWrite | kPermOwner))
      return reply_error(c, r.req_id, r.tx_id, EACCES);
    *target = perms;
    return reply(c, r, static_cast<uint32_t>(r.op), kOk);
  }
  auto res = store_.set_perms(caller, tx, path, perms);
  if (!res) return reply_error(c, r.req_id, r.tx_id, res.error());
  reply(c, r, static_cast<uint32_t>(r.op), kOk);
}

void Server::do_watch(Connection& c, const Request& r) {
  const Caller caller = caller_for(c);
  WatchReg w;
  w.token = r.args[1];
  const std::string& path = r.args[0];
  if (path.starts_with('@')) {
    if (path.size() > kRelPathMax) return reply_error(c, r.req_id, r.tx_id, EINVAL);
    w.node = path;
  } else {
    auto canon = canonicalize(caller, path, quotas_.max_path_length);
    if (!canon) return reply_error(c, r.req_id, r.tx_id, canon.error());
    w.node = std::move(*canon);
    w.relative = !path.starts_with('/');
  }
  for (const auto& e : c.watches_)
    if (e.node == w.node && e.token == w.token) return reply_error(c, r.req_id, r.tx_id, EEXIST);
  if (!caller.privileged() && c.watches_.size() >= quotas_.max_watches_per_connection)
    return reply_error(c, r.req_id, r.tx_id, E2BIG);
  c.watches_.push_back(w);
  reply(c, r, static_cast<uint32_t>(r.op), kOk);
  // "When a watch is first set up it is triggered once straight away, with <path> equal
  // to <wpath>" (xenstore.txt).
  send_event(c, watch_path(w, c.domid(), w.node), w.token);
}

void Server::do_unwatch(Connection& c, const Request& r) {
  const std::string& path = r.args[0];
  std::string node = (path.starts_with('/') || path.starts_with('@'))
                         ? path
                         : implicit_path(c.domid()) + "/" + path;
  for (auto it = c.watches_.begin(); it != c.watches_.end(); ++it) {
    if (it->node == node && it->token == r.args[1]) {
      c.watches_.erase(it);
      return reply(c, r, static_cast<uint32_t>(r.op), kOk);
    }
  }
  reply_error(c, r.req_id, r.tx_id, ENOENT);
}

void Server::do_transaction_start(Connection& c, const Request& r) {
  const Caller caller = caller_for(c);
  if (!caller.privileged() && c.transactions_.size() >= quotas_.max_transactions_per_connection)
    return reply_error(c, r.req_id, r.tx_id, ENOSPC);
  auto tx = store_.begin();
  if (!tx) return reply_error(c, r.req_id, r.tx_id, tx.error());
  // Pick an unused identifier; 0 means "no transaction" and is never handed out.
  uint32_t id = c.next_tx_id_;
  while (id == 0 || c.transactions_.contains(id)) ++id;
  c.next_tx_id_ = id + 1;
  c.transactions_.emplace(id, std::move(*tx));
  reply(c, r, static_cast<uint32_t>(r.op), with_nul(fmt::format("{}", id)));
}

void Server::do_transaction_end(Connection& c, const Request& r) {
  const std::string& arg = r.args[0];
  if (arg != "T" && arg != "F") return reply_error(c, r.req_id, r.tx_id, EINVAL);
  auto it = c.transactions_.find(r.tx_id);
  if (r.tx_id == 0 || it == c.transactions_.end()) return reply_error(c, r.req_id, r.tx_id, ENOENT);
  std::unique_ptr<Store::Transaction> tx = std::move(it->second);
  c.transactions_.erase(it);
  if (arg == "T") {
    auto res = store_.commit(caller_for(c), std::move(tx));
    if (!res) return reply_error(c, r.req_id, r.tx_id, res.error());
  }
  reply(c, r, static_cast<uint32_t>(r.op), kOk);
}

void Server::do_control(Connection& c, const Request& r) {
  const std::string& cmd = r.args[0];
  const size_t nparams = r.args.size() - 1;
  if (cmd == "check") {
    if (nparams != 0) return reply_error(c, r.req_id, r.tx_id, EINVAL);
    const std::string problems = store_.check();
    if (problems.empty()) {
      log::info("xenstored: check: store consistent ({} nodes)", store_.node_count());
    } else {
      log::error("xenstored: check: {}", problems);
    }
    return reply(c, r, static_cast<uint32_t>(r.op), kOk);
  }
  if (cmd == "print") {
    if (nparams != 1) return reply_error(c, r.req_id, r.tx_id, EINVAL);
    log::info("control: {}", r.args[1]);
    return reply(c, r, static_cast<uint32_t>(r.op), kOk);
  }
  if (cmd == "help") {
    if (nparams != 0) return reply_error(c, r.req_id, r.tx_id, EINVAL);
    return reply(c, r, static_cast<uint32_t>(r.op),
                 with_nul("check\t\nprint\t<string>\nhelp\t\n"));
  }
  reply_error(c, r.req_id, r.tx_id, EINVAL);
}

}  // namespace pvhost::xenemu
