// The PV console backend device (type `console`, frontend `type` = "ioemu").
//
// Control plane: realize() parses the keys (config.h), opens the host end (host_end.h) and
// writes the pty path into the frontend `tty` node; connect() maps the ring and binds the
// guest's port; disconnect() unbinds and unmaps. The host end and the unsent output survive
// frontend reconnects.
//
// Primary vs secondary (docs/misc/console.txt):
//   * secondary consoles (/local/domain/N/device/console/<n>) are ordinary xenbus devices:
//     ring-ref is a grant, the frontend walks the xenbus states (Linux hvc_xen's
//     xencons_connect_backend writes ring-ref, port, then Initialised).
//   * the primary console (/local/domain/N/console) is set up by the domain builder before
//     the guest runs: ring-ref is a guest frame (mapped with ForeignMemory, as QEMU's
//     con_initialise and xenconsoled do), and there is no frontend `state` node. We watch
//     ring-ref and port and connect as soon as both exist, ignoring the (absent) state, as
//     QEMU's legacy backends do for DEVOPS_FLAG_IGNORE_STATE.
//
// Data plane (main loop; a console is not busy enough for an I/O thread): pump() drains the
// whole `out` ring into the OutputBuffer (bounded by `limit`, drop-middle) and writes the
// buffer to the host end as fast as it takes it; host input is read only as far as `in` has
// room, and the host fd is not polled while `in` is full (resumed by the guest's next
// notification). A hostile index closes the device (STYLE.md rule 7).
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "backends/console/config.h"
#include "backends/console/console_host.h"
#include "backends/console/host_end.h"
#include "backends/console/output_buffer.h"
#include "src/device/xen_device.h"

namespace pvhost::console {

struct ConsoleCounters {
  uint64_t bytes_out = 0;       // guest -> host, drained from `out`
  uint64_t bytes_in = 0;        // host -> guest, written into `in`
  uint64_t connects = 0;        // frontend connections
  uint64_t protocol_errors = 0;
};

class ConsoleDevice final : public XenDevice {
 public:
  ConsoleDevice(DeviceContext ctx, ConsoleHost& host);
  ~ConsoleDevice() override;

  [[nodiscard]] nlohmann::json describe() const override;
  void quiesce(std::function<void()> done) override;
  void resume() override;

  [[nodiscard]] bool primary() const { return primary_; }

 protected:
  Result<void> realize() override;
  void frontend_changed(XenbusState state) override;
  Result<void> connect() override;
  void disconnect() override;
  void unrealize() override;

 private:
  // Per-connection resources: exist only while connected (STYLE.md rule 13). Declaration
  // order is teardown order reversed: the fd watch goes first, then the port is unbound,
  // then the event-channel handle closes, then the ring is unmapped.
  struct Live {
    xen::GuestMapping ring;
    std::unique_ptr<xen::EventChannels> evtchn;
    xen::PortBinding port;
    EventLoop::Watch watch;
  };

  [[nodiscard]] Result<OutputSpec> resolve_output();
  void try_connect_primary();
  void on_event();
  void pump();
  void flush_output();
  void defer_pump();
  void protocol_violation(Error e);

  ConsoleHost& host_;
  const bool primary_;
  std::string label_;
  OutputBuffer buffer_{kDefaultLimit};
  std::unique_ptr<HostEnd> end_;
  std::unique_ptr<HostEnd> log_end_;  // backend `log` key: an extra timestamped copy
  std::vector<std::byte> in_pending_;  // host bytes read but not yet in `in`
  std::optional<Live> live_;
  bool quiesced_ = false;
  ConsoleCounters counters_;
  ConsoleHost::Entry chardev_;
  xen::XenStore::Watch ring_ref_watch_;  // primary only
  xen::XenStore::Watch port_watch_;      // primary only
  EventLoop::Timer again_;               // resumes a pump cut short for fairness
  std::shared_ptr<int> alive_ = std::make_shared<int>(0);  // guards deferred calls
};

}  // namespace pvhost::console
