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
#include "src/device/registry.h"

namespace pvhost::blkif {

class QdiskDevice final : public XenDevice {
 public:
  QdiskDevice(DeviceContext ctx, BlockConfig config);
  ~QdiskDevice() override;

  // --- for the QMP glue (main thread) ---
  // Counters of this device.
  [[nodiscard]] BlockStatsSnapshot stats() const { return stats_.snapshot(); }
  // One entry of query-blockstats, in QEMU's shape: {"device", "node-name", "qdev", "stats"}.
  [[nodiscard]] nlohmann::json blockstats_json() const;
  // One entry of query-block (BlockInfo): {"device", "qdev", "locked", "removable",
  // "inserted": {"file", "node-name", "ro", "drv", "image": {...}, ...}, "type"}.
  [[nodiscard]] nlohmann::json query_block_json() const;
  // The QMP `device` name ("51712", the qdisk devid) and block node name ("xvda-raw").
  [[nodiscard]] std::string qmp_device() const { return context().devid; }
  [[nodiscard]] std::string node_name() const { return config_.node_name(context().devid); }
  [[nodiscard]] const BlockConfig& config() const { return config_; }

  // The image changed size underneath: announce the new `sectors` and write Connected
  // again, as blkback does, so the frontend re-reads it.
  [[nodiscard]] Result<uint64_t> resize();

  // blockdev-snapshot-sync, called while quiesced: makes `overlay` (created unless
  // `existing`) a qcow2 whose backing file is the current image, switches every queue to
  // it, and records it in the backend's `params` so a restarted pvhost opens the same chain.
  enum class SnapshotMode { create, existing };
  [[nodiscard]] Result<void> snapshot(const std::string& overlay, SnapshotMode mode);

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
