// The emulated xenstored against real clients: the Debian xenstore-* tools and the real
// libxenstore (STYLE.md rule 14: real tools are the oracles). One test per rule.
#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <atomic>
#include <set>

#include "tests/unit/hw/xen/emu/xenstored/xs_test_util.h"

using namespace xstest;
using namespace std::chrono_literals;

namespace {

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// Collects the watch events arriving within `ms`.
std::set<std::pair<std::string, std::string>> events_within(xs_handle* h, int ms) {
  std::set<std::pair<std::string, std::string>> out;
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        end - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    auto ev = xs_next_event(h, static_cast<int>(left.count()));
    if (!ev) break;
    out.insert(*ev);
  }
  return out;
}

// Makes /local/domain/<d> owned by <d>, as the toolstack does before introducing it.
void make_domain_home(xs_handle* dom0, int d) {
  const std::string home = "/local/domain/" + std::to_string(d);
  REQUIRE(xs_mkdir(dom0, XBT_NULL, home.c_str()));
  xs_permissions p{static_cast<unsigned>(d), XS_PERM_NONE};
  REQUIRE(xs_set_permissions(dom0, XBT_NULL, home.c_str(), &p, 1));
}

}  // namespace

TEST_CASE("tools: write, read, ls, exists and rm round-trip through the dom0 socket") {
  Server s;
  CHECK(tool(s.socket(), {"xenstore-write", "/vm/a", "hello", "/vm/b", "world"}).status == 0);
  auto r = tool(s.socket(), {"xenstore-read", "/vm/a"});
  CHECK(r.status == 0);
  CHECK(r.out == "hello\n");
  auto ls = tool(s.socket(), {"xenstore-list", "/vm"});
  CHECK(ls.out == "a\nb\n");
  auto lsr = tool(s.socket(), {"xenstore-ls", "-f", "/vm"});
  CHECK(lsr.out == "/vm/a = \"hello\"\n/vm/b = \"world\"\n");
  CHECK(tool(s.socket(), {"xenstore-exists", "/vm/a"}).status == 0);
  CHECK(tool(s.socket(), {"xenstore-exists", "/vm/nope"}).status != 0);
  CHECK(tool(s.socket(), {"xenstore-rm", "/vm/a"}).status == 0);
  CHECK(tool(s.socket(), {"xenstore-exists", "/vm/a"}).status != 0);
  CHECK(tool(s.socket(), {"xenstore-read", "/vm/b"}).out == "world\n");
}

TEST_CASE("initial tree: /local/domain/0 and /tool/xenstored exist at start") {
  Server s;
  auto h = xs_connect(s.socket());
  REQUIRE(h);
  auto root = xs_ls(h.get(), "/");
  REQUIRE(root);
  CHECK(std::set<std::string>(root->begin(), root->end()) == std::set<std::string>{"local", "tool"});
  CHECK(xs_ls(h.get(), "/local/domain").value() == std::vector<std::string>{"0"});
  CHECK(xs_read_str(h.get(), "/tool/xenstored").value().empty());
}

TEST_CASE("write creates missing parents with empty values; rm of a missing child of a missing parent is ENOENT") {
  Server s;
  auto h = xs_connect(s.socket());
  REQUIRE(xs_write_str(h.get(), "/p/q/r", "v"));
  CHECK(xs_read_str(h.get(), "/p/q").value().empty());
  CHECK(xs_rm(h.get(), XBT_NULL, "/p/q/missing"));  // parent exists: fine
  errno = 0;
  CHECK_FALSE(xs_rm(h.get(), XBT_NULL, "/p/missing/child"));
  CHECK(errno == ENOENT);
}

