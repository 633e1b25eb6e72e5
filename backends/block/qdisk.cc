#include "backends/block/qdisk.h"

#include "src/block/formats.h"
#include "src/block/qcow2/qcow2_image.h"

#include <thread>

#include <fmt/format.h>

#include "src/log.h"

namespace pvhost::blkif {

QdiskDevice::QdiskDevice(DeviceContext ctx, BlockConfig config)
    : XenDevice(std::move(ctx)), config_(std::move(config)) {
  // multi-queue-max-queues: one queue per core, as blkback's xenblk_max_queues default.
  max_queues_ = std::max(1u, std::thread::hardware_concurrency());
}

QdiskDevice::~QdiskDevice() {
  queues_.clear();  // drains; normally done by stop() already
}

Limits QdiskDevice::limits() const {
  Limits l;
  const auto info = driver_->info();
  l.sectors = info.size_bytes >> kSectorShift;
  l.sector_size = info.logical_block_size;
  l.read_only = info.read_only;
  l.discard = config_.discard_enable && info.discard;
  return l;
}

Result<void> QdiskDevice::realize() {
  block::OpenOptions o;
  o.path = config_.path;
  o.read_only = config_.read_only;
  // Data always goes through our own bounce buffers, so O_DIRECT is safe whatever the
  // storage (the "direct IO memory lifetime bug" direct-io-safe is about concerns I/O
  // straight from granted pages, which we never do).
  o.direct = block::DirectIo::yes;
  driver_ = PVHOST_TRY_CTX(block::open_image(config_.format, o), fmt::format("opening {}", config_.path));
  const auto info = driver_->info();
  log::info("{}: {} image {} ({} bytes{}{})", name(), info.format, config_.path, info.size_bytes,
            info.read_only ? ", read-only" : "", info.direct_io ? ", O_DIRECT" : "");
  return write_features();
}

Result<void> QdiskDevice::write_features() {
  const auto info = driver_->info();
  const Limits l = limits();
  unsigned vinfo = 0;
  if (info.read_only) vinfo |= VDISK_READONLY;
  if (config_.device_type == DeviceType::cdrom) vinfo |= VDISK_CDROM;
  if (config_.removable) vinfo |= VDISK_REMOVABLE;
  std::vector<std::pair<std::string, std::string>> kv = {
      {"feature-flush-cache", "1"},
      {"feature-barrier", "1"},
      {"feature-persistent", "1"},
      {"feature-max-indirect-segments", std::to_string(kMaxIndirectSegments)},
      {"multi-queue-max-queues", std::to_string(max_queues_)},
      {"max-ring-page-order", std::to_string(kMaxRingPageOrder)},
      {"info", std::to_string(vinfo)},
      {"sector-size", std::to_string(info.logical_block_size)},
      {"physical-sector-size", std::to_string(info.physical_block_size)},
      {"sectors", std::to_string(l.sectors)},
  };
  if (l.discard) {
    kv.emplace_back("feature-discard", "1");
    kv.emplace_back("discard-granularity", std::to_string(info.discard_granularity));
    kv.emplace_back("discard-alignment", "0");
    if (info.secure_discard) kv.emplace_back("discard-secure", "1");
  } else {
    kv.emplace_back("feature-discard", "0");
  }
  const std::string base = context().backend_path;
  return with_context(xen::transact(store(),
                                    [&](xen::Transaction t) -> Result<void> {
                                      for (const auto& [k, v] : kv) PVHOST_TRY(store().write(t, base + "/" + k, v));
                                      return {};
                                    }),
                      "writing features");
}

Result<void> QdiskDevice::connect() {
  frontend_ = PVHOST_TRY(FrontendConfig::parse(
      [this](std::string_view k) { return read_frontend_optional(k); }, max_queues_));
  ++generation_;
  const uint64_t gen = generation_;
  for (size_t i = 0; i < frontend_.queues.size(); ++i) {
    QueueParams qp;
    qp.xen = &xen();
    qp.frontend = context().frontend_domid;
    qp.index = static_cast<unsigned>(i);
    qp.ring_refs = frontend_.queues[i].ring_refs;
    qp.remote_port = frontend_.queues[i].event_channel;
    qp.abi = frontend_.abi;
    qp.persistent = frontend_.persistent;
    qp.limits = limits();
    qp.paused = paused_;
    qp.driver = driver_.get();
    qp.stats = &stats_;
    qp.name = fmt::format("{} q{}", name(), i);
    // From the I/O thread: hand the violation to the main loop, where the device lives.
    qp.on_violation = [this, gen, alive = std::weak_ptr<bool>(alive_), &main = loop()](Error e) {
      main.post([this, gen, alive, e = std::move(e)] {
        if (!alive.lock() || gen != generation_ || !connected()) return;
        fail_device(Error(e).add_context("protocol violation"));
      });
    };
    auto q = RingQueue::start(std::move(qp));
    if (!q) {
      queues_.clear();
      return std::unexpected(std::move(q).error());
    }
    queues_.push_back(std::move(*q));
  }
  log::info("{}: {} queue(s), ring order {}, {}, persistent grants {}", name(), queues_.size(),
            frontend_.ring_page_order, to_string(frontend_.abi), frontend_.persistent ? "on" : "off");
  return {};
}

void QdiskDevice::disconnect() {
  ++generation_;
  queues_.clear();  // each drains its in-flight requests, answers them, unbinds, unmaps
}

void QdiskDevice::unrealize() { driver_.reset(); }

Result<uint64_t> QdiskDevice::resize() {
  if (!driver_) return fail(ENODEV, "no image open");
  const uint64_t bytes = PVHOST_TRY(driver_->refresh_size());
  const Limits l = limits();
  for (auto& q : queues_) q->set_limits(l);
  PVHOST_TRY(write_backend("sectors", std::to_string(l.sectors)));
  // blkback's resize: sectors rewritten, then state Connected written again so the
  // frontend's otherend watch fires and it re-reads sectors.
  if (backend_state() == XenbusState::connected) PVHOST_TRY(write_backend("state", "4"));
  log::info("{}: resized to {} bytes", name(), bytes);
  return bytes;
}

Result<void> QdiskDevice::snapshot(const std::string& overlay, SnapshotMode mode) {
  if (!paused_) return fail(EBUSY, "the device must be quiesced for a snapshot");
  if (!driver_) return fail(ENODEV, "no image is open");
  const auto info = driver_->info();
  // Everything the guest wrote must be in the current image before another driver opens it
  // as a backing file: a qcow2 driver holds metadata (L2, refcounts) until a flush.
  if (auto* img = dynamic_cast<block::Image*>(driver_.get()))
    PVHOST_TRY_CTX(img->flush_all(), fmt::format("flushing {} before the snapshot", config_.path));
  if (mode == SnapshotMode::create) {
    // qcow2.txt: the overlay's backing file is the current image, with its format.
    PVHOST_TRY_CTX(block::create_qcow2(overlay, info.size_bytes, 65536, config_.path,
                                       std::string(block::to_string(config_.format))),
                   fmt::format("creating {}", overlay));
  }
  block::OpenOptions o;
  o.path = overlay;
  o.read_only = config_.read_only;
  o.direct = block::DirectIo::yes;
  std::unique_ptr<block::BlockDriver> next =
      PVHOST_TRY_CTX(block::open_image(block::Format::qcow2, o), fmt::format("opening {}", overlay));
  if (next->info().size_bytes != info.size_bytes)
    return fail(EINVAL, fmt::format("{} is {} bytes, the disk is {}", overlay, next->info().size_bytes, info.size_bytes));
  for (auto& q : queues_) PVHOST_TRY_CTX(q->switch_driver(next.get()), "switching queues to the overlay");
  driver_ = std::move(next);  // the old top is closed; the overlay holds the chain below it
  config_.path = overlay;
  config_.format = block::Format::qcow2;
  // A restarted pvhost (or a reconnecting device) opens the active layer.
  PVHOST_TRY_CTX(write_backend("params", "qcow2:" + overlay), "recording the new chain");
  log::info("{}: snapshot: now writing to {}", name(), overlay);
  return {};
}

void QdiskDevice::quiesce(std::function<void()> done) {
  paused_ = true;
  if (queues_.empty()) {
    done();
    return;
  }
  auto remaining = std::make_shared<size_t>(queues_.size());
  auto shared_done = std::make_shared<std::function<void()>>(std::move(done));
  for (auto& q : queues_) {
    q->pause([alive = std::weak_ptr<bool>(alive_), &main = loop(), remaining, shared_done] {
      main.post([alive, remaining, shared_done] {
        if (!alive.lock()) return;
        if (--*remaining == 0) (*shared_done)();
      });
    });
  }
}

void QdiskDevice::resume() {
  paused_ = false;
  for (auto& q : queues_) q->resume();
}

nlohmann::json QdiskDevice::blockstats_json() const {
  return {
      {"device", qmp_device()},
      {"node-name", node_name()},
      {"qdev", context().backend_path},
      {"stats", stats().qmp_stats()},
  };
}

nlohmann::json QdiskDevice::query_block_json() const {
  nlohmann::json j = {
      {"device", qmp_device()},
      {"qdev", context().backend_path},
      {"locked", false},
      {"removable", config_.removable || config_.device_type == DeviceType::cdrom},
      {"type", "unknown"},
  };
  if (!driver_) return j;
  const auto info = driver_->info();
  j["inserted"] = {
      {"file", config_.path},
      {"node-name", node_name()},
      {"ro", info.read_only},
      {"drv", std::string(info.format)},
      {"encrypted", false},
      {"detect_zeroes", "off"},
      {"backing_file_depth", 0},
      {"bps", 0},
      {"bps_rd", 0},
      {"bps_wr", 0},
      {"iops", 0},
      {"iops_rd", 0},
      {"iops_wr", 0},
      {"write_threshold", 0},
      {"cache", {{"writeback", true}, {"direct", info.direct_io}, {"no-flush", false}}},
      {"image",
       {{"filename", config_.path},
        {"format", std::string(info.format)},
        {"virtual-size", info.size_bytes},
        {"dirty-flag", false}}},
  };
  // The format layer's ImageInfo carries the backing chain (backing-image, nested), as
  // QEMU's inserted.image does; backing_file_depth counts it.
  if (auto* img = dynamic_cast<const block::Image*>(driver_.get())) {
    nlohmann::json& inserted = j["inserted"];
    inserted["image"] = block::image_info_json(*img);
    int depth = 0;
    for (const nlohmann::json* b = &inserted["image"]; b->contains("backing-image"); b = &(*b)["backing-image"]) ++depth;
    inserted["backing_file_depth"] = depth;
  }
  return j;
}

nlohmann::json QdiskDevice::describe() const {
  nlohmann::json j = XenDevice::describe();
  j["image"] = config_.path;
  j["format"] = std::string(block::to_string(config_.format));
  j["node-name"] = node_name();
  j["mode"] = config_.read_only == block::ReadOnly::yes ? "r" : "w";
  if (driver_) {
    const auto info = driver_->info();
    j["size"] = info.size_bytes;
    j["direct-io"] = info.direct_io;
  }
  nlohmann::json qs = nlohmann::json::array();
  for (const auto& q : queues_) {
    const auto& qi = q->info();
    qs.push_back({{"ring-pages", q->ring_pages()},
                  {"ring-size", q->ring_size()},
                  {"port", q->local_port().value()},
                  {"requests", qi.requests.load(std::memory_order_relaxed)},
                  {"in-flight", qi.in_flight.load(std::memory_order_relaxed)},
                  {"notifications", qi.notifications_sent.load(std::memory_order_relaxed)},
                  {"wakeups", qi.wakeups.load(std::memory_order_relaxed)},
                  {"persistent-grants", qi.persistent_grants.load(std::memory_order_relaxed)},
                  {"violated", qi.violated.load(std::memory_order_relaxed)}});
  }
  j["queues"] = qs;
  if (!queues_.empty()) {
    j["protocol"] = std::string(to_string(frontend_.abi));
    j["ring-page-order"] = frontend_.ring_page_order;
    j["persistent"] = frontend_.persistent;
  }
  const auto s = stats();
  j["stats"] = s.qmp_stats();
  j["stats"]["in_flight"] = s.in_flight;
  j["stats"]["queue_depth"] = s.max_queue_depth;
  j["stats"]["unsupported_operations"] = s.unsupported;
  return j;
}

void register_types(Registry& registry) {
  std::vector<BackendKeySpec> keys = {
      {"frontend", true, "frontend path"},
      {"params", true, "image, <format>:<path>"},
      {"mode", false, "r or w"},
      {"device-type", false, "disk or cdrom"},
      {"dev", false, "virtual device name (xvda)"},
      {"removable", false, "0 or 1"},
      {"bootable", false, "0 or 1"},
      {"direct-io-safe", false, "0 or 1"},
      {"discard-enable", false, "0 or 1"},
  };
  auto create = [](DeviceContext ctx) -> Result<std::unique_ptr<XenDevice>> {
    auto cfg = BlockConfig::parse(ctx.backend_keys);
    if (!cfg) return std::unexpected(std::move(cfg).error().add_context("qdisk config"));
    return std::unique_ptr<XenDevice>(std::make_unique<QdiskDevice>(std::move(ctx), std::move(*cfg)));
  };
  registry.add(BackendType{"qdisk", "PV block device (blkif), raw images via io_uring", keys, create, {}});
  registry.add(BackendType{"vbd", "PV block device served as a vbd (on request only: -backends vbd)", keys, create, {}});
  registry.mark_opt_in("vbd");
}

}  // namespace pvhost::blkif
