// The hypervisor broker of pvhost-xenemu (ARCHITECTURE.md "The emulated hypervisor"): domains,
// guest RAM and grant tables as memfds, event-channel port tables, grant mapping with Xen's
// rules, foreign mapping for privileged callers, ioreq servers and interrupt lines.
// Socket naming and the wire protocol: hw/xen/emu/broker/wire.h.
//
// Runs on one EventLoop; single-threaded.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "src/error.h"
#include "src/event_loop.h"
#include "src/types.h"

namespace pvhost::xenemu {

struct BrokerOptions {
  std::string rundir;
  // Grant maps are one MAP_FIXED page each inside a reserved range (wire.h hello vals[1]).
  bool strict = false;
};

// How the broker tells the rest of the daemon (xenstored) about domains. Every hook is
// optional, so the broker runs alone in tests.
struct BrokerHooks {
  std::function<Result<void>(DomId)> introduce_domain;
  std::function<Result<void>(DomId)> release_domain;
  // The domain that `domid` has privilege over (XS_SET_TARGET), if any.
  std::function<std::optional<DomId>(DomId)> target_of;
};

class Broker {
 public:
  // Creates RUNDIR/hv.sock and serves on `loop`.
  [[nodiscard]] static Result<std::unique_ptr<Broker>> start(EventLoop& loop, BrokerOptions options,
                                                             BrokerHooks hooks = {});
  virtual ~Broker() = default;  // destroys every domain, closes connections, removes sockets

  // A toolstack client released `domid` through xenstored (XS_RELEASE): destroy it here too.
  virtual void domain_released(DomId domid) = 0;
  [[nodiscard]] virtual size_t domain_count() const = 0;
};

}  // namespace pvhost::xenemu
