// Registers the `console` backend type (STYLE.md rule 3).
#include "backends/console/console_device.h"
#include "src/device/registry.h"

namespace pvhost {

// With an explicit ConsoleHost (tests, or a main that owns one).
void register_console_backends(Registry& r, console::ConsoleHost& host) {
  r.add(BackendType{
      "console",
      "PV console (primary and secondary) to pty, unix socket, file, log or -chardev",
      {
          {"frontend", true, "frontend path"},
          {"frontend-id", true, "frontend domain"},
          {"protocol", false, "vt100"},
          {"output", false, "overrides the frontend output: pty, null, file:P, log:P, unix:P,server, chardev:ID"},
          {"log", false, "extra file with the guest's output as timestamped lines"},
      },
      [&host](DeviceContext ctx) -> Result<std::unique_ptr<XenDevice>> {
        return std::make_unique<console::ConsoleDevice>(std::move(ctx), host);
      },
      // Consoles of type xenconsoled (and any without a type) belong to xenconsoled and are
      // never touched; "ioemu" is the device model's (QEMU's con_init does the same).
      [](xen::XenStore& xs, const DeviceContext& ctx) {
        auto type = xen::read_optional(xs, xen::kNoTransaction, ctx.frontend_path + "/type");
        return type && *type && **type == "ioemu";
      },
  });
}

// The built-in registration: the process's ConsoleHost (console_host.h says how main.cc
// hands it the -chardev list and the QMP chardev sink).
void register_console_backends(Registry& r) { register_console_backends(r, console::process_console_host()); }

}  // namespace pvhost
