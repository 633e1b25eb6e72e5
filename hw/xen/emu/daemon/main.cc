// pvhost-xenemu: the emulated hypervisor daemon (ARCHITECTURE.md "The emulated hypervisor").
//
//   pvhost-xenemu --rundir DIR [--strict] [--daemonize --pidfile FILE] [-D LOGFILE] [-d LEVEL]
//
// Serves xenstored (RUNDIR/socket, RUNDIR/domain-N.sock) and the hypervisor broker
// (RUNDIR/hv.sock, RUNDIR/hv-domain-N.sock; wire.h) on one event loop. Foreground by default;
// with --daemonize the parent returns only once both sockets accept connections. SIGTERM and
// SIGINT end it cleanly: domains destroyed, sockets removed.
#include <fcntl.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <string_view>

#include "hw/xen/emu/broker/broker.h"
#ifndef PVHOST_XENEMU_NO_XENSTORED
#include "hw/xen/emu/xenstored/xenstored.h"
#endif
#include "src/log.h"

namespace pvhost::xenemu {
namespace {

struct Options {
  std::string rundir;
  bool strict = false;
  bool daemonize = false;
  std::string pidfile;
  std::string logfile;
  std::string level = "info";
};

constexpr std::string_view kUsage =
    "usage: pvhost-xenemu --rundir DIR [--strict] [--daemonize --pidfile FILE] [-D LOGFILE] [-d LEVEL]\n";

Result<Options> parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    const auto value = [&]() -> Result<std::string> {
      if (i + 1 >= argc) return fail(EINVAL, fmt::format("{} needs a value", a));
      return std::string(argv[++i]);
    };
    if (a == "--rundir") o.rundir = PVHOST_TRY(value());
    else if (a == "--strict") o.strict = true;
    else if (a == "--daemonize") o.daemonize = true;
    else if (a == "--pidfile") o.pidfile = PVHOST_TRY(value());
    else if (a == "-D") o.logfile = PVHOST_TRY(value());
    else if (a == "-d" || a == "--log-level") o.level = PVHOST_TRY(value());
    else return fail(EINVAL, fmt::format("unknown argument '{}'", a));
  }
  if (o.rundir.empty()) return fail(EINVAL, "--rundir is required");
  if (!o.pidfile.empty() && !o.daemonize) return fail(EINVAL, "--pidfile goes with --daemonize");
  return o;
}

// The daemon proper; `ready_fd` (or -1) gets one byte once the sockets accept connections.
Result<void> serve(const Options& o, int ready_fd) {
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  if (::sigprocmask(SIG_BLOCK, &mask, nullptr) != 0) return fail_errno("sigprocmask");
  UniqueFd sigfd(::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!sigfd) return fail_errno("signalfd");
  ::signal(SIGPIPE, SIG_IGN);  // peers die; sends report EPIPE instead

  if (::mkdir(o.rundir.c_str(), 0755) != 0 && errno != EEXIST) return fail_errno("mkdir " + o.rundir);
  auto loop = PVHOST_TRY(EventLoop::create("xenemu"));

  BrokerHooks hooks;
#ifndef PVHOST_XENEMU_NO_XENSTORED
  auto xs = PVHOST_TRY_CTX(Xenstored::start(*loop, XenstoredOptions{o.rundir, {}}), "start xenstored");
  hooks.introduce_domain = [&xs](DomId d) { return xs->introduce_domain(d); };
  hooks.release_domain = [&xs](DomId d) { return xs->release_domain(d); };
  hooks.target_of = [&xs](DomId d) { return xs->target_of(d); };
#else
  log::warn("pvhost-xenemu built without xenstored: serving the hypervisor broker only");
#endif
  auto broker = PVHOST_TRY(Broker::start(*loop, BrokerOptions{o.rundir, o.strict}, std::move(hooks)));
#ifndef PVHOST_XENEMU_NO_XENSTORED
  xs->on_domain_change = [&broker](DomId d, bool introduced) {
    if (!introduced) broker->domain_released(d);
  };
#endif

  EventLoop* lp = loop.get();
  auto sigwatch = PVHOST_TRY(loop->watch_fd(sigfd.get(), EPOLLIN, [lp, &sigfd](uint32_t) {
    signalfd_siginfo si{};
    while (::read(sigfd.get(), &si, sizeof si) == sizeof si) {
      log::info("pvhost-xenemu: signal {}, shutting down", si.ssi_signo);
      lp->stop();
    }
  }));

  if (ready_fd >= 0) {
    const char ok = 1;
    (void)::write(ready_fd, &ok, 1);  // the parent treats a closed pipe without it as failure
    ::close(ready_fd);
  }
  log::info("pvhost-xenemu: serving in {}", o.rundir);
  auto ran = loop->run();
  // Ordered shutdown: the broker first (it releases domains in xenstored), then xenstored.
  broker.reset();
#ifndef PVHOST_XENEMU_NO_XENSTORED
  xs.reset();
#endif
  if (!o.pidfile.empty()) ::unlink(o.pidfile.c_str());
  return ran;
}

int run(int argc, char** argv) {
  auto opts = parse(argc, argv);
  if (!opts) {
    std::fprintf(stderr, "pvhost-xenemu: %s\n%.*s", opts.error().what().c_str(), static_cast<int>(kUsage.size()),
                 kUsage.data());
    return 2;
  }
  if (auto l = log::parse_level(opts->level); l) log::set_level(*l);
  if (!opts->logfile.empty()) {
    if (auto r = log::set_file(opts->logfile); !r) {
      std::fprintf(stderr, "pvhost-xenemu: %s\n", r.error().describe().c_str());
      return 1;
    }
  }
  if (!opts->daemonize) {
    auto r = serve(*opts, -1);
    if (!r) {
      log::error("pvhost-xenemu: {}", r.error().describe());
      return 1;
    }
    return 0;
  }

  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) {
    std::perror("pvhost-xenemu: pipe");
    return 1;
  }
  const pid_t pid = ::fork();
  if (pid < 0) {
    std::perror("pvhost-xenemu: fork");
    return 1;
  }
  if (pid > 0) {
    ::close(pipefd[1]);
    char ok = 0;
    const ssize_t n = ::read(pipefd[0], &ok, 1);
    if (n != 1) {
      int status = 0;
      ::waitpid(pid, &status, 0);
      std::fprintf(stderr, "pvhost-xenemu: the daemon failed to start (see the log)\n");
      return 1;
    }
    return 0;
  }
  ::close(pipefd[0]);
  ::setsid();
  if (!opts->pidfile.empty()) {
    const std::string text = fmt::format("{}\n", ::getpid());
    UniqueFd f(::open(opts->pidfile.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!f || !write_all(f.get(), text)) {
      log::error("pvhost-xenemu: write pidfile {}: {}", opts->pidfile, errno_name(errno));
      return 1;
    }
  }
  UniqueFd devnull(::open("/dev/null", O_RDWR | O_CLOEXEC));
  if (devnull) {
    ::dup2(devnull.get(), STDIN_FILENO);
    ::dup2(devnull.get(), STDOUT_FILENO);
    if (!opts->logfile.empty()) ::dup2(devnull.get(), STDERR_FILENO);
  }
  auto r = serve(*opts, pipefd[1]);
  if (!r) {
    log::error("pvhost-xenemu: {}", r.error().describe());
    if (!opts->pidfile.empty()) ::unlink(opts->pidfile.c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace pvhost::xenemu

int main(int argc, char** argv) { return pvhost::xenemu::run(argc, argv); }
