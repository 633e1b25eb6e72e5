// The emulated xenstored of pvhost-xenemu: the real xs_wire.h protocol on unix sockets,
// with C xenstored's semantics (ARCHITECTURE.md "The emulated hypervisor").
//
//   RUNDIR/socket          dom0 (privileged)
//   RUNDIR/domain-N.sock   a connection there *is* domain N (relative paths resolve to
//                          /local/domain/N, permissions enforced); present while N is
//                          introduced.
//
// The hypervisor broker in the same daemon calls introduce_domain/release_domain when it
// creates and destroys domains; toolstack clients may also send XS_INTRODUCE/XS_RELEASE.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "src/error.h"
#include "src/event_loop.h"
#include "src/types.h"

namespace pvhost::xenemu {

struct XenstoredQuotas {
  size_t max_node_size = 4096;          // XENSTORE_PAYLOAD_MAX
  size_t max_path_length = 3072;        // XENSTORE_ABS_PATH_MAX
  size_t max_nodes_per_domain = 1000;   // xenstored -N default
  size_t max_watches_per_connection = 128;
  size_t max_transactions_per_connection = 10;
};

struct XenstoredOptions {
  std::string rundir;
  XenstoredQuotas quotas;
};

class Xenstored {
 public:
  // Creates RUNDIR/socket and starts serving on `loop`.
  [[nodiscard]] static Result<std::unique_ptr<Xenstored>> start(EventLoop& loop, XenstoredOptions options);
  virtual ~Xenstored() = default;  // closes every connection, removes the socket files

  // Called by the broker: the domain exists now / is gone. Introduce makes
  // RUNDIR/domain-N.sock appear and fires @introduceDomain; release removes the socket,
  // closes that domain's connections, and fires @releaseDomain. Idempotent.
  [[nodiscard]] virtual Result<void> introduce_domain(DomId domid) = 0;
  [[nodiscard]] virtual Result<void> release_domain(DomId domid) = 0;
  // The domain `domid` was given privilege over via XS_SET_TARGET, if any.
  [[nodiscard]] virtual std::optional<DomId> target_of(DomId domid) const = 0;
  // Called whenever a toolstack client sends XS_INTRODUCE/XS_RELEASE/XS_SET_TARGET, so the
  // broker can keep its view in step.
  std::function<void(DomId domid, bool introduced)> on_domain_change;
};

}  // namespace pvhost::xenemu
