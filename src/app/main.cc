// pvhost: the process entry point. Parses the command line at the edge, opens the Xen
// interface (real or emulated), and runs the main event loop until a signal or `quit`.
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
#include "src/cli.h"
#include "src/event_loop.h"
#include "src/log.h"

namespace pvhost {
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
  if (auto lvl = log::parse_level(o.log_level); lvl) log::set_level(*lvl);
  else {
    std::fprintf(stderr, "pvhost: --log-level: %s\n", lvl.error().what().c_str());
    return 2;
  }
  if (!o.log_file.empty()) {
    if (auto r = log::set_file(o.log_file); !r) {
      std::fprintf(stderr, "pvhost: -D: %s\n", r.error().describe().c_str());
      return 2;
    }
  }
  if (!o.domid) {
    std::fprintf(stderr, "pvhost: -xen-domid N is required\n");
    return 2;
  }

  auto xen = open_xen(o);
  if (!xen) {
    std::fprintf(stderr, "pvhost: %s\n", xen.error().what().c_str());
    return 1;
  }

  // Signals arrive through a signalfd on the main loop; block them before any thread starts.
  sigset_t mask;
  sigemptyset(&mask);
  for (int s : {SIGHUP, SIGTERM, SIGINT}) sigaddset(&mask, s);
  pthread_sigmask(SIG_BLOCK, &mask, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  auto loop = EventLoop::create("main");
  if (!loop) {
    log::error("{}", loop.error().describe());
    return 1;
  }
  UniqueFd sfd(::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
  auto sig_watch = (*loop)->watch_fd(sfd.get(), EPOLLIN, [&](uint32_t) {
    signalfd_siginfo si{};
    if (::read(sfd.get(), &si, sizeof si) == sizeof si) {
      log::info("signal {}: shutting down", si.ssi_signo);
      (*loop)->stop();
    }
  });
  if (!sig_watch) {
    log::error("{}", sig_watch.error().describe());
    return 1;
  }
  log::info("pvhost {} serving dom{} ({} Xen)", PVHOST_VERSION, *o.domid, (*xen)->kind());
  if (auto r = (*loop)->run(); !r) {
    log::error("main loop: {}", r.error().describe());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace pvhost

int main(int argc, char** argv) { return pvhost::run(argc, argv); }
