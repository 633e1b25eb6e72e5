#include "hw/xen/toolstack/devices.h"

#include <charconv>
#include <thread>

#include <fmt/format.h>

namespace pvhost::toolstack {
namespace {

using Perm = xen::Permission;

std::optional<uint32_t> parse_num(std::string_view s) {
  uint32_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size()) return std::nullopt;
  return v;
}

// The frontend directory name for a backend type (libxl's device kinds).
std::string frontend_kind(const std::string& type) {
  if (type == "qdisk" || type == "vbd" || type == "vbd3") return "vbd";
  if (type == "qnic") return "vif";
  if (type == "virtio_disk") return "virtio";
  return type;
}

}  // namespace

Result<uint32_t> vbd_number(std::string_view name) {
  // xen-vbd-interface(7): a plain number is used as is; xvdX[N], hdX[N], sdX[N] encode.
  if (auto n = parse_num(name)) return *n;
  auto bad = [&] { return fail(EINVAL, fmt::format("'{}' is not a disk name (xvda, xvdb1, hda, sdc, or a number)", name)); };
  std::string_view prefix;
  for (std::string_view p : {"xvd", "hd", "sd"})
    if (name.starts_with(p)) {
      prefix = p;
      break;
    }
  if (prefix.empty()) return bad();
  std::string_view rest = name.substr(prefix.size());
  // Disk letters: a..z, aa..zz (bijective base 26), then an optional partition number.
  size_t letters = 0;
  while (letters < rest.size() && rest[letters] >= 'a' && rest[letters] <= 'z') ++letters;
  if (letters == 0 || letters > 3) return bad();
  uint32_t disk = 0;
  for (size_t i = 0; i < letters; ++i) disk = disk * 26 + static_cast<uint32_t>(rest[i] - 'a' + 1);
  disk -= 1;
  uint32_t part = 0;
  if (letters < rest.size()) {
    auto p = parse_num(rest.substr(letters));
    if (!p) return bad();
    part = *p;
  }
  if (prefix == "xvd") {
    if (disk < 16 && part < 16) return (202u << 8) | (disk << 4) | part;
    if (disk < (1u << 20) && part < 256) return (1u << 28) | (disk << 8) | part;
    return bad();
  }
  if (prefix == "hd") {
    if (disk >= 4 || part >= 64) return bad();
    static constexpr uint32_t kMajor[] = {3, 3, 22, 22};
    return (kMajor[disk] << 8) | ((disk % 2) << 6) | part;
  }
  // sd: 8 << 8 for the first 16 disks.
  if (disk >= 16 || part >= 16) return bad();
  return (8u << 8) | (disk << 4) | part;
}

Result<DeviceAddress> device_add(xen::XenStore& xs, const DeviceRequest& req) {
  std::map<std::string, std::string> be, fe;
  std::map<std::string, std::string> s = req.settings;
  auto take = [&](const std::string& k, const std::string& def) {
    auto it = s.find(k);
    if (it == s.end()) return def;
    std::string v = it->second;
    s.erase(it);
    return v;
  };
  std::string devid;
  const std::string kind = frontend_kind(req.type);
  const bool primary_console = req.type == "console" && s.contains("devid") && s.at("devid") == "0";

  if (req.type == "qdisk" || req.type == "vbd") {
    std::string target = take("target", "");
    if (target.empty()) return fail(EINVAL, "disk: target=PATH is required");
    std::string format = take("format", "raw");
    std::string vdev = take("vdev", "xvda");
    uint32_t num = PVHOST_TRY(with_context(vbd_number(vdev), "vdev"));
    devid = std::to_string(num);
    std::string mode = take("mode", "w");
    if (mode != "w" && mode != "r") return fail(EINVAL, fmt::format("disk: mode '{}' is not w or r", mode));
    std::string devtype = take("devtype", "disk");
    // libxl writes raw images as "aio:PATH" for qdisk (libxl__device_disk_string_of_format).
    be["params"] = (format == "raw" ? std::string("aio") : format) + ":" + target;
    be["removable"] = "0";
    be["bootable"] = "1";
    be["dev"] = vdev;
    be["type"] = req.type == "qdisk" ? "qdisk" : "phy";
    be["mode"] = mode;
    be["device-type"] = devtype;
    be["discard-enable"] = take("discard", "on") == "on" ? "1" : "0";
    be["specification"] = "xen";
    fe["virtual-device"] = devid;
    fe["device-type"] = devtype;
    fe["trusted"] = "1";
  } else if (req.type == "console") {
    devid = take("devid", "1");
    be["protocol"] = "vt100";
    fe["limit"] = take("limit", "1048576");
    fe["type"] = take("type", "ioemu");
    fe["output"] = take("output", "pty");
    if (auto name = take("name", ""); !name.empty()) fe["name"] = name;
  } else if (req.type == "vfb") {
    devid = take("devid", "0");
    be["vnc"] = "1";
    be["vnclisten"] = take("vnclisten", "127.0.0.1");
    be["vncdisplay"] = take("vncdisplay", "0");
    be["vncunused"] = "0";
    be["sdl"] = "0";
    be["opengl"] = "0";
  } else if (req.type == "qnic" || req.type == "vif") {
    devid = take("devid", "0");
    std::string mac = take("mac", "00:16:3e:00:00:01");
    be["mac"] = mac;
    be["bridge"] = take("bridge", "xenbr0");
    be["handle"] = devid;
    be["type"] = req.type == "qnic" ? "ioemu" : "vif";
    fe["handle"] = devid;
    fe["mac"] = mac;
  } else {
    devid = take("devid", "0");
  }
  for (auto it = s.begin(); it != s.end();) {
    if (it->first.starts_with("be.")) be[it->first.substr(3)] = it->second;
    else if (it->first.starts_with("fe.")) fe[it->first.substr(3)] = it->second;
    else return fail(EINVAL, fmt::format("{}: unknown setting '{}'", req.type, it->first));
    it = s.erase(it);
  }

  DeviceAddress addr;
  addr.type = req.type;
  addr.frontend = req.frontend;
  addr.devid = devid;
  addr.backend_path = fmt::format("/local/domain/{}/backend/{}/{}/{}", req.backend, req.type, req.frontend, devid);
  addr.frontend_path = primary_console ? fmt::format("/local/domain/{}/console", req.frontend)
                                       : fmt::format("/local/domain/{}/device/{}/{}", req.frontend, kind, devid);
  be["frontend"] = addr.frontend_path;
  be["frontend-id"] = std::to_string(req.frontend.value());
  be["online"] = "1";
  be["state"] = "1";
  fe["backend"] = addr.backend_path;
  fe["backend-id"] = std::to_string(req.backend.value());
  if (!primary_console) fe["state"] = "1";

  const std::vector<Perm> be_perms{{req.backend, Perm::Kind::none}, {req.frontend, Perm::Kind::read}};
  const std::vector<Perm> fe_perms{{req.frontend, Perm::Kind::none}, {req.backend, Perm::Kind::read}};
  PVHOST_TRY(xen::transact(xs, [&](xen::Transaction t) -> Result<void> {
    if (PVHOST_TRY(xen::read_optional(xs, t, addr.backend_path + "/state")))
      return fail(EEXIST, fmt::format("{} device {} of dom{} already exists", req.type, devid, req.frontend));
    PVHOST_TRY(xs.mkdir(t, addr.backend_path));
    PVHOST_TRY(xs.set_permissions(t, addr.backend_path, be_perms));
    if (!primary_console) {
      PVHOST_TRY(xs.mkdir(t, addr.frontend_path));
      PVHOST_TRY(xs.set_permissions(t, addr.frontend_path, fe_perms));
    }
    for (const auto& [k, v] : fe) PVHOST_TRY(xs.write(t, addr.frontend_path + "/" + k, v));
    for (const auto& [k, v] : be) PVHOST_TRY(xs.write(t, addr.backend_path + "/" + k, v));
    // libxl's own bookkeeping (/libxl/<domid>/device/<kind>/<devid>).
    const std::string lx = fmt::format("/libxl/{}/device/{}/{}", req.frontend, kind, devid);
    PVHOST_TRY(xs.write(t, lx + "/frontend", addr.frontend_path));
    PVHOST_TRY(xs.write(t, lx + "/backend", addr.backend_path));
    return {};
  }));
  return addr;
}

