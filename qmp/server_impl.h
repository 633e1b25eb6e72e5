// Internal to qmp/: the Server's state, shared by server.cc (protocol, sessions,
// registries), commands.cc (built-in QMP and HMP commands) and schema.cc.
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qmp/json_framer.h"
#include "qmp/server.h"
#include "src/fd.h"

namespace pvhost::qmp {

namespace detail {
struct Pending {
  EventLoop* loop = nullptr;
  std::string command;
  std::function<void(CommandResult)> deliver;  // loop thread only
};
}  // namespace detail

// Checks `args` against `spec` in QAPI's order: each declared parameter (missing, then
// type), then undeclared ones. Returns the GenericError desc, or nothing when valid.
[[nodiscard]] std::optional<std::string> check_arguments(const std::vector<ArgSpec>& spec,
                                                         const nlohmann::json& args);
[[nodiscard]] std::string_view arg_type_name(ArgType t);  // "string", "integer", ...

struct Session;

struct MonitorListener {
  std::string path;
  std::string label;
  UniqueFd fd;
  EventLoop::Watch watch;
  size_t clients = 0;
  Registration chardev;
};

struct Server::Impl {
  Impl(EventLoop& l, ServerInfo i, ServerLimits lim);
  ~Impl();

  EventLoop& loop;
  ServerInfo info;
  ServerLimits limits;
  RunState run_state;
  std::map<std::string, CommandSpec, std::less<>> commands;
  std::vector<HmpCommand> hmp;

  struct Chardev {
    uint64_t id;
    std::string label;
    std::function<std::string()> filename;
    std::function<bool()> frontend_open;  // asked at query time (a console's guest comes and goes)
  };
  std::vector<Chardev> chardevs;
  uint64_t next_id = 1;
  std::optional<VncProvider> vnc;
  std::function<void(std::string_view)> shutdown;
  std::vector<std::unique_ptr<MonitorListener>> monitors;
  std::map<uint64_t, std::shared_ptr<Session>> sessions;
  std::shared_ptr<int> alive = std::make_shared<int>(0);  // registrations check it

  void accept_clients(MonitorListener& m);
  void execute(std::string_view name, nlohmann::json args, std::function<void(CommandResult)> done);
  void broadcast(const std::string& line);
  void flush_all();
  [[nodiscard]] Registration add_chardev(std::string label, std::function<std::string()> filename,
                                         std::function<bool()> frontend_open);
};

void register_builtin_commands(Server& server, Server::Impl& impl);
[[nodiscard]] nlohmann::json build_qmp_schema(const Server::Impl& impl);

}  // namespace pvhost::qmp
