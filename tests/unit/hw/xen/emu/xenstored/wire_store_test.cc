// Pure layers of the emulated xenstored: the wire framer/decoder and the store, without
// sockets (STYLE.md rule 14: parsers are tested over plain buffers).
#include <catch2/catch.hpp>

#include <cerrno>

#include "hw/xen/emu/xenstored/server.h"
#include "hw/xen/emu/xenstored/store.h"
#include "hw/xen/emu/xenstored/wire.h"

using namespace pvhost;
using namespace pvhost::xenemu;

namespace {

std::string z(std::string_view s) {
  std::string out(s);
  out += '\0';
  return out;
}

WireMessage msg(uint32_t type, std::string payload, uint32_t tx = 0) {
  return WireMessage{type, 7, tx, std::move(payload)};
}

const Caller kDom0Caller{kDom0, std::nullopt};
const Caller kDom5{DomId(5), std::nullopt};

}  // namespace

TEST_CASE("wire: a message split across reads is reassembled byte by byte") {
  const std::string frame = encode_message(XS_READ, 42, 3, z("/local"));
  MessageReader r;
  for (size_t i = 0; i + 1 < frame.size(); ++i) {
    r.feed(std::string_view(&frame[i], 1));
    CHECK(std::holds_alternative<std::monostate>(r.next()));
  }
  r.feed(std::string_view(&frame.back(), 1));
  auto n = r.next();
  REQUIRE(std::holds_alternative<WireMessage>(n));
  const auto& m = std::get<WireMessage>(n);
  CHECK(m.type == XS_READ);
  CHECK(m.req_id == 42);
  CHECK(m.tx_id == 3);
  CHECK(m.payload == z("/local"));
  CHECK(r.buffered() == 0);
}

TEST_CASE("wire: two messages in one read come out in order") {
  MessageReader r;
  r.feed(encode_message(XS_READ, 1, 0, z("/a")) + encode_message(XS_RM, 2, 0, z("/b")));
  auto a = r.next();
  auto b = r.next();
  REQUIRE(std::holds_alternative<WireMessage>(a));
  REQUIRE(std::holds_alternative<WireMessage>(b));
  CHECK(std::get<WireMessage>(a).req_id == 1);
  CHECK(std::get<WireMessage>(b).type == XS_RM);
  CHECK(std::holds_alternative<std::monostate>(r.next()));
}

TEST_CASE("wire: a length over XENSTORE_PAYLOAD_MAX is a fatal framing error at the header") {
  xsd_sockmsg h{XS_WRITE, 1, 0, XENSTORE_PAYLOAD_MAX + 1};
  MessageReader r;
  r.feed(std::string_view(reinterpret_cast<const char*>(&h), sizeof(h)));
  auto n = r.next();
  REQUIRE(std::holds_alternative<FrameError>(n));
  CHECK(std::get<FrameError>(n) == FrameError::payload_too_long);

  MessageReader ok;
  ok.feed(encode_message(XS_WRITE, 1, 0, std::string(XENSTORE_PAYLOAD_MAX, 'a')));
  CHECK(std::holds_alternative<WireMessage>(ok.next()));
}

TEST_CASE("wire: one-argument operations need exactly one trailing NUL (EINVAL otherwise)") {
  auto good = decode_request(msg(XS_READ, z("/a")));
  REQUIRE(std::holds_alternative<Request>(good));
  CHECK(std::get<Request>(good).invalid == nullptr);
  CHECK(std::get<Request>(good).args == std::vector<std::string>{"/a"});
  for (std::string bad : {std::string("/a"), z("/a") + "x", z("/a") + z("/b"), std::string()}) {
    auto d = decode_request(msg(XS_READ, bad));
    REQUIRE(std::holds_alternative<Request>(d));
    CHECK(std::get<Request>(d).invalid != nullptr);
  }
}

TEST_CASE("wire: a WRITE value is binary and runs to the end of the payload") {
  const std::string value("a\0b\0", 4);
  auto d = decode_request(msg(XS_WRITE, z("/k") + value));
  REQUIRE(std::holds_alternative<Request>(d));
  CHECK(std::get<Request>(d).args[0] == "/k");
  CHECK(std::get<Request>(d).value == value);
  auto bad = decode_request(msg(XS_WRITE, "/k-without-nul"));
  CHECK(std::get<Request>(bad).invalid != nullptr);
}

