#include "tests/integration/harness.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>

#include "hw/xen/emu/toolstack/domain.h"

namespace pvhost::test {

using namespace std::chrono_literals;

namespace {

// The last part of a log worth putting in a failure message.
constexpr size_t kLogTail = 6000;

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int exit_status(int wait_status) {
  return WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : 128 + WTERMSIG(wait_status);
}

}  // namespace

Process Process::spawn(const std::vector<std::string>& argv, std::string log_path, std::string out_path) {
  Process p;
  p.log_path_ = std::move(log_path);
  p.out_path_ = std::move(out_path);
  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    int log = ::open(p.log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    int out = p.out_path_.empty() ? log : ::open(p.out_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (out >= 0) ::dup2(out, STDOUT_FILENO);
    if (log >= 0) ::dup2(log, STDERR_FILENO);
    int null = ::open("/dev/null", O_RDONLY);
    if (null >= 0) ::dup2(null, STDIN_FILENO);
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

Process::Process(Process&& o) noexcept
    : pid_(std::exchange(o.pid_, -1)), status_(o.status_), log_path_(std::move(o.log_path_)),
      out_path_(std::move(o.out_path_)) {}

Process& Process::operator=(Process&& o) noexcept {
  if (this != &o) {
    kill_now();
    pid_ = std::exchange(o.pid_, -1);
    status_ = o.status_;
    log_path_ = std::move(o.log_path_);
    out_path_ = std::move(o.out_path_);
  }
  return *this;
}

Process::~Process() { kill_now(); }

void Process::signal(int sig) const {
  if (pid_ > 0 && !status_) ::kill(pid_, sig);
}

void Process::kill_now() {
  if (pid_ > 0 && !status_) {
    ::kill(pid_, SIGKILL);
    int st = 0;
    ::waitpid(pid_, &st, 0);
    status_ = exit_status(st);
  }
}

bool Process::running() {
  if (pid_ <= 0 || status_) return false;
  int st = 0;
  if (::waitpid(pid_, &st, WNOHANG) == pid_) {
    status_ = exit_status(st);
    return false;
  }
  return true;
}

std::optional<int> Process::wait(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (running()) {
    if (std::chrono::steady_clock::now() > deadline) return std::nullopt;
    std::this_thread::sleep_for(5ms);
  }
  return status_;
}

std::string Process::log() const { return slurp(log_path_); }
std::string Process::out() const { return slurp(out_path_); }

CommandResult run_command(const std::string& cmd) {
  CommandResult r{};
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return {-1, "popen failed"};
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  r.status = exit_status(::pclose(p));
  return r;
}

bool poll_until(const std::function<bool()>& cond, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

std::string build_path(const std::string& relative) {
  const char* dir = std::getenv("PVHOST_BUILD_DIR");
  return std::string(dir ? dir : ".") + "/" + relative;
}

std::string pvhost_binary() {
  const char* bin = std::getenv("PVHOST_BIN");
  return bin ? std::string(bin) : build_path("src/app/pvhost");
}

TempDir::TempDir(std::string path_template) : path_(std::move(path_template)) {
  if (::mkdtemp(path_.data()) == nullptr) throw std::runtime_error("mkdtemp " + path_ + " failed");
}

TempDir::~TempDir() {
  if (std::getenv("PVHOST_KEEP_RUNDIR") != nullptr) return;
  std::error_code ec;
  // A temp directory: what cannot be removed is left behind, harmlessly.
  std::filesystem::remove_all(path_, ec);
}

std::unique_ptr<EmuHost> EmuHost::start() { return std::unique_ptr<EmuHost>(new EmuHost()); }

EmuHost::EmuHost() : rundir_("/tmp/pvhost-it-XXXXXX") {
  log_files_.push_back(rundir() + "/xenemu.log");
  daemon_ = Process::spawn({build_path(kXenemuBinary), "--rundir", rundir(), "--strict"}, log_files_.back());
  // xenstored (RUNDIR/socket) and the broker (RUNDIR/hv.sock) accept connections once the
  // daemon is up; a socket file can appear a moment before it is listened on, so retry.
  std::string error = "no connection yet";
  if (!poll_until([&] {
        if (!xs_) {
          auto xs = xen::XsClient::open(rundir() + "/socket");
          if (!xs) {
            error = "xenstore: " + xs.error().describe();
            return false;
          }
          xs_ = std::move(*xs);
        }
        auto ts = xenemu::Toolstack::connect(rundir());
        if (!ts) {
          error = "toolstack: " + ts.error().describe();
          return false;
        }
        ts_ = std::move(*ts);
        return true;
      }))
    throw std::runtime_error(fmt::format("pvhost-xenemu did not start ({}): {}", error, daemon_.log()));
}

EmuHost::~EmuHost() {
  ts_.reset();
  xs_.reset();
  daemon_.signal(SIGTERM);
  // Killed by daemon_'s destructor if it did not stop in time; the status does not matter.
  (void)daemon_.wait(5s);
}

DomId EmuHost::create_domain(const xenemu::DomainConfig& config) {
  auto d = xenemu::domain_create(*ts_, *xs_, config);
  if (!d) throw std::runtime_error("domain create: " + d.error().describe());
  return *d;
}

DomId EmuHost::create_domain(const std::string& name, unsigned memory_mib) {
  return create_domain(xenemu::DomainConfig{.name = name, .memory_mib = memory_mib});
}

void EmuHost::destroy_domain(DomId d) {
  auto r = xenemu::domain_destroy(*ts_, *xs_, d);
  if (!r) throw std::runtime_error("domain destroy: " + r.error().describe());
}

std::unique_ptr<xen::XsClient> EmuHost::domain_xs(DomId d) {
  auto xs = xen::XsClient::open(fmt::format("{}/domain-{}.sock", rundir(), d));
  if (!xs) throw std::runtime_error("domain xenstore connect: " + xs.error().describe());
  return std::move(*xs);
}

Process EmuHost::start_pvhost(DomId guest, const std::vector<std::string>& args, const std::string& binary) {
  std::vector<std::string> argv{binary.empty() ? pvhost_binary() : binary, "-xen-domid", std::to_string(guest.value()),
                                "--xen=emu:" + rundir(), "--log-level", "debug"};
  argv.insert(argv.end(), args.begin(), args.end());
  return spawn("pvhost", argv);
}

Process EmuHost::spawn(const std::string& name, const std::vector<std::string>& argv, Stdout out) {
  const std::string base = fmt::format("{}/{}-{}", rundir(), name, next_log_++);
  log_files_.push_back(base + ".log");
  return Process::spawn(argv, log_files_.back(), out == Stdout::own_file ? base + ".out" : "");
}

std::string EmuHost::read(const std::string& path) {
  auto v = xs_->read(xen::kNoTransaction, path);
  return v ? *v : std::string();
}

bool EmuHost::wait_for(const std::string& path, const std::string& value, std::chrono::milliseconds timeout) {
  return poll_until([&] { return read(path) == value; }, timeout);
}

std::string EmuHost::logs() const {
  std::string all;
  for (const auto& f : log_files_) {
    std::string text = slurp(f);
    if (text.size() > kLogTail) text = "...\n" + text.substr(text.size() - kLogTail);
    all += "==== " + f + "\n" + text + "\n";
  }
  return all;
}

GuestEnv::GuestEnv(const xenemu::DomainConfig& domain, std::string backend)
    : domid_(create_domain(domain)), backend_(std::move(backend)) {}

toolstack::DeviceAddress GuestEnv::add_device(std::map<std::string, std::string> settings) {
  auto a = toolstack::device_add(xs(), {backend_, domid_, DomId(0), std::move(settings)});
  if (!a) throw std::runtime_error("device_add: " + a.error().describe());
  return *a;
}

void GuestEnv::start_pvhost(const std::vector<std::string>& extra) {
  std::vector<std::string> args{"-backends", backend_};
  args.insert(args.end(), extra.begin(), extra.end());
  pvhost_ = EmuHost::start_pvhost(domid_, args);
}

Process GuestEnv::start_frontend(const std::string& name, const std::vector<std::string>& args, Stdout out) {
  std::vector<std::string> argv{build_path(fmt::format("tests/frontends/{}/{}", name, name)), "--rundir", rundir(),
                                "--domid", std::to_string(domid_.value())};
  argv.insert(argv.end(), args.begin(), args.end());
  return spawn(name, argv, out);
}

}  // namespace pvhost::test
