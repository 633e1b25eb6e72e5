// The lifecycle conformance suite: the XenDevice state machine, as a toolstack and a
// frontend see it through xenstore, against pvhost-xenemu, with pvhost-test (pvhost plus
// the `testdev` backend) as a separate process. Backends run the same rules.
#include <catch2/catch.hpp>

#include <signal.h>

#include <thread>

#include "hw/xen/toolstack/devices.h"
#include "tests/integration/harness.h"

using namespace pvhost;
using namespace pvhost::test;
using namespace std::chrono_literals;

namespace {

std::string pvhost_test_bin() { return build_path("tests/integration/pvhost-test"); }

struct Guest {
  EmuHost& host;
  DomId domid;
  std::unique_ptr<xen::XsClient> fe;  // xenstore as the guest

  Guest(EmuHost& h, const std::string& name) : host(h), domid(h.create_domain(name)), fe(h.domain_xs(domid)) {}

  toolstack::DeviceAddress add(const std::string& type, const std::string& devid,
                               std::map<std::string, std::string> extra = {}) {
    toolstack::DeviceRequest req{type, domid, DomId(0), std::move(extra)};
    req.settings["devid"] = devid;
    auto a = toolstack::device_add(host.xs(), req);
    REQUIRE(a);
    return *a;
  }
  // The frontend's side of the handshake, written as the guest (perms enforced).
  void fe_write(const toolstack::DeviceAddress& d, const std::string& key, const std::string& v) {
    auto r = fe->write(xen::kNoTransaction, d.frontend_path + "/" + key, v);
    REQUIRE(r);
  }
  void fe_connect(const toolstack::DeviceAddress& d, const std::string& ring = "8") {
    fe_write(d, "ring-ref", ring);
    fe_write(d, "event-channel", "5");
    fe_write(d, "state", "3");
  }
  std::string be(const toolstack::DeviceAddress& d, const std::string& key) { return host.read(d.backend_path + "/" + key); }
  bool be_state(const toolstack::DeviceAddress& d, const std::string& s) { return host.wait_for(d.backend_path + "/state", s); }
};

std::string dm(DomId guest, const std::string& rest) { return fmt::format("/local/domain/0/device-model/{}/{}", guest, rest); }

}  // namespace

TEST_CASE("create: InitWait, hotplug-status, features, type claims and device-model state") {
  auto host = EmuHost::start();
  Guest g(*host, "life1");
  auto d = g.add("testdev", "0");
  auto pv = host->start_pvhost(g.domid, {"-backends", "testdev"}, pvhost_test_bin());
  REQUIRE(g.be_state(d, "2"));
  CHECK(g.be(d, "hotplug-status") == "connected");
  CHECK(g.be(d, "feature-testdev") == "1");
  CHECK(host->wait_for(dm(g.domid, "state"), "running"));
  CHECK(host->read(dm(g.domid, "backends/testdev")) == std::to_string(pv.pid()));
  INFO(pv.log());
}

TEST_CASE("a device added while pvhost runs is found and connected by its frontend") {
  auto host = EmuHost::start();
  Guest g(*host, "life2");
  auto pv = host->start_pvhost(g.domid, {"-backends", "testdev"}, pvhost_test_bin());
  REQUIRE(host->wait_for(dm(g.domid, "state"), "running"));
  auto d = g.add("testdev", "3");
  REQUIRE(g.be_state(d, "2"));
  g.fe_connect(d, "77");
  REQUIRE(g.be_state(d, "4"));
  CHECK(g.be(d, "connected-ring-ref") == "77");
  INFO(pv.log());
}

TEST_CASE("reconnect: frontend Closed then Initialising brings the backend back to InitWait, then Connected") {
  auto host = EmuHost::start();
  Guest g(*host, "life3");
  auto d = g.add("testdev", "0");
  auto pv = host->start_pvhost(g.domid, {"-backends", "testdev"}, pvhost_test_bin());
  REQUIRE(g.be_state(d, "2"));
  g.fe_connect(d);
  REQUIRE(g.be_state(d, "4"));
  g.fe_write(d, "state", "5");
  REQUIRE(g.be_state(d, "5"));
  g.fe_write(d, "state", "6");
  REQUIRE(g.be_state(d, "6"));
  CHECK(g.be(d, "disconnects") == "1");
  g.fe_write(d, "state", "1");
  REQUIRE(g.be_state(d, "2"));
  g.fe_connect(d, "9");
  REQUIRE(g.be_state(d, "4"));
  CHECK(g.be(d, "connected-ring-ref") == "9");
  INFO(pv.log());
}