TEST_CASE("domain connection: relative paths resolve to /local/domain/<N>") {
  Server s;
  auto dom0 = xs_connect(s.socket());
  make_domain_home(dom0.get(), 5);
  REQUIRE(s.introduce(5));
  CHECK(tool(s.domain_socket(5), {"xenstore-write", "name", "guest5"}).status == 0);
  CHECK(xs_read_str(dom0.get(), "/local/domain/5/name").value() == "guest5");
  CHECK(tool(s.domain_socket(5), {"xenstore-read", "name"}).out == "guest5\n");
  // And dom0's relative paths resolve to /local/domain/0.
  CHECK(tool(s.socket(), {"xenstore-write", "rel", "x"}).status == 0);
  CHECK(xs_read_str(dom0.get(), "/local/domain/0/rel").value() == "x");
}

TEST_CASE("perms: a domain gets EACCES for an existing unreadable node, ENOENT under a readable parent") {
  Server s;
  auto dom0 = xs_connect(s.socket());
  make_domain_home(dom0.get(), 5);
  REQUIRE(xs_write_str(dom0.get(), "/secret/key", "x"));  // n0 inherited: nobody else
  REQUIRE(s.introduce(5));
  auto d5 = xs_connect(s.domain_socket(5));
  REQUIRE(d5);
  errno = 0;
  CHECK_FALSE(xs_read_str(d5.get(), "/secret/key"));
  CHECK(errno == EACCES);
  errno = 0;
  CHECK_FALSE(xs_read_str(d5.get(), "/secret/nothing-here"));
  CHECK(errno == EACCES);  // the parent is unreadable: nothing is revealed
  errno = 0;
  CHECK_FALSE(xs_read_str(d5.get(), "/local/domain/5/nothing-here"));
  CHECK(errno == ENOENT);  // its own home is readable: the truth
  errno = 0;
  CHECK_FALSE(xs_write_str(d5.get(), "/local/domain/0/intrude", "x"));
  CHECK(errno == EACCES);
  // The tools see the same.
  auto r = tool(s.domain_socket(5), {"xenstore-read", "/secret/key"});
  CHECK(r.status != 0);
  CHECK(r.out.find("couldn't read path") != std::string::npos);
}

TEST_CASE("perms: a node written by a domain inherits the parent's list with the domain as owner") {
  Server s;
  auto dom0 = xs_connect(s.socket());
  make_domain_home(dom0.get(), 5);
  xs_permissions home[2] = {{5, XS_PERM_NONE}, {0, XS_PERM_READ}};
  REQUIRE(xs_set_permissions(dom0.get(), XBT_NULL, "/local/domain/5", home, 2));
  REQUIRE(s.introduce(5));
  CHECK(tool(s.domain_socket(5), {"xenstore-write", "data/x", "1"}).status == 0);
  auto ls = tool(s.socket(), {"xenstore-ls", "-p", "/local/domain/5"});
  CHECK(ls.out.find("(n5,r0)") != std::string::npos);
  unsigned num = 0;
  xs_permissions* p = xs_get_permissions(dom0.get(), XBT_NULL, "/local/domain/5/data/x", &num);
  REQUIRE(p);
  CHECK(num == 2);
  CHECK(p[0].id == 5);
  CHECK(p[1].id == 0);
  CHECK(p[1].perms == XS_PERM_READ);
  std::free(p);
}

TEST_CASE("chmod: the tools set permissions; only the owner may, and only dom0 may change the owner") {
  Server s;
  auto dom0 = xs_connect(s.socket());
  make_domain_home(dom0.get(), 5);
  REQUIRE(xs_write_str(dom0.get(), "/shared/v", "data"));
  REQUIRE(s.introduce(5));
  CHECK(tool(s.domain_socket(5), {"xenstore-read", "/shared/v"}).status != 0);
  CHECK(tool(s.socket(), {"xenstore-chmod", "-r", "/shared", "n0", "r5"}).status == 0);
  CHECK(tool(s.domain_socket(5), {"xenstore-read", "/shared/v"}).out == "data\n");
  // Read access is not ownership.
  CHECK(tool(s.domain_socket(5), {"xenstore-chmod", "/shared/v", "b5"}).status != 0);
  // The owner may change the other entries but not hand the node to someone else.
  REQUIRE(xs_write_str(dom0.get(), "/local/domain/5/own", ""));
  xs_permissions owned{5, XS_PERM_NONE};
  REQUIRE(xs_set_permissions(dom0.get(), XBT_NULL, "/local/domain/5/own", &owned, 1));
  auto d5 = xs_connect(s.domain_socket(5));
  xs_permissions keep[2] = {{5, XS_PERM_NONE}, {7, XS_PERM_READ}};
  CHECK(xs_set_permissions(d5.get(), XBT_NULL, "/local/domain/5/own", keep, 2));
  xs_permissions give{7, XS_PERM_NONE};
  errno = 0;
  CHECK_FALSE(xs_set_permissions(d5.get(), XBT_NULL, "/local/domain/5/own", &give, 1));
  CHECK(errno == EPERM);
}

