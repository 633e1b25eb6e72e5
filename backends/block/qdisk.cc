#include "backends/block/qdisk.h"

#include "src/block/formats.h"
#include "src/block/qcow2/qcow2_image.h"

#include <sys/stat.h>

#include <algorithm>
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
  adopt_chain();
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
    qp.driver = active_driver();
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

void QdiskDevice::unrealize() {
  if (commit_) {
    // The queues are gone (disconnect ran first); the job ends with the device.
    auto hooks = std::move(commit_->hooks);
    commit_.reset();
    ++commit_generation_;
    log::info("{}: block-commit ended: the device is being removed", name());
    if (hooks.on_removed) hooks.on_removed();
  }
  driver_.reset();
}

Result<uint64_t> QdiskDevice::resize() {
  if (!driver_) return fail(ENODEV, "no image open");
  if (commit_) return fail(EBUSY, "a block-commit is running on this disk");
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

Result<void> QdiskDevice::snapshot(const std::string& overlay, SnapshotMode mode, const std::string& node_name) {
  if (!paused_) return fail(EBUSY, "the device must be quiesced for a snapshot");
  if (!driver_) return fail(ENODEV, "no image is open");
  if (commit_) return fail(EBUSY, "a block-commit is running on this disk");
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
  // The overlay is the active layer, under its snapshot-node-name or the device's name;
  // the old top (opened again as its backing file) keeps its counters.
  user_node_name_ = node_name;
  adopt_chain();
  // A restarted pvhost (or a reconnecting device) opens the active layer.
  PVHOST_TRY_CTX(write_backend("params", "qcow2:" + overlay), "recording the new chain");
  log::info("{}: snapshot: now writing to {}", name(), overlay);
  return {};
}

block::BlockDriver* QdiskDevice::active_driver() const {
  return commit_ ? commit_->tracking.get() : driver_.get();
}

Result<void> QdiskDevice::switch_queues(block::BlockDriver* to) {
  for (auto& q : queues_) PVHOST_TRY(q->switch_driver(to));
  return {};
}

std::vector<QdiskDevice::Layer> QdiskDevice::backing_chain() const {
  std::vector<Layer> out;
  const auto* top = dynamic_cast<const block::Image*>(driver_.get());
  for (const block::Image* l = top ? top->backing() : nullptr; l != nullptr; l = l->backing())
    out.push_back({l, l->path(), l->details().format});
  return out;
}

Result<void> QdiskDevice::start_commit(const Layer& base, uint64_t speed, CommitHooks hooks) {
  if (!paused_) return fail(EBUSY, "the device must be quiesced to start a commit");
  if (commit_) return fail(EBUSY, "a block-commit is already running on this disk");
  auto* top = dynamic_cast<block::Image*>(driver_.get());
  if (top == nullptr || top->backing() == nullptr)
    return fail(EINVAL, fmt::format("{} has no backing file: there is nothing to commit into", config_.path));
  if (config_.read_only == block::ReadOnly::yes) return fail(EROFS, "the disk is read-only");
  const block::Format format = PVHOST_TRY(block::parse_format(base.format));
  block::OpenOptions o;
  o.path = base.path;
  o.read_only = block::ReadOnly::no;
  o.direct = block::DirectIo::yes;
  auto base_rw = PVHOST_TRY_CTX(block::open_any(base.format, o), fmt::format("opening the base {} read-write", base.path));
  share_counters(*base_rw);  // the job's writes into the base count on the base's node
  const uint64_t size = top->info().size_bytes;
  if (base_rw->info().size_bytes != size)
    return fail(EINVAL, fmt::format("the base {} is {} bytes, the disk {}: committing across a size change is not supported",
                                    base.path, base_rw->info().size_bytes, size));
  auto job = std::make_unique<ActiveCommit>();
  // Granules of 64 KiB: qcow2's default cluster; a guest write marks at most two.
  job->dirty = std::make_shared<block::DirtyBitmap>(size, 65536);
  job->tracking = block::make_tracking_driver(*driver_, job->dirty);
  job->base_path = base.path;
  job->base_format = format;
  job->hooks = std::move(hooks);
  const uint64_t gen = ++commit_generation_;
  // From the job's thread to the main loop, where the device lives.
  auto to_main = [this, gen, alive = std::weak_ptr<bool>(alive_), &main = loop()](std::function<void(CommitHooks&)> fn) {
    main.post([this, gen, alive, fn = std::move(fn)] {
      if (!alive.lock() || gen != commit_generation_ || !commit_) return;
      fn(commit_->hooks);
    });
  };
  block::CommitSpec spec;
  spec.top = top;
  spec.base_in_chain = base.image;
  spec.base = std::move(base_rw);
  spec.dirty = job->dirty;
  spec.speed = speed;
  spec.on_ready = [to_main] {
    to_main([](CommitHooks& h) {
      if (h.on_ready) h.on_ready();
    });
  };
  spec.on_error = [to_main](Error e) {
    to_main([e = std::move(e)](CommitHooks& h) {
      if (h.on_failed) h.on_failed(e);
    });
  };
  // The queues are paused and drained, so no write can slip between the engine's scan of
  // what the top owns and the tracking that follows.
  job->engine = PVHOST_TRY(block::CommitEngine::start(std::move(spec)));
  commit_ = std::move(job);
  if (auto r = switch_queues(commit_->tracking.get()); !r) {
    (void)switch_queues(driver_.get());  // best effort: back to the untracked top
    commit_.reset();
    return std::unexpected(std::move(r).error().add_context("switching queues to the tracked top"));
  }
  log::info("{}: block-commit: {} -> {} ({})", name(), config_.path, base.path, base.format);
  return {};
}

std::optional<block::CommitProgress> QdiskDevice::commit_progress() const {
  if (!commit_) return std::nullopt;
  return commit_->engine->progress();
}

void QdiskDevice::commit_set_speed(uint64_t bytes_per_second) {
  if (commit_) commit_->engine->set_speed(bytes_per_second);
}
void QdiskDevice::commit_pause() {
  if (commit_) commit_->engine->pause();
}
void QdiskDevice::commit_resume() {
  if (commit_) commit_->engine->resume();
}

void QdiskDevice::complete_commit(std::function<void(Result<void>)> done) {
  if (!commit_) return done(fail(EINVAL, "no block-commit is running on this disk"));
  if (!paused_) return done(fail(EBUSY, "the device must be quiesced to complete a commit"));
  const uint64_t gen = commit_generation_;
  commit_->engine->finish([this, gen, alive = std::weak_ptr<bool>(alive_), &main = loop(),
                           done = std::move(done)](Result<std::unique_ptr<block::Image>> base) {
    // On the job's thread; the switch happens on the main loop.
    auto shared = std::make_shared<Result<std::unique_ptr<block::Image>>>(std::move(base));
    main.post([this, gen, alive, done, shared] {
      if (!alive.lock() || gen != commit_generation_ || !commit_) return;  // on_removed told the job
      done(pivot(std::move(*shared)));
    });
  });
}

Result<void> QdiskDevice::pivot(Result<std::unique_ptr<block::Image>> base) {
  // The worker has handed over the base and returns; the engine joins it.
  std::unique_ptr<ActiveCommit> job = std::move(commit_);
  ++commit_generation_;
  auto back_to_top = [&](Error e) -> Result<void> {
    if (auto r = switch_queues(driver_.get()); !r) log::error("{}: back to the top: {}", name(), r.error().describe());
    return std::unexpected(std::move(e));
  };
  if (!base) return back_to_top(std::move(base).error().add_context("final copy"));
  base->reset();  // flushed; closed before the base is reopened as the guest's disk
  block::OpenOptions o;
  o.path = job->base_path;
  o.read_only = config_.read_only;
  o.direct = block::DirectIo::yes;
  auto next = block::open_image(job->base_format, o);
  if (!next) return back_to_top(std::move(next).error().add_context(fmt::format("reopening {}", job->base_path)));
  if (auto r = switch_queues(next->get()); !r) return back_to_top(std::move(r).error().add_context("switching queues to the base"));
  const std::string old_top = config_.path;
  config_.path = job->base_path;
  config_.format = job->base_format;
  job.reset();                 // the tracking wrapper and the engine, then
  driver_ = std::move(*next);  // the old top and the layers above the base close
  user_node_name_.clear();     // the base is the active layer now (adopt_chain names it)
  adopt_chain();
  // A restarted pvhost (or a reconnecting device) opens the base from now on.
  PVHOST_TRY_CTX(write_backend("params", fmt::format("{}:{}", block::to_string(config_.format), config_.path)),
                 "recording the new chain");
  log::info("{}: block-commit: {} committed; now writing to {}", name(), old_top, config_.path);
  return {};
}

Result<void> QdiskDevice::abandon_commit() {
  if (!commit_) return fail(EINVAL, "no block-commit is running on this disk");
  if (!paused_) return fail(EBUSY, "the device must be quiesced to stop a commit");
  PVHOST_TRY_CTX(switch_queues(driver_.get()), "switching queues back to the top");
  commit_.reset();  // joins the job's thread
  ++commit_generation_;
  log::info("{}: block-commit stopped; still writing to {}", name(), config_.path);
  return {};
}

void QdiskDevice::quiesce(std::function<void()> done) {
  paused_ = true;
  // Drained, then flushed, as QEMU's vm_stop does (bdrv_drain_all, bdrv_flush_all): a
  // format driver holds metadata (qcow2 L2 tables and refcounts, the VHD BAT) until a
  // flush, and a stopped guest's image must be whole for whoever reads it meanwhile.
  done = [this, alive = std::weak_ptr<bool>(alive_), done = std::move(done)] {
    if (alive.lock())
      if (auto* img = dynamic_cast<block::Image*>(driver_.get()))
        if (auto r = img->flush_all(); !r) log::error("{}: flushing on quiesce: {}", name(), r.error().describe());
    done();
  };
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

namespace {

// A file's identity, so the same layer is recognised when it is opened again under
// another spelling of its name; an NBD export is known by its spec.
std::string file_key(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) return fmt::format("{}:{}", st.st_dev, st.st_ino);
  return path;
}

BlockStatsSnapshot node_snapshot(const block::NodeCounters& c) {
  const block::NodeIoStats n = c.snapshot();
  BlockStatsSnapshot s;
  auto copy = [&](StatClass to, block::IoClass from) {
    const auto& f = n.of(from);
    ClassStats& t = s.cls[static_cast<size_t>(to)];
    t.operations = f.operations;
    t.bytes = f.bytes;
    t.total_time_ns = f.total_time_ns;
    t.failed = f.failed;
  };
  copy(StatClass::rd, block::IoClass::rd);
  copy(StatClass::wr, block::IoClass::wr);
  copy(StatClass::flush, block::IoClass::flush);
  copy(StatClass::unmap, block::IoClass::unmap);
  s.wr_highest_offset = n.wr_highest_offset;
  return s;
}

}  // namespace

void QdiskDevice::adopt_chain() {
  std::vector<Node> next;
  const std::string device_name = config_.node_name(context().devid);
  for (auto* layer = block::as_counting(driver_.get()); layer != nullptr;
       layer = block::as_counting(layer->backing_image())) {
    Node n;
    const std::string key = file_key(layer->path());
    auto known = std::find_if(nodes_.begin(), nodes_.end(), [&](const Node& x) { return x.key == key; });
    block::ImageFile* file = layer->file_mut();
    if (known != nodes_.end()) {
      n = *known;
      layer->share_counters(n.counters);
      if (file != nullptr && n.file_counters) file->share_counters(n.file_counters);
    } else {
      n.key = key;
      n.counters = layer->counters();
    }
    if (file != nullptr && !n.file_counters) {
      n.file_counters = file->counters();
      n.file_name = block::generate_node_name();
      n.block_device = file->block_device();
    }
    if (next.empty()) {
      // The active layer: its snapshot-node-name, a user's name it kept (the base after a
      // commit), else the device's "xvda-qcow2".
      if (!user_node_name_.empty()) {
        n.name = user_node_name_;
        n.named_by_user = true;
      } else if (n.named_by_user) {
        user_node_name_ = n.name;
      } else {
        n.name = device_name;
        n.device_named = true;
      }
    } else if (n.name.empty() || n.device_named) {
      // A backing layer nobody named, or the old top that carried the device's name.
      n.name = block::generate_node_name();
      n.device_named = false;
    }
    next.push_back(std::move(n));
  }
  nodes_ = std::move(next);
}

void QdiskDevice::share_counters(block::Image& top) const {
  for (auto* layer = block::as_counting(&top); layer != nullptr; layer = block::as_counting(layer->backing_image())) {
    const std::string key = file_key(layer->path());
    auto known = std::find_if(nodes_.begin(), nodes_.end(), [&](const Node& x) { return x.key == key; });
    if (known == nodes_.end()) continue;
    layer->share_counters(known->counters);
    if (block::ImageFile* file = layer->file_mut(); file != nullptr && known->file_counters)
      file->share_counters(known->file_counters);
  }
}

bool QdiskDevice::has_node(const std::string& name) const {
  if (name == node_name()) return true;
  return std::any_of(nodes_.begin(), nodes_.end(), [&](const Node& n) { return n.name == name; });
}

std::vector<std::string> QdiskDevice::node_names() const {
  std::vector<std::string> out;
  for (const Node& n : nodes_) out.push_back(n.name);
  if (out.empty()) out.push_back(node_name());
  return out;
}

nlohmann::json QdiskDevice::file_stats_json(const Node& n) {
  // QEMU's file-posix nodes add their discard counts (BlockStatsSpecificFile).
  const BlockStatsSnapshot f = node_snapshot(*n.file_counters);
  const ClassStats& unmap = f.cls[static_cast<size_t>(StatClass::unmap)];
  return {{"node-name", n.file_name},
          {"stats", f.qmp_stats()},
          {"driver-specific",
           {{"driver", n.block_device ? "host_device" : "file"},
            {"discard-nb-ok", unmap.operations},
            {"discard-nb-failed", unmap.failed},
            {"discard-bytes-ok", unmap.bytes}}}};
}

nlohmann::json QdiskDevice::node_stats_json(const Node& n) {
  nlohmann::json j = {{"node-name", n.name}, {"stats", node_snapshot(*n.counters).qmp_stats()}};
  if (n.file_counters) j["parent"] = file_stats_json(n);
  return j;
}

nlohmann::json QdiskDevice::blockstats_json() const {
  // QEMU's bdrv_query_bds_stats at BlockBackend level: the guest's counters at the root,
  // the file under each layer as its "parent" (what the format driver read and wrote
  // there, metadata included), each backing layer nested under "backing". Beyond QEMU,
  // whose nodes below the root count only wr_highest_offset, every node counts its I/O.
  nlohmann::json root = {
      {"device", qmp_device()},
      {"node-name", node_name()},
      {"qdev", context().backend_path},
      {"stats", stats().qmp_stats()},
  };
  if (!nodes_.empty() && nodes_.front().file_counters) root["parent"] = file_stats_json(nodes_.front());
  nlohmann::json* at = &root;
  for (size_t i = 1; i < nodes_.size(); ++i) {
    (*at)["backing"] = node_stats_json(nodes_[i]);
    at = &(*at)["backing"];
  }
  return root;
}

nlohmann::json QdiskDevice::blockstats_nodes_json() const {
  // query-nodes: every node on its own, with its "parent" but no "backing" (QEMU's
  // bdrv_query_bds_stats below BlockBackend level); the files are nodes too.
  nlohmann::json out = nlohmann::json::array();
  if (nodes_.empty()) {
    // A driver that is not an Image (the io_uring raw driver): one node, the guest's I/O.
    out.push_back({{"node-name", node_name()}, {"stats", stats().qmp_stats()}});
    return out;
  }
  for (const Node& n : nodes_) {
    nlohmann::json j = node_stats_json(n);
    nlohmann::json file = j.contains("parent") ? j["parent"] : nlohmann::json();
    out.push_back(std::move(j));
    if (!file.is_null()) out.push_back(std::move(file));
  }
  return out;
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
