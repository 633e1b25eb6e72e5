// The Xen interface layer (ARCHITECTURE.md "The Xen interface layer"). Backends never call
// libxen* directly: they receive one `Xen` bundle, chosen once at start-up (real or
// emulated) and passed in, never global (STYLE.md rule 9).
//
// Threading: XenStore and DeviceModel are used from the main thread only. GrantTables and
// ForeignMemory are thread-safe (I/O threads map and copy). An EventChannels handle belongs
// to the one loop that polls its fd; open one per device or queue.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "src/error.h"
#include "src/event_loop.h"
#include "src/types.h"

namespace pvhost::xen {

enum class Access { read_only, read_write };

// ---------------------------------------------------------------------------------------
// XenStore (xs_wire.h semantics; always the real libxenstore, also under emulation)

// One entry of a node's permission list; the first entry names the owner (xenstore.txt).
struct Permission {
  enum class Kind : char { none = 'n', read = 'r', write = 'w', both = 'b' };
  DomId domid;
  Kind kind;
  friend bool operator==(const Permission&, const Permission&) = default;
};

// A transaction id; kNoTransaction (XBT_NULL) for plain operations.
struct Transaction {
  uint32_t id = 0;
};
inline constexpr Transaction kNoTransaction{};

class XenStore {
 public:
  // RAII watch registration; unwatches on destruction.
  class Watch {
   public:
    Watch() = default;
    Watch(XenStore* store, uint64_t id) : store_(store), id_(id) {}
    Watch(Watch&& o) noexcept : store_(std::exchange(o.store_, nullptr)), id_(o.id_) {}
    Watch& operator=(Watch&& o) noexcept {
      if (this != &o) {
        reset();
        store_ = std::exchange(o.store_, nullptr);
        id_ = o.id_;
      }
      return *this;
    }
    Watch(const Watch&) = delete;
    Watch& operator=(const Watch&) = delete;
    ~Watch() { reset(); }
    void reset() noexcept {
      if (store_ != nullptr) std::exchange(store_, nullptr)->unwatch(id_);
    }
    [[nodiscard]] bool active() const { return store_ != nullptr; }

   private:
    XenStore* store_ = nullptr;
    uint64_t id_ = 0;
  };
  // Called on the event loop with the path that fired (never inside another XenStore call).
  using WatchCallback = std::function<void(std::string_view path)>;

  virtual ~XenStore() = default;

  [[nodiscard]] virtual Result<std::string> read(Transaction t, std::string_view path) = 0;
  [[nodiscard]] virtual Result<void> write(Transaction t, std::string_view path, std::string_view value) = 0;
  [[nodiscard]] virtual Result<std::vector<std::string>> directory(Transaction t, std::string_view path) = 0;
  [[nodiscard]] virtual Result<void> mkdir(Transaction t, std::string_view path) = 0;
  [[nodiscard]] virtual Result<void> rm(Transaction t, std::string_view path) = 0;
  [[nodiscard]] virtual Result<std::vector<Permission>> get_permissions(Transaction t, std::string_view path) = 0;
  [[nodiscard]] virtual Result<void> set_permissions(Transaction t, std::string_view path,
                                                     std::span<const Permission> perms) = 0;
  [[nodiscard]] virtual Result<Transaction> transaction_start() = 0;
  // Commits (or aborts). A conflicting commit fails with code EAGAIN.
  [[nodiscard]] virtual Result<void> transaction_end(Transaction t, bool abort) = 0;
  // Registers a watch; the callback first fires once for `path` itself (xenstore.txt).
  [[nodiscard]] virtual Result<Watch> watch(std::string_view path, WatchCallback cb) = 0;
  // Path of a domain's home, "/local/domain/<domid>".
  [[nodiscard]] virtual Result<std::string> get_domain_path(DomId domid) = 0;

  // Hooks the store's fd into `loop` so watch callbacks are dispatched there.
  [[nodiscard]] virtual Result<void> attach(EventLoop& loop) = 0;

 protected:
  virtual void unwatch(uint64_t id) noexcept = 0;
};

// Runs `body` in a transaction, retrying while the commit fails with EAGAIN (as libxl
// does). `body` returns an error to abort.
[[nodiscard]] Result<void> transact(XenStore& xs, const std::function<Result<void>(Transaction)>& body,
                                    int max_attempts = 64);

// Convenience: reads and parses an unsigned integer node, naming the path on error.
[[nodiscard]] Result<uint64_t> read_uint(XenStore& xs, Transaction t, std::string_view path);
// Reads a node, or nullopt when it does not exist (ENOENT).
[[nodiscard]] Result<std::optional<std::string>> read_optional(XenStore& xs, Transaction t,
                                                               std::string_view path);

// ---------------------------------------------------------------------------------------
// Mappings of guest memory (grant maps and foreign maps), unmapped on destruction.

class GuestMapping;
class Unmapper {
 public:
  virtual void unmap(GuestMapping& m) noexcept = 0;

