// The qdisk backend's control plane: a XenDevice that opens the image at realize (as QEMU
// does), advertises the blkif features, reads the frontend's ring keys at connect and runs
// one RingQueue per queue. Statistics and QMP-shaped views for the QMP glue.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backends/block/config.h"
#include "backends/block/dataplane.h"
#include "backends/block/stats.h"
#include "src/block/block_driver.h"
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

  BlockConfig config_;
  std::unique_ptr<block::BlockDriver> driver_;
  BlockStats stats_;
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
