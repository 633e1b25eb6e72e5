#include "src/cli.h"

#include <charconv>

#include <fmt/format.h>

namespace pvhost {
namespace {

Result<uint64_t> parse_u64(std::string_view opt, std::string_view v) {
  uint64_t out = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (v.empty() || ec != std::errc() || p != v.data() + v.size())
    return fail(EINVAL, fmt::format("{}: '{}' is not a non-negative integer", opt, v));
  return out;
}

// -m accepts "768", "768M", "1G", or "size=768".
Result<uint64_t> parse_memory(std::string_view v) {
  if (v.starts_with("size=")) v.remove_prefix(5);
  uint64_t scale = 1;
  if (!v.empty()) {
    switch (v.back()) {
      case 'M': case 'm': scale = 1; v.remove_suffix(1); break;
      case 'G': case 'g': scale = 1024; v.remove_suffix(1); break;
      default: break;
    }
  }
  return PVHOST_TRY(parse_u64("-m", v)) * scale;
}

Result<ChardevOptions> parse_chardev(std::string_view text) {
  KeyValues kv = PVHOST_TRY(with_context(parse_key_values(text, "backend"), "-chardev"));
  ChardevOptions c;
  c.backend = kv.get("backend").value_or("");
  c.id = kv.get("id").value_or("");
  if (c.id.empty()) return fail(EINVAL, fmt::format("-chardev {}: missing id=", text));
  for (const auto& [k, v] : kv.items) {
    if (k == "backend" || k == "id") continue;
    if (k == "path") c.path = v;
    else if (k == "server") c.server = PVHOST_TRY(parse_bool("-chardev server", v));
    else if (k == "wait") c.wait = PVHOST_TRY(parse_bool("-chardev wait", v));
    else if (k == "nowait") c.wait = false;  // legacy spelling "server,nowait"
    else if (k == "logfile" || k == "logappend" || k == "mux" || k == "signal") continue;  // no effect on PV
    else return fail(EINVAL, fmt::format("-chardev {}: unsupported property '{}'", c.id, k));
  }
  if (c.backend == "socket") {
    if (!c.path) return fail(EINVAL, fmt::format("-chardev {}: socket needs path= (unix sockets only)", c.id));
    if (!c.server) return fail(EINVAL, fmt::format("-chardev {}: only server=on sockets are supported", c.id));
  } else if (c.backend == "file") {
    if (!c.path) return fail(EINVAL, fmt::format("-chardev {}: file needs path=", c.id));
  } else if (c.backend != "pty" && c.backend != "null") {
    return fail(EINVAL, fmt::format("-chardev {}: unsupported backend '{}' (socket, pty, file, null)", c.id, c.backend));
  }
  return c;
}

constexpr std::string_view kUsage = R"(usage: pvhost [options]

pvhost serves Xen PV backends (qdisk, console, vfb/vkbd, qnic, virtio) for one guest.
It accepts the options libxl gives a PV device model (device_model_override=).

pvhost options:
  -backends LIST        backend types to serve, comma separated (default: all built in);
                        '-backends help' lists them
  --xen=real|emu[:DIR]|auto
                        hypervisor: the real Xen libraries, or pvhost-xenemu in DIR
                        (default auto: real if /dev/xen/privcmd exists, else emu with
                        $PVHOST_XENEMU_DIR)
  -peer                 serve as a peer: another pvhost process is this guest's primary
                        (owns device-model/<domid>/state); this one announces its QMP
                        socket under device-model/<domid>/peers/<name>
  -D FILE               log to FILE instead of stderr
  --log-level LEVEL     trace, debug, info, warning, error (default info)
  -h, --help            this text
  --version             print the version

QEMU options (as libxl passes them):
  -xen-domid N          the guest's domain id (required)
  -xen-attach           attach to an existing domain (always the case for PV)
  -xen-domid-restrict   restrict Xen handles to the guest after start-up
  -name NAME            guest name (query-name)
  -chardev socket,id=ID,path=PATH,server=on,wait=off   a unix socket (for -mon)
  -chardev pty,id=ID | file,id=ID,path=P | null,id=ID  console/channel outputs
  -mon chardev=ID,mode=control                          a QMP monitor on that chardev
  -qmp unix:PATH,server=on,wait=off                     a QMP monitor on a new socket
  -vnc DISPLAY[,...]    VNC server for the vfb backend ('none' disables)
  -k KEYMAP             VNC keymap
  -S                    start paused (device-model state waits for 'cont')
  -daemonize            detach once ready
  -pidfile FILE         write the pid to FILE
  -runas USER[:GROUP]   drop privileges after start-up
  -chroot DIR           chroot after start-up
  -m SIZE               guest memory (MiB), informational
Accepted and ignored (no meaning for a PV device model): -no-shutdown, -nodefaults,
  -no-user-config, -nographic, -display none, -machine/-M xenpv, -serial none,
  -monitor none, -parallel none.
)";

}  // namespace

