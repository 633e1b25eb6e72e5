#include "src/device/backend_host.h"

#include <signal.h>
#include <unistd.h>

#include <charconv>

#include "src/log.h"

namespace pvhost {
namespace {

bool process_alive(pid_t pid) { return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM); }

// A claim node's value is the claiming pvhost's pid; "" (as QEMU writes) or a dead pid is free.
std::optional<pid_t> live_claimant(const std::optional<std::string>& value) {
  if (!value || value->empty()) return std::nullopt;
  pid_t pid = 0;
  auto [p, ec] = std::from_chars(value->data(), value->data() + value->size(), pid);
  if (ec != std::errc() || p != value->data() + value->size()) return std::nullopt;
  if (pid == ::getpid() || !process_alive(pid)) return std::nullopt;
  return pid;
}

}  // namespace

Result<std::unique_ptr<BackendHost>> BackendHost::create(xen::Xen& xen, EventLoop& loop, const Registry& registry,
                                                         BackendHostOptions options) {
  for (const auto& t : options.types)
    if (registry.find(t) == nullptr) return fail(EINVAL, fmt::format("backend type '{}' is not built in", t));
  return std::unique_ptr<BackendHost>(new BackendHost(xen, loop, registry, std::move(options)));
}

BackendHost::~BackendHost() { shutdown(); }

std::string BackendHost::dm_path() const {
  return fmt::format("/local/domain/{}/device-model/{}", self_, opts_.guest);
}

Result<void> BackendHost::claim_types() {
  auto& xs = xen_.store();
  const std::string pid = std::to_string(::getpid());
  const std::vector<xen::Permission> perms{{self_, xen::Permission::Kind::none},
                                           {opts_.guest, xen::Permission::Kind::none}};
  return xen::transact(xs, [&](xen::Transaction t) -> Result<void> {
    if (opts_.primary) {
      auto holder = live_claimant(PVHOST_TRY(xen::read_optional(xs, t, dm_path() + "/primary-pid")));
      if (holder)
        return fail(EEXIST, fmt::format("dom{} already has a primary pvhost (pid {}); start this one with -peer",
                                        opts_.guest, *holder));
      PVHOST_TRY(xs.write(t, dm_path() + "/primary-pid", pid));
    }
    for (const auto& type : opts_.types) {
      const std::string path = fmt::format("{}/backends/{}", dm_path(), type);
      auto holder = live_claimant(PVHOST_TRY(xen::read_optional(xs, t, path)));
      if (holder)
        return fail(EEXIST, fmt::format("backend type '{}' of dom{} is already served by pvhost pid {}", type,
                                        opts_.guest, *holder));
      PVHOST_TRY(xs.write(t, path, pid));
      PVHOST_TRY(xs.set_permissions(t, path, perms));
    }
    if (!opts_.primary && !opts_.peer_name.empty())
      PVHOST_TRY(xs.write(t, fmt::format("{}/peers/{}", dm_path(), opts_.peer_name), opts_.peer_qmp_socket));
    return {};
  });
}

Result<void> BackendHost::start(bool running) {
  auto& xs = xen_.store();
  // Our own domain id: the `domid` node of our home (absent in dom0), as QEMU reads it, so
  // driver domains work.
  auto own = PVHOST_TRY_CTX(xen::read_optional(xs, xen::kNoTransaction, "domid"), "reading own domid");
  if (own) {
    uint64_t v = PVHOST_TRY_CTX(xen::read_uint(xs, xen::kNoTransaction, "domid"), "reading own domid");
    self_ = DomId(static_cast<uint16_t>(v));
  }
  PVHOST_TRY_CTX(claim_types(), "claiming backend types");
  claimed_ = opts_.types;
  for (const auto& name : opts_.types) {
    const BackendType* type = registry_.find(name);
    const std::string path = fmt::format("/local/domain/{}/backend/{}/{}", self_, name, opts_.guest);
    type_watches_.push_back(PVHOST_TRY(xs.watch(path, [this, type](std::string_view) { scan(*type); })));
    // Scan now rather than on the watch's first event, so that "ready" (-daemonize) means
    // every device already written has been found; the first event rescans harmlessly.
    scan(*type);
  }
  release_watch_ = PVHOST_TRY(xs.watch("@releaseDomain", [this](std::string_view) { check_domains(); }));
  if (running) PVHOST_TRY(set_running());
  log::info("serving {} for dom{} as {} (backend domain {})", fmt::join(opts_.types, ","), opts_.guest,
            opts_.primary ? "primary" : "peer " + opts_.peer_name, self_);
  return {};
}