TEST_CASE("watch: fires once on registration with the path as given") {
  Server s;
  auto h = xs_connect(s.socket());
  REQUIRE(xs_watch(h.get(), "/not/there/yet", "tok"));
  auto ev = xs_next_event(h.get());
  REQUIRE(ev);
  CHECK(ev->first == "/not/there/yet");
  CHECK(ev->second == "tok");
  CHECK(events_within(h.get(), 200).empty());
  // The tool sees the same initial event.
  auto r = tool(s.socket(), {"xenstore-watch", "-n", "1", "/anything"});
  CHECK(r.status == 0);
  CHECK(r.out == "/anything\n");
}

TEST_CASE("watch: fires with the changed path for the node and its descendants") {
  Server s;
  auto h = xs_connect(s.socket());
  auto w = xs_connect(s.socket());
  REQUIRE(xs_watch(w.get(), "/dev", "t"));
  REQUIRE(xs_next_event(w.get()));
  REQUIRE(xs_write_str(h.get(), "/dev/vbd/768/state", "1"));
  auto evs = events_within(w.get(), 300);
  CHECK(evs.contains({"/dev/vbd/768/state", "t"}));
  REQUIRE(xs_write_str(h.get(), "/devices", "1"));  // a sibling with a common prefix
  REQUIRE(xs_write_str(h.get(), "/dev", "x"));
  evs = events_within(w.get(), 300);
  CHECK(evs == std::set<std::pair<std::string, std::string>>{{"/dev", "t"}});
}

TEST_CASE("watch: xenstore-watch reports a change made by xenstore-write") {
  Server s;
  ToolResult r;
  std::atomic<bool> done{false};
  std::thread watcher([&] {
    r = tool(s.socket(), {"xenstore-watch", "-n", "2", "/w"});
    done = true;
  });
  // The watcher registers at some point; every write after that fires, and it exits after
  // its initial event plus one change. Keep writing until it has seen one.
  for (int i = 0; i < 100 && !done; ++i) {
    CHECK(tool(s.socket(), {"xenstore-write", "/w/k", "v"}).status == 0);
    std::this_thread::sleep_for(100ms);
  }
  watcher.join();
  CHECK(r.status == 0);
  CHECK(r.out == "/w\n/w/k\n");
}

TEST_CASE("watch: rm fires for the removed node and for watches on its descendants") {
  Server s;
  auto h = xs_connect(s.socket());
  REQUIRE(xs_write_str(h.get(), "/r/a/b/c", "1"));
  auto w = xs_connect(s.socket());
  REQUIRE(xs_watch(w.get(), "/r", "top"));
  REQUIRE(xs_watch(w.get(), "/r/a/b", "deep"));
  REQUIRE(xs_watch(w.get(), "/r/a/zzz", "absent"));
  CHECK(events_within(w.get(), 300).size() == 3);  // the initial ones
  REQUIRE(xs_rm(h.get(), XBT_NULL, "/r/a"));
  auto evs = events_within(w.get(), 300);
  CHECK(evs == std::set<std::pair<std::string, std::string>>{{"/r/a", "top"}, {"/r/a/b", "deep"}});
}