 protected:
  ~Unmapper() = default;
};

class GuestMapping {
 public:
  GuestMapping() = default;
  // `cookie` is implementation data (e.g. the emulator's mapping id).
  GuestMapping(std::byte* addr, size_t pages, Unmapper* owner, uint64_t cookie = 0)
      : addr_(addr), pages_(pages), owner_(owner), cookie_(cookie) {}
  GuestMapping(GuestMapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), pages_(std::exchange(o.pages_, 0)),
        owner_(std::exchange(o.owner_, nullptr)), cookie_(o.cookie_) {}
  GuestMapping& operator=(GuestMapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      pages_ = std::exchange(o.pages_, 0);
      owner_ = std::exchange(o.owner_, nullptr);
      cookie_ = o.cookie_;
    }
    return *this;
  }
  GuestMapping(const GuestMapping&) = delete;
  GuestMapping& operator=(const GuestMapping&) = delete;
  ~GuestMapping() { reset(); }
  void reset() noexcept {
    if (owner_ != nullptr) std::exchange(owner_, nullptr)->unmap(*this);
    addr_ = nullptr;
    pages_ = 0;
  }

  // Shared with a hostile guest: read it only through volatile/atomic accessors or by copying
  // out once (STYLE.md rule 5).
  [[nodiscard]] std::byte* data() const { return addr_; }
  [[nodiscard]] size_t pages() const { return pages_; }
  [[nodiscard]] size_t size() const { return pages_ * kPageSize; }
  [[nodiscard]] uint64_t cookie() const { return cookie_; }
  [[nodiscard]] bool valid() const { return addr_ != nullptr; }

 private:
  std::byte* addr_ = nullptr;
  size_t pages_ = 0;
  Unmapper* owner_ = nullptr;
  uint64_t cookie_ = 0;
};

// ---------------------------------------------------------------------------------------
// Event channels (event_channel.h)

class EventChannels {
 public:
  virtual ~EventChannels() = default;
  // Binds a local port to `remote`'s unbound port; returns the local port.
  [[nodiscard]] virtual Result<Port> bind_interdomain(DomId remote, Port remote_port) = 0;
  // Allocates a port that `remote` may bind to.
  [[nodiscard]] virtual Result<Port> alloc_unbound(DomId remote) = 0;
  [[nodiscard]] virtual Result<void> unbind(Port local) = 0;
  [[nodiscard]] virtual Result<void> notify(Port local) = 0;
  [[nodiscard]] virtual Result<void> unmask(Port local) = 0;
  // Readable when a port of this handle is pending.
  [[nodiscard]] virtual int fd() const = 0;
  // The next pending port (now masked until unmask), or nullopt when none is pending.
  // Never blocks.
  [[nodiscard]] virtual Result<std::optional<Port>> pending() = 0;
  [[nodiscard]] virtual Result<void> restrict_to(DomId domid) = 0;
};

// A bound port, unbound on destruction.
class PortBinding {
 public:
  PortBinding() = default;
  PortBinding(EventChannels* ch, Port port) : ch_(ch), port_(port) {}
  PortBinding(PortBinding&& o) noexcept : ch_(std::exchange(o.ch_, nullptr)), port_(o.port_) {}
  PortBinding& operator=(PortBinding&& o) noexcept {
    if (this != &o) {
      reset();
      ch_ = std::exchange(o.ch_, nullptr);
      port_ = o.port_;
    }
    return *this;
  }
  PortBinding(const PortBinding&) = delete;
  PortBinding& operator=(const PortBinding&) = delete;
  ~PortBinding() { reset(); }
  void reset() noexcept;
  [[nodiscard]] Port port() const { return port_; }
  [[nodiscard]] bool valid() const { return ch_ != nullptr; }
  [[nodiscard]] Result<void> notify() const { return ch_->notify(port_); }

 private:
  EventChannels* ch_ = nullptr;
  Port port_;
};

// ---------------------------------------------------------------------------------------
// Grant tables (grant_table.h)

// One segment of a batched grant copy (xengnttab_grant_copy_segment semantics): exactly
// one side is a guest grant, the other local memory. Fits within one granted page.
struct GrantCopySegment {
  enum class Direction { from_guest, to_guest };
  Direction direction;
  DomId domid;
  GrantRef ref;
  uint16_t offset;  // within the granted page
  uint16_t length;  // offset + length <= 4096
  std::byte* local;
  int16_t status = 0;  // GNTST_okay (0) or a negative GNTST_* after the copy
};

