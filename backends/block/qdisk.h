// The qdisk backend's control plane: a XenDevice that opens the image at realize (as QEMU
// does), advertises the blkif features, reads the frontend's ring keys at connect and runs
// one RingQueue per queue. Statistics and QMP-shaped views for the QMP glue.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backends/block/config.h"
#include "backends/block/dataplane.h"
#include "backends/block/stats.h"
#include "src/block/block_driver.h"
#include "src/block/commit.h"
#include "src/block/counting_image.h"
#include "src/device/registry.h"

namespace pvhost::blkif {

class QdiskDevice final : public XenDevice {
 public:
  QdiskDevice(DeviceContext ctx, BlockConfig config);
  ~QdiskDevice() override;

  // --- for the QMP glue (main thread) ---
  // Counters of this device.
  [[nodiscard]] BlockStatsSnapshot stats() const { return stats_.snapshot(); }
  // One entry of query-blockstats, in QEMU's shape: {"device", "node-name", "qdev",
  // "stats" (the guest's requests), "backing" (the next layer: {"node-name", "stats" of
  // what was read from or written to that layer, "backing"?}, nested down the chain)}.
  [[nodiscard]] nlohmann::json blockstats_json() const;
  // query-blockstats with query-nodes: one {"node-name", "stats"} per layer, top first,
  // each with the layer's own counters (no "device", no "backing"), as QEMU lists nodes.
  [[nodiscard]] nlohmann::json blockstats_nodes_json() const;
  // Whether a layer of this disk is called `name`.
  [[nodiscard]] bool has_node(const std::string& name) const;
  // The node name of each layer, top first (the active layer is node_name()).
  [[nodiscard]] std::vector<std::string> node_names() const;
  // One entry of query-block (BlockInfo): {"device", "qdev", "locked", "removable",
  // "inserted": {"file", "node-name", "ro", "drv", "image": {...}, ...}, "type"}.
  [[nodiscard]] nlohmann::json query_block_json() const;
  // The QMP `device` name ("51712", the qdisk devid) and the active layer's node name:
  // the one blockdev-snapshot-sync's snapshot-node-name gave it, else "xvda-raw" style.
  [[nodiscard]] std::string qmp_device() const { return context().devid; }
  [[nodiscard]] std::string node_name() const {
    return user_node_name_.empty() ? config_.node_name(context().devid) : user_node_name_;
  }
  [[nodiscard]] const BlockConfig& config() const { return config_; }

  // The image changed size underneath: announce the new `sectors` and write Connected
  // again, as blkback does, so the frontend re-reads it.
  [[nodiscard]] Result<uint64_t> resize();

  // blockdev-snapshot-sync, called while quiesced: makes `overlay` (created unless
  // `existing`) a qcow2 whose backing file is the current image, switches every queue to
  // it, and records it in the backend's `params` so a restarted pvhost opens the same chain.
  enum class SnapshotMode { create, existing };
  // `node_name` (snapshot-node-name; may be empty) names the overlay; the caller has
  // checked it is well formed and unused.
  [[nodiscard]] Result<void> snapshot(const std::string& overlay, SnapshotMode mode, const std::string& node_name = {});

  // ---- block-commit of the active layer (src/block/commit.h) ----
  // One layer of the chain under the active image: file name as opened, and format.
  struct Layer {
    const block::Image* image = nullptr;
    std::string path;
    std::string format;  // "qcow2", "vpc", "raw"
  };
  // The backing chain below the active layer, nearest first (empty for a raw disk).
  [[nodiscard]] std::vector<Layer> backing_chain() const;
  // Called on the main loop. on_ready: the base holds the whole disk. on_failed: the copy
  // failed (the guest's disk is unchanged; abandon_commit() ends the job). on_removed: the
  // device went away, taking the job with it.
  struct CommitHooks {
    std::function<void()> on_ready;
    std::function<void(Error)> on_failed;
    std::function<void()> on_removed;
  };
  // While quiesced: opens `base` (a layer of backing_chain()) read-write, starts tracking
  // the guest's writes and copying what the layers above the base own into it.
  [[nodiscard]] Result<void> start_commit(const Layer& base, uint64_t speed, CommitHooks hooks);
  [[nodiscard]] bool committing() const { return commit_ != nullptr; }
  [[nodiscard]] std::optional<block::CommitProgress> commit_progress() const;
  void commit_set_speed(uint64_t bytes_per_second);
  void commit_pause();
  void commit_resume();
  // While quiesced: the final copy and flush (on the job's thread), then, on the main loop,
  // the switch: every queue submits to the base, which is recorded in `params`; the layers
  // above it leave the chain. `done` runs on the main loop. On failure the guest keeps
  // the top (the job is over either way).
  void complete_commit(std::function<void(Result<void>)> done);
  // While quiesced: stops the job; the guest keeps the top, no longer tracked.
  [[nodiscard]] Result<void> abandon_commit();