TEST_CASE("watch: mkdir fires only when it creates") {
  Server s;
  auto h = xs_connect(s.socket());
  auto w = xs_connect(s.socket());
  REQUIRE(xs_watch(w.get(), "/m", "t"));
  REQUIRE(xs_next_event(w.get()));
  REQUIRE(xs_mkdir(h.get(), XBT_NULL, "/m/d"));
  CHECK(events_within(w.get(), 300) == std::set<std::pair<std::string, std::string>>{{"/m/d", "t"}});
  REQUIRE(xs_mkdir(h.get(), XBT_NULL, "/m/d"));
  CHECK(events_within(w.get(), 300).empty());
}

TEST_CASE("watch: events respect read permission for domain connections") {
  Server s;
  auto dom0 = xs_connect(s.socket());
  make_domain_home(dom0.get(), 5);
  REQUIRE(xs_mkdir(dom0.get(), XBT_NULL, "/data"));
  REQUIRE(s.introduce(5));
  auto d5 = xs_connect(s.domain_socket(5));
  REQUIRE(xs_watch(d5.get(), "/data", "t"));
  REQUIRE(xs_next_event(d5.get()));
  REQUIRE(xs_write_str(dom0.get(), "/data/secret", "x"));  // n0: domain 5 may not know
  CHECK(events_within(d5.get(), 300).empty());
  REQUIRE(xs_write_str(dom0.get(), "/data/open", "y"));
  xs_permissions p[2] = {{0, XS_PERM_NONE}, {5, XS_PERM_READ}};
  REQUIRE(xs_set_permissions(dom0.get(), XBT_NULL, "/data/open", p, 2));  // now readable
  CHECK(events_within(d5.get(), 300) ==
        std::set<std::pair<std::string, std::string>>{{"/data/open", "t"}});
}

TEST_CASE("watch: a relative watch reports relative paths") {
  Server s;
  auto dom0 = xs_connect(s.socket());
  make_domain_home(dom0.get(), 5);
  REQUIRE(s.introduce(5));
  auto d5 = xs_connect(s.domain_socket(5));
  REQUIRE(xs_watch(d5.get(), "device", "rel"));
  auto first = xs_next_event(d5.get());
  REQUIRE(first);
  CHECK(first->first == "device");
  REQUIRE(xs_write_str(dom0.get(), "/local/domain/5/device/vif/0", "x"));
  CHECK(events_within(d5.get(), 300) ==
        std::set<std::pair<std::string, std::string>>{{"device/vif/0", "rel"}});
}

TEST_CASE("watch: @introduceDomain and @releaseDomain fire on introduce and release") {
  Server s;
  auto w = xs_connect(s.socket());
  REQUIRE(xs_watch(w.get(), "@introduceDomain", "in"));
  REQUIRE(xs_watch(w.get(), "@releaseDomain", "out"));
  CHECK(events_within(w.get(), 300).size() == 2);
  REQUIRE(s.introduce(7));
  CHECK(events_within(w.get(), 300) ==
        std::set<std::pair<std::string, std::string>>{{"@introduceDomain", "in"}});
  REQUIRE(s.introduce(7));  // idempotent: no second event
  CHECK(events_within(w.get(), 300).empty());
  REQUIRE(s.release(7));
  CHECK(events_within(w.get(), 300) ==
        std::set<std::pair<std::string, std::string>>{{"@releaseDomain", "out"}});
}

TEST_CASE("watch: a domain gets @releaseDomain only when SET_PERMS allowed it") {
  Server s;
  auto dom0 = xs_connect(s.socket());
  make_domain_home(dom0.get(), 5);
  REQUIRE(s.introduce(5));
  auto d5 = xs_connect(s.domain_socket(5));
  REQUIRE(xs_watch(d5.get(), "@releaseDomain", "r"));
  REQUIRE(xs_next_event(d5.get()));
  REQUIRE(s.introduce(8));
  REQUIRE(s.release(8));
  CHECK(events_within(d5.get(), 300).empty());
  xs_permissions p[2] = {{0, XS_PERM_NONE}, {5, XS_PERM_READ}};
  REQUIRE(xs_set_permissions(dom0.get(), XBT_NULL, "@releaseDomain", p, 2));
  REQUIRE(s.introduce(8));
  REQUIRE(s.release(8));
  CHECK(events_within(d5.get(), 300) == std::set<std::pair<std::string, std::string>>{{"@releaseDomain", "r"}});
}

