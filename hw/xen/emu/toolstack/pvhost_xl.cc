// pvhost-xl: the emulated toolstack's command line, in the manner of `xl`.
//
//   pvhost-xl [--rundir DIR] domain create NAME [--memory MIB] [--vcpus N] [--max-grant-frames N]
//   pvhost-xl [--rundir DIR] domain destroy DOMID
//   pvhost-xl [--rundir DIR] domain list
//   pvhost-xl [--rundir DIR] device add TYPE DOMID KEY=VALUE...   (prints the devid)
//   pvhost-xl [--rundir DIR] device del TYPE DOMID ID [--timeout SECONDS]
//   pvhost-xl [--rundir DIR] device list DOMID
//
// RUNDIR is pvhost-xenemu's (--rundir, else $PVHOST_XENEMU_RUNDIR). Commands are one table of
// {group, verb, handler}; each group's work lives in a library (hw/xen/emu/toolstack/) so tests
// and scripts share it. Exit status: 0 success, 1 failure, 2 usage.
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "hw/xen/emu/toolstack/domain.h"
#include "hw/xen/toolstack/devices.h"
#include "hw/xen/xs_client.h"
#include "src/log.h"

namespace pvhost::xenemu {
namespace {

// What every command may need, opened on first use.
class Context {
 public:
  explicit Context(std::string rundir) : rundir_(std::move(rundir)) {}
  Result<Toolstack*> toolstack() {
    if (!ts_) ts_ = PVHOST_TRY_CTX(Toolstack::connect(rundir_), fmt::format("pvhost-xenemu in {}", rundir_));
    return ts_.get();
  }
  Result<xen::XenStore*> store() {
    if (!xs_) xs_ = PVHOST_TRY_CTX(xen::XsClient::open(rundir_ + "/socket"), fmt::format("xenstored in {}", rundir_));
    return xs_.get();
  }

 private:
  std::string rundir_;
  std::unique_ptr<Toolstack> ts_;
  std::unique_ptr<xen::XsClient> xs_;
};

using Args = std::vector<std::string_view>;

struct Command {
  std::string_view group;
  std::string_view verb;
  std::string_view usage;
  std::function<Result<void>(Context&, const Args&)> run;
};

Result<uint32_t> parse_u32(std::string_view what, std::string_view s) {
  uint32_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size()) return fail(EINVAL, fmt::format("{}: '{}' is not a number", what, s));
  return v;
}

Result<void> domain_create_cmd(Context& ctx, const Args& args) {
  DomainConfig c;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string_view a = args[i];
    const auto value = [&]() -> Result<std::string_view> {
      if (i + 1 >= args.size()) return fail(EINVAL, fmt::format("{} needs a value", a));
      return args[++i];
    };
    if (a == "--memory") c.memory_mib = PVHOST_TRY(parse_u32("--memory", PVHOST_TRY(value())));
    else if (a == "--vcpus") c.vcpus = PVHOST_TRY(parse_u32("--vcpus", PVHOST_TRY(value())));
    else if (a == "--max-grant-frames") c.max_grant_frames = PVHOST_TRY(parse_u32("--max-grant-frames", PVHOST_TRY(value())));
    else if (!a.starts_with("-") && c.name.empty()) c.name = std::string(a);
    else return fail(EINVAL, fmt::format("unexpected argument '{}'", a));
  }
  if (c.name.empty()) return fail(EINVAL, "a domain name is required");
  Toolstack* ts = PVHOST_TRY(ctx.toolstack());
  xen::XenStore* xs = PVHOST_TRY(ctx.store());
  const DomId domid = PVHOST_TRY(domain_create(*ts, *xs, c));
  std::printf("%u\n", domid.value());
  return {};
}

Result<void> domain_destroy_cmd(Context& ctx, const Args& args) {
  if (args.size() != 1) return fail(EINVAL, "usage: domain destroy DOMID");
  const uint32_t id = PVHOST_TRY(parse_u32("DOMID", args[0]));
  if (id == 0 || id > 0x7FEF) return fail(EINVAL, fmt::format("{} is not a guest domain id", id));
  Toolstack* ts = PVHOST_TRY(ctx.toolstack());
  xen::XenStore* xs = PVHOST_TRY(ctx.store());
  return domain_destroy(*ts, *xs, DomId(static_cast<uint16_t>(id)));
}

Result<void> domain_list_cmd(Context& ctx, const Args& args) {
  if (!args.empty()) return fail(EINVAL, "usage: domain list");
  Toolstack* ts = PVHOST_TRY(ctx.toolstack());
  const std::string text = PVHOST_TRY(domain_list_text(*ts));
  std::fputs(text.c_str(), stdout);
  return {};
}

Result<DomId> parse_domid(std::string_view s) {
  const uint32_t id = PVHOST_TRY(parse_u32("DOMID", s));
  if (id == 0 || id > 0x7FEF) return fail(EINVAL, fmt::format("{} is not a guest domain id", id));
  return DomId(static_cast<uint16_t>(id));
}