TEST_CASE("unplug while connected: online=0 state=5, the frontend closes, the backend reaches Closed") {
  auto host = EmuHost::start();
  Guest g(*host, "life4");
  auto d = g.add("testdev", "0");
  auto pv = host->start_pvhost(g.domid, {"-backends", "testdev"}, pvhost_test_bin());
  REQUIRE(g.be_state(d, "2"));
  g.fe_connect(d);
  REQUIRE(g.be_state(d, "4"));
  // The toolstack's side runs concurrently with the frontend's, as on Xen.
  std::thread toolstack([&] {
    auto xs = xen::XsClient::open(host->rundir() + "/socket");
    REQUIRE(xs);
    auto r = toolstack::device_del(**xs, d, 10s);
    CHECK(r);
  });
  REQUIRE(host->wait_for(d.backend_path + "/state", "5"));
  g.fe_write(d, "state", "6");  // Linux blkfront: backend Closing -> frontend Closed
  toolstack.join();
  CHECK(host->read(d.backend_path + "/state").empty());  // removed by the toolstack
  CHECK(poll_until([&] { return pv.log().find("unplugged") != std::string::npos; }));
  INFO(pv.log());
}

TEST_CASE("unplug without an active frontend closes at once") {
  auto host = EmuHost::start();
  Guest g(*host, "life5");
  auto d = g.add("testdev", "0");
  auto pv = host->start_pvhost(g.domid, {"-backends", "testdev"}, pvhost_test_bin());
  REQUIRE(g.be_state(d, "2"));
  auto r = toolstack::device_del(host->xs(), d, 5s);
  CHECK(r);  // no timeout: Closed without the frontend's help
  INFO(pv.log());
}

TEST_CASE("a frontend writing garbage into its state node closes that device only, with an error node") {
  auto host = EmuHost::start();
  Guest g(*host, "life6");
  auto bad = g.add("testdev", "0");
  auto good = g.add("testdev", "1");
  auto pv = host->start_pvhost(g.domid, {"-backends", "testdev"}, pvhost_test_bin());
  REQUIRE(g.be_state(bad, "2"));
  REQUIRE(g.be_state(good, "2"));
  g.fe_write(bad, "state", "connected!");
  REQUIRE(g.be_state(bad, "5"));
  CHECK(g.be(bad, "error").find("frontend state") != std::string::npos);
  CHECK(host->read(fmt::format("/local/domain/0/error/backend/testdev/{}/0/error", g.domid)).find("frontend state") !=
        std::string::npos);
  g.fe_connect(good);
  CHECK(g.be_state(good, "4"));
  CHECK(pv.running());
  INFO(pv.log());
}

TEST_CASE("bad frontend keys fail the connect with an error node and Closing") {
  auto host = EmuHost::start();
  Guest g(*host, "life7");
  auto d = g.add("testdev", "0");
  auto pv = host->start_pvhost(g.domid, {"-backends", "testdev"}, pvhost_test_bin());
  REQUIRE(g.be_state(d, "2"));
  g.fe_write(d, "ring-ref", "not-a-number");
  g.fe_write(d, "event-channel", "5");
  g.fe_write(d, "state", "3");
  REQUIRE(g.be_state(d, "5"));
  CHECK(g.be(d, "error") == "connect: reading ring-ref: " + d.frontend_path + "/ring-ref: 'not-a-number' is not an unsigned integer");
  INFO(pv.log());
}

TEST_CASE("bad backend keys: a missing frontend key and a failing realize give error nodes, others carry on") {
  auto host = EmuHost::start();
  Guest g(*host, "life8");
  auto failing = g.add("testdev", "0", {{"be.fail-realize", "1"}});
  auto ok = g.add("testdev", "1");
  // A device whose frontend path points outside the guest's home is refused.
  auto bad_fe = g.add("testdev", "2");
  REQUIRE(host->xs().write(xen::kNoTransaction, bad_fe.backend_path + "/frontend", "/local/domain/0/stolen"));
  auto pv = host->start_pvhost(g.domid, {"-backends", "testdev"}, pvhost_test_bin());
  REQUIRE(g.be_state(failing, "5"));
  CHECK(g.be(failing, "error") == "realize: fail-realize requested");
  REQUIRE(g.be_state(bad_fe, "5"));
  CHECK(g.be(bad_fe, "error").find("is not under /local/domain/") != std::string::npos);
  REQUIRE(g.be_state(ok, "2"));
  INFO(pv.log());
}

