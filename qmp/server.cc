// QMP protocol engine: sockets, per-client negotiation state, framing, dispatch, replies
// and events (docs/interop/qmp-spec.rst). Built-in commands live in commands.cc.
#include "qmp/server.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cstring>

#include <fmt/format.h>

#include "pvhost_config.h"
#include "qmp/json_writer.h"
#include "qmp/server_impl.h"
#include "src/log.h"

namespace pvhost::qmp {

using nlohmann::json;

std::string_view error_class_name(ErrorClass c) {
  switch (c) {
    case ErrorClass::generic_error: return "GenericError";
    case ErrorClass::command_not_found: return "CommandNotFound";
    case ErrorClass::device_not_active: return "DeviceNotActive";
    case ErrorClass::device_not_found: return "DeviceNotFound";
    case ErrorClass::kvm_missing_cap: return "KVMMissingCap";
  }
  return "GenericError";
}

std::string_view run_status_name(RunStatus s) {
  switch (s) {
    case RunStatus::prelaunch: return "prelaunch";
    case RunStatus::running: return "running";
    case RunStatus::paused: return "paused";
  }
  return "running";
}

std::string_view arg_type_name(ArgType t) {
  switch (t) {
    case ArgType::string: return "string";
    case ArgType::integer: return "integer";
    case ArgType::boolean: return "boolean";
    case ArgType::number: return "number";
    case ArgType::object: return "object";
    case ArgType::array: return "array";
    case ArgType::any: return "any";
  }
  return "any";
}

namespace {

bool type_matches(ArgType t, const json& v) {
  switch (t) {
    case ArgType::string: return v.is_string();
    // qobject_input_type_int64: a QNum that fits int64 (1.0 and 2^63 do not).
    case ArgType::integer:
      return v.is_number_integer() &&
             (!v.is_number_unsigned() || v.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX));
    case ArgType::boolean: return v.is_boolean();
    case ArgType::number: return v.is_number();
    case ArgType::object: return v.is_object();
    case ArgType::array: return v.is_array();
    case ArgType::any: return true;
  }
  return false;
}

}  // namespace

// qapi/qobject-input-visitor.c: members are visited in schema order (missing →
// QERR_MISSING_PARAMETER, wrong type → QERR_INVALID_PARAMETER_TYPE), then
// qobject_input_check_struct rejects what is left over.
std::optional<std::string> check_arguments(const std::vector<ArgSpec>& spec, const json& args) {
  for (const ArgSpec& a : spec) {
    auto it = args.find(a.name);
    if (it == args.end()) {
      if (a.optional) continue;
      return fmt::format("Parameter '{}' is missing", a.name);
    }
    if (!type_matches(a.type, *it))
      return fmt::format("Invalid parameter type for '{}', expected: {}", a.name, arg_type_name(a.type));
  }
  for (const auto& [key, value] : args.items()) {
    bool known = false;
    for (const ArgSpec& a : spec) known = known || a.name == key;
    if (!known) return fmt::format("Parameter '{}' is unexpected", key);
  }
  return std::nullopt;
}

// ───────────────────────────── Responder ─────────────────────────────

Responder& Responder::operator=(Responder&& o) noexcept {
  if (this != &o) {
    if (p_) reply(command_error("Command '" + p_->command + "' was abandoned"));
    p_ = std::move(o.p_);
  }
  return *this;
}

Responder::~Responder() {
  if (p_) reply(command_error("Command '" + p_->command + "' was abandoned"));
}

void Responder::reply(CommandResult result) {
  std::shared_ptr<detail::Pending> p = std::move(p_);
  p_ = nullptr;
  if (!p) return;
  if (p->loop->in_loop_thread()) {
    p->deliver(std::move(result));
  } else {
    p->loop->post([p, r = std::move(result)]() mutable { p->deliver(std::move(r)); });
  }
}

CommandSpec CommandSpec::sync(std::string name, std::vector<ArgSpec> args, Returns returns,
                              SyncHandler fn) {
  CommandSpec s;
  s.name = std::move(name);
  s.args = std::move(args);
  s.returns = std::move(returns);
  s.handler = [fn = std::move(fn)](const json& a, Responder r) { r.reply(fn(a)); };
  return s;
}

// ───────────────────────────── RunState ─────────────────────────────

