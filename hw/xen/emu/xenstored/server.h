// The protocol engine of the emulated xenstored: connections (each one domain), their
// watches and transactions, the domain table, and the dispatch of decoded requests to
// the Store — everything but the sockets, so it runs in unit tests and under the fuzzer
// with in-memory connections.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "hw/xen/emu/xenstored/store.h"
#include "hw/xen/emu/xenstored/wire.h"
#include "src/types.h"

namespace pvhost::xenemu {

// Output a connection may have queued before watch events to it are dropped (xenstored
// drops events over the domain's memory quota) and, at twice this, before the
// connection is closed as not reading its replies.
inline constexpr size_t kMaxPendingOutput = 1 << 20;

struct WatchReg {
  std::string node;   // canonical path, or "@..." special
  std::string token;
  bool relative = false;  // reported relative to the connection's implicit path
};

class Connection {
 public:
  Connection(uint64_t id, DomId domid) : id_(id), domid_(domid) {}
  [[nodiscard]] uint64_t id() const { return id_; }
  [[nodiscard]] DomId domid() const { return domid_; }

  // Bytes waiting to be written to the peer; the socket layer drains it.
  std::string out;
  // Set when the connection must be closed after its output (or at once).
  bool closing = false;

 private:
  friend class Server;
  uint64_t id_;
  DomId domid_;
  std::vector<WatchReg> watches_;
  std::map<uint32_t, std::unique_ptr<Store::Transaction>> transactions_;
  uint32_t next_tx_id_ = 1;
};

class Server {
 public:
  // What the socket layer does when a domain is introduced or released (either by the
  // broker through Xenstored or by a toolstack's XS_INTRODUCE/XS_RELEASE).
  struct Hooks {
    std::function<void(DomId)> domain_introduced;  // create RUNDIR/domain-N.sock
    std::function<void(DomId)> domain_released;    // remove socket, close connections
    std::function<void(Connection&)> output_ready; // conn.out grew
    // A client's XS_INTRODUCE / XS_RELEASE / XS_SET_TARGET succeeded.
    std::function<void(DomId, bool introduced)> client_domain_change;
  };

  Server(XenstoredQuotas quotas, Hooks hooks);
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  Connection& add_connection(DomId domid);
  void remove_connection(uint64_t id);
  [[nodiscard]] Connection* connection(uint64_t id);

  // Handles one framed message from `conn`: the reply (and any watch events) are
  // appended to the connections' `out`. Never throws, never aborts on client input.
  void handle(Connection& conn, const WireMessage& msg);

  // Domain table. introduce/release fire @introduceDomain/@releaseDomain and call the
  // hooks; both are idempotent. Return false when nothing changed.
  bool introduce(DomId domid);
  bool release(DomId domid);
  [[nodiscard]] bool is_introduced(DomId domid) const { return domains_.contains(domid.value()); }
  [[nodiscard]] std::optional<DomId> target_of(DomId domid) const;

  [[nodiscard]] Store& store() { return store_; }
  [[nodiscard]] size_t connection_count() const { return conns_.size(); }

  // Counters, for tests and logs.
  struct Stats {
    uint64_t requests = 0;
    uint64_t errors = 0;
    uint64_t events = 0;
    uint64_t events_dropped = 0;
  };
  [[nodiscard]] const Stats& stats() const { return stats_; }

 private:
  [[nodiscard]] Caller caller_for(const Connection& c) const;
  void reply(Connection& c, const Request& r, uint32_t type, std::string_view payload);
  void reply_error(Connection& c, uint32_t req_id, uint32_t tx_id, int code);
  void send_event(Connection& c, std::string_view path, std::string_view token);
  void deliver(const ChangeEvent& ev);
  void fire_special(const std::string& name);
  [[nodiscard]] bool watch_permitted(const Connection& c, const ChangeEvent& ev) const;
  [[nodiscard]] bool special_readable(const Connection& c, const std::string& name) const;
  void dispatch(Connection& c, const Request& r);
  void do_watch(Connection& c, const Request& r);
  void do_unwatch(Connection& c, const Request& r);
  void do_transaction_start(Connection& c, const Request& r);
  void do_transaction_end(Connection& c, const Request& r);
  void do_set_perms(Connection& c, const Request& r, Store::Transaction* tx);
  void do_control(Connection& c, const Request& r);
  void reset_connection(Connection& c);

  struct DomainState {
    std::optional<DomId> target;
  };

  Store store_;
  XenstoredQuotas quotas_;
  Hooks hooks_;
  uint64_t next_conn_id_ = 1;
  std::map<uint64_t, std::unique_ptr<Connection>> conns_;
  std::map<uint16_t, DomainState> domains_;
  // Permissions of the special watch paths (set_perms_special()); default: dom0 only.
  PermList introduce_perms_{Perm{0, kPermNone}};
  PermList release_perms_{Perm{0, kPermNone}};
  Stats stats_;
};

}  // namespace pvhost::xenemu
