// xenstored-test-server RUNDIR [DOMID...]: runs the emulated xenstored in the foreground
// on RUNDIR (introducing the given domains), prints "ready" once RUNDIR/socket accepts
// connections, and exits cleanly on SIGINT/SIGTERM. For tests and manual poking with the
// xenstore-* tools (XENSTORED_PATH=RUNDIR/socket) until the pvhost-xenemu daemon exists.
#include <signal.h>
#include <sys/signalfd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "hw/xen/emu/xenstored/xenstored.h"
#include "src/event_loop.h"
#include "src/fd.h"
#include "src/log.h"

using namespace pvhost;

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s RUNDIR [DOMID...]\n", argv[0]);
    return 2;
  }
  if (const char* lvl = std::getenv("PVHOST_LOG_LEVEL")) {
    if (auto l = log::parse_level(lvl)) log::set_level(*l);
  }
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGTERM);
  if (sigprocmask(SIG_BLOCK, &mask, nullptr) != 0) return 1;
  UniqueFd sfd(::signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC));
  if (!sfd) return 1;

  auto loop = EventLoop::create("xenstored");
  if (!loop) {
    std::fprintf(stderr, "%s\n", loop.error().describe().c_str());
    return 1;
  }
  auto xs = xenemu::Xenstored::start(**loop, xenemu::XenstoredOptions{argv[1], {}});
  if (!xs) {
    std::fprintf(stderr, "%s\n", xs.error().describe().c_str());
    return 1;
  }
  for (int i = 2; i < argc; ++i) {
    const long d = std::strtol(argv[i], nullptr, 10);
    if (auto r = (*xs)->introduce_domain(DomId(static_cast<uint16_t>(d))); !r) {
      std::fprintf(stderr, "%s\n", r.error().describe().c_str());
      return 1;
    }
  }
  EventLoop& l = **loop;
  auto w = l.watch_fd(sfd.get(), EPOLLIN, [&](uint32_t) { l.stop(); });
  if (!w) return 1;
  std::printf("ready\n");
  std::fflush(stdout);
  auto r = l.run();
  xs->reset();
  return r ? 0 : 1;
}
