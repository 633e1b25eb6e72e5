#include "tests/integration/block/block_env.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "hw/xen/emu/toolstack/domain.h"

namespace pvhost::blktest {
using namespace std::chrono_literals;

namespace {
std::string env_or(const char* name, const std::string& def) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : def;
}
std::string build_dir() { return env_or("PVHOST_BUILD_DIR", "."); }
std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}
}  // namespace

Child::Child(const std::vector<std::string>& argv, std::string out_path, std::string err_path)
    : out_path_(std::move(out_path)), err_path_(std::move(err_path)) {
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    int out = ::open(out_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    int err = ::open(err_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (out >= 0) ::dup2(out, 1);
    if (err >= 0) ::dup2(err, 2);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
}
Child::Child(Child&& o) noexcept
    : pid_(std::exchange(o.pid_, -1)), status_(o.status_), out_path_(std::move(o.out_path_)),
      err_path_(std::move(o.err_path_)) {}
Child& Child::operator=(Child&& o) noexcept {
  if (this != &o) {
    kill_now();
    pid_ = std::exchange(o.pid_, -1);
    status_ = o.status_;
    out_path_ = std::move(o.out_path_);
    err_path_ = std::move(o.err_path_);
  }
  return *this;
}
Child::~Child() { kill_now(); }
void Child::kill_now() {
  if (pid_ > 0 && !status_) {
    ::kill(pid_, SIGKILL);
    int st = 0;
    ::waitpid(pid_, &st, 0);
    status_ = 128 + SIGKILL;
  }
}
bool Child::running() {
  if (pid_ <= 0 || status_) return false;
  int st = 0;
  if (::waitpid(pid_, &st, WNOHANG) == pid_) {
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return false;
  }
  return true;
}
std::optional<int> Child::wait(std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (running()) {
    if (std::chrono::steady_clock::now() > end) return std::nullopt;
    std::this_thread::sleep_for(5ms);
  }
  return status_;
}
std::string Child::out() const { return slurp(out_path_); }
std::string Child::err() const { return slurp(err_path_); }

bool poll_until(const std::function<bool()>& cond, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

nlohmann::json last_json(const std::string& out) {
  std::istringstream in(out);
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty() && line[0] == '{') last = line;
  if (last.empty()) return {{"ok", false}, {"error", "no JSON output"}};
  auto j = nlohmann::json::parse(last, nullptr, false);
  if (j.is_discarded()) return {{"ok", false}, {"error", "bad JSON: " + last}};
  return j;
}

BlockEnv::BlockEnv(uint32_t memory_mib) {
  rundir_ = "/tmp/pvhost-blk-XXXXXX";
  if (::mkdtemp(rundir_.data()) == nullptr) throw std::runtime_error("mkdtemp");
  // Images on a disk-backed file system so O_DIRECT is exercised (/tmp may be tmpfs).
  imgdir_ = "/var/tmp/pvhost-blkimg-XXXXXX";
  if (::mkdtemp(imgdir_.data()) == nullptr) throw std::runtime_error("mkdtemp images");
  log_files_.push_back(rundir_ + "/xenemu.log");
  xenemu_ = Child({build_dir() + "/hw/xen/emu/broker/pvhost-xenemu", "--rundir", rundir_, "--strict"},
                  log_files_.back(), log_files_.back());
  std::unique_ptr<xen::XsClient> xs;
  if (!poll_until([&] {
        if (::access((rundir_ + "/hv.sock").c_str(), F_OK) != 0) return false;
        auto r = xen::XsClient::open(rundir_ + "/socket");
        if (!r) return false;
        xs = std::move(*r);
        return true;
      }))
    throw std::runtime_error("pvhost-xenemu did not start: " + slurp(log_files_[0]));
  xs_ = std::move(xs);
  // The socket file can appear a moment before the broker listens on it: retry.
  std::string last_error;
  if (!poll_until([&] {
        auto ts = xenemu::Toolstack::connect(rundir_);
        if (!ts) {
          last_error = ts.error().describe();
          return false;
        }
        ts_ = std::move(*ts);
        return true;
      }))
    throw std::runtime_error("toolstack: " + last_error);
  xenemu::DomainConfig cfg;
  cfg.name = "block-guest";
  cfg.memory_mib = memory_mib;
  cfg.max_grant_frames = 64;
  auto d = xenemu::domain_create(*ts_, *xs_, cfg);
  if (!d) throw std::runtime_error("domain_create: " + d.error().describe());
  domid_ = *d;
}

BlockEnv::~BlockEnv() {
  pvhost_.kill_now();
  xs_.reset();
  ts_.reset();
  xenemu_.kill_now();
  // Temp directories; leftovers are harmless.
  (void)std::system(("rm -rf " + rundir_ + " " + imgdir_).c_str());
}

std::string BlockEnv::make_image(uint64_t bytes) {
  std::string path = fmt::format("{}/disk{}.img", imgdir_, next_++);
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(bytes)) != 0) throw std::runtime_error("image " + path);
  ::close(fd);
  return path;
}

