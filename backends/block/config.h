// The qdisk configuration, parsed at the edge (STYLE.md rule 4) from the backend keys libxl
// writes (reference/libxl-4.17-pv/xenstore-1-running.txt: params, mode, device-type, dev,
// removable, bootable, discard-enable, direct-io-safe) and, at connect, from the frontend's
// keys (blkif.h: protocol, ring-page-order, ring-ref*, event-channel, multi-queue-num-queues,
// queue-N/, feature-persistent; the toolstack's virtual-device, device-type, trusted).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "backends/block/blkif_abi.h"
#include "src/block/block_driver.h"
#include "src/error.h"
#include "src/types.h"

namespace pvhost::blkif {

enum class DeviceType { disk, cdrom };

struct BlockConfig {
  block::Format format = block::Format::raw;
  std::string path;
  block::ReadOnly read_only = block::ReadOnly::no;  // mode=r
  DeviceType device_type = DeviceType::disk;
  std::string dev;  // the vdev name ("xvda"), for node names and QMP
  bool removable = false;
  bool bootable = true;
  bool direct_io_safe = false;
  bool discard_enable = true;

  // Rejects bad values with a message naming the key.
  [[nodiscard]] static Result<BlockConfig> parse(const std::map<std::string, std::string>& keys);
  // "xvda-raw": the block node name, as QEMU names qdisk nodes.
  [[nodiscard]] std::string node_name(std::string_view devid) const;
};

// `params` = "<format>:<path>" ("aio:" and "raw:" mean raw; no prefix means raw).
struct Params {
  block::Format format;
  std::string path;
};
[[nodiscard]] Result<Params> parse_params(std::string_view params);

struct QueueKeys {
  std::vector<GrantRef> ring_refs;  // ring-ref (order 0) or ring-ref0..N-1
  Port event_channel;
};

struct FrontendConfig {
  Abi abi = kNativeAbi;
  uint32_t ring_page_order = 0;
  bool persistent = false;
  std::vector<QueueKeys> queues;
  std::optional<uint32_t> virtual_device;
  std::string device_type;
  bool trusted = true;

  // `read(key)` reads a frontend key ("queue-1/ring-ref0"), nullopt when absent.
  using Reader = std::function<Result<std::optional<std::string>>(std::string_view key)>;
  [[nodiscard]] static Result<FrontendConfig> parse(const Reader& read, uint32_t max_queues);
};

}  // namespace pvhost::blkif