struct RunState::Impl : std::enable_shared_from_this<RunState::Impl> {
  explicit Impl(EventLoop& l, RunStatus s) : loop(l), status(s) {}
  EventLoop& loop;
  RunStatus status;
  uint64_t next_id = 1;
  std::map<uint64_t, Hook> quiesce, resume;
  std::map<uint64_t, Listener> listeners;
  std::function<void(std::string_view)> sink;
  struct Op {
    bool stop;
    std::function<void()> done;
  };
  std::deque<Op> queue;
  bool busy = false;

  Registration add(std::map<uint64_t, Hook>& table, Hook h) {
    const uint64_t id = next_id++;
    table.emplace(id, std::move(h));
    std::weak_ptr<Impl> weak = weak_from_this();
    std::map<uint64_t, Hook>* t = &table;
    return Registration([weak, t, id] {
      if (auto self = weak.lock()) t->erase(id);
    });
  }

  void start_next() {
    if (busy || queue.empty()) return;
    busy = true;
    const bool stop = queue.front().stop;
    const bool change = stop ? status == RunStatus::running : status != RunStatus::running;
    if (!change) {
      // QEMU: stop when not running only drains; cont when running is a no-op.
      complete(std::nullopt);
      return;
    }
    std::vector<Hook> hooks;
    for (auto& [id, h] : (stop ? quiesce : resume)) hooks.push_back(h);
    auto remaining = std::make_shared<size_t>(hooks.size() + 1);
    auto self = shared_from_this();
    const RunStatus target = stop ? RunStatus::paused : RunStatus::running;
    auto one_done = [self, remaining, target] {
      if (--*remaining == 0) self->complete(target);
    };
    for (Hook& h : hooks) {
      auto called = std::make_shared<std::atomic<bool>>(false);
      h([self, one_done, called] {
        if (called->exchange(true)) return;  // a second call is a hook bug; ignore it
        if (self->loop.in_loop_thread()) one_done();
        else self->loop.post(one_done);
      });
    }
    one_done();  // the guard: completes now if every hook was synchronous
  }

  void complete(std::optional<RunStatus> target) {
    Op op = std::move(queue.front());
    queue.pop_front();
    if (target) {
      status = *target;
      for (auto& [id, l] : listeners) l(status);
      if (sink) sink(*target == RunStatus::paused ? "STOP" : "RESUME");
    }
    busy = false;
    if (op.done) op.done();
    start_next();
  }
};

RunState::RunState(EventLoop& loop, RunStatus initial) : impl_(std::make_shared<Impl>(loop, initial)) {}
RunState::~RunState() = default;
RunStatus RunState::status() const { return impl_->status; }
Registration RunState::add_quiesce_hook(Hook hook) { return impl_->add(impl_->quiesce, std::move(hook)); }
Registration RunState::add_resume_hook(Hook hook) { return impl_->add(impl_->resume, std::move(hook)); }
Registration RunState::add_listener(Listener listener) {
  const uint64_t id = impl_->next_id++;
  impl_->listeners.emplace(id, std::move(listener));
  std::weak_ptr<Impl> weak = impl_;
  return Registration([weak, id] {
    if (auto self = weak.lock()) self->listeners.erase(id);
  });
}
void RunState::stop(std::function<void()> done) {
  impl_->queue.push_back({true, std::move(done)});
  impl_->start_next();
}
void RunState::cont(std::function<void()> done) {
  impl_->queue.push_back({false, std::move(done)});
  impl_->start_next();
}
void RunState::set_event_sink(std::function<void(std::string_view)> sink) { impl_->sink = std::move(sink); }

// ───────────────────────────── Sessions ─────────────────────────────

struct Session : std::enable_shared_from_this<Session> {
  Session(Server::Impl& s, MonitorListener& m, uint64_t i, UniqueFd f)
      : server(s), monitor(m), id(i), fd(std::move(f)),
        framer(FramerLimits{s.limits.max_message_bytes, s.limits.max_depth}) {}

  struct Input {
    std::string text;
    bool error;  // text is an error desc from the framer
  };

  Server::Impl& server;
  MonitorListener& monitor;
  uint64_t id;
  UniqueFd fd;
  EventLoop::Watch watch;
  JsonFramer framer;
  std::deque<Input> inbox;
  size_t inbox_bytes = 0;
  std::string out;
  size_t out_off = 0;
  bool negotiated = false;  // qmp-spec.rst "Capabilities Negotiation"
  bool busy = false;        // a command is in flight
  bool pumping = false;
  bool eof = false;
  bool read_paused = false;
  bool closed = false;
  uint32_t events = 0;