TEST_CASE("wire: unknown and server-to-client types are ENOSYS") {
  for (uint32_t t : {uint32_t{XS_WATCH_EVENT}, uint32_t{XS_ERROR}, uint32_t{20}, uint32_t{23},
                     uint32_t{XS_INVALID}, uint32_t{0xdeadbeef}}) {
    auto d = decode_request(msg(t, z("x")));
    REQUIRE(std::holds_alternative<RequestError>(d));
    CHECK(std::get<RequestError>(d).code == ENOSYS);
  }
}

TEST_CASE("wire: errors travel as errno names; untranslatable codes become EINVAL") {
  CHECK(error_payload(ENOENT) == z("ENOENT"));
  CHECK(error_payload(EACCES) == z("EACCES"));
  CHECK(error_payload(E2BIG) == z("E2BIG"));
  CHECK(error_payload(ENOTTY) == z("EINVAL"));
}

TEST_CASE("paths: relative paths resolve under /local/domain/<N>; bad paths are EINVAL") {
  const size_t max = XenstoredQuotas{}.max_path_length;
  CHECK(*canonicalize(kDom5, "device/vif", max) == "/local/domain/5/device/vif");
  CHECK(*canonicalize(kDom0Caller, "x", max) == "/local/domain/0/x");
  CHECK(*canonicalize(kDom5, "/", max) == "/");
  for (const char* bad : {"", "/a/", "/a//b", "/a b", "/a.b", "@introduceDomain", "a/"})
    CHECK(canonicalize(kDom5, bad, max).error() == EINVAL);
  // Below /local/domain/<N>/ at most XENSTORE_REL_PATH_MAX bytes; whole path bounded too.
  CHECK(canonicalize(kDom5, "/local/domain/5/" + std::string(2048, 'a'), max).has_value());
  CHECK(canonicalize(kDom5, "/local/domain/5/" + std::string(2049, 'a'), max).error() == EINVAL);
  CHECK(canonicalize(kDom5, "/" + std::string(2100, 'a'), max).error() == EINVAL);
}

TEST_CASE("perms: the first entry is the owner and the default for domains not listed") {
  const PermList p{Perm{3, kPermRead}, Perm{5, kPermWrite}};
  CHECK(perm_for(Caller{DomId(3), {}}, p) == (kPermRead | kPermWrite | kPermOwner));
  CHECK(perm_for(Caller{DomId(5), {}}, p) == kPermWrite);
  CHECK(perm_for(Caller{DomId(9), {}}, p) == kPermRead);
  CHECK(perm_for(kDom0Caller, p) == (kPermRead | kPermWrite | kPermOwner));
  // SET_TARGET: a domain gets its target's rights.
  CHECK(perm_for(Caller{DomId(9), DomId(3)}, p) == (kPermRead | kPermWrite | kPermOwner));
  CHECK(parse_perm("b12") == Perm{12, kPermRead | kPermWrite});
  CHECK(parse_perm("n0x10") == Perm{16, kPermNone});
  for (const char* bad : {"", "r", "x1", "r1z", "r-1", "r70000"}) CHECK_FALSE(parse_perm(bad));
}

TEST_CASE("store: initial tree holds /tool/xenstored and /local/domain/0, owned by dom0") {
  Store s(XenstoredQuotas{});
  for (const char* p : {"/", "/tool", "/tool/xenstored", "/local", "/local/domain", "/local/domain/0"})
    CHECK(s.read(kDom0Caller, nullptr, p).has_value());
  CHECK(s.get_perms(kDom0Caller, nullptr, "/local").value() == PermList{Perm{0, kPermNone}});
  CHECK(s.check().empty());
}

