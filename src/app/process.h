// Process-level chores from QEMU's option set: -daemonize (the parent returns once the
// child is ready), -pidfile, -chroot, -runas.
#pragma once

#include <string>

#include "src/error.h"
#include "src/fd.h"

namespace pvhost {

// Forks. In the parent, waits until the child calls notify_ready() (exit 0) or dies
// (exit 1) and never returns. In the child, returns the write end of the readiness pipe.
[[nodiscard]] Result<UniqueFd> daemonize();
// Detaches stdin/stdout (and stderr unless it is still the log) and tells the waiting
// parent that we are ready. A daemon that kept its caller's stderr pipe open would make
// `out=$(pvhost -daemonize ...)` wait for it forever.
enum class KeepStderr { no, yes };
void notify_ready(UniqueFd& ready_pipe, KeepStderr keep_stderr);
[[nodiscard]] Result<void> write_pidfile(const std::string& path);
// chroot(dir) then chdir("/").
[[nodiscard]] Result<void> enter_chroot(const std::string& dir);
// USER or USER:GROUP (names or numbers): setgroups, setgid, setuid.
[[nodiscard]] Result<void> drop_privileges(const std::string& spec);

}  // namespace pvhost