// device add TYPE DOMID KEY=VALUE...: the nodes libxl writes for that type
// (hw/xen/toolstack/devices.h lists the keys each type takes).
Result<void> device_add_cmd(Context& ctx, const Args& args) {
  if (args.size() < 2) return fail(EINVAL, "usage: device add TYPE DOMID KEY=VALUE...");
  toolstack::DeviceRequest req{std::string(args[0]), PVHOST_TRY(parse_domid(args[1])), DomId(0), {}};
  for (size_t i = 2; i < args.size(); ++i) {
    auto eq = args[i].find('=');
    if (eq == std::string_view::npos || eq == 0) return fail(EINVAL, fmt::format("'{}' is not KEY=VALUE", args[i]));
    req.settings[std::string(args[i].substr(0, eq))] = std::string(args[i].substr(eq + 1));
  }
  xen::XenStore* xs = PVHOST_TRY(ctx.store());
  const auto dev = PVHOST_TRY(toolstack::device_add(*xs, req));
  std::printf("%s\n", dev.devid.c_str());
  return {};
}

// device del TYPE DOMID ID: online=0, state=5, wait for Closed, remove (as libxl does).
Result<void> device_del_cmd(Context& ctx, const Args& args) {
  if (args.size() != 3 && args.size() != 5) return fail(EINVAL, "usage: device del TYPE DOMID ID [--timeout SECONDS]");
  uint32_t timeout_s = 10;
  if (args.size() == 5) {
    if (args[3] != "--timeout") return fail(EINVAL, fmt::format("unexpected argument '{}'", args[3]));
    timeout_s = PVHOST_TRY(parse_u32("--timeout", args[4]));
  }
  xen::XenStore* xs = PVHOST_TRY(ctx.store());
  const auto dev = PVHOST_TRY(toolstack::device_find(*xs, DomId(0), PVHOST_TRY(parse_domid(args[1])),
                                                     std::string(args[0]), std::string(args[2])));
  return toolstack::device_del(*xs, dev, std::chrono::seconds(timeout_s));
}

Result<void> device_list_cmd(Context& ctx, const Args& args) {
  if (args.size() != 1) return fail(EINVAL, "usage: device list DOMID");
  xen::XenStore* xs = PVHOST_TRY(ctx.store());
  for (const auto& d : PVHOST_TRY(toolstack::device_list(*xs, DomId(0), PVHOST_TRY(parse_domid(args[0]))))) {
    auto state = PVHOST_TRY(xen::read_optional(*xs, xen::kNoTransaction, d.backend_path + "/state"));
    std::printf("%-10s %-8s state=%-2s %s\n", d.type.c_str(), d.devid.c_str(), state.value_or("-").c_str(),
                d.frontend_path.c_str());
  }
  return {};
}

const std::vector<Command>& commands() {
  static const std::vector<Command> table = {
      {"domain", "create", "domain create NAME [--memory MIB] [--vcpus N] [--max-grant-frames N]", domain_create_cmd},
      {"domain", "destroy", "domain destroy DOMID", domain_destroy_cmd},
      {"domain", "list", "domain list", domain_list_cmd},
      {"device", "add", "device add TYPE DOMID KEY=VALUE...  (qdisk: target=PATH format=raw|qcow2|vhd vdev=xvda mode=w|r)",
       device_add_cmd},
      {"device", "del", "device del TYPE DOMID ID [--timeout SECONDS]", device_del_cmd},
      {"device", "list", "device list DOMID", device_list_cmd},
  };
  return table;
}

void usage() {
  std::fputs("usage: pvhost-xl [--rundir DIR] COMMAND...\n", stderr);
  for (const Command& c : commands()) std::fprintf(stderr, "  %.*s\n", static_cast<int>(c.usage.size()), c.usage.data());
}

int run(int argc, char** argv) {
  log::set_level(log::Level::warn);
  Args args(argv + 1, argv + argc);
  std::string rundir;
  if (const char* env = std::getenv("PVHOST_XENEMU_RUNDIR")) rundir = env;
  if (args.size() >= 2 && args[0] == "--rundir") {
    rundir = std::string(args[1]);
    args.erase(args.begin(), args.begin() + 2);
  }
  if (args.size() < 2 || rundir.empty()) {
    if (rundir.empty()) std::fputs("pvhost-xl: --rundir DIR or PVHOST_XENEMU_RUNDIR is required\n", stderr);
    usage();
    return 2;
  }
  for (const Command& c : commands()) {
    if (c.group != args[0] || c.verb != args[1]) continue;
    Context ctx(rundir);
    auto r = c.run(ctx, Args(args.begin() + 2, args.end()));
    if (!r) {
      std::fprintf(stderr, "pvhost-xl: %s\n", r.error().describe().c_str());
      return r.error().code() == EINVAL ? 2 : 1;
    }
    return 0;
  }
  std::fprintf(stderr, "pvhost-xl: unknown command '%.*s %.*s'\n", static_cast<int>(args[0].size()), args[0].data(),
               static_cast<int>(args[1].size()), args[1].data());
  usage();
  return 2;
}

}  // namespace
}  // namespace pvhost::xenemu

int main(int argc, char** argv) { return pvhost::xenemu::run(argc, argv); }
