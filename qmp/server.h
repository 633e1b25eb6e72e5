// The QMP server: QEMU's machine protocol (docs/interop/qmp-spec.rst) on unix sockets,
// so libxl, libxenstat, qemu.qmp and qmp-shell can drive pvhost (docs/QMP.md).
//
// ── Integrating it (src/app/main.cc) ──────────────────────────────────────────────
//
//   auto server = PVHOST_TRY(qmp::Server::create(loop, qmp::ServerInfo::from_options(opts), opts));
//   server->set_shutdown_handler([&](std::string_view reason) { loop.stop(); });
//   ... loop.run();
//
// create() listens on every `-mon chardev=X,mode=control` socket (and `-qmp unix:...`),
// unlinking a stale socket file first, registers the monitors in the chardev registry and
// the built-in commands (docs/QMP.md lists them). Everything runs on `loop`'s thread.
//
// ── Registering commands (from a backend or main) ─────────────────────────────────
//
//   server.add_command(qmp::CommandSpec::sync(
//       "query-block", {}, qmp::Returns::array_of({/* members, for query-qmp-schema */}),
//       [this](const nlohmann::json& args) -> qmp::CommandResult { return block_info(); }));
//
//   server.add_command({.name = "device_del",
//                       .args = {{"id", qmp::ArgType::string}},
//                       .handler = [](const nlohmann::json& args, qmp::Responder r) {
//                         // answer later, from any thread: r.ok() / r.fail("...", cls)
//                       }});
//
// Arguments are checked against `args` before the handler runs (missing, unexpected and
// wrong-typed parameters get QEMU's GenericError texts), so a handler may use
// `args.at("id").get_ref<const std::string&>()` for a required string without further
// checks; optional ones with `args.contains(...)`. A Responder must be answered exactly
// once; one destroyed unanswered answers GenericError "Command 'X' was abandoned".
// Replies on one connection go out in request order: a connection's next request is
// dispatched only after the previous one is answered (QEMU does the same without oob).
//
// ── Run state, quiesce hooks, chardevs, VNC ───────────────────────────────────────
//
//   Registration r = server.run_state().add_quiesce_hook([](std::function<void()> done) {
//     /* stop taking requests, drain in-flight I/O, then */ done();   // any thread
//   });
//   Registration c = server.add_chardev("libxl-channel0", [] { return "pty:/dev/pts/3"; });
//   server.set_vnc_provider({.query = ..., .change_password = ...});
//
// Registration handles undo on destruction (keep them in the object that registered).
#pragma once

#include <chrono>
#include <cstdint>
#include <expected>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "src/cli.h"
#include "src/error.h"
#include "src/event_loop.h"

namespace pvhost::qmp {

// ── Errors (qapi/error.json QapiErrorClass) ──
enum class ErrorClass { generic_error, command_not_found, device_not_active, device_not_found, kvm_missing_cap };
[[nodiscard]] std::string_view error_class_name(ErrorClass c);

struct CommandError {
  ErrorClass cls = ErrorClass::generic_error;
  std::string desc;
};
using CommandResult = std::expected<nlohmann::json, CommandError>;

[[nodiscard]] inline std::unexpected<CommandError> command_error(
    std::string desc, ErrorClass cls = ErrorClass::generic_error) {
  return std::unexpected(CommandError{cls, std::move(desc)});
}
// A pvhost::Error as a QMP error: its what() (no errno name) becomes the desc.
[[nodiscard]] inline std::unexpected<CommandError> command_error(
    const Error& e, ErrorClass cls = ErrorClass::generic_error) {
  return std::unexpected(CommandError{cls, e.what()});
}

// ── Argument schema (QAPI types; the names are what query-qmp-schema reports) ──
enum class ArgType { string, integer, boolean, number, object, array, any };
struct ArgSpec {
  std::string name;
  ArgType type = ArgType::string;
  bool optional = false;
};

// The return shape, for query-qmp-schema only (handlers are trusted to return it).
struct Returns {
  ArgType type = ArgType::object;  // object, array, or a builtin
  ArgType element = ArgType::object;  // for arrays
  std::vector<ArgSpec> members;    // for object and array-of-object
  [[nodiscard]] static Returns empty() { return {}; }
  [[nodiscard]] static Returns object(std::vector<ArgSpec> m) { return {ArgType::object, ArgType::object, std::move(m)}; }
  [[nodiscard]] static Returns array_of(std::vector<ArgSpec> m) { return {ArgType::array, ArgType::object, std::move(m)}; }
  [[nodiscard]] static Returns array_of(ArgType builtin) { return {ArgType::array, builtin, {}}; }
  [[nodiscard]] static Returns builtin(ArgType t) { return {t, ArgType::object, {}}; }
};

namespace detail {
struct Pending;
}

// Answers one command, once, from any thread (a call off the loop thread is posted to it).
class Responder {
 public:
  Responder() = default;
  explicit Responder(std::shared_ptr<detail::Pending> p) : p_(std::move(p)) {}
  Responder(Responder&&) noexcept = default;
  Responder& operator=(Responder&& o) noexcept;
  Responder(const Responder&) = delete;
  Responder& operator=(const Responder&) = delete;
  ~Responder();