Result<void> BackendHost::set_running() {
  if (!opts_.primary) return {};
  return xen_.store().write(xen::kNoTransaction, dm_path() + "/state", "running");
}

void BackendHost::scan(const BackendType& type) {
  if (shut_down_) return;
  const std::string path = fmt::format("/local/domain/{}/backend/{}/{}", self_, type.name, opts_.guest);
  auto entries = xen_.store().directory(xen::kNoTransaction, path);
  std::vector<std::string> present;
  if (entries) present = std::move(*entries);
  else if (entries.error().code() != ENOENT) log::warn("scan {}: {}", path, entries.error().describe());
  const std::string tname(type.name);
  // Devices whose directory vanished.
  std::vector<std::string> gone;
  for (const auto& [key, dev] : devices_)
    if (key.first == tname && std::find(present.begin(), present.end(), key.second) == present.end())
      gone.push_back(key.second);
  for (const auto& devid : gone) destroy(tname, devid);
  std::erase_if(failed_, [&](const auto& key) {
    return key.first == tname && std::find(present.begin(), present.end(), key.second) == present.end();
  });
  for (const auto& devid : present)
    if (!devices_.contains({tname, devid}) && !failed_.contains({tname, devid})) maybe_create(type, devid);
}

void BackendHost::maybe_create(const BackendType& type, const std::string& devid) {
  auto& xs = xen_.store();
  DeviceContext ctx;
  ctx.xen = &xen_;
  ctx.loop = &loop_;
  ctx.type = std::string(type.name);
  ctx.backend_domid = self_;
  ctx.frontend_domid = opts_.guest;
  ctx.devid = devid;
  ctx.backend_path = fmt::format("/local/domain/{}/backend/{}/{}/{}", self_, type.name, opts_.guest, devid);
  // All keys in one transaction, so a device is never seen half-written.
  auto read = xen::transact(xs, [&](xen::Transaction t) -> Result<void> {
    ctx.backend_keys.clear();
    for (const auto& key : PVHOST_TRY(xs.directory(t, ctx.backend_path)))
      ctx.backend_keys[key] = PVHOST_TRY(xs.read(t, ctx.backend_path + "/" + key));
    return {};
  });
  if (!read) {
    if (read.error().code() != ENOENT) log::warn("{}: reading backend keys: {}", ctx.backend_path, read.error().describe());
    return;
  }
  // Only devices the toolstack has just written (online=1, state=Initialising) are ours to
  // create; anything else is being set up or torn down by someone else.
  auto key = [&](const char* k) { return ctx.backend_keys.contains(k) ? ctx.backend_keys[k] : std::string(); };
  if (key("online") != "1" || key("state") != "1") return;

  auto refuse = [&](const Error& e) {
    log::error("{} dom{}/{}: {}", type.name, opts_.guest, devid, e.what());
    failed_.insert({ctx.type, devid});
    // Same error nodes a failing device writes (see XenDevice::fail_device).
    (void)xs.write(xen::kNoTransaction, fmt::format("/local/domain/{}/error/backend/{}/{}/{}/error", self_, type.name,
                                                    opts_.guest, devid), e.what());
    (void)xs.write(xen::kNoTransaction, ctx.backend_path + "/error", e.what());
    (void)xs.write(xen::kNoTransaction, ctx.backend_path + "/state", "5");
  };
  ctx.frontend_path = key("frontend");
  const std::string fe_home = fmt::format("/local/domain/{}/", opts_.guest);
  if (ctx.frontend_path.empty()) return refuse(Error(EINVAL, "backend key 'frontend' is missing"));
  if (!ctx.frontend_path.starts_with(fe_home) || ctx.frontend_path.find("..") != std::string::npos)
    return refuse(Error(EINVAL, fmt::format("backend key 'frontend' = '{}' is not under {}", ctx.frontend_path, fe_home)));
  if (auto fid = key("frontend-id"); !fid.empty() && fid != std::to_string(opts_.guest.value()))
    return refuse(Error(EINVAL, fmt::format("backend key 'frontend-id' = '{}' is not dom{}", fid, opts_.guest)));
  if (type.accepts && !type.accepts(xs, ctx)) {
    log::debug("{} dom{}/{}: not ours (left to another backend)", type.name, opts_.guest, devid);
    failed_.insert({ctx.type, devid});
    return;
  }
  if (auto r = check_required_keys(type, ctx); !r) return refuse(r.error());
  auto dev = type.create(ctx);
  if (!dev) return refuse(dev.error());
  XenDevice* raw = dev->get();
  raw->on_finished = [this, t = ctx.type, devid] { destroy(t, devid); };
  devices_[{ctx.type, devid}] = std::move(*dev);
  if (auto r = raw->start(); !r) {
    // The device wrote its error node and went to Closing; keep it so the toolstack can
    // still unplug it the usual way (online=0, state=5 -> Closed).
    log::error("{}: start failed: {}", raw->context().backend_path, r.error().describe());
  }
}