std::optional<std::string> KeyValues::get(std::string_view key) const {
  for (const auto& [k, v] : items)
    if (k == key) return v;
  return std::nullopt;
}

Result<KeyValues> parse_key_values(std::string_view text, std::string_view implied_key) {
  KeyValues kv;
  // Split on single commas; ",," stands for a literal comma (QEMU option syntax).
  std::vector<std::string> parts(1);
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == ',') {
      if (i + 1 < text.size() && text[i + 1] == ',') {
        parts.back() += ',';
        ++i;
      } else {
        parts.emplace_back();
      }
    } else {
      parts.back() += text[i];
    }
  }
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::string& p = parts[i];
    auto eq = p.find('=');
    if (eq == std::string::npos) {
      if (i == 0 && !implied_key.empty()) kv.items.emplace_back(std::string(implied_key), p);
      else if (p.empty()) return fail(EINVAL, fmt::format("empty element in '{}'", text));
      else kv.items.emplace_back(p, "");  // bare flag, e.g. "server"
    } else {
      if (eq == 0) return fail(EINVAL, fmt::format("'{}': missing key before '='", p));
      kv.items.emplace_back(p.substr(0, eq), p.substr(eq + 1));
    }
  }
  return kv;
}

Result<bool> parse_bool(std::string_view key, std::string_view v) {
  if (v.empty() || v == "on" || v == "yes" || v == "true") return true;
  if (v == "off" || v == "no" || v == "false") return false;
  return fail(EINVAL, fmt::format("{}: '{}' is not a boolean (on/off)", key, v));
}

std::string usage_text() { return std::string(kUsage); }

