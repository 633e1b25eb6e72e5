// Built-in QMP commands and the HMP subset behind human-monitor-command (docs/QMP.md).
// Argument and return shapes follow QEMU 7.2's QAPI schema (qapi/*.json), cited per
// command.
#include <cstring>

#include <fmt/format.h>

#include "qmp/migration_stream.h"
#include "qmp/server_impl.h"
#include "src/log.h"

namespace pvhost::qmp {

using nlohmann::json;

namespace {

// Safe accessors: nlohmann's get<T>() throws on a type mismatch.
std::string str_of(const json& o, std::string_view key) {
  if (!o.is_object()) return {};
  auto it = o.find(key);
  return it != o.end() && it->is_string() ? it->get<std::string>() : std::string();
}
bool bool_of(const json& o, std::string_view key) {
  if (!o.is_object()) return false;
  auto it = o.find(key);
  return it != o.end() && it->is_boolean() && it->get<bool>();
}
const json* obj_of(const json& o, std::string_view key) {
  if (!o.is_object()) return nullptr;
  auto it = o.find(key);
  return it != o.end() && it->is_object() ? &*it : nullptr;
}

// Keeps a move-only Responder in a copyable std::function.
using SharedResponder = std::shared_ptr<Responder>;

// monitor/hmp-cmds.c print_block_info, for "info block" from query-block's BlockInfo.
std::string format_block_info(const json& list) {
  std::string out;
  if (!list.is_array()) return out;
  for (const json& info : list) {
    const json* inserted = obj_of(info, "inserted");
    std::string device = str_of(info, "device");
    std::string node = inserted ? str_of(*inserted, "node-name") : std::string();
    if (!device.empty()) {
      out += device;
      if (!node.empty()) out += fmt::format(" ({})", node);
    } else {
      out += node;
    }
    if (inserted) {
      out += fmt::format(": {} ({}{}{})\n", str_of(*inserted, "file"), str_of(*inserted, "drv"),
                         bool_of(*inserted, "ro") ? ", read-only" : "",
                         bool_of(*inserted, "encrypted") ? ", encrypted" : "");
    } else {
      out += ": [not inserted]\n";
    }
    if (std::string qdev = str_of(info, "qdev"); !qdev.empty())
      out += fmt::format("    Attached to:      {}\n", qdev);
    if (bool_of(info, "removable"))
      out += fmt::format("    Removable device: {}locked, tray {}\n", bool_of(info, "locked") ? "" : "not ",
                         bool_of(info, "tray_open") ? "open" : "closed");
    if (inserted) {
      if (const json* cache = obj_of(*inserted, "cache")) {
        out += fmt::format("    Cache mode:       {}{}{}\n", bool_of(*cache, "writeback") ? "writeback" : "writethrough",
                           bool_of(*cache, "direct") ? ", direct" : "",
                           bool_of(*cache, "no-flush") ? ", ignore flushes" : "");
      }
    }
    out += "\n";
  }
  // QEMU separates devices with a blank line but ends without one.
  if (out.ends_with("\n\n")) out.pop_back();
  return out;
}

void register_hmp(Server& server, Server::Impl& impl) {
  auto add = [&](std::string name, std::string help,
                 std::function<void(std::string_view, std::function<void(std::string)>)> fn) {
    (void)server.add_hmp_command({std::move(name), std::move(help), std::move(fn)});
  };
  Server::Impl* p = &impl;
  // monitor/hmp-cmds.c hmp_info_status.
  add("info status", "show the current VM status (running|paused)", [p](std::string_view, auto done) {
    const RunStatus s = p->run_state.status();
    std::string out = fmt::format("VM status: {}", s == RunStatus::running ? "running" : "paused");
    if (s == RunStatus::prelaunch) out += " (prelaunch)";
    done(out + "\n");
  });
  add("info chardev", "show the character devices", [p](std::string_view, auto done) {
    std::string out;
    for (const auto& c : p->chardevs) out += fmt::format("{}: filename={}\n", c.label, c.filename());
    done(out);
  });
  add("info block", "show the block devices", [p](std::string_view, auto done) {
    if (!p->commands.contains("query-block")) {
      done("");  // QEMU with no drives prints nothing
      return;
    }
    p->execute("query-block", json::object(), [done](CommandResult r) {
      done(r ? format_block_info(*r) : r.error().desc + "\n");
    });
  });
  add("info version", "show the version of QEMU", [p](std::string_view, auto done) {
    const VersionTriple& v = p->info.qemu_version;
    done(fmt::format("{}.{}.{} ({})\n", v.major, v.minor, v.micro, p->info.package));
  });
  add("info name", "show the current VM name", [p](std::string_view, auto done) {
    done(p->info.name.empty() ? std::string() : p->info.name + "\n");
  });
  add("info uuid", "show the current VM UUID", [p](std::string_view, auto done) {
    done(p->info.uuid.value_or("00000000-0000-0000-0000-000000000000") + "\n");
  });
  auto via_qmp = [p](std::string command) {
    return [p, command](std::string_view, std::function<void(std::string)> done) {
      p->execute(command, json::object(), [done](CommandResult r) { done(r ? "" : r.error().desc + "\n"); });
    };
  };
  add("stop", "stop emulation", via_qmp("stop"));
  add("cont", "resume emulation", via_qmp("cont"));
  add("c", "resume emulation", via_qmp("cont"));
  add("quit", "quit the emulator", via_qmp("quit"));
  add("q", "quit the emulator", via_qmp("quit"));
}

}  // namespace

std::vector<CommandLineOption> default_command_line_options() {
  // The QemuOpts groups of the options pvhost accepts (src/cli.h), in QEMU's shape
  // (util/qemu-config.c query_option_descs). Parameters pvhost ignores are listed when
  // QEMU has them and libxl may pass them.
  return {
      {"chardev",
       {{"backend", "string", ""},
        {"path", "string", ""},
        {"server", "boolean", ""},
        {"wait", "boolean", ""},
        {"logfile", "string", ""},
        {"logappend", "boolean", ""},
        {"mux", "boolean", ""},
        {"signal", "boolean", ""}}},
      {"mon", {{"mode", "string", ""}, {"chardev", "string", ""}, {"pretty", "boolean", ""}}},
      {"name",
       {{"guest", "string", "Sets the name of the guest.\nThis name will be displayed in the SDL window caption.\n"
                             "The name will also be used for the VNC server"},
        {"process", "string", "Sets the name of the QEMU process, as shown in top etc"},
        {"debug-threads", "boolean", "When enabled, name the individual threads; defaults off.\n"
                                     "NOTE: The thread names are for debugging and not a\nstable API."}}},
      {"machine", {{"type", "string", "emulated machine"}}},
      {"memory", {{"size", "size", ""}}},
      {"vnc", {{"to", "number", ""}, {"password", "boolean", ""}, {"lossy", "boolean", ""}}},
  };
}

ServerInfo ServerInfo::from_options(const Options& o) {
  ServerInfo info;
  info.name = o.name;
  info.initial = o.start_paused ? RunStatus::prelaunch : RunStatus::running;
  return info;
}

void Server::execute_hmp(std::string_view command_line, std::function<void(std::string)> done) {
  // monitor/hmp.c: output goes through monitor_puts, which turns "\n" into "\r\n".
  auto crlf = [done = std::move(done)](std::string text) {
    std::string out;
    out.reserve(text.size() + 8);
    for (char c : text) {
      if (c == '\n') out += "\r\n";
      else out.push_back(c);
    }
    done(std::move(out));
  };
  auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  size_t b = 0;
  while (b < command_line.size() && is_space(command_line[b])) ++b;
  std::string_view line = command_line.substr(b);
  while (!line.empty() && is_space(line.back())) line.remove_suffix(1);
  if (line.empty()) {
    crlf("");
    return;
  }
  auto word_end = [&](std::string_view s) {
    size_t i = 0;
    while (i < s.size() && !is_space(s[i])) ++i;
    return i;
  };
  size_t e1 = word_end(line);
  std::string name(line.substr(0, e1));
  std::string_view rest = line.substr(e1);
  while (!rest.empty() && is_space(rest.front())) rest.remove_prefix(1);
  if (name == "info") {
    if (rest.empty()) {
      std::string out;
      for (const auto& c : impl_->hmp)
        if (c.name.starts_with("info ")) out += fmt::format("{} -- {}\n", c.name, c.help);
      crlf(out);
      return;
    }
    size_t e2 = word_end(rest);
    name = "info " + std::string(rest.substr(0, e2));
    rest.remove_prefix(e2);
    while (!rest.empty() && is_space(rest.front())) rest.remove_prefix(1);
  }
  for (const auto& c : impl_->hmp) {
    if (c.name == name) {
      auto handler = c.handler;  // the table may change while it runs
      handler(rest, std::move(crlf));
      return;
    }
  }
  // monitor/hmp.c monitor_parse_command.
  crlf(fmt::format("unknown command: '{}'\n", name));
}

void register_builtin_commands(Server& server, Server::Impl& impl) {
  Server::Impl* p = &impl;
  Server* srv = &server;
  auto add = [&](CommandSpec spec) {
    if (auto r = server.add_command(std::move(spec)); !r) log::error("qmp: {}", r.error().describe());
  };
  const ArgType S = ArgType::string, I = ArgType::integer, B = ArgType::boolean;

  // qapi/control.json. Reached only through Server::execute: sessions negotiate themselves.
  add(CommandSpec::sync("qmp_capabilities", {{"enable", ArgType::array, true}}, Returns::empty(),
                        [](const json&) -> CommandResult {
                          return command_error("Capabilities negotiation is already complete, command ignored",
                                               ErrorClass::command_not_found);
                        }));
  // qapi/control.json VersionInfo.
  add(CommandSpec::sync("query-version", {},
                        Returns::object({{"qemu", ArgType::object}, {"package", S}}),
                        [p](const json&) -> CommandResult {
                          const VersionTriple& v = p->info.qemu_version;
                          return json{{"qemu", {{"major", v.major}, {"minor", v.minor}, {"micro", v.micro}}},
                                      {"package", p->info.package}};
                        }));
  add(CommandSpec::sync("query-commands", {}, Returns::array_of({{"name", S}}), [p](const json&) -> CommandResult {
    json list = json::array();
    for (const auto& [name, spec] : p->commands) list.push_back({{"name", name}});
    return list;
  }));
  add(CommandSpec::sync("query-qmp-schema", {}, Returns::array_of(ArgType::any),
                        [p](const json&) -> CommandResult { return build_qmp_schema(*p); }));
  // qapi/machine.json NameInfo: "name" is absent without -name.
  add(CommandSpec::sync("query-name", {}, Returns::object({{"name", S, true}}), [p](const json&) -> CommandResult {
    json r = json::object();
    if (!p->info.name.empty()) r["name"] = p->info.name;
    return r;
  }));
  // qapi/machine.json UuidInfo; QEMU without -uuid reports the nil UUID.
  add(CommandSpec::sync("query-uuid", {}, Returns::object({{"UUID", S}}), [p](const json&) -> CommandResult {
    return json{{"UUID", p->info.uuid.value_or("00000000-0000-0000-0000-000000000000")}};
  }));
  // qapi/run-state.json StatusInfo (7.2 still has the deprecated "singlestep").
  add(CommandSpec::sync("query-status", {}, Returns::object({{"running", B}, {"singlestep", B}, {"status", S}}),
                        [p](const json&) -> CommandResult {
                          const RunStatus s = p->run_state.status();
                          return json{{"status", run_status_name(s)},
                                      {"singlestep", false},
                                      {"running", s == RunStatus::running}};
                        }));
  // qapi/misc.json stop / cont: STOP / RESUME are sent before the reply, as QEMU does.
  add({"stop", {}, Returns::empty(), [p](const json&, Responder r) {
         auto shared = std::make_shared<Responder>(std::move(r));
         p->run_state.stop([shared] { shared->ok(); });
       }});
  add({"cont", {}, Returns::empty(), [p](const json&, Responder r) {
         auto shared = std::make_shared<Responder>(std::move(r));
         p->run_state.cont([shared] { shared->ok(); });
       }});
  // qapi/misc.json quit: the reply first, then SHUTDOWN (runstate.c
  // qemu_system_shutdown_request with SHUTDOWN_CAUSE_HOST_QMP_QUIT), then exit.
  add({"quit", {}, Returns::empty(), [p, srv](const json&, Responder r) {
         r.ok();
         std::weak_ptr<int> alive = p->alive;  // the server may be gone when this runs
         p->loop.defer([p, srv, alive] {
           if (alive.expired()) return;
           srv->emit_event("SHUTDOWN", json{{"guest", false}, {"reason", "host-qmp-quit"}});
           p->flush_all();
           log::info("qmp: quit requested");
           if (p->shutdown) p->shutdown("host-qmp-quit");
           else p->loop.stop();
         });
       }});
  // qapi/misc.json query-command-line-options.
  add(CommandSpec::sync(
      "query-command-line-options", {{"option", S, true}},
      Returns::array_of({{"option", S}, {"parameters", ArgType::array}}), [p](const json& args) -> CommandResult {
        std::string want = str_of(args, "option");
        json list = json::array();
        for (const CommandLineOption& o : p->info.command_line_options) {
          if (!want.empty() && o.option != want) continue;
          json params = json::array();
          for (const CommandLineParameter& prm : o.parameters) {
            json row{{"name", prm.name}, {"type", prm.type}};
            if (!prm.help.empty()) row["help"] = prm.help;
            params.push_back(std::move(row));
          }
          list.push_back({{"option", o.option}, {"parameters", std::move(params)}});
        }
        if (!want.empty() && list.empty()) return command_error("invalid option name: " + want);
        return list;
      }));
  // qapi/char.json ChardevInfo.
  add(CommandSpec::sync("query-chardev", {},
                        Returns::array_of({{"label", S}, {"filename", S}, {"frontend-open", B}}),
                        [p](const json&) -> CommandResult {
                          json list = json::array();
                          for (const auto& c : p->chardevs)
                            list.push_back({{"frontend-open", c.frontend_open()}, {"filename", c.filename()}, {"label", c.label}});
                          return list;
                        }));
  // qapi/ui.json VncInfo: {"enabled": false} when no VNC server listens (ui/vnc.c).
  add(CommandSpec::sync("query-vnc", {}, Returns::object({{"enabled", B}}), [p](const json&) -> CommandResult {
    if (p->vnc && p->vnc->query) return p->vnc->query();
    return json{{"enabled", false}};
  }));
  // qapi/ui.json change-vnc-password; ui/vnc.c vnc_display_password fails without a display.
  add(CommandSpec::sync("change-vnc-password", {{"password", S}}, Returns::empty(), [p](const json& args) -> CommandResult {
    if (p->vnc && p->vnc->change_password) return p->vnc->change_password(str_of(args, "password"));
    return command_error("Could not set password");
  }));
  // qapi/misc.json human-monitor-command.
  add({"human-monitor-command", {{"command-line", S}, {"cpu-index", I, true}}, Returns::builtin(S),
       [srv](const json& args, Responder r) {
         auto shared = std::make_shared<Responder>(std::move(r));
         srv->execute_hmp(str_of(args, "command-line"), [shared](std::string out) { shared->ok(json(std::move(out))); });
       }});
  // qapi/migration.json xen-save-devices-state / xen-load-devices-state: QEMU reports a
  // failed load as QERR_IO_ERROR; the detail goes to the log.
  add(CommandSpec::sync("xen-save-devices-state", {{"filename", S}, {"live", B, true}}, Returns::empty(),
                        [](const json& args) -> CommandResult {
                          if (auto r = save_device_state_file(str_of(args, "filename")); !r) {
                            log::warn("qmp: xen-save-devices-state: {}", r.error().describe());
                            // io/channel-file.c: error_setg_errno(.., "Unable to open %s", path)
                            return command_error(fmt::format("{}: {}", r.error().what(), std::strerror(r.error().code())));
                          }
                          return json::object();
                        }));
  add(CommandSpec::sync("xen-load-devices-state", {{"filename", S}}, Returns::empty(),
                        [](const json& args) -> CommandResult {
                          if (auto r = load_device_state_file(str_of(args, "filename")); !r) {
                            log::warn("qmp: xen-load-devices-state: {}", r.error().describe());
                            return command_error("An IO error has occurred");
                          }
                          return json::object();
                        }));
  // qapi/migration.json xen-set-global-dirty-log: a PV device model maps no guest RAM
  // for emulation, so there is no dirty log to start or stop.
  add(CommandSpec::sync("xen-set-global-dirty-log", {{"enable", B}}, Returns::empty(),
                        [](const json&) -> CommandResult { return json::object(); }));

  register_hmp(server, impl);
}

}  // namespace pvhost::qmp