  void reply(CommandResult result);
  void ok(nlohmann::json value = nlohmann::json::object()) { reply(std::move(value)); }
  void fail(std::string desc, ErrorClass cls = ErrorClass::generic_error) {
    reply(command_error(std::move(desc), cls));
  }
  [[nodiscard]] bool answered() const { return p_ == nullptr; }

 private:
  std::shared_ptr<detail::Pending> p_;
};

using Handler = std::function<void(const nlohmann::json& args, Responder responder)>;
using SyncHandler = std::function<CommandResult(const nlohmann::json& args)>;

struct CommandSpec {
  std::string name;
  std::vector<ArgSpec> args;
  Returns returns;
  Handler handler;

  // A handler that answers before returning.
  [[nodiscard]] static CommandSpec sync(std::string name, std::vector<ArgSpec> args, Returns returns,
                                        SyncHandler fn);
};

// An RAII registration: destroying it undoes the registration.
class Registration {
 public:
  Registration() = default;
  explicit Registration(std::function<void()> undo) : undo_(std::move(undo)) {}
  Registration(Registration&& o) noexcept : undo_(std::exchange(o.undo_, nullptr)) {}
  Registration& operator=(Registration&& o) noexcept {
    if (this != &o) {
      reset();
      undo_ = std::exchange(o.undo_, nullptr);
    }
    return *this;
  }
  Registration(const Registration&) = delete;
  Registration& operator=(const Registration&) = delete;
  ~Registration() { reset(); }
  void reset() noexcept {
    if (auto u = std::exchange(undo_, nullptr)) u();
  }
  // Keeps the registration for the life of the registry.
  void release() { undo_ = nullptr; }

 private:
  std::function<void()> undo_;
};

// ── Run state (qapi/run-state.json RunState; only the states a PV device model has) ──
enum class RunStatus { prelaunch, running, paused };
[[nodiscard]] std::string_view run_status_name(RunStatus s);

class RunState {
 public:
  // A hook gets a `done` to call exactly once (from any thread) when it has finished.
  using Hook = std::function<void(std::function<void()> done)>;
  using Listener = std::function<void(RunStatus)>;

  RunState(EventLoop& loop, RunStatus initial);
  ~RunState();
  RunState(const RunState&) = delete;
  RunState& operator=(const RunState&) = delete;

  [[nodiscard]] RunStatus status() const;
  // stop (running → paused): every quiesce hook runs (concurrently); STOP is emitted and
  // `stop`'s reply sent when all have called done. Hooks must stop new work and drain
  // in-flight I/O before calling done (QEMU: vm_stop → bdrv_drain_all).
  [[nodiscard]] Registration add_quiesce_hook(Hook hook);
  // cont (paused or prelaunch → running): every resume hook runs, then RESUME.
  [[nodiscard]] Registration add_resume_hook(Hook hook);
  // Called on every transition, after the hooks, before the event.
  [[nodiscard]] Registration add_listener(Listener listener);

  // Transitions are serialised: one requested while another runs starts after it.
  // `done` runs on the loop thread when the transition (or no-op) is complete.
  void stop(std::function<void()> done);
  void cont(std::function<void()> done);