  [[nodiscard]] size_t pending_out() const { return out.size() - out_off; }
  [[nodiscard]] bool want_read() const { return !eof && !read_paused; }

  void update_events() {
    if (closed) return;
    const uint32_t want = (want_read() ? EPOLLIN : 0u) | (pending_out() ? EPOLLOUT : 0u);
    if (want == events) return;
    events = want;
    if (auto r = watch.set_events(want); !r) {
      log::warn("qmp: {}: client {}: {}", monitor.path, id, r.error().describe());
      close("epoll");
    }
  }

  void close(std::string_view why) {
    if (closed) return;
    closed = true;
    log::debug("qmp: {}: client {} closed ({})", monitor.path, id, why);
    watch.reset();
    fd.reset();
    --monitor.clients;
    auto keep = shared_from_this();  // erase() below drops the map's reference
    server.sessions.erase(id);
  }

  void send_line(std::string line) {
    if (closed) return;
    line += "\r\n";  // qmp-spec.rst: every message the server sends ends in CRLF
    if (pending_out() + line.size() > server.limits.max_output_bytes) {
      log::warn("qmp: {}: client {} is not reading its replies ({} bytes pending, limit {}); disconnecting",
                monitor.path, id, pending_out() + line.size(), server.limits.max_output_bytes);
      close("output limit");
      return;
    }
    if (out_off == out.size()) {
      out.clear();
      out_off = 0;
    }
    out += line;
    flush();
  }

  void flush() {
    while (!closed && out_off < out.size()) {
      const ssize_t n = ::send(fd.get(), out.data() + out_off, out.size() - out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        out_off += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) break;
      close(n < 0 ? errno_name(errno) : "short send");
      return;
    }
    if (closed) return;
    if (out_off == out.size()) {
      out.clear();
      out_off = 0;
    } else if (out_off > (1u << 20) && out_off > out.size() / 2) {
      out.erase(0, out_off);
      out_off = 0;
    }
    update_events();
    maybe_finish();
  }

  // After EOF from the client: answer what was read, flush, then close (lets
  // `echo ... | socat - UNIX-CONNECT:` scripts see their replies).
  void maybe_finish() {
    if (!closed && eof && !busy && inbox.empty() && pending_out() == 0) close("end of input");
  }

  void on_events(uint32_t ev) {
    auto keep = shared_from_this();
    if (ev & EPOLLERR) {
      close("socket error");
      return;
    }
    if (ev & EPOLLOUT) flush();
    if (closed) return;
    if ((ev & (EPOLLIN | EPOLLHUP)) && want_read()) read_input();
    if (closed) return;
    if ((ev & EPOLLHUP) && !want_read()) close("hang-up");
  }

  bool inbox_full() const {
    return inbox.size() >= server.limits.max_queued_requests || inbox_bytes >= server.limits.max_message_bytes;
  }