TEST_CASE("introduce/release: socket appears and goes; release closes the domain's connections and removes its nodes") {
  Server s;
  auto dom0 = xs_connect(s.socket());
  CHECK_FALSE(exists(s.domain_socket(6)));
  make_domain_home(dom0.get(), 6);
  REQUIRE(s.introduce(6));
  CHECK(exists(s.domain_socket(6)));
  CHECK_FALSE(xs_read_str(dom0.get(), "/local/domain/6/name"));  // not made by xenstored
  RawClient d6(s.domain_socket(6));
  REQUIRE(d6.connected());
  auto w = d6.call(XS_WATCH, z("/x") + z("t"));
  REQUIRE(w);
  CHECK(w->type == XS_WATCH);
  REQUIRE(d6.recv());  // the initial watch event
  REQUIRE(s.release(6));
  CHECK_FALSE(exists(s.domain_socket(6)));
  CHECK(d6.closed_by_peer());
  // Nodes owned by the released domain go with it (destroy_domain()).
  errno = 0;
  CHECK_FALSE(xs_read_str(dom0.get(), "/local/domain/6"));
  CHECK(errno == ENOENT);
  CHECK(s.release(6));  // idempotent
}

TEST_CASE("introduce: XS_INTRODUCE from dom0 creates the domain socket; a domain may not introduce") {
  Server s;
  std::vector<std::pair<int, bool>> changes;
  s.sync([&] {
    s.xenstored().on_domain_change = [&](DomId d, bool in) { changes.emplace_back(d.value(), in); };
  });
  auto dom0 = xs_connect(s.socket());
  CHECK_FALSE(xs_is_domain_introduced(dom0.get(), 9));
  REQUIRE(xs_introduce_domain(dom0.get(), 9, 0xfeffc, 5));
  CHECK(xs_is_domain_introduced(dom0.get(), 9));
  CHECK(exists(s.domain_socket(9)));
  auto d9 = xs_connect(s.domain_socket(9));
  errno = 0;
  CHECK_FALSE(xs_introduce_domain(d9.get(), 10, 1, 5));
  CHECK(errno == EACCES);
  d9.reset();
  REQUIRE(xs_release_domain(dom0.get(), 9));
  CHECK_FALSE(exists(s.domain_socket(9)));
  errno = 0;
  CHECK_FALSE(xs_release_domain(dom0.get(), 9));
  CHECK(errno == ENOENT);
  s.sync([&] {});
  CHECK(changes == std::vector<std::pair<int, bool>>{{9, true}, {9, false}});
}

TEST_CASE("set_target: a domain gets the rights of its target") {
  Server s;
  auto dom0 = xs_connect(s.socket());
  make_domain_home(dom0.get(), 3);
  REQUIRE(xs_write_str(dom0.get(), "/local/domain/3/private", "p"));
  xs_permissions owned{3, XS_PERM_NONE};
  REQUIRE(xs_set_permissions(dom0.get(), XBT_NULL, "/local/domain/3/private", &owned, 1));
  REQUIRE(s.introduce(3));
  REQUIRE(s.introduce(4));
  auto d4 = xs_connect(s.domain_socket(4));
  CHECK_FALSE(xs_read_str(d4.get(), "/local/domain/3/private"));
  RawClient raw(s.socket());
  auto r = raw.call(XS_SET_TARGET, z("4") + z("3"));
  REQUIRE(r);
  CHECK(r->type == XS_SET_TARGET);
  CHECK(s.target_of(4) == DomId(3));
  CHECK(xs_read_str(d4.get(), "/local/domain/3/private").value() == "p");
}