  // Where STOP/RESUME go (set by the Server).
  void set_event_sink(std::function<void(std::string_view event)> sink);

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// ── Server ──
struct VersionTriple {
  int major = 0, minor = 0, micro = 0;
};

// The QEMU version pvhost reports (greeting, query-version). libxl 4.17 picks code paths
// by comparing it with 2.8 (blockdev-change-medium "id"), 2.11 (xen-save-devices-state
// "live") and 2.12; newer libxl also with 9.1 (restore via "-incoming file:"). 7.2.0 is the
// QAPI schema whose shapes pvhost implements (query-status with "singlestep", etc.) and
// what Debian 12 ships (7.2.x), so libxl takes the paths it takes with the stock device
// model. docs/QMP.md explains the choice.
inline constexpr VersionTriple kQemuVersion{7, 2, 0};

// One row of query-command-line-options (qapi/misc.json CommandLineOptionInfo).
struct CommandLineParameter {
  std::string name;
  std::string type;  // "string", "boolean", "number", "size"
  std::string help;
};
struct CommandLineOption {
  std::string option;
  std::vector<CommandLineParameter> parameters;
};
[[nodiscard]] std::vector<CommandLineOption> default_command_line_options();

struct ServerInfo {
  std::string name;                   // -name; empty: query-name returns {}
  std::optional<std::string> uuid;    // none: all zeros, as QEMU without -uuid
  std::string package;                // empty: "pvhost <version>"
  VersionTriple qemu_version = kQemuVersion;
  RunStatus initial = RunStatus::running;  // prelaunch with -S
  std::vector<CommandLineOption> command_line_options = default_command_line_options();

  [[nodiscard]] static ServerInfo from_options(const Options& o);
};

struct ServerLimits {
  size_t max_message_bytes = 4u << 20;   // per request (JsonFramer)
  size_t max_depth = 1024;               // JSON nesting (QEMU's MAX_NESTING)
  size_t max_output_bytes = 8u << 20;    // per client; a client over it is disconnected
  size_t max_queued_requests = 64;       // per client; reading pauses beyond it
};

struct VncProvider {
  std::function<nlohmann::json()> query;                                      // query-vnc
  std::function<CommandResult(const std::string& password)> change_password;  // change-vnc-password
};

// An HMP ("human monitor") command for human-monitor-command, e.g. "info block".
// `args` is the rest of the line; `done` gets the text output ("\n" line ends; converted
// to "\r\n" as QEMU's monitor does).
struct HmpCommand {
  std::string name;  // "info block", "stop", ...
  std::string help;
  std::function<void(std::string_view args, std::function<void(std::string)> done)> handler;
};

class Server {
 public:
  // A server with the built-in commands and no monitors.
  [[nodiscard]] static Result<std::unique_ptr<Server>> create(EventLoop& loop, ServerInfo info,
                                                              ServerLimits limits = {});
  // The same, plus a monitor for every control-mode -mon/-qmp in `options`.
  [[nodiscard]] static Result<std::unique_ptr<Server>> create(EventLoop& loop, ServerInfo info,
                                                              const Options& options,
                                                              ServerLimits limits = {});
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Listens on a unix socket (a stale file is unlinked) and registers chardev `label`.
  [[nodiscard]] Result<void> add_monitor(const std::string& socket_path, std::string label);

  // Fails (EEXIST) when the name is taken.
  [[nodiscard]] Result<void> add_command(CommandSpec spec);
  void remove_command(std::string_view name);
  [[nodiscard]] bool has_command(std::string_view name) const;
  // Runs a registered command as if a client had sent it (arguments checked), for HMP and
  // for other parts of pvhost. `done` runs on the loop thread.
  void execute(std::string_view name, nlohmann::json args, std::function<void(CommandResult)> done);

  [[nodiscard]] Result<void> add_hmp_command(HmpCommand cmd);
  // Runs an HMP command line; `done` gets its output (with "\r\n" line ends).
  void execute_hmp(std::string_view command_line, std::function<void(std::string)> done);

  // Sends {"timestamp", "event", "data"?} to every client past negotiation. `data` null or
  // empty object: no "data" member.
  void emit_event(std::string_view name, const nlohmann::json& data = nullptr);

  [[nodiscard]] RunState& run_state();

  // query-chardev rows: `filename` is asked at query time (a socket's text changes with its
  // connection state). Kept in registration order.
  [[nodiscard]] Registration add_chardev(std::string label, std::function<std::string()> filename,
                                         bool frontend_open = true);
  // The same, with frontend-open asked at query time.
  [[nodiscard]] Registration add_chardev(std::string label, std::function<std::string()> filename,
                                         std::function<bool()> frontend_open);

  void set_vnc_provider(VncProvider provider);
  // Called (on the loop thread) after `quit` has been answered and SHUTDOWN sent; default:
  // stops the loop.
  void set_shutdown_handler(std::function<void(std::string_view reason)> handler);

  [[nodiscard]] const ServerInfo& info() const;
  [[nodiscard]] size_t client_count() const;

  struct Impl;

 private:
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pvhost::qmp
