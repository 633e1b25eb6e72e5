// The "no Xen" failure path: on a machine without /dev/xen, --xen=real fails at once with
// one clear line and no library noise.
#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "hw/xen/xen.h"

namespace {
struct Run {
  int status;
  std::string output;
};
Run run(const std::string& cmd) {
  Run r{};
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  REQUIRE(p != nullptr);
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  r.status = ::pclose(p);
  return r;
}
bool have_xen() {
  struct stat st;
  return ::stat("/dev/xen/privcmd", &st) == 0;
}
}  // namespace

TEST_CASE("open_real without a hypervisor names the missing device and the alternative") {
  if (have_xen()) {
    WARN("this machine has Xen; the no-Xen path is not reachable here");
    return;
  }
  auto x = pvhost::xen::open_real();
  REQUIRE_FALSE(x);
  CHECK(x.error().code() == ENOENT);
  CHECK(x.error().describe().find("no Xen hypervisor: /dev/xen/privcmd not present; use --xen=emu") == 0);
}

TEST_CASE("pvhost --xen=real prints exactly one clear line and exits non-zero") {
  if (have_xen()) {
    WARN("this machine has Xen; the no-Xen path is not reachable here");
    return;
  }
  const char* bin = std::getenv("PVHOST_BIN");
  REQUIRE(bin != nullptr);
  Run r = run(std::string(bin) + " --xen=real -xen-domid 1");
  CHECK(WEXITSTATUS(r.status) != 0);
  CHECK(r.output ==
        "pvhost: no Xen hypervisor: /dev/xen/privcmd not present; use --xen=emu for the emulated hypervisor\n");
}