toolstack::DeviceAddress BlockEnv::add_disk(const std::string& image, const std::string& vdev,
                                            std::map<std::string, std::string> settings) {
  toolstack::DeviceRequest req{"qdisk", domid_, DomId(0), std::move(settings)};
  if (!req.settings.contains("target")) req.settings["target"] = image;
  req.settings["vdev"] = vdev;
  auto a = toolstack::device_add(*xs_, req);
  if (!a) throw std::runtime_error("device_add: " + a.error().describe());
  return *a;
}

void BlockEnv::start_pvhost(const std::vector<std::string>& extra) {
  std::vector<std::string> argv{env_or("PVHOST_BIN", build_dir() + "/src/app/pvhost"), "-xen-domid",
                                std::to_string(domid_.value()), "--xen=emu:" + rundir_, "-backends", "qdisk"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  log_files_.push_back(rundir_ + "/pvhost.log");
  pvhost_ = Child(argv, log_files_.back(), log_files_.back());
}

Child BlockEnv::start_blkfront(const std::string& devid, const std::vector<std::string>& args) {
  std::vector<std::string> argv{build_dir() + "/tests/frontends/blkfront/blkfront", "--rundir", rundir_, "--domid",
                                std::to_string(domid_.value()), "--devid", devid};
  argv.insert(argv.end(), args.begin(), args.end());
  const int n = next_++;
  log_files_.push_back(fmt::format("{}/blkfront-{}.err", rundir_, n));
  return Child(argv, fmt::format("{}/blkfront-{}.out", rundir_, n), log_files_.back());
}

nlohmann::json BlockEnv::blkfront(const std::string& devid, const std::vector<std::string>& args,
                                  std::chrono::milliseconds timeout) {
  Child c = start_blkfront(devid, args);
  auto st = c.wait(timeout);
  if (!st) {
    c.kill_now();
    return {{"ok", false}, {"error", "blkfront timed out"}, {"stdout", c.out()}};
  }
  auto j = last_json(c.out());
  j["exit"] = *st;
  return j;
}

std::string BlockEnv::read(const std::string& path) {
  auto v = xs_->read(xen::kNoTransaction, path);
  return v ? *v : std::string();
}

bool BlockEnv::wait_for(const std::string& path, const std::string& value, std::chrono::milliseconds timeout) {
  return poll_until([&] { return read(path) == value; }, timeout);
}

std::string BlockEnv::logs() {
  std::string out;
  for (const auto& f : log_files_) {
    std::string text = slurp(f);
    if (text.size() > 4000) text = "...\n" + text.substr(text.size() - 4000);
    out += "==== " + f + "\n" + text + "\n";
  }
  return out;
}

}  // namespace pvhost::blktest