TEST_CASE("get_domain_path and is_domain_introduced answer as xenstored") {
  Server s;
  auto h = xs_connect(s.socket());
  char* p = xs_get_domain_path(h.get(), 12);
  REQUIRE(p);
  CHECK(std::string(p) == "/local/domain/12");
  std::free(p);
  CHECK(xs_is_domain_introduced(h.get(), 0));
  CHECK_FALSE(xs_is_domain_introduced(h.get(), 12));
}

TEST_CASE("transaction: writes inside a transaction fire watches only at commit") {
  Server s;
  auto h = xs_connect(s.socket());
  auto w = xs_connect(s.socket());
  REQUIRE(xs_watch(w.get(), "/tx", "t"));
  REQUIRE(xs_next_event(w.get()));
  xs_transaction_t t = xs_transaction_start(h.get());
  REQUIRE(t != XBT_NULL);
  REQUIRE(xs_write_str(h.get(), "/tx/a", "1", t));
  CHECK(events_within(w.get(), 300).empty());
  CHECK_FALSE(xs_read_str(w.get(), "/tx/a"));  // invisible outside
  REQUIRE(xs_transaction_end(h.get(), t, false));
  auto evs = events_within(w.get(), 300);
  CHECK(evs.contains({"/tx/a", "t"}));
  CHECK(xs_read_str(w.get(), "/tx/a").value() == "1");
  // An aborted transaction fires nothing and changes nothing.
  t = xs_transaction_start(h.get());
  REQUIRE(xs_write_str(h.get(), "/tx/b", "1", t));
  REQUIRE(xs_transaction_end(h.get(), t, true));
  CHECK(events_within(w.get(), 300).empty());
  CHECK_FALSE(xs_read_str(w.get(), "/tx/b"));
}

TEST_CASE("transaction: a conflicting commit gets EAGAIN") {
  Server s;
  auto a = xs_connect(s.socket());
  auto b = xs_connect(s.socket());
  REQUIRE(xs_write_str(a.get(), "/c/v", "0"));
  xs_transaction_t t = xs_transaction_start(a.get());
  REQUIRE(xs_read_str(a.get(), "/c/v", t).value() == "0");
  REQUIRE(xs_write_str(b.get(), "/c/v", "1"));
  REQUIRE(xs_write_str(a.get(), "/c/w", "from-tx", t));
  errno = 0;
  CHECK_FALSE(xs_transaction_end(a.get(), t, false));
  CHECK(errno == EAGAIN);
  CHECK_FALSE(xs_read_str(b.get(), "/c/w"));
  // A non-conflicting one commits.
  t = xs_transaction_start(a.get());
  REQUIRE(xs_read_str(a.get(), "/c/v", t).value() == "1");
  REQUIRE(xs_write_str(a.get(), "/c/w", "ok", t));
  CHECK(xs_transaction_end(a.get(), t, false));
  CHECK(xs_read_str(b.get(), "/c/w").value() == "ok");
}

TEST_CASE("directory_part: listings over 4096 bytes come back whole through xs_directory and xenstore-ls") {
  Server s;
  auto h = xs_connect(s.socket());
  std::set<std::string> names;
  for (int i = 0; i < 400; ++i) {
    names.insert(fmt::format("a-fairly-long-child-name-{:04}", i));
  }
  xs_transaction_t t = xs_transaction_start(h.get());
  for (const auto& n : names) REQUIRE(xs_mkdir(h.get(), t, ("/big/" + n).c_str()));
  REQUIRE(xs_transaction_end(h.get(), t, false));
  // Plain DIRECTORY cannot carry it.
  RawClient raw(s.socket());
  auto d = raw.call(XS_DIRECTORY, z("/big"));
  REQUIRE(d);
  CHECK(err_of(*d) == "E2BIG");
  auto got = xs_ls(h.get(), "/big");
  REQUIRE(got);
  CHECK(std::set<std::string>(got->begin(), got->end()) == names);
  auto ls = tool(s.socket(), {"xenstore-list", "/big"});
  CHECK(ls.status == 0);
  CHECK(static_cast<size_t>(std::count(ls.out.begin(), ls.out.end(), '\n')) == names.size());
}