  void read_input() {
    char buf[65536];
    for (int round = 0; round < 16 && !closed && !eof && !inbox_full(); ++round) {
      const ssize_t n = ::read(fd.get(), buf, sizeof buf);
      if (n > 0) {
        framer.feed(std::string_view(buf, static_cast<size_t>(n)), [this](const JsonFramer::Frame& f) {
          const bool err = f.message.empty();
          std::string text(err ? f.error : f.message);
          inbox_bytes += text.size();
          inbox.push_back({std::move(text), err});
        });
        continue;
      }
      if (n == 0) {
        eof = true;
        break;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      close(errno_name(errno));
      return;
    }
    read_paused = inbox_full();
    pump();
    update_events();
    maybe_finish();
  }

  void pump() {
    if (pumping) return;
    pumping = true;
    auto keep = shared_from_this();
    while (!closed && !busy && !inbox.empty()) {
      Input in = std::move(inbox.front());
      inbox.pop_front();
      inbox_bytes -= in.text.size();
      if (in.error) {
        reply(std::nullopt, command_error(std::move(in.text)));
      } else {
        dispatch(in.text);
      }
    }
    pumping = false;
    if (closed) return;
    if (read_paused && !inbox_full()) {
      read_paused = false;
      update_events();
    }
    maybe_finish();
  }

  void reply(const std::optional<json>& req_id, const CommandResult& r) {
    std::string line;
    if (r) {
      line = "{\"return\": ";
      write_json(line, *r);
    } else {
      line = "{\"error\": {\"class\": ";
      write_json_string(line, error_class_name(r.error().cls));
      line += ", \"desc\": ";
      write_json_string(line, r.error().desc);
      line += "}";
    }
    if (req_id) {  // qmp-spec.rst: "id" is echoed verbatim, whatever its type
      line += ", \"id\": ";
      write_json(line, *req_id);
    }
    line += "}";
    send_line(std::move(line));
  }

  // qapi/qmp-dispatch.c qmp_dispatch_check_obj + do_qmp_dispatch; monitor/qmp.c for the
  // negotiation-mode rewrite of CommandNotFound.
  void dispatch(const std::string& text) {
    json req = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (req.is_discarded()) {
      reply(std::nullopt, command_error("JSON parse error, invalid JSON value"));
      return;
    }
    if (!req.is_object()) {
      reply(std::nullopt, command_error("QMP input must be a JSON object"));
      return;
    }
    std::optional<json> req_id;
    if (auto it = req.find("id"); it != req.end()) req_id = *it;
    std::string command;
    for (const auto& [key, value] : req.items()) {
      if (key == "execute") {
        if (!value.is_string()) {
          reply(req_id, command_error("QMP input member 'execute' must be a string"));
          return;
        }
        command = value.get<std::string>();
      } else if (key == "arguments") {
        if (!value.is_object()) {
          reply(req_id, command_error("QMP input member 'arguments' must be an object"));
          return;
        }
      } else if (key != "id") {
        // "exec-oob" too: pvhost does not offer the oob capability.
        reply(req_id, command_error(fmt::format("QMP input member '{}' is unexpected", key)));
        return;
      }
    }
    if (!req.contains("execute")) {
      reply(req_id, command_error("QMP input lacks member 'execute'"));
      return;
    }
    json args = json::object();
    if (auto it = req.find("arguments"); it != req.end()) args = std::move(*it);

    if (!negotiated) {
      if (command != "qmp_capabilities") {
        reply(req_id, command_error("Expecting capabilities negotiation with 'qmp_capabilities'",
                                ErrorClass::command_not_found));
        return;
      }
      reply(req_id, negotiate(args));
      return;
    }
    if (command == "qmp_capabilities") {
      reply(req_id, command_error("Capabilities negotiation is already complete, command ignored",
                              ErrorClass::command_not_found));
      return;
    }
    busy = true;
    std::weak_ptr<Session> weak = weak_from_this();
    server.execute(command, std::move(args), [weak, req_id](CommandResult r) {
      auto self = weak.lock();
      if (!self || self->closed) return;  // the client went away; nobody to tell
      self->reply(req_id, r);
      self->busy = false;
      self->pump();
    });
  }

  // qmp_capabilities {enable?: [QMPCapability]} (qapi/control.json); monitor/qmp.c
  // qmp_caps_accept: "oob" exists but is not offered here.
  CommandResult negotiate(const json& args) {
    if (auto err = check_arguments({{"enable", ArgType::array, true}}, args)) return command_error(*err);
    if (auto it = args.find("enable"); it != args.end()) {
      for (size_t i = 0; i < it->size(); ++i) {
        const json& cap = (*it)[i];
        if (!cap.is_string())
          return command_error(fmt::format("Invalid parameter type for 'enable[{}]', expected: string", i));
        if (cap.get_ref<const std::string&>() == "oob") return command_error("Capability oob not available");
        return command_error(fmt::format("Parameter 'enable[{}]' does not accept value '{}'", i,
                                         cap.get_ref<const std::string&>()));
      }
    }
    negotiated = true;
    return json::object();
  }
};

// ───────────────────────────── Server ─────────────────────────────

Server::Impl::Impl(EventLoop& l, ServerInfo i, ServerLimits lim)
    : loop(l), info(std::move(i)), limits(lim), run_state(l, info.initial) {}

Server::Impl::~Impl() {
  *alive = 1;
  alive.reset();
  auto s = std::move(sessions);
  for (auto& [id, session] : s) session->closed = true;  // no callbacks into a dying server
  s.clear();
  for (auto& m : monitors) {
    m->watch.reset();
    m->chardev.release();
    // Our socket file; a failure leaves a stale name that the next start unlinks.
    (void)::unlink(m->path.c_str());
  }
}

void Server::Impl::accept_clients(MonitorListener& m) {
  for (;;) {
    int cfd = ::accept4(m.fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (cfd < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN)
        PVHOST_LOG_RATELIMITED(log::Level::warn, "qmp: {}: accept: {}", m.path, errno_name(errno));
      return;
    }
    const uint64_t sid = next_id++;
    auto s = std::make_shared<Session>(*this, m, sid, UniqueFd(cfd));
    std::weak_ptr<Session> weak = s;
    auto w = loop.watch_fd(cfd, EPOLLIN, [weak](uint32_t ev) {
      if (auto self = weak.lock()) self->on_events(ev);
    });
    if (!w) {
      log::warn("qmp: {}: {}", m.path, w.error().describe());
      continue;
    }
    s->watch = std::move(*w);
    s->events = EPOLLIN;
    ++m.clients;
    sessions.emplace(sid, s);
    log::debug("qmp: {}: client {} connected", m.path, sid);
    // qmp-spec.rst "Server Greeting".
    const VersionTriple& v = info.qemu_version;
    std::string greeting = fmt::format(R"({{"QMP": {{"version": {{"qemu": {{"micro": {}, "minor": {}, "major": {}}}, "package": )",
                                       v.micro, v.minor, v.major);
    write_json_string(greeting, info.package);
    greeting += R"(}, "capabilities": []}})";
    s->send_line(std::move(greeting));
  }
}

void Server::Impl::execute(std::string_view name, json args, std::function<void(CommandResult)> done) {
  auto it = commands.find(name);
  if (it == commands.end()) {
    done(command_error(fmt::format("The command {} has not been found", name), ErrorClass::command_not_found));
    return;
  }
  if (!args.is_object()) args = json::object();
  if (auto err = check_arguments(it->second.args, args)) {
    done(command_error(std::move(*err)));
    return;
  }
  auto p = std::make_shared<detail::Pending>();
  p->loop = &loop;
  p->command = std::string(name);
  p->deliver = std::move(done);
  Handler h = it->second.handler;  // a handler may remove its own command
  h(args, Responder(std::move(p)));
}

void Server::Impl::broadcast(const std::string& line) {
  std::vector<std::shared_ptr<Session>> targets;
  for (auto& [id, s] : sessions)
    if (s->negotiated) targets.push_back(s);
  for (auto& s : targets) s->send_line(line);
}

void Server::Impl::flush_all() {
  std::vector<std::shared_ptr<Session>> all;
  for (auto& [id, s] : sessions) all.push_back(s);
  for (auto& s : all) s->flush();
}

Registration Server::Impl::add_chardev(std::string label, std::function<std::string()> filename,
                                       std::function<bool()> frontend_open) {
  const uint64_t cid = next_id++;
  chardevs.push_back({cid, std::move(label), std::move(filename), frontend_open});
  std::weak_ptr<int> weak = alive;
  return Registration([this, weak, cid] {
    if (weak.expired()) return;
    std::erase_if(chardevs, [cid](const Chardev& c) { return c.id == cid; });
  });
}

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Server::~Server() = default;

Result<std::unique_ptr<Server>> Server::create(EventLoop& loop, ServerInfo info, ServerLimits limits) {
  if (info.package.empty()) info.package = std::string("pvhost ") + PVHOST_VERSION;
  auto impl = std::make_unique<Impl>(loop, std::move(info), limits);
  std::unique_ptr<Server> server(new Server(std::move(impl)));
  Impl* raw = server->impl_.get();
  Server* srv = server.get();
  // A transition may complete after the server is gone (a hook finishing late).
  std::weak_ptr<int> alive = raw->alive;
  raw->run_state.set_event_sink([srv, alive](std::string_view ev) {
    if (!alive.expired()) srv->emit_event(ev);
  });
  register_builtin_commands(*server, *raw);
  return server;
}

Result<std::unique_ptr<Server>> Server::create(EventLoop& loop, ServerInfo info, const Options& options,
                                               ServerLimits limits) {
  auto server = PVHOST_TRY(create(loop, std::move(info), limits));
  for (const MonitorOptions& m : options.monitors) {
    if (m.mode != "control") continue;  // the command line refuses other modes already
    const ChardevOptions* c = nullptr;
    for (const auto& cd : options.chardevs)
      if (cd.id == m.chardev) c = &cd;
    if (c == nullptr || c->backend != "socket" || !c->path)
      return fail(EINVAL, fmt::format("-mon chardev={}: not a unix socket chardev", m.chardev));
    PVHOST_TRY(server->add_monitor(*c->path, c->id));
  }
  return server;
}

Result<void> Server::add_monitor(const std::string& socket_path, std::string label) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.empty() || socket_path.size() >= sizeof addr.sun_path)
    return fail(ENAMETOOLONG, fmt::format("QMP socket path '{}' is empty or too long", socket_path));
  std::memcpy(addr.sun_path, socket_path.data(), socket_path.size());
  // A socket left by an earlier run would make bind() fail; only a socket is removed.
  struct stat st {};
  if (::lstat(socket_path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) (void)::unlink(socket_path.c_str());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) return fail_errno("socket(AF_UNIX)");
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    return fail_errno(fmt::format("bind {}", socket_path));
  if (::listen(fd.get(), 64) != 0) return fail_errno(fmt::format("listen {}", socket_path));

  auto m = std::make_unique<MonitorListener>();
  m->path = socket_path;
  m->label = label;
  m->fd = std::move(fd);
  MonitorListener* raw = m.get();
  Impl* impl = impl_.get();
  m->watch = PVHOST_TRY_CTX(impl->loop.watch_fd(raw->fd.get(), EPOLLIN, [impl, raw](uint32_t) {
                              impl->accept_clients(*raw);
                            }),
                            fmt::format("QMP socket {}", socket_path));
  // chardev/char-socket.c: qemu_chr_compute_filename while a client is connected,
  // update_disconnected_filename ("disconnected:" prefix) otherwise.
  m->chardev = impl->add_chardev(std::move(label), [raw] {
    return fmt::format("{}unix:{},server=on", raw->clients > 0 ? "" : "disconnected:", raw->path);
  }, [] { return true; });
  impl->monitors.push_back(std::move(m));
  log::info("qmp: listening on {}", socket_path);
  return {};
}

