// pvhost: the process entry point. Parses the command line at the edge, opens the Xen
// interface (real or emulated), serves the chosen backend types for one guest through a
// BackendHost, and runs the main event loop until a signal or QMP `quit`.
//
// Start-up order (as QEMU's dm_restrict expects): open everything (Xen handles, sockets),
// restrict Xen handles to the guest, chroot, drop privileges, then report readiness.
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "hw/xen/xen.h"
#include "pvhost_config.h"
#include "qmp/server.h"
#include "src/app/process.h"
#include "src/app/qmp_glue.h"
#if PVHOST_BACKEND_CONSOLE
#include "backends/console/console_host.h"
#endif
#if PVHOST_BACKEND_QDISK
#include "src/app/block_glue.h"
#endif
#include "src/cli.h"
#include "src/device/backend_host.h"
#include "src/device/registry.h"
#include "src/event_loop.h"
#include "src/log.h"

namespace pvhost {

Registry make_registry();

namespace {

Result<std::unique_ptr<xen::Xen>> open_xen(const Options& o) {
  switch (o.xen) {
    case XenMode::real:
      return xen::open_real();
    case XenMode::emulated: {
      std::string dir = o.emu_rundir;
      if (dir.empty()) {
        const char* env = std::getenv("PVHOST_XENEMU_DIR");
        if (env == nullptr) return fail(EINVAL, "--xen=emu needs a directory: --xen=emu:DIR or PVHOST_XENEMU_DIR");
        dir = env;
      }
      return xen::open_emulated(dir);
    }
    case XenMode::automatic: {
      struct stat st;
      if (::stat("/dev/xen/privcmd", &st) == 0) return xen::open_real();
      if (const char* env = std::getenv("PVHOST_XENEMU_DIR")) return xen::open_emulated(env);
      return xen::open_real();  // fails with the clear "no Xen hypervisor" line
    }
  }
  return fail(EINVAL, "unknown --xen mode");
}

// The served types: -backends (each must be built in) or every type built in.
Result<std::vector<std::string>> served_types(const Options& o, const Registry& registry) {
  if (o.backends.empty()) {
    std::vector<std::string> all;
    for (auto n : registry.default_names()) all.emplace_back(n);
    return all;
  }
  for (const auto& b : o.backends) {
    if (registry.find(b) == nullptr)
      return fail(EINVAL, fmt::format("-backends: '{}' is not a backend type of this build (built in: {})", b,
                                      fmt::join(registry.names(), ", ")));
  }
  return o.backends;
}

// One line on stderr (where libxl's qemu-dm log and a person both see it); the log file,
// if -D moved the log elsewhere, gets the detailed form too.
bool g_log_to_file = false;
int fail_start(const Error& e) {
  std::fprintf(stderr, "pvhost: %s\n", e.what().c_str());
  if (g_log_to_file) log::error("start-up failed: {}", e.describe());
  return 1;
}

int run(int argc, char** argv) {
  std::vector<std::string> args(argv, argv + argc);
  auto parsed = parse_command_line(args);
  if (!parsed) {
    std::fprintf(stderr, "pvhost: %s\n", parsed.error().what().c_str());
    return 2;
  }
  Options& o = *parsed;
  if (o.help) {
    std::cout << usage_text();
    return 0;
  }
  if (o.version) {
    std::cout << "pvhost " << PVHOST_VERSION << "\n";
    return 0;
  }
  const Registry registry = make_registry();
  if (o.list_backends) {
    std::cout << "backend types built into this pvhost:\n";
    for (const auto& t : registry.types())
      std::cout << "  " << t.name << "\t" << t.description << (registry.is_opt_in(t.name) ? " [opt-in]" : "") << "\n";
    return 0;
  }
  if (auto lvl = log::parse_level(o.log_level); lvl) {
    log::set_level(*lvl);
  } else {
    std::fprintf(stderr, "pvhost: --log-level: %s\n", lvl.error().what().c_str());
    return 2;
  }
  if (!o.log_file.empty()) {
    g_log_to_file = true;
    if (auto r = log::set_file(o.log_file); !r) {
      std::fprintf(stderr, "pvhost: -D: %s\n", r.error().describe().c_str());
      return 2;
    }
  }
  if (!o.domid) {
    std::fprintf(stderr, "pvhost: -xen-domid N is required\n");
    return 2;
  }
  auto types = served_types(o, registry);
  if (!types) {
    std::fprintf(stderr, "pvhost: %s\n", types.error().what().c_str());
    return 2;
  }
  for (const auto& ign : o.ignored) log::debug("option {} accepted and ignored (no meaning for a PV device model)", ign);

  UniqueFd ready_pipe;
  if (o.daemonize) {
    auto r = daemonize();
    if (!r) return fail_start(r.error());
    ready_pipe = std::move(*r);
  }

  // Signals arrive through a signalfd on the main loop; block them before any thread starts.
  sigset_t mask;
  sigemptyset(&mask);
  for (int s : {SIGHUP, SIGTERM, SIGINT}) sigaddset(&mask, s);
  pthread_sigmask(SIG_BLOCK, &mask, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  // The loop first: everything below registers with it, so it must be destroyed last.
  auto loop_r = EventLoop::create("main");
  if (!loop_r) return fail_start(loop_r.error());
  EventLoop& loop = **loop_r;
  auto xen = open_xen(o);
  if (!xen) return fail_start(xen.error());
  if (auto r = (*xen)->store().attach(loop); !r) return fail_start(r.error());

  UniqueFd sfd(::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
  // libxl ends a PV device model with SIGHUP (xl save, xl destroy); all three are graceful.
  auto sig_watch = loop.watch_fd(sfd.get(), EPOLLIN, [&](uint32_t) {
    signalfd_siginfo si{};
    if (::read(sfd.get(), &si, sizeof si) == sizeof si) {
      log::info("signal {} ({}): shutting down", si.ssi_signo, ::strsignal(static_cast<int>(si.ssi_signo)));
      loop.stop();
    }
  });
  if (!sig_watch) return fail_start(sig_watch.error());

  BackendHostOptions hopts;
  hopts.guest = *o.domid;
  hopts.types = *types;
  hopts.primary = !o.peer;
  hopts.peer_name = o.name.empty() ? fmt::format("pvhost-{}", ::getpid()) : o.name;
  for (const auto& m : o.monitors)
    for (const auto& c : o.chardevs)
      if (c.id == m.chardev && c.path && hopts.peer_qmp_socket.empty()) hopts.peer_qmp_socket = *c.path;
  auto host = BackendHost::create(**xen, loop, registry, hopts);
  if (!host) return fail_start(host.error());
  (*host)->on_guest_gone = [&] {
    log::info("dom{} is gone; exiting", *o.domid);
    loop.stop();
  };
  // QMP first, so the monitors exist (and -S shows "prelaunch") as soon as devices appear.
  auto qmp_info = qmp::ServerInfo::from_options(o);
  auto server = qmp::Server::create(loop, qmp_info, o);
  if (!server) return fail_start(server.error());
  (*server)->set_shutdown_handler([&](std::string_view reason) {
    log::info("QMP quit ({}): shutting down", reason);
    loop.stop();
  });
  auto framework_cmds = FrameworkCommands::install(**server, **host);
  if (!framework_cmds) return fail_start(framework_cmds.error());
#if PVHOST_BACKEND_QDISK
  auto block_cmds = BlockCommands::install(**server, **host);
  if (!block_cmds) return fail_start(block_cmds.error());
#endif
#if PVHOST_BACKEND_CONSOLE
  // Consoles resolve `output = chardev:ID` against the -chardev list, and appear in
  // query-chardev while they exist.
  console::process_console_host().set_chardevs(o.chardevs);
  console::process_console_host().set_sink(
      [&srv = **server](std::string label, console::ConsoleHost::FilenameFn filename, console::ConsoleHost::OpenFn open) {
        auto reg = std::make_shared<qmp::Registration>(srv.add_chardev(std::move(label), std::move(filename), std::move(open)));
        return std::function<void()>([reg] { reg->reset(); });
      });
#endif
  if (auto r = (*host)->start(!o.start_paused); !r) return fail_start(r.error());

  if (o.domid_restrict) {
    if (auto r = (*xen)->restrict_to(*o.domid); !r) return fail_start(r.error());
  }
  if (!o.chroot_dir.empty()) {
    if (auto r = enter_chroot(o.chroot_dir); !r) return fail_start(r.error());
  }
  if (!o.runas.empty()) {
    if (auto r = drop_privileges(o.runas); !r) return fail_start(r.error());
  }
  if (!o.pidfile.empty()) {
    if (auto r = write_pidfile(o.pidfile); !r) return fail_start(r.error());
  }
  log::info("pvhost {} serving dom{} ({} Xen)", PVHOST_VERSION, *o.domid, (*xen)->kind());
  notify_ready(ready_pipe, g_log_to_file ? KeepStderr::no : KeepStderr::yes);

  auto ran = loop.run();
  (*host)->shutdown();
#if PVHOST_BACKEND_CONSOLE
  console::process_console_host().set_sink({});  // the QMP server goes before the registry
#endif
  if (!ran) {
    log::error("main loop: {}", ran.error().describe());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace pvhost

int main(int argc, char** argv) { return pvhost::run(argc, argv); }