Result<Options> parse_command_line(std::span<const std::string> argv) {
  Options o;
  size_t qmp_count = 0;
  for (size_t i = 1; i < argv.size(); ++i) {
    std::string opt = argv[i];
    std::optional<std::string> inline_value;
    // QEMU accepts "-opt" and "--opt"; ours also take "--opt=value".
    if (opt.starts_with("--")) opt.erase(0, 1);
    if (auto eq = opt.find('='); eq != std::string::npos && opt.starts_with("-")) {
      inline_value = opt.substr(eq + 1);
      opt.resize(eq);
    }
    auto value = [&]() -> Result<std::string> {
      if (inline_value) return *inline_value;
      if (i + 1 >= argv.size()) return fail(EINVAL, fmt::format("{}: missing argument", opt));
      return argv[++i];
    };
    auto no_value = [&]() -> Result<void> {
      if (inline_value) return fail(EINVAL, fmt::format("{} takes no argument", opt));
      return {};
    };

    if (opt == "-h" || opt == "-help") {
      o.help = true;
    } else if (opt == "-version") {
      o.version = true;
    } else if (opt == "-xen-domid") {
      std::string v = PVHOST_TRY(value());
      uint64_t d = PVHOST_TRY(parse_u64("-xen-domid", v));
      // DOMID_FIRST_RESERVED (0x7FF0): ids above are special, never a guest.
      if (d >= 0x7FF0) return fail(EINVAL, fmt::format("-xen-domid: {} is not a guest domain id", d));
      o.domid = DomId(static_cast<uint16_t>(d));
    } else if (opt == "-xen-attach") {
      PVHOST_TRY(no_value());
      o.xen_attach = true;
    } else if (opt == "-xen-domid-restrict") {
      PVHOST_TRY(no_value());
      o.domid_restrict = true;
    } else if (opt == "-no-shutdown") {
      PVHOST_TRY(no_value());
      o.no_shutdown = true;  // a PV device model never shuts the guest down; nothing to change
    } else if (opt == "-S") {
      PVHOST_TRY(no_value());
      o.start_paused = true;
    } else if (opt == "-daemonize") {
      PVHOST_TRY(no_value());
      o.daemonize = true;
    } else if (opt == "-name") {
      std::string v = PVHOST_TRY(value());
      // QEMU's "-name guest=NAME,debug-threads=on" form.
      KeyValues kv = PVHOST_TRY(with_context(parse_key_values(v, "guest"), "-name"));
      o.name = kv.get("guest").value_or(v);
    } else if (opt == "-m") {
      o.memory_mib = PVHOST_TRY(parse_memory(PVHOST_TRY(value())));
    } else if (opt == "-chardev") {
      ChardevOptions c = PVHOST_TRY(parse_chardev(PVHOST_TRY(value())));
      for (const auto& other : o.chardevs)
        if (other.id == c.id) return fail(EINVAL, fmt::format("-chardev: duplicate id '{}'", c.id));
      o.chardevs.push_back(std::move(c));
    } else if (opt == "-mon") {
      std::string mon_text = PVHOST_TRY(value());
      KeyValues kv = PVHOST_TRY(with_context(parse_key_values(mon_text, "chardev"), "-mon"));
      MonitorOptions m;
      m.chardev = kv.get("chardev").value_or("");
      m.mode = kv.get("mode").value_or("readline");
      for (const auto& [k, v] : kv.items)
        if (k != "chardev" && k != "mode" && k != "pretty")
          return fail(EINVAL, fmt::format("-mon: unsupported property '{}'", k));
      if (m.chardev.empty()) return fail(EINVAL, "-mon: missing chardev=");
      if (m.mode != "control")
        return fail(EINVAL, fmt::format("-mon {}: mode '{}' is not supported (only mode=control, QMP)", m.chardev, m.mode));
      o.monitors.push_back(std::move(m));
    } else if (opt == "-qmp") {
      std::string v = PVHOST_TRY(value());
      if (v == "none") continue;
      KeyValues kv = PVHOST_TRY(with_context(parse_key_values(v, "target"), "-qmp"));
      std::string target = kv.get("target").value_or("");
      if (!target.starts_with("unix:"))
        return fail(EINVAL, fmt::format("-qmp {}: only unix:PATH sockets are supported", v));
      ChardevOptions c;
      c.id = fmt::format("compat_monitor{}", qmp_count++);
      c.backend = "socket";
      c.path = target.substr(5);
      c.server = false;
      c.wait = true;
      for (const auto& [k, val] : kv.items) {
        if (k == "target") continue;
        if (k == "server") c.server = PVHOST_TRY(parse_bool("-qmp server", val));
        else if (k == "wait") c.wait = PVHOST_TRY(parse_bool("-qmp wait", val));
        else if (k == "nowait") c.wait = false;
        else return fail(EINVAL, fmt::format("-qmp: unsupported property '{}'", k));
      }
      if (!c.server) return fail(EINVAL, fmt::format("-qmp {}: only server=on sockets are supported", v));
      o.monitors.push_back({c.id, "control"});
      o.chardevs.push_back(std::move(c));
    } else if (opt == "-vnc") {
      std::string v = PVHOST_TRY(value());
      if (v == "none") o.vnc.reset();
      else o.vnc = v;
    } else if (opt == "-k") {
      o.keymap = PVHOST_TRY(value());
    } else if (opt == "-pidfile") {
      o.pidfile = PVHOST_TRY(value());
    } else if (opt == "-runas") {
      o.runas = PVHOST_TRY(value());
    } else if (opt == "-chroot") {
      o.chroot_dir = PVHOST_TRY(value());
    } else if (opt == "-D") {
      o.log_file = PVHOST_TRY(value());
    } else if (opt == "-log-level") {
      o.log_level = PVHOST_TRY(value());
    } else if (opt == "-backends") {
      std::string v = PVHOST_TRY(value());
      if (v == "help") {
        o.list_backends = true;
        continue;
      }
      o.backends.clear();
      KeyValues kv = PVHOST_TRY(parse_key_values(v, ""));
      for (const auto& [k, val] : kv.items) {
        if (!val.empty() || k.empty()) return fail(EINVAL, fmt::format("-backends: '{}' is not a backend type name", v));
        o.backends.push_back(k);
      }
    } else if (opt == "-peer") {
      PVHOST_TRY(no_value());
      o.peer = true;
    } else if (opt == "-xen") {
      std::string v = PVHOST_TRY(value());
      if (v == "real") o.xen = XenMode::real;
      else if (v == "auto") o.xen = XenMode::automatic;
      else if (v == "emu" || v.starts_with("emu:")) {
        o.xen = XenMode::emulated;
        if (v.size() > 4) o.emu_rundir = v.substr(4);
      } else {
        return fail(EINVAL, fmt::format("--xen: '{}' is not real, emu[:DIR] or auto", v));
      }
    } else if (opt == "-nodefaults" || opt == "-no-user-config" || opt == "-nographic") {
      PVHOST_TRY(no_value());
      o.ignored.push_back(opt);
    } else if (opt == "-display") {
      std::string v = PVHOST_TRY(value());
      if (v != "none") return fail(EINVAL, fmt::format("-display {}: only 'none' (use -vnc for the framebuffer)", v));
      o.ignored.push_back(opt + " " + v);
    } else if (opt == "-machine" || opt == "-M") {
      std::string v = PVHOST_TRY(value());
      KeyValues kv = PVHOST_TRY(with_context(parse_key_values(v, "type"), opt));
      std::string type = kv.get("type").value_or("");
      if (type != "xenpv")
        return fail(EINVAL, fmt::format("{} {}: pvhost only serves the xenpv machine", opt, v));
      o.ignored.push_back(opt + " " + v);
    } else if (opt == "-serial" || opt == "-monitor" || opt == "-parallel") {
      std::string v = PVHOST_TRY(value());
      if (v != "none")
        return fail(EINVAL, fmt::format("{} {}: a PV device model has no {}; only 'none' is accepted", opt, v, opt.substr(1)));
      o.ignored.push_back(opt + " " + v);
    } else if (!opt.starts_with("-")) {
      return fail(EINVAL, fmt::format("unexpected argument '{}'", argv[i]));
    } else {
      return fail(EINVAL, fmt::format("unknown option '{}' (see pvhost --help)", argv[i]));
    }
  }
  for (const MonitorOptions& m : o.monitors) {
    auto it = std::find_if(o.chardevs.begin(), o.chardevs.end(), [&](const auto& c) { return c.id == m.chardev; });
    if (it == o.chardevs.end()) return fail(EINVAL, fmt::format("-mon: no -chardev with id '{}'", m.chardev));
    if (it->backend != "socket") return fail(EINVAL, fmt::format("-mon: chardev '{}' is not a socket", m.chardev));
  }
  return o;
}

}  // namespace pvhost