Result<void> Server::add_command(CommandSpec spec) {
  if (spec.name.empty() || !spec.handler) return fail(EINVAL, "QMP command needs a name and a handler");
  if (impl_->commands.contains(spec.name))
    return fail(EEXIST, fmt::format("QMP command '{}' is already registered", spec.name));
  std::string name = spec.name;
  impl_->commands.emplace(std::move(name), std::move(spec));
  return {};
}

void Server::remove_command(std::string_view name) {
  if (auto it = impl_->commands.find(name); it != impl_->commands.end()) impl_->commands.erase(it);
}

bool Server::has_command(std::string_view name) const { return impl_->commands.contains(name); }

void Server::execute(std::string_view name, json args, std::function<void(CommandResult)> done) {
  impl_->execute(name, std::move(args), std::move(done));
}

Result<void> Server::add_hmp_command(HmpCommand cmd) {
  for (const auto& c : impl_->hmp)
    if (c.name == cmd.name) return fail(EEXIST, fmt::format("HMP command '{}' is already registered", cmd.name));
  impl_->hmp.push_back(std::move(cmd));
  return {};
}

void Server::emit_event(std::string_view name, const json& data) {
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(now).count();
  // qmp-spec.rst "Asynchronous events"; QEMU puts the timestamp first.
  std::string line = fmt::format(R"({{"timestamp": {{"seconds": {}, "microseconds": {}}}, "event": )",
                                 us / 1000000, us % 1000000);
  write_json_string(line, name);
  if (!data.is_null() && !(data.is_object() && data.empty())) {
    line += ", \"data\": ";
    write_json(line, data);
  }
  line += "}";
  impl_->broadcast(line);
}

RunState& Server::run_state() { return impl_->run_state; }

Registration Server::add_chardev(std::string label, std::function<std::string()> filename, bool frontend_open) {
  return impl_->add_chardev(std::move(label), std::move(filename), [frontend_open] { return frontend_open; });
}

Registration Server::add_chardev(std::string label, std::function<std::string()> filename,
                                 std::function<bool()> frontend_open) {
  return impl_->add_chardev(std::move(label), std::move(filename), std::move(frontend_open));
}

void Server::set_vnc_provider(VncProvider provider) { impl_->vnc = std::move(provider); }
void Server::set_shutdown_handler(std::function<void(std::string_view)> handler) {
  impl_->shutdown = std::move(handler);
}
const ServerInfo& Server::info() const { return impl_->info; }
size_t Server::client_count() const { return impl_->sessions.size(); }

}  // namespace pvhost::qmp
