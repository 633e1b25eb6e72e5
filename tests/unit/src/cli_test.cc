#include <catch2/catch.hpp>

#include <fstream>
#include <sstream>

#include "src/cli.h"

using namespace pvhost;

namespace {
Result<Options> parse(std::vector<std::string> args) {
  args.insert(args.begin(), "pvhost");
  return parse_command_line(args);
}
std::string error_of(std::vector<std::string> args) {
  auto r = parse(std::move(args));
  REQUIRE_FALSE(r);
  return r.error().what();
}
}  // namespace

TEST_CASE("the argv libxl 4.17 builds for a PV guest is accepted verbatim") {
  // shared/reference/libxl-4.17-pv/dm-argv-create.txt
  auto r = parse({"-xen-domid", "1", "-no-shutdown", "-chardev",
                  "socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-1,server=on,wait=off", "-mon",
                  "chardev=libxl-cmd,mode=control", "-chardev",
                  "socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-1,server=on,wait=off", "-mon",
                  "chardev=libxenstat-cmd,mode=control", "-nodefaults", "-no-user-config", "-xen-attach",
                  "-name", "cap", "-vnc", "127.0.0.1:0", "-display", "none", "-machine", "xenpv", "-m", "768"});
  REQUIRE(r);
  CHECK(r->domid == DomId(1));
  CHECK(r->name == "cap");
  CHECK(r->memory_mib == 768u);
  CHECK(r->vnc == "127.0.0.1:0");
  REQUIRE(r->chardevs.size() == 2);
  CHECK(r->chardevs[0].id == "libxl-cmd");
  CHECK(r->chardevs[0].path == "/var/run/xen/qmp-libxl-1");
  CHECK(r->chardevs[0].server);
  CHECK_FALSE(r->chardevs[0].wait);
  REQUIRE(r->monitors.size() == 2);
  CHECK(r->monitors[1].chardev == "libxenstat-cmd");
}

TEST_CASE("dom0's own QEMU line is accepted") {
  // shared/reference/libxl-4.17-pv/dom0-qemu-argv.txt
  auto r = parse({"-xen-domid", "0", "-xen-attach", "-name", "dom0", "-nographic", "-M", "xenpv", "-daemonize",
                  "-monitor", "none", "-serial", "none", "-parallel", "none", "-pidfile", "/run/qemu-dom0.pid"});
  REQUIRE(r);
  CHECK(r->daemonize);
  CHECK(r->pidfile == "/run/qemu-dom0.pid");
}

TEST_CASE("legacy server,nowait chardev spelling and -qmp are accepted") {
  auto r = parse({"-xen-domid", "3", "-chardev", "socket,id=m,path=/tmp/x,server,nowait", "-mon", "chardev=m,mode=control",
                  "-qmp", "unix:/tmp/q.sock,server=on,wait=off", "-chardev", "pty,id=libxl-channel0"});
  REQUIRE(r);
  CHECK_FALSE(r->chardevs[0].wait);
  REQUIRE(r->monitors.size() == 2);
  CHECK(r->chardevs[1].path == "/tmp/q.sock");
  CHECK(r->chardevs[2].backend == "pty");
}

TEST_CASE("pvhost's own options: -backends, --xen, -D") {
  auto r = parse({"-xen-domid", "2", "-backends", "qdisk,console", "--xen=emu:/run/emu", "-D", "/tmp/log"});
  REQUIRE(r);
  CHECK(r->backends == std::vector<std::string>{"qdisk", "console"});
  CHECK(r->xen == XenMode::emulated);
  CHECK(r->emu_rundir == "/run/emu");
  CHECK(r->log_file == "/tmp/log");
  CHECK(parse({"-backends", "help"})->list_backends);
}

TEST_CASE("unknown options and malformed values are refused naming the option") {
  CHECK(error_of({"-xen-domid", "1", "-enable-kvm"}) == "unknown option '-enable-kvm' (see pvhost --help)");
  CHECK(error_of({"-xen-domid", "one"}) == "-xen-domid: 'one' is not a non-negative integer");
  CHECK(error_of({"-xen-domid", "32753"}).find("not a guest domain id") != std::string::npos);
  CHECK(error_of({"-xen-domid"}) == "-xen-domid: missing argument");
  CHECK(error_of({"-machine", "pc"}).find("only serves the xenpv machine") != std::string::npos);
  CHECK(error_of({"-serial", "pty"}).find("only 'none'") != std::string::npos);
  CHECK(error_of({"-chardev", "socket,id=a,path=/x,server=maybe"}).find("'maybe' is not a boolean") != std::string::npos);
  CHECK(error_of({"-chardev", "socket,id=a,path=/x,server=on", "-chardev", "null,id=a"}).find("duplicate id 'a'") !=
        std::string::npos);
  CHECK(error_of({"-mon", "chardev=nope,mode=control"}).find("no -chardev with id 'nope'") != std::string::npos);
  CHECK(error_of({"-mon", "chardev=x,mode=readline"}).find("only mode=control") != std::string::npos);
  CHECK(error_of({"--xen=hyperv"}).find("not real, emu[:DIR] or auto") != std::string::npos);
  CHECK(error_of({"-no-shutdown=yes"}) == "-no-shutdown takes no argument");
  CHECK(error_of({"stray"}) == "unexpected argument 'stray'");
}

TEST_CASE("QEMU key=value syntax: implied first key and ,, escapes") {
  auto kv = parse_key_values("socket,id=a,path=/tmp/with,,comma,server", "backend");
  REQUIRE(kv);
  CHECK(kv->get("backend") == "socket");
  CHECK(kv->get("path") == "/tmp/with,comma");
  CHECK(kv->get("server") == "");
  CHECK_FALSE(parse_key_values("a=1,,,=2", ""));
}

TEST_CASE("-m accepts QEMU size spellings") {
  CHECK(parse({"-m", "1G"})->memory_mib == 1024u);
  CHECK(parse({"-m", "size=512M"})->memory_mib == 512u);
}

TEST_CASE("every option in --help is one the parser knows") {
  // Guards against a stale usage text: each "-opt" at the start of a help line parses.
  std::istringstream in(usage_text());
  std::string line;
  int checked = 0;
  while (std::getline(in, line)) {
    if (!line.starts_with("  -")) continue;
    std::string opt = line.substr(2, line.find_first_of(" ,", 2) - 2);
    if (opt.find('=') != std::string::npos) opt = opt.substr(0, opt.find('='));
    if (opt == "-h" || opt == "--help" || opt == "--version") continue;
    auto r = parse({opt, "x"});
    if (!r) CHECK(r.error().describe().find("unknown option") == std::string::npos);
    ++checked;
  }
  CHECK(checked > 10);
}