void BackendHost::destroy(const std::string& type, const std::string& devid) {
  auto it = devices_.find({type, devid});
  if (it == devices_.end()) return;
  std::unique_ptr<XenDevice> dev = std::move(it->second);
  devices_.erase(it);
  dev->stop(/*store_gone=*/false);
  if (unplug_requested_.erase({type, devid}) != 0) {
    // We asked for this unplug (QMP device_del), so we finish it as the toolstack would.
    const DeviceContext& c = dev->context();
    (void)xen::transact(xen_.store(), [&](xen::Transaction t) -> Result<void> {
      for (const std::string& p : {c.backend_path, c.frontend_path})
        if (auto r = xen_.store().rm(t, p); !r && r.error().code() != ENOENT) return r;
      return {};
    });
  }
  log::trace_point("device.destroyed", "type={} devid={}", type, devid);
  if (on_device_removed) on_device_removed(dev->context());
}

XenDevice* BackendHost::find(std::string_view type, std::string_view devid) const {
  auto it = devices_.find({std::string(type), std::string(devid)});
  return it == devices_.end() ? nullptr : it->second.get();
}

Result<void> BackendHost::unplug(XenDevice& dev) {
  const DeviceContext& c = dev.context();
  unplug_requested_.insert({c.type, c.devid});
  return xen::transact(xen_.store(), [&](xen::Transaction t) -> Result<void> {
    PVHOST_TRY(xen_.store().write(t, c.backend_path + "/online", "0"));
    PVHOST_TRY(xen_.store().write(t, c.backend_path + "/state", "5"));
    return {};
  });
}

void BackendHost::check_domains() {
  if (shut_down_) return;
  auto info = xen_.domain_info(opts_.guest);
  const bool gone = !info || info->dying;
  if (!info && info.error().code() != ENOENT) {
    log::warn("domain info dom{}: {}", opts_.guest, info.error().describe());
    return;
  }
  if (!gone) return;
  log::info("dom{} is gone: tearing down its devices", opts_.guest);
  for (auto& [key, dev] : devices_) dev->stop(/*store_gone=*/true);
  devices_.clear();
  if (on_guest_gone) loop_.defer(on_guest_gone);
}

std::vector<XenDevice*> BackendHost::devices() const {
  std::vector<XenDevice*> out;
  for (const auto& [key, dev] : devices_) out.push_back(dev.get());
  return out;
}

void BackendHost::shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  type_watches_.clear();
  release_watch_.reset();
  for (auto& [key, dev] : devices_) dev->stop(/*store_gone=*/false);
  devices_.clear();
  // Remove what we wrote, if it is still ours.
  auto& xs = xen_.store();
  const std::string pid = std::to_string(::getpid());
  auto remove_if_ours = [&](const std::string& path) {
    auto v = xen::read_optional(xs, xen::kNoTransaction, path);
    if (v && *v && **v == pid) (void)xs.rm(xen::kNoTransaction, path);  // best effort on the way out
  };
  for (const auto& type : claimed_) remove_if_ours(fmt::format("{}/backends/{}", dm_path(), type));
  if (opts_.primary) {
    remove_if_ours(dm_path() + "/primary-pid");
  } else if (!opts_.peer_name.empty()) {
    (void)xs.rm(xen::kNoTransaction, fmt::format("{}/peers/{}", dm_path(), opts_.peer_name));
  }
  log::info("backends for dom{} shut down", opts_.guest);
}

}  // namespace pvhost