class GrantTables {
 public:
  virtual ~GrantTables() = default;
  // Maps `refs` of `domid` contiguously, in order. All or nothing.
  [[nodiscard]] virtual Result<GuestMapping> map_refs(DomId domid, std::span<const GrantRef> refs,
                                                      Access access) = 0;
  // Copies every segment; per-segment status is written back. The call fails only when
  // the batch could not be attempted at all.
  [[nodiscard]] virtual Result<void> copy(std::span<GrantCopySegment> segments) = 0;
  [[nodiscard]] virtual Result<void> set_max_grants(uint32_t count) = 0;
  [[nodiscard]] virtual bool supports_copy() const = 0;
};

// ---------------------------------------------------------------------------------------
// Foreign memory (privileged mapping of guest frames)

class ForeignMemory {
 public:
  virtual ~ForeignMemory() = default;
  // Maps `gfns` of `domid` contiguously, in order. All or nothing.
  [[nodiscard]] virtual Result<GuestMapping> map(DomId domid, std::span<const Gfn> gfns, Access access) = 0;
  // xenforeignmemory_map_resource (e.g. XENMEM_resource_ioreq_server frames).
  [[nodiscard]] virtual Result<GuestMapping> map_resource(DomId domid, unsigned type, unsigned id,
                                                          uint64_t frame, size_t nr_frames,
                                                          Access access) = 0;
  [[nodiscard]] virtual Result<void> restrict_to(DomId domid) = 0;
};

// ---------------------------------------------------------------------------------------
// Device model operations (hvm/dm_op.h)

struct IoreqServerId {
  uint16_t value = 0;  // ioservid_t
};

class DeviceModel {
 public:
  virtual ~DeviceModel() = default;
  [[nodiscard]] virtual Result<IoreqServerId> create_ioreq_server(DomId domid, bool buffered) = 0;
  // Port (in the guest's domain) that each vCPU's ioreq notifies, indexed by vCPU.
  [[nodiscard]] virtual Result<std::vector<Port>> ioreq_server_ports(DomId domid, IoreqServerId id) = 0;
  [[nodiscard]] virtual Result<void> map_io_range(DomId domid, IoreqServerId id, bool mmio,
                                                  uint64_t start, uint64_t end) = 0;
  [[nodiscard]] virtual Result<void> unmap_io_range(DomId domid, IoreqServerId id, bool mmio,
                                                    uint64_t start, uint64_t end) = 0;
  [[nodiscard]] virtual Result<void> set_ioreq_server_state(DomId domid, IoreqServerId id, bool enabled) = 0;
  [[nodiscard]] virtual Result<void> destroy_ioreq_server(DomId domid, IoreqServerId id) = 0;
  [[nodiscard]] virtual Result<void> set_irq_level(DomId domid, uint32_t irq, bool level) = 0;
  [[nodiscard]] virtual Result<void> inject_msi(DomId domid, uint64_t addr, uint32_t data) = 0;
  [[nodiscard]] virtual Result<void> restrict_to(DomId domid) = 0;
};

// ---------------------------------------------------------------------------------------
// The bundle

struct DomainInfo {
  DomId domid;
  bool dying = false;
  bool shutdown = false;
  uint32_t max_vcpu_id = 0;
};

class Xen {
 public:
  virtual ~Xen() = default;
  [[nodiscard]] virtual std::string_view kind() const = 0;  // "real" or "emu"
  [[nodiscard]] virtual XenStore& store() = 0;
  [[nodiscard]] virtual GrantTables& grants() = 0;
  [[nodiscard]] virtual ForeignMemory& foreign() = 0;
  [[nodiscard]] virtual DeviceModel& device_model() = 0;
  // A new event-channel handle, for one loop (one per device or queue, as QEMU does).
  [[nodiscard]] virtual Result<std::unique_ptr<EventChannels>> open_event_channels() = 0;
  // ENOENT when the domain does not exist.
  [[nodiscard]] virtual Result<DomainInfo> domain_info(DomId domid) = 0;
  // Restricts every handle opened so far, and later ones, to `domid` (dm_restrict).
  [[nodiscard]] virtual Result<void> restrict_to(DomId domid) = 0;
};

// Opens the real libraries. Fails with one clear line when there is no hypervisor.
[[nodiscard]] Result<std::unique_ptr<Xen>> open_real();
// Connects to pvhost-xenemu in `rundir`.
[[nodiscard]] Result<std::unique_ptr<Xen>> open_emulated(const std::string& rundir);

}  // namespace pvhost::xen
