// The command line: QEMU's options as libxl 4.17 passes them to a PV device model
// (shared/reference/libxl-4.17-pv/dm-argv-create.txt), plus pvhost's own. Parsed at the
// edge into a typed struct (STYLE.md rule 4); anything not understood is refused with an
// error that names the option and the reason.
#pragma once

#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "src/error.h"
#include "src/types.h"

namespace pvhost {

// "a=1,b=2" in QEMU's syntax (",," is a literal comma). A first element without "=" is
// stored under `implied_key` (e.g. "socket,id=x" -> backend=socket).
struct KeyValues {
  std::vector<std::pair<std::string, std::string>> items;
  [[nodiscard]] std::optional<std::string> get(std::string_view key) const;
  [[nodiscard]] bool has(std::string_view key) const { return get(key).has_value(); }
};
[[nodiscard]] Result<KeyValues> parse_key_values(std::string_view text, std::string_view implied_key);
// QEMU booleans: on/off, yes/no, true/false; an empty value (bare "server") is on.
[[nodiscard]] Result<bool> parse_bool(std::string_view key, std::string_view value);

struct ChardevOptions {
  std::string id;
  std::string backend;           // socket, pty, file, null, stdio
  std::optional<std::string> path;  // socket path / file path
  bool server = false;
  bool wait = true;
};

struct MonitorOptions {
  std::string chardev;  // id of a ChardevOptions
  std::string mode = "readline";  // "control" is QMP
};

enum class XenMode { automatic, real, emulated };

struct Options {
  bool help = false;
  bool version = false;
  bool list_backends = false;          // -backends help

  std::optional<DomId> domid;          // -xen-domid
  bool xen_attach = false;             // -xen-attach (PV: always attaching)
  bool domid_restrict = false;         // -xen-domid-restrict
  bool no_shutdown = false;            // -no-shutdown
  bool start_paused = false;           // -S
  bool daemonize = false;              // -daemonize
  std::string name;                    // -name
  std::optional<uint64_t> memory_mib;  // -m
  std::vector<ChardevOptions> chardevs;
  std::vector<MonitorOptions> monitors;  // -mon, and -qmp as an implied chardev
  std::optional<std::string> vnc;        // -vnc DISPLAY[,opts]; nullopt: no VNC
  std::optional<std::string> keymap;     // -k
  std::string pidfile;
  std::string runas;
  std::string chroot_dir;
  std::string log_file;                // -D
  std::string log_level = "info";      // --log-level
  std::vector<std::string> backends;   // -backends; empty = every compiled-in type
  bool peer = false;                   // -peer: another pvhost is this guest's primary
  XenMode xen = XenMode::automatic;    // --xen
  std::string emu_rundir;              // --xen=emu:DIR
  std::vector<std::string> ignored;    // accepted-and-ignored options, for the log
};

// argv[0] is the program name.
[[nodiscard]] Result<Options> parse_command_line(std::span<const std::string> argv);
[[nodiscard]] std::string usage_text();

}  // namespace pvhost