TEST_CASE("quota: a value over 4096 bytes is E2BIG in libxenstore and an oversized frame closes the connection") {
  Server s;
  auto h = xs_connect(s.socket());
  errno = 0;
  CHECK_FALSE(xs_write_str(h.get(), "/big", std::string(5000, 'x')));
  CHECK(errno == E2BIG);
  CHECK(xs_write_str(h.get(), "/ok", "still works"));
  RawClient raw(s.socket());
  xsd_sockmsg hdr{XS_WRITE, 1, 0, XENSTORE_PAYLOAD_MAX + 1};
  REQUIRE(raw.send_raw(std::string_view(reinterpret_cast<const char*>(&hdr), sizeof(hdr))));
  CHECK(raw.closed_by_peer());
  CHECK(xs_read_str(h.get(), "/ok").value() == "still works");
}

TEST_CASE("quota: a domain's node at or over the node-size quota gets ENOSPC") {
  XenstoredQuotas q;
  q.max_node_size = 256;
  Server s(q);
  auto dom0 = xs_connect(s.socket());
  make_domain_home(dom0.get(), 5);
  REQUIRE(s.introduce(5));
  auto d5 = xs_connect(s.domain_socket(5));
  CHECK(xs_write_str(d5.get(), "small", std::string(100, 'a')));
  errno = 0;
  CHECK_FALSE(xs_write_str(d5.get(), "large", std::string(300, 'a')));
  CHECK(errno == ENOSPC);
  CHECK(xs_write_str(dom0.get(), "/local/domain/5/dom0-large", std::string(300, 'a')));
}

TEST_CASE("quota: nodes per domain give ENOSPC") {
  XenstoredQuotas q;
  q.max_nodes_per_domain = 5;
  Server s(q);
  auto dom0 = xs_connect(s.socket());
  make_domain_home(dom0.get(), 5);  // node 1 owned by 5
  REQUIRE(s.introduce(5));
  auto d5 = xs_connect(s.domain_socket(5));
  for (int i = 0; i < 4; ++i) REQUIRE(xs_write_str(d5.get(), "n" + std::to_string(i), "x"));
  errno = 0;
  CHECK_FALSE(xs_write_str(d5.get(), "one-too-many", "x"));
  CHECK(errno == ENOSPC);
  REQUIRE(xs_rm(d5.get(), XBT_NULL, "n0"));
  CHECK(xs_write_str(d5.get(), "fits-again", "x"));
}

TEST_CASE("quota: watches per connection give E2BIG, transactions ENOSPC") {
  XenstoredQuotas q;
  q.max_watches_per_connection = 3;
  q.max_transactions_per_connection = 2;
  Server s(q);
  auto dom0 = xs_connect(s.socket());
  make_domain_home(dom0.get(), 5);
  REQUIRE(s.introduce(5));
  RawClient d5(s.domain_socket(5));
  for (int i = 0; i < 3; ++i) {
    auto r = d5.call(XS_WATCH, z("w" + std::to_string(i)) + z("t"));
    REQUIRE(r);
    CHECK(r->type == XS_WATCH);
  }
  auto r = d5.call(XS_WATCH, z("w-extra") + z("t"));
  REQUIRE(r);
  CHECK(err_of(*r) == "E2BIG");
  for (int i = 0; i < 2; ++i) {
    auto t = d5.call(XS_TRANSACTION_START, z(""));
    REQUIRE(t);
    CHECK(t->type == XS_TRANSACTION_START);
  }
  auto t = d5.call(XS_TRANSACTION_START, z(""));
  REQUIRE(t);
  CHECK(err_of(*t) == "ENOSPC");
  // dom0 is not subject to quotas.
  RawClient raw0(s.socket());
  for (int i = 0; i < 5; ++i) {
    auto w = raw0.call(XS_WATCH, z("/w" + std::to_string(i)) + z("t"));
    REQUIRE(w);
    CHECK(w->type == XS_WATCH);
  }
}

