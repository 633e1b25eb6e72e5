// pvhost-xenemu as a whole (xenstored + broker in the daemon), driven by pvhost-xl and read
// back through pvhost's open_emulated(): the xenstore side of domain creation as libxl does
// it, and destroy undoing it.
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>

#include "hw/xen/emu/guest/guest.h"
#include "hw/xen/xen.h"

using namespace pvhost;
using namespace std::chrono_literals;

namespace {

std::string build_dir() {
  const char* b = std::getenv("PVHOST_BUILD_DIR");
  return b != nullptr ? b : ".";
}

// The daemon, started with --daemonize (so it is serving on return), stopped with SIGTERM.
class Daemon {
 public:
  Daemon() {
    char t[] = "/tmp/xenemu-xs-XXXXXX";
    dir_ = ::mkdtemp(t);
    const std::string cmd = build_dir() + "/hw/xen/emu/broker/pvhost-xenemu --rundir " + dir_ +
                            " --strict --daemonize --pidfile " + dir_ + "/pid -D " + dir_ + "/log";
    REQUIRE(std::system(cmd.c_str()) == 0);
    FILE* f = std::fopen((dir_ + "/pid").c_str(), "r");
    REQUIRE(f != nullptr);
    REQUIRE(std::fscanf(f, "%d", &pid_) == 1);
    std::fclose(f);
  }
  ~Daemon() {
    if (pid_ > 0) ::kill(pid_, SIGTERM);
    for (int i = 0; i < 200 && pid_ > 0 && ::kill(pid_, 0) == 0; ++i) std::this_thread::sleep_for(10ms);
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  const std::string& dir() const { return dir_; }

  // Runs pvhost-xl; returns its exit status and stdout.
  std::pair<int, std::string> xl(const std::string& args) const {
    const std::string cmd = build_dir() + "/hw/xen/emu/broker/pvhost-xl --rundir " + dir_ + " " + args;
    FILE* p = ::popen(cmd.c_str(), "r");
    REQUIRE(p != nullptr);
    std::string out;
    char buf[256];
    while (std::fgets(buf, sizeof buf, p) != nullptr) out += buf;
    const int status = ::pclose(p);
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
  }

 private:
  std::string dir_;
  int pid_ = -1;
};

}  // namespace

TEST_CASE("pvhost-xl: domain create writes libxl's nodes with libxl's permissions; destroy removes them",
          "[xenemu]") {
  Daemon d;
  auto [rc, out] = d.xl("domain create web --memory 8 --vcpus 2");
  REQUIRE(rc == 0);
  const DomId domid(static_cast<uint16_t>(std::stoi(out)));
  CHECK(domid.value() >= 1);

  auto x = xen::open_emulated(d.dir());
  REQUIRE(x);
  xen::XenStore& xs = (*x)->store();
  const std::string home = "/local/domain/" + std::to_string(domid.value());
  CHECK(xs.read(xen::kNoTransaction, home + "/name").value_or("") == "web");
  CHECK(xs.read(xen::kNoTransaction, home + "/domid").value_or("") == std::to_string(domid.value()));
  CHECK(xs.read(xen::kNoTransaction, home + "/memory/target").value_or("") == "8192");
  CHECK(xs.read(xen::kNoTransaction, home + "/cpu/1/availability").value_or("") == "online");
  using K = xen::Permission::Kind;
  const std::vector<xen::Permission> dom0_owned{{kDom0, K::none}, {domid, K::read}};
  const std::vector<xen::Permission> guest_owned{{domid, K::none}};
  CHECK(xs.get_permissions(xen::kNoTransaction, home).value_or(std::vector<xen::Permission>{}) == dom0_owned);
  CHECK(xs.get_permissions(xen::kNoTransaction, home + "/data").value_or(std::vector<xen::Permission>{}) ==
        guest_owned);
  CHECK(xs.get_permissions(xen::kNoTransaction, home + "/control/shutdown").value_or(std::vector<xen::Permission>{}) ==
        guest_owned);
  const std::string vm = xs.read(xen::kNoTransaction, home + "/vm").value_or("");
  REQUIRE(vm.starts_with("/vm/"));
  CHECK(xs.read(xen::kNoTransaction, vm + "/name").value_or("") == "web");

  // The domain exists for the hypervisor side too, with its sockets.
  auto info = (*x)->domain_info(domid);
  REQUIRE(info);
  CHECK(info->max_vcpu_id == 1);
  CHECK(std::filesystem::exists(d.dir() + "/domain-" + std::to_string(domid.value()) + ".sock"));
  auto guest = xenemu::Guest::connect(d.dir(), domid);
  REQUIRE(guest);

  auto [lrc, list] = d.xl("domain list");
  CHECK(lrc == 0);
  CHECK(list.find("web") != std::string::npos);

  CHECK(d.xl("domain destroy " + std::to_string(domid.value())).first == 0);
  auto gone = xs.read(xen::kNoTransaction, home + "/name");
  REQUIRE_FALSE(gone);
  CHECK(gone.error().code() == ENOENT);
  CHECK_FALSE(xs.read(xen::kNoTransaction, vm));
  auto info2 = (*x)->domain_info(domid);
  REQUIRE_FALSE(info2);
  CHECK(info2.error().code() == ENOENT);
  CHECK_FALSE(std::filesystem::exists(d.dir() + "/domain-" + std::to_string(domid.value()) + ".sock"));
  // A second destroy names the problem.
  CHECK(d.xl("domain destroy " + std::to_string(domid.value()) + " 2>/dev/null").first == 1);
}
