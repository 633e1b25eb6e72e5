// The guest library of pvhost-xenemu: what a frontend driver running as a separate "guest"
// process needs from the emulated hypervisor (ARCHITECTURE.md "The emulated hypervisor"):
// guest pages, granting them (grant_table.h v1 entries), event channels (event_channel.h),
// MMIO/port I/O through the ioreq protocol (hvm/ioreq.h) and interrupt delivery. Plus the
// tiny toolstack client that creates and destroys domains.
//
// A Guest connects to RUNDIR/hv-domain-N.sock, so it *is* domain N for the broker (wire.h).
// Not thread-safe: one thread drives a Guest.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "src/error.h"
#include "src/fd.h"
#include "src/types.h"

namespace pvhost::xenemu {

class BrokerConnection;
class PortSet;
struct DomainMemory;

// --- toolstack client (dom0) -------------------------------------------------------------

struct DomainConfig {
  std::string name;
  uint32_t memory_mib = 64;
  uint32_t vcpus = 1;
  uint32_t max_grant_frames = 32;  // libxl's default max_grant_frames
};

struct DomainSummary {
  DomId domid;
  std::string name;
  bool dying = false;
  uint32_t vcpus = 0;
  uint64_t memory_mib = 0;
  uint32_t max_grant_frames = 0;
};

// Domain management over RUNDIR/hv.sock. The broker introduces the new domain to xenstored
// (RUNDIR/domain-N.sock appears, @introduceDomain fires); the xenstore nodes a toolstack
// writes for it are hw/xen/emu/toolstack/domain.h's job.
class Toolstack {
 public:
  [[nodiscard]] static Result<std::unique_ptr<Toolstack>> connect(const std::string& rundir);
  ~Toolstack();
  [[nodiscard]] Result<DomId> create_domain(const DomainConfig& config);
  [[nodiscard]] Result<void> destroy_domain(DomId domid);
  [[nodiscard]] Result<std::vector<DomainSummary>> list_domains();
  // ENOENT when the domain does not exist.
  [[nodiscard]] Result<DomainSummary> domain_info(DomId domid);

 private:
  explicit Toolstack(std::unique_ptr<BrokerConnection> conn);
  std::unique_ptr<BrokerConnection> conn_;
};

// --- guest side --------------------------------------------------------------------------

enum class ReadOnly { no, yes };

// Contiguous guest pages: gfn of the first, and where they are in this process.
struct GuestPages {
  Gfn gfn;
  size_t count = 0;
  std::byte* data = nullptr;
};

struct Interrupt {
  enum class Kind { irq_level, msi };
  Kind kind = Kind::irq_level;
  uint32_t irq = 0;     // irq_level
  bool level = false;   // irq_level
  uint64_t addr = 0;    // msi
  uint32_t data = 0;    // msi
};

class Guest {
 public:
  [[nodiscard]] static Result<std::unique_ptr<Guest>> connect(const std::string& rundir, DomId domid);
  ~Guest();
  Guest(const Guest&) = delete;
  Guest& operator=(const Guest&) = delete;

  [[nodiscard]] DomId domid() const { return domid_; }
  [[nodiscard]] bool strict() const;
  [[nodiscard]] uint64_t ram_pages() const;

  // Guest memory: allocated by the broker, so several processes of one domain never share a
  // page by accident. Freed when this process exits.
  [[nodiscard]] Result<GuestPages> alloc_pages(size_t count = 1);
  [[nodiscard]] Result<void> free_pages(const GuestPages& pages);
  [[nodiscard]] std::byte* page(Gfn gfn) const;

  // Grants (grant_table.h "Introducing a valid entry into the grant table": frame and domid
  // first, then flags with a write barrier).
  [[nodiscard]] Result<GrantRef> grant_access(DomId backend, Gfn gfn, ReadOnly ro);
  // gnttab_end_foreign_access_ref: fails with EBUSY while the backend has the page mapped
  // (GTF_reading/GTF_writing set); the ref is free again on success.
  [[nodiscard]] Result<void> end_access(GrantRef ref);
  // The entry's GTF_reading/GTF_writing bits right now.
  [[nodiscard]] bool grant_in_use(GrantRef ref) const;

  // Event channels.
  [[nodiscard]] Result<Port> alloc_unbound(DomId remote);
  [[nodiscard]] Result<Port> bind_interdomain(DomId remote, Port remote_port);
  [[nodiscard]] Result<void> close_port(Port port);
  [[nodiscard]] Result<void> notify(Port port);
  [[nodiscard]] Result<void> unmask(Port port);
  // Readable while a port is pending.
  [[nodiscard]] int event_fd() const;
  // The next pending port, now masked until unmask(); nullopt when none fired in `timeout`.
  [[nodiscard]] Result<std::optional<Port>> wait_event(std::chrono::milliseconds timeout = {});

  // MMIO and port I/O as a vCPU would do them: an ioreq_t in the ioreq server's shared page,
  // a notification on the vCPU's vp_eport, a wait for STATE_IORESP_READY (hvm/ioreq.h).
  // Addresses nobody serves read as all ones and ignore writes, as unassigned MMIO on Xen.
  [[nodiscard]] Result<uint64_t> mmio_read(uint64_t addr, unsigned size);
  [[nodiscard]] Result<void> mmio_write(uint64_t addr, unsigned size, uint64_t value);
  [[nodiscard]] Result<uint64_t> pio_read(uint16_t port, unsigned size);
  [[nodiscard]] Result<void> pio_write(uint16_t port, unsigned size, uint64_t value);
  // How long an access waits for the device model before failing with ETIMEDOUT.
  void set_io_timeout(std::chrono::milliseconds t) { io_timeout_ = t; }

  // Interrupts raised by set_irq_level / inject_msi: readable fd, then next_interrupt().
  [[nodiscard]] Result<int> interrupt_fd();
  [[nodiscard]] Result<std::optional<Interrupt>> next_interrupt();

 private:
  struct IoreqServerView;
  Guest() = default;
  [[nodiscard]] Result<uint64_t> io(bool mmio, uint64_t addr, unsigned size, bool read, uint64_t value);

  DomId domid_;
  std::unique_ptr<BrokerConnection> conn_;
  std::shared_ptr<DomainMemory> mem_;
  std::unique_ptr<PortSet> ports_;
  std::vector<uint32_t> free_refs_;
  std::map<uint64_t, std::unique_ptr<IoreqServerView>> ioreq_;  // by (server id << 32 | port)
  UniqueFd interrupts_;
  std::chrono::milliseconds io_timeout_{5000};
};

}  // namespace pvhost::xenemu
