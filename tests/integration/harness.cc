#include "tests/integration/harness.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>

namespace pvhost::test {

Process Process::spawn(const std::vector<std::string>& argv, const std::string& log_path,
                       const std::vector<std::string>& env) {
  Process p;
  p.log_path_ = log_path;
  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      ::dup2(fd, STDOUT_FILENO);
      ::dup2(fd, STDERR_FILENO);
    }
    int null = ::open("/dev/null", O_RDONLY);
    if (null >= 0) ::dup2(null, STDIN_FILENO);
    for (const auto& e : env) ::putenv(const_cast<char*>(e.c_str()));
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    std::fprintf(stderr, "exec %s failed\n", args[0]);
    ::_exit(127);
  }
  p.pid_ = pid;
  return p;
}

Process::Process(Process&& o) noexcept : pid_(std::exchange(o.pid_, -1)), log_path_(std::move(o.log_path_)) {}
Process& Process::operator=(Process&& o) noexcept {
  if (this != &o) {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    pid_ = std::exchange(o.pid_, -1);
    log_path_ = std::move(o.log_path_);
  }
  return *this;
}
Process::~Process() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
}

void Process::signal(int sig) const {
  if (pid_ > 0) ::kill(pid_, sig);
}

std::optional<int> Process::wait(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return std::nullopt;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    int status = 0;
    pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      return 128 + WTERMSIG(status);
    }
    if (std::chrono::steady_clock::now() > deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

bool Process::running() {
  if (pid_ <= 0) return false;
  int status = 0;
  pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

std::string Process::log() const {
  std::ifstream in(log_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

CommandResult run_command(const std::string& cmd) {
  CommandResult r{};
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return {-1, "popen failed"};
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

bool wait_until(const std::function<bool()>& cond, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

std::string build_path(const std::string& relative) {
  const char* dir = std::getenv("PVHOST_BUILD_DIR");
  return std::string(dir ? dir : ".") + "/" + relative;
}

std::unique_ptr<EmuHost> EmuHost::start() {
  std::unique_ptr<EmuHost> h(new EmuHost());
  char tmpl[] = "/tmp/pvhost-it-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
  h->rundir_ = tmpl;
  h->daemon_ = Process::spawn({build_path(kXenemuBinary), "--rundir", h->rundir_, "--strict"},
                              h->rundir_ + "/xenemu.log");
  if (!wait_until([&] { return ::access((h->rundir_ + "/socket").c_str(), F_OK) == 0 &&
                               ::access((h->rundir_ + "/hv.sock").c_str(), F_OK) == 0; }))
    throw std::runtime_error("pvhost-xenemu did not start: " + h->daemon_.log());
  auto xs = xen::XsClient::open(h->rundir_ + "/socket");
  if (!xs) throw std::runtime_error("xenstore connect: " + xs.error().describe());
  h->xs_ = std::move(*xs);
  return h;
}

EmuHost::~EmuHost() {
  xs_.reset();
  daemon_.signal(SIGTERM);
  (void)daemon_.wait(std::chrono::seconds(5));
  if (!rundir_.empty() && std::getenv("PVHOST_KEEP_RUNDIR") == nullptr)
    (void)run_command("rm -rf '" + rundir_ + "'");
}

DomId EmuHost::create_domain(const std::string& name, unsigned memory_mib) {
  auto r = run_command(fmt::format("{} --rundir {} domain create {} --memory {} --vcpus 1", build_path(kXlBinary),
                                   rundir_, name, memory_mib));
  if (r.status != 0) throw std::runtime_error("domain create: " + r.output);
  return DomId(static_cast<uint16_t>(std::stoul(r.output)));
}

void EmuHost::destroy_domain(DomId d) {
  auto r = run_command(fmt::format("{} --rundir {} domain destroy {}", build_path(kXlBinary), rundir_, d));
  if (r.status != 0) throw std::runtime_error("domain destroy: " + r.output);
}

std::unique_ptr<xen::XsClient> EmuHost::domain_xs(DomId d) {
  auto xs = xen::XsClient::open(fmt::format("{}/domain-{}.sock", rundir_, d));
  if (!xs) throw std::runtime_error("domain xenstore connect: " + xs.error().describe());
  return std::move(*xs);
}

Process EmuHost::start_pvhost(DomId guest, const std::vector<std::string>& args, const std::string& binary) {
  std::vector<std::string> argv{binary.empty() ? build_path("src/app/pvhost") : binary, "-xen-domid",
                                std::to_string(guest.value()), "--xen=emu:" + rundir_, "--log-level", "debug"};
  argv.insert(argv.end(), args.begin(), args.end());
  return Process::spawn(argv, fmt::format("{}/pvhost-{}.log", rundir_, next_log_++));
}

std::string EmuHost::read(const std::string& path) {
  auto v = xs_->read(xen::kNoTransaction, path);
  return v ? *v : std::string();
}

bool EmuHost::wait_for(const std::string& path, const std::string& value, std::chrono::milliseconds timeout) {
  return wait_until([&] { return read(path) == value; }, timeout);
}

}  // namespace pvhost::test