  void quiesce(std::function<void()> done) override;
  void resume() override;
  [[nodiscard]] nlohmann::json describe() const override;

 protected:
  Result<void> realize() override;
  Result<void> connect() override;
  void disconnect() override;
  void unrealize() override;

 private:
  [[nodiscard]] Limits limits() const;
  [[nodiscard]] Result<void> write_features();
  // What the queues submit to: the image, or the commit's tracking wrapper around it.
  [[nodiscard]] block::BlockDriver* active_driver() const;
  [[nodiscard]] Result<void> switch_queues(block::BlockDriver* to);
  [[nodiscard]] Result<void> pivot(Result<std::unique_ptr<block::Image>> base);
  // After the chain was (re)opened: names every layer and makes each count into its
  // node's counters, found by file, so a layer's counters continue when the same file is
  // opened again (the old top under a snapshot overlay, the base after a commit). Layers
  // that left the chain are forgotten. While no I/O runs (at realize or quiesced).
  void adopt_chain();
  // Same for another handle on layers of the chain (the commit's read-write base).
  void share_counters(block::Image& top) const;

  // One layer of the chain as query-blockstats names and counts it.
  struct Node {
    std::string key;  // the file: "st_dev:st_ino", or the path when it is not one
    std::string name;
    bool named_by_user = false;  // snapshot-node-name: the name stays with the layer
    bool device_named = false;   // the device's "xvda-qcow2": it stays with the active layer
    std::shared_ptr<block::NodeCounters> counters;
    // The file under the layer (QEMU's protocol node: query-blockstats "parent"), which
    // QEMU names "#blockNNN"; empty name and null counters for an NBD export.
    std::string file_name;
    std::shared_ptr<block::NodeCounters> file_counters;
    bool block_device = false;  // the file is a block device (QEMU's "host_device" driver)
  };
  // A node's query-blockstats entry: node-name, stats, the file's as "parent".
  [[nodiscard]] static nlohmann::json node_stats_json(const Node& n);
  // The "parent" of a node whose layer is a file (file_counters set).
  [[nodiscard]] static nlohmann::json file_stats_json(const Node& n);
  std::vector<Node> nodes_;      // top first; empty for a driver that is not an Image
  std::string user_node_name_;   // the active layer's snapshot-node-name, if it had one

  struct ActiveCommit {
    std::shared_ptr<block::DirtyBitmap> dirty;
    std::unique_ptr<block::BlockDriver> tracking;  // wraps driver_
    std::unique_ptr<block::CommitEngine> engine;   // reads driver_'s chain
    std::string base_path;
    block::Format base_format = block::Format::raw;
    CommitHooks hooks;
  };

  BlockConfig config_;
  std::unique_ptr<block::BlockDriver> driver_;
  BlockStats stats_;
  // Destroyed before driver_ (the job reads it) and after queues_ (they submit to it).
  std::unique_ptr<ActiveCommit> commit_;
  uint64_t commit_generation_ = 0;  // bumped per job, so a stale report from a job's thread is ignored
  std::vector<std::unique_ptr<RingQueue>> queues_;
  FrontendConfig frontend_;
  uint32_t max_queues_ = 1;
  bool paused_ = false;
  uint64_t generation_ = 0;  // bumped per connect, so a stale violation report is ignored
  // Lifetime token for work posted back from the I/O threads.
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

// Registers `qdisk` and `vbd`.
void register_types(Registry& registry);

}  // namespace pvhost::blkif