Result<void> device_del(xen::XenStore& xs, const DeviceAddress& dev, std::chrono::milliseconds timeout) {
  PVHOST_TRY(xen::transact(xs, [&](xen::Transaction t) -> Result<void> {
    PVHOST_TRY(xs.write(t, dev.backend_path + "/online", "0"));
    PVHOST_TRY(xs.write(t, dev.backend_path + "/state", "5"));
    return {};
  }));
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  bool closed = false;
  while (std::chrono::steady_clock::now() < deadline) {
    auto st = PVHOST_TRY(xen::read_optional(xs, xen::kNoTransaction, dev.backend_path + "/state"));
    if (!st || *st == "6") {
      closed = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const std::string kind = frontend_kind(dev.type);
  PVHOST_TRY(xen::transact(xs, [&](xen::Transaction t) -> Result<void> {
    for (const std::string& p : {dev.backend_path, dev.frontend_path,
                                 fmt::format("/libxl/{}/device/{}/{}", dev.frontend, kind, dev.devid)}) {
      if (p.ends_with("/console")) continue;  // the primary console's frontend is the domain's
      if (auto r = xs.rm(t, p); !r && r.error().code() != ENOENT) return r;
    }
    return {};
  }));
  if (!closed)
    return fail(ETIMEDOUT, fmt::format("{} did not reach Closed within {} ms; removed anyway", dev.backend_path,
                                       timeout.count()));
  return {};
}

Result<std::vector<DeviceAddress>> device_list(xen::XenStore& xs, DomId backend, DomId frontend) {
  std::vector<DeviceAddress> out;
  const std::string root = fmt::format("/local/domain/{}/backend", backend);
  auto types = xs.directory(xen::kNoTransaction, root);
  if (!types) return types.error().code() == ENOENT ? Result<std::vector<DeviceAddress>>(out)
                                                    : std::unexpected(types.error());
  for (const auto& type : *types) {
    auto ids = xs.directory(xen::kNoTransaction, fmt::format("{}/{}/{}", root, type, frontend));
    if (!ids) continue;
    for (const auto& id : *ids) {
      DeviceAddress a{type, frontend, id, fmt::format("{}/{}/{}/{}", root, type, frontend, id), ""};
      a.frontend_path = PVHOST_TRY(xen::read_optional(xs, xen::kNoTransaction, a.backend_path + "/frontend")).value_or("");
      out.push_back(std::move(a));
    }
  }
  return out;
}

Result<DeviceAddress> device_find(xen::XenStore& xs, DomId backend, DomId frontend, const std::string& type,
                                  const std::string& id) {
  std::string devid = id;
  if (type == "qdisk" || type == "vbd")
    if (auto n = vbd_number(id)) devid = std::to_string(*n);
  for (auto& d : PVHOST_TRY(device_list(xs, backend, frontend)))
    if (d.type == type && d.devid == devid) return d;
  return fail(ENOENT, fmt::format("dom{} has no {} device '{}'", frontend, type, id));
}

}  // namespace pvhost::toolstack
