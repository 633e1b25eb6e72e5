// xs-wire: the emulated xenstored's wire framing, request decoding and protocol engine
// (store, permissions, transactions, watches) on arbitrary bytes, without sockets.
//
// Input: byte 0 picks which connections exist (dom0 and/or domain 5, introduced); the
// rest is a client byte stream of xsd_sockmsg frames. A frame's req_id low bit routes it
// to one connection, so cross-connection watches, permissions and transaction conflicts
// are reachable. Invariants checked after each input: no crash/UB (sanitizers), replies
// are well-formed frames within XENSTORE_PAYLOAD_MAX, and the store stays consistent.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "hw/xen/emu/xenstored/server.h"
#include "hw/xen/emu/xenstored/wire.h"
#include "src/log.h"

using namespace pvhost;
using namespace pvhost::xenemu;

namespace {

void check_output(const std::string& out) {
  MessageReader r;
  r.feed(out);
  for (;;) {
    auto n = r.next();
    if (std::holds_alternative<std::monostate>(n)) break;
    if (std::holds_alternative<FrameError>(n)) std::abort();  // we sent an oversized frame
  }
  if (r.buffered() != 0) std::abort();  // a truncated frame
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static bool quiet = [] {
    log::set_level(log::Level::off);
    return true;
  }();
  (void)quiet;
  if (size == 0) return 0;
  XenstoredQuotas q;
  q.max_nodes_per_domain = 50;  // small, so quota paths are reachable
  q.max_watches_per_connection = 8;
  q.max_transactions_per_connection = 3;
  Server srv(q, Server::Hooks{});
  (void)srv.introduce(DomId(5));
  const uint8_t mode = data[0];
  Connection* conns[2];
  conns[0] = &srv.add_connection((mode & 1) ? DomId(5) : kDom0);
  conns[1] = &srv.add_connection((mode & 2) ? DomId(5) : kDom0);
  const uint64_t ids[2] = {conns[0]->id(), conns[1]->id()};

  MessageReader reader;
  reader.feed(std::string_view(reinterpret_cast<const char*>(data + 1), size - 1));
  for (int budget = 0; budget < 512; ++budget) {
    auto n = reader.next();
    if (std::holds_alternative<std::monostate>(n)) break;
    if (std::holds_alternative<FrameError>(n)) break;  // the socket layer closes here
    const WireMessage& m = std::get<WireMessage>(n);
    Connection* c = srv.connection(ids[m.req_id & 1]);
    if (c == nullptr) break;
    srv.handle(*c, m);
    if (mode & 4) (void)srv.release(DomId(5)), (void)srv.introduce(DomId(5));
  }
  for (uint64_t id : ids) {
    if (Connection* c = srv.connection(id)) check_output(c->out);
  }
  if (!srv.store().check().empty()) std::abort();
  return 0;
}
