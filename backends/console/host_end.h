// The host side of a console: where the guest's output goes and its input comes from.
// One per console, created at realize and kept across frontend reconnects (a pty path or a
// socket stays the same for `xl console` and for clients).
//
//   pty      posix_openpt master, non-blocking; we keep a slave fd open ourselves (as
//            xenconsoled does) so the slave is in raw mode for every reader and never
//            hangs up: output written while nobody reads waits in the tty buffer, then in
//            our OutputBuffer (bounded by `limit`).
//   socket   a listening unix socket; one client at a time (later ones wait in the backlog
//            until the current one leaves); output waits while no client is there.
//   file     appended; never readable.
//   log      appended as timestamped lines (LineStamper); never readable.
//   null     output discarded; never readable.
//
// Flow control is the caller's: write() takes what the end accepts now (0: try again when
// `writable` fires, after want_write(true)); read() gives at most what was asked, so a caller
// never reads more than the guest's `in` ring can take, and stops asking (want_read(false))
// while the ring is full. Everything runs on one loop.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "backends/console/config.h"
#include "src/event_loop.h"
#include "src/fd.h"

namespace pvhost::console {

class HostEnd {
 public:
  struct Events {
    std::function<void()> readable;  // read() may return data
    std::function<void()> writable;  // write() may take data
    std::function<void()> changed;   // a client connected or left
  };
  virtual ~HostEnd() = default;

  // QEMU's query-chardev `filename`: "pty:/dev/pts/3", "unix:/run/c.sock,server=on",
  // "file:/var/log/c.log", "null".
  [[nodiscard]] virtual std::string filename() const = 0;
  // The pty's slave path, for the frontend `tty` node.
  [[nodiscard]] virtual std::optional<std::string> tty_path() const { return std::nullopt; }
  // Whether someone is there to read what we write (a socket client).
  [[nodiscard]] virtual bool peer_connected() const { return true; }
  // Bytes accepted now (0: would block, or nobody to take them).
  [[nodiscard]] virtual size_t write(std::span<const std::byte> bytes) = 0;
  // Bytes read now, at most dst.size() (0: nothing available).
  [[nodiscard]] virtual size_t read(std::span<std::byte> dst) = 0;
  virtual void want_read(bool) {}
  virtual void want_write(bool) {}
  // Clients accepted after the first (sockets).
  [[nodiscard]] virtual uint64_t reconnects() const { return 0; }
};

[[nodiscard]] Result<std::unique_ptr<HostEnd>> open_host_end(const OutputSpec& spec, EventLoop& loop,
                                                             HostEnd::Events events);

}  // namespace pvhost::console
