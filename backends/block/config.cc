#include "backends/block/config.h"

#include <charconv>

#include <fmt/format.h>

namespace pvhost::blkif {
namespace {

Result<uint64_t> parse_uint(std::string_view key, std::string_view v) {
  uint64_t out = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (v.empty() || ec != std::errc() || p != v.data() + v.size())
    return fail(EINVAL, fmt::format("{}: '{}' is not an unsigned number", key, v));
  return out;
}

Result<bool> parse_bool(const std::map<std::string, std::string>& keys, std::string_view key, bool dflt) {
  auto it = keys.find(std::string(key));
  if (it == keys.end()) return dflt;
  if (it->second == "0") return false;
  if (it->second == "1") return true;
  return fail(EINVAL, fmt::format("{}: '{}' (need 0 or 1)", key, it->second));
}

}  // namespace

Result<Params> parse_params(std::string_view params) {
  if (params.empty()) return fail(EINVAL, "params is empty (no image)");
  std::string_view fmt_name = "raw";
  std::string_view path = params;
  // A prefix is the text before the first ':' when it has no '/' (paths may hold ':').
  if (auto colon = params.find(':'); colon != std::string_view::npos) {
    auto prefix = params.substr(0, colon);
    if (prefix.find('/') == std::string_view::npos) {
      fmt_name = prefix;
      path = params.substr(colon + 1);
    }
  }
  if (path.empty()) return fail(EINVAL, fmt::format("params '{}' has no path", params));
  auto f = block::parse_format(fmt_name);
  if (!f) return std::unexpected(std::move(f).error().add_context("params"));
  // An NBD target is the whole spec (nbd:unix:/path[:exportname=N], nbd://host[:port]/export).
  if (*f == block::Format::nbd) path = params;
  return Params{*f, std::string(path)};
}

Result<BlockConfig> BlockConfig::parse(const std::map<std::string, std::string>& keys) {
  BlockConfig c;
  auto get = [&](std::string_view k) -> std::optional<std::string> {
    auto it = keys.find(std::string(k));
    return it == keys.end() ? std::nullopt : std::optional(it->second);
  };
  auto params = get("params");
  if (!params) return fail(EINVAL, "params: missing");
  auto p = PVHOST_TRY(parse_params(*params));
  c.format = p.format;
  c.path = std::move(p.path);
  const std::string mode = get("mode").value_or("w");
  if (mode == "w" || mode == "rw")
    c.read_only = block::ReadOnly::no;
  else if (mode == "r" || mode == "ro")
    c.read_only = block::ReadOnly::yes;
  else
    return fail(EINVAL, fmt::format("mode: '{}' (need r or w)", mode));
  const std::string type = get("device-type").value_or("disk");
  if (type == "disk")
    c.device_type = DeviceType::disk;
  else if (type == "cdrom")
    c.device_type = DeviceType::cdrom;
  else
    return fail(EINVAL, fmt::format("device-type: '{}' (need disk or cdrom)", type));
  c.dev = get("dev").value_or("");
  if (c.dev.find_first_of("/ ") != std::string::npos) return fail(EINVAL, fmt::format("dev: '{}'", c.dev));
  c.removable = PVHOST_TRY(parse_bool(keys, "removable", false));
  c.bootable = PVHOST_TRY(parse_bool(keys, "bootable", true));
  c.direct_io_safe = PVHOST_TRY(parse_bool(keys, "direct-io-safe", false));
  c.discard_enable = PVHOST_TRY(parse_bool(keys, "discard-enable", true));
  return c;
}

std::string BlockConfig::node_name(std::string_view devid) const {
  return fmt::format("{}-{}", dev.empty() ? std::string(devid) : dev, block::to_string(format));
}

Result<FrontendConfig> FrontendConfig::parse(const Reader& read, uint32_t max_queues) {
  FrontendConfig fc;
  auto opt = [&](std::string_view k) { return with_context(read(k), std::string(k)); };
  if (auto proto = PVHOST_TRY(opt("protocol")); proto && !proto->empty()) {
    if (!parse_protocol(*proto, fc.abi)) return fail(EINVAL, fmt::format("protocol: '{}' not supported", *proto));
  }
  if (auto v = PVHOST_TRY(opt("ring-page-order")); v) {
    fc.ring_page_order = static_cast<uint32_t>(std::min<uint64_t>(PVHOST_TRY(parse_uint("ring-page-order", *v)), 99));
    if (fc.ring_page_order > kMaxRingPageOrder)
      return fail(EINVAL, fmt::format("ring-page-order {} above max-ring-page-order {}", fc.ring_page_order,
                                      kMaxRingPageOrder));
  }
  if (auto v = PVHOST_TRY(opt("feature-persistent")); v) fc.persistent = PVHOST_TRY(parse_uint("feature-persistent", *v)) != 0;
  uint32_t nq = 1;
  if (auto v = PVHOST_TRY(opt("multi-queue-num-queues")); v) {
    uint64_t n = PVHOST_TRY(parse_uint("multi-queue-num-queues", *v));
    if (n == 0 || n > max_queues)
      return fail(EINVAL, fmt::format("multi-queue-num-queues {} (need 1..{})", n, max_queues));
    nq = static_cast<uint32_t>(n);
  }
  const bool multi = PVHOST_TRY(opt("multi-queue-num-queues")).has_value();
  const uint32_t pages = 1u << fc.ring_page_order;
  for (uint32_t q = 0; q < nq; ++q) {
    // With multi-queue-num-queues the keys live under queue-N/ (blkif.h), even for one queue.
    const std::string dir = multi ? fmt::format("queue-{}/", q) : "";
    QueueKeys keys;
    for (uint32_t i = 0; i < pages; ++i) {
      std::string k = fc.ring_page_order == 0 ? dir + "ring-ref" : fmt::format("{}ring-ref{}", dir, i);
      auto v = PVHOST_TRY(opt(k));
      // A frontend with order 0 may still use ring-ref0 (some do); accept it.
      if (!v && fc.ring_page_order == 0) {
        k = dir + "ring-ref0";
        v = PVHOST_TRY(opt(k));
      }
      if (!v) return fail(ENOENT, fmt::format("{}: missing", k));
      uint64_t ref = PVHOST_TRY(parse_uint(k, *v));
      if (ref > UINT32_MAX) return fail(EINVAL, fmt::format("{}: {} out of range", k, ref));
      keys.ring_refs.emplace_back(static_cast<uint32_t>(ref));
    }
    const std::string ek = dir + "event-channel";
    auto ev = PVHOST_TRY(opt(ek));
    if (!ev) return fail(ENOENT, fmt::format("{}: missing", ek));
    uint64_t port = PVHOST_TRY(parse_uint(ek, *ev));
    if (port > UINT32_MAX) return fail(EINVAL, fmt::format("{}: {} out of range", ek, port));
    keys.event_channel = Port(static_cast<uint32_t>(port));
    fc.queues.push_back(std::move(keys));
  }
  if (auto v = PVHOST_TRY(opt("virtual-device")); v) {
    uint64_t vd = PVHOST_TRY(parse_uint("virtual-device", *v));
    if (vd > UINT32_MAX) return fail(EINVAL, "virtual-device: out of range");
    fc.virtual_device = static_cast<uint32_t>(vd);
  }
  fc.device_type = PVHOST_TRY(opt("device-type")).value_or("disk");
  if (auto v = PVHOST_TRY(opt("trusted")); v) fc.trusted = *v != "0";
  return fc;
}

}  // namespace pvhost::blkif