TEST_CASE("malformed: garbage closes that connection only; other clients carry on") {
  Server s;
  auto h = xs_connect(s.socket());
  REQUIRE(xs_write_str(h.get(), "/alive", "1"));
  RawClient bad(s.socket());
  REQUIRE(bad.send_raw(std::string(64, '\xff')));
  CHECK(bad.closed_by_peer());
  CHECK(xs_read_str(h.get(), "/alive").value() == "1");
  CHECK(tool(s.socket(), {"xenstore-read", "/alive"}).out == "1\n");
}

TEST_CASE("malformed: unknown types get ENOSYS and missing NULs EINVAL, as xenstored answers them") {
  Server s;
  RawClient raw(s.socket());
  auto r = raw.call(0x1234, z("x"));
  REQUIRE(r);
  CHECK(err_of(*r) == "ENOSYS");
  r = raw.call(XS_WATCH_EVENT, z("/a") + z("t"));
  REQUIRE(r);
  CHECK(err_of(*r) == "ENOSYS");
  r = raw.call(XS_READ, "/no-nul");
  REQUIRE(r);
  CHECK(err_of(*r) == "EINVAL");
  r = raw.call(XS_READ, z("/bad path"));
  REQUIRE(r);
  CHECK(err_of(*r) == "EINVAL");
  r = raw.call(XS_READ, z("/local"));  // the connection is still in service
  REQUIRE(r);
  CHECK(r->type == XS_READ);
}

TEST_CASE("privileged operations: a domain gets EACCES for CONTROL, INTRODUCE, RELEASE, RESUME, SET_TARGET and IS_DOMAIN_INTRODUCED") {
  Server s;
  REQUIRE(s.introduce(5));
  RawClient d5(s.domain_socket(5));
  for (uint32_t t : {uint32_t{XS_CONTROL}, uint32_t{XS_INTRODUCE}, uint32_t{XS_RELEASE},
                     uint32_t{XS_RESUME}, uint32_t{XS_SET_TARGET}, uint32_t{XS_IS_DOMAIN_INTRODUCED}}) {
    auto r = d5.call(t, z("5") + z("1") + z("1"));
    REQUIRE(r);
    CHECK(err_of(*r) == "EACCES");
  }
}

TEST_CASE("control: print and check answer OK; unknown commands EINVAL") {
  Server s;
  RawClient raw(s.socket());
  auto r = raw.call(XS_CONTROL, z("print") + z("hello from the test"));
  REQUIRE(r);
  CHECK(r->payload == z("OK"));
  r = raw.call(XS_CONTROL, z("check"));
  REQUIRE(r);
  CHECK(r->payload == z("OK"));
  r = raw.call(XS_CONTROL, z("no-such-command"));
  REQUIRE(r);
  CHECK(err_of(*r) == "EINVAL");
}

TEST_CASE("reset_watches: drops the connection's watches") {
  Server s;
  auto h = xs_connect(s.socket());
  RawClient raw(s.socket());
  auto r = raw.call(XS_WATCH, z("/rw") + z("t"));
  REQUIRE(r);
  r = raw.call(XS_RESET_WATCHES, z(""));
  REQUIRE(r);
  CHECK(r->type == XS_RESET_WATCHES);
  REQUIRE(xs_write_str(h.get(), "/rw/x", "1"));
  // Only the reply to this READ may arrive: no event from the dropped watch.
  REQUIRE(raw.send(XS_READ, z("/rw/x"), 555));
  auto m = raw.recv();
  REQUIRE(m);
  CHECK(m->type == XS_READ);
  CHECK(m->req_id == 555);
}
