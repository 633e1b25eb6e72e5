#include "src/app/process.h"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <charconv>
#include <cstdlib>
#include <optional>

#include <fmt/format.h>

namespace pvhost {

Result<UniqueFd> daemonize() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return fail_errno("daemonize: pipe");
  UniqueFd rd(fds[0]), wr(fds[1]);
  pid_t pid = ::fork();
  if (pid < 0) return fail_errno("daemonize: fork");
  if (pid > 0) {
    wr.reset();
    char c = 0;
    ssize_t n;
    do n = ::read(rd.get(), &c, 1);
    while (n < 0 && errno == EINTR);
    // One byte "R" means ready; EOF means the child failed (it printed why).
    std::_Exit(n == 1 && c == 'R' ? 0 : 1);
  }
  rd.reset();
  if (::setsid() < 0) return fail_errno("daemonize: setsid");
  return wr;
}

void notify_ready(UniqueFd& ready_pipe, KeepStderr keep_stderr) {
  if (!ready_pipe) return;
  int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null >= 0) {
    ::dup2(null, STDIN_FILENO);
    ::dup2(null, STDOUT_FILENO);
    if (keep_stderr == KeepStderr::no) ::dup2(null, STDERR_FILENO);
    ::close(null);
  }
  const char r = 'R';
  (void)::write(ready_pipe.get(), &r, 1);  // the parent exits either way
  ready_pipe.reset();
}

Result<void> write_pidfile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) return fail_errno(fmt::format("-pidfile {}", path));
  return write_all(fd.get(), fmt::format("{}\n", ::getpid()));
}

Result<void> enter_chroot(const std::string& dir) {
  if (::chroot(dir.c_str()) != 0) return fail_errno(fmt::format("-chroot {}", dir));
  if (::chdir("/") != 0) return fail_errno("-chroot: chdir /");
  return {};
}

Result<void> drop_privileges(const std::string& spec) {
  std::string user = spec, group;
  if (auto colon = spec.find(':'); colon != std::string::npos) {
    user = spec.substr(0, colon);
    group = spec.substr(colon + 1);
  }
  auto number = [](const std::string& s) -> std::optional<unsigned> {
    unsigned v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (s.empty() || ec != std::errc() || p != s.data() + s.size()) return std::nullopt;
    return v;
  };
  uid_t uid;
  gid_t gid;
  if (auto n = number(user)) {
    uid = *n;
    gid = *n;
  } else {
    struct passwd* pw = ::getpwnam(user.c_str());
    if (pw == nullptr) return fail(EINVAL, fmt::format("-runas: no user '{}'", user));
    uid = pw->pw_uid;
    gid = pw->pw_gid;
  }
  if (!group.empty()) {
    if (auto n = number(group)) gid = *n;
    else {
      struct group* gr = ::getgrnam(group.c_str());
      if (gr == nullptr) return fail(EINVAL, fmt::format("-runas: no group '{}'", group));
      gid = gr->gr_gid;
    }
  }
  if (::setgroups(0, nullptr) != 0) return fail_errno("-runas: setgroups");
  if (::setgid(gid) != 0) return fail_errno(fmt::format("-runas: setgid {}", gid));
  if (::setuid(uid) != 0) return fail_errno(fmt::format("-runas: setuid {}", uid));
  return {};
}

}  // namespace pvhost