TEST_CASE("store: a domain's new node inherits the parent's perms with the domain as owner") {
  Store s(XenstoredQuotas{});
  REQUIRE(s.mkdir(kDom0Caller, nullptr, "/local/domain/5"));
  REQUIRE(s.set_perms(kDom0Caller, nullptr, "/local/domain/5", {Perm{5, kPermNone}, Perm{7, kPermRead}}));
  REQUIRE(s.write(kDom5, nullptr, "a/b", "v"));
  CHECK(s.get_perms(kDom0Caller, nullptr, "/local/domain/5/a/b").value() ==
        PermList{Perm{5, kPermNone}, Perm{7, kPermRead}});
  // dom0 writing under a node owned by 3 keeps the inherited owner.
  REQUIRE(s.mkdir(kDom0Caller, nullptr, "/o"));
  REQUIRE(s.set_perms(kDom0Caller, nullptr, "/o", {Perm{3, kPermRead}}));
  REQUIRE(s.write(kDom0Caller, nullptr, "/o/x", "1"));
  CHECK(s.get_perms(kDom0Caller, nullptr, "/o/x").value() == PermList{Perm{3, kPermRead}});
  CHECK(s.check().empty());
}

TEST_CASE("store: a transaction sees its own writes and commits them atomically") {
  Store s(XenstoredQuotas{});
  auto tx = *s.begin();
  REQUIRE(s.write(kDom0Caller, tx.get(), "/t/a", "1"));
  CHECK(s.read(kDom0Caller, tx.get(), "/t/a").value() == "1");
  CHECK(s.read(kDom0Caller, nullptr, "/t/a").error() == ENOENT);
  REQUIRE(s.commit(kDom0Caller, std::move(tx)));
  CHECK(s.read(kDom0Caller, nullptr, "/t/a").value() == "1");
  CHECK(s.check().empty());
}

TEST_CASE("store: a commit after an intervening change to a node read gets EAGAIN") {
  Store s(XenstoredQuotas{});
  REQUIRE(s.write(kDom0Caller, nullptr, "/c", "0"));
  auto tx = *s.begin();
  REQUIRE(s.read(kDom0Caller, tx.get(), "/c"));
  REQUIRE(s.write(kDom0Caller, nullptr, "/c", "1"));
  REQUIRE(s.write(kDom0Caller, tx.get(), "/d", "x"));
  CHECK(s.commit(kDom0Caller, std::move(tx)).error() == EAGAIN);
  CHECK(s.read(kDom0Caller, nullptr, "/d").error() == ENOENT);
}

TEST_CASE("store: DIRECTORY_PART pages whole names with the generation in front") {
  Store s(XenstoredQuotas{});
  std::vector<std::string> names;
  for (int i = 0; i < 300; ++i) {
    names.push_back(fmt::format("child-number-{:04}", i));
    REQUIRE(s.mkdir(kDom0Caller, nullptr, "/big/" + names.back()));
  }
  std::vector<std::string> got;
  std::string gen;
  size_t off = 0;
  for (int guard = 0; guard < 10; ++guard) {
    auto part = s.directory_part(kDom0Caller, nullptr, "/big", std::to_string(off));
    REQUIRE(part);
    REQUIRE(part->size() <= XENSTORE_PAYLOAD_MAX);
    auto split = split_strings(*part);
    REQUIRE(!split.strings.empty());
    if (gen.empty()) gen = split.strings[0];
    CHECK(split.strings[0] == gen);
    bool done = false;
    for (size_t i = 1; i < split.strings.size(); ++i) {
      if (split.strings[i].empty()) {
        done = true;
        break;
      }
      got.emplace_back(split.strings[i]);
      off += split.strings[i].size() + 1;
    }
    if (done) break;
  }
  CHECK(got == names);
}

TEST_CASE("server: requests with an unknown transaction id get ENOENT; nested start EBUSY") {
  Server srv(XenstoredQuotas{}, {});
  Connection& c = srv.add_connection(kDom0);
  srv.handle(c, WireMessage{XS_READ, 1, 99, z("/local")});
  CHECK(c.out == encode_message(XS_ERROR, 1, 99, z("ENOENT")));
  c.out.clear();
  srv.handle(c, WireMessage{XS_TRANSACTION_START, 2, 0, z("")});
  auto split = split_strings(std::string_view(c.out).substr(kHeaderSize));
  REQUIRE(split.strings.size() == 1);
  const uint32_t tx = static_cast<uint32_t>(std::stoul(std::string(split.strings[0])));
  c.out.clear();
  srv.handle(c, WireMessage{XS_TRANSACTION_START, 3, tx, z("")});
  CHECK(c.out == encode_message(XS_ERROR, 3, tx, z("EBUSY")));
}