TEST_CASE("two guests, one pvhost each") {
  auto host = EmuHost::start();
  Guest a(*host, "lifeA"), b(*host, "lifeB");
  auto da = a.add("testdev", "0");
  auto db = b.add("testdev", "0");
  auto pa = host->start_pvhost(a.domid, {"-backends", "testdev"}, pvhost_test_bin());
  auto pb = host->start_pvhost(b.domid, {"-backends", "testdev"}, pvhost_test_bin());
  REQUIRE(a.be_state(da, "2"));
  REQUIRE(b.be_state(db, "2"));
  a.fe_connect(da, "11");
  b.fe_connect(db, "22");
  REQUIRE(a.be_state(da, "4"));
  REQUIRE(b.be_state(db, "4"));
  CHECK(a.be(da, "connected-ring-ref") == "11");
  CHECK(b.be(db, "connected-ring-ref") == "22");
}

TEST_CASE("split processes: disjoint types share a guest; a second claim on a type fails clearly") {
  auto host = EmuHost::start();
  Guest g(*host, "life9");
  auto d1 = g.add("testdev", "0");
  auto d2 = g.add("testdev2", "0");
  auto primary = host->start_pvhost(g.domid, {"-backends", "testdev"}, pvhost_test_bin());
  REQUIRE(g.be_state(d1, "2"));
  auto peer = host->start_pvhost(g.domid, {"-backends", "testdev2", "-peer", "-name", "io",
                                           "-qmp", "unix:" + host->rundir() + "/peer.qmp,server=on,wait=off"},
                                 pvhost_test_bin());
  REQUIRE(g.be_state(d2, "2"));
  CHECK(host->wait_for(dm(g.domid, "peers/io"), host->rundir() + "/peer.qmp"));
  // Each process serves only its own type.
  CHECK(host->read(dm(g.domid, "backends/testdev")) == std::to_string(primary.pid()));
  CHECK(host->read(dm(g.domid, "backends/testdev2")) == std::to_string(peer.pid()));
  auto dup = host->start_pvhost(g.domid, {"-backends", "testdev", "-peer"}, pvhost_test_bin());
  auto st = dup.wait(10s);
  REQUIRE(st);
  CHECK(*st == 1);
  CHECK(dup.log().find(fmt::format("backend type 'testdev' of dom{} is already served by pvhost pid {}", g.domid,
                                   primary.pid())) != std::string::npos);
  auto second_primary = host->start_pvhost(g.domid, {"-backends", "testdev2"}, pvhost_test_bin());
  CHECK(second_primary.wait(10s) == 1);
  CHECK(second_primary.log().find("already has a primary pvhost") != std::string::npos);
  g.fe_connect(d1);
  g.fe_connect(d2);
  CHECK(g.be_state(d1, "4"));
  CHECK(g.be_state(d2, "4"));
}

TEST_CASE("SIGHUP (how libxl stops a PV device model) shuts down gracefully and removes our claims") {
  auto host = EmuHost::start();
  Guest g(*host, "life10");
  auto d = g.add("testdev", "0");
  auto pv = host->start_pvhost(g.domid, {"-backends", "testdev"}, pvhost_test_bin());
  REQUIRE(g.be_state(d, "2"));
  g.fe_connect(d);
  REQUIRE(g.be_state(d, "4"));
  pv.signal(SIGHUP);
  CHECK(pv.wait(10s) == 0);
  CHECK(host->read(d.backend_path + "/state") == "6");
  CHECK(host->read(dm(g.domid, "backends/testdev")).empty());
}

TEST_CASE("domain destroy tears the devices down and the process exits") {
  auto host = EmuHost::start();
  Guest g(*host, "life11");
  auto d = g.add("testdev", "0");
  auto pv = host->start_pvhost(g.domid, {"-backends", "testdev"}, pvhost_test_bin());
  REQUIRE(g.be_state(d, "2"));
  g.fe_connect(d);
  REQUIRE(g.be_state(d, "4"));
  g.fe.reset();
  host->destroy_domain(g.domid);
  CHECK(pv.wait(10s) == 0);
  CHECK(pv.log().find("is gone") != std::string::npos);
}

TEST_CASE("-S: device-model state waits for cont; -daemonize returns once ready") {
  auto host = EmuHost::start();
  Guest g(*host, "life12");
  auto d = g.add("testdev", "0");
  auto pidfile = host->rundir() + "/dm.pid";
  auto r = run_command(fmt::format("{} -xen-domid {} --xen=emu:{} -backends testdev -daemonize -pidfile {} -S -D {}/d.log",
                                   pvhost_test_bin(), g.domid, host->rundir(), pidfile, host->rundir()));
  REQUIRE(r.status == 0);
  // Ready means: devices found and the pidfile written before the parent returned.
  CHECK(host->read(d.backend_path + "/state") == "2");
  auto pid = std::stoi(run_command("cat " + pidfile).output);
  CHECK(host->read(dm(g.domid, "state")).empty());  // -S: not running until cont
  ::kill(pid, SIGTERM);
  CHECK(poll_until([&] { return ::kill(pid, 0) != 0; }));
}
