// Per-node I/O accounting for the layers of an image chain (issue #7): a decorator Image
// that forwards everything to the format driver and counts each completed read, write,
// flush and discard into a NodeCounters. open_any_in_chain() (formats.cc) wraps every layer
// it opens, so reads that fall through an overlay to its backing file (qcow2 backing,
// VHD differencing parent) and the block-commit job's reads and writes land on the layer
// that served them.
//
// These are what query-blockstats reports per node, with QEMU's BlockDeviceStats names
// (qapi/block-core.json); the guest-facing counters stay in backends/block/stats.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "src/block/formats.h"
#include "src/block/node_counters.h"

namespace pvhost::block {

class CountingImage final : public Image {
 public:
  explicit CountingImage(std::unique_ptr<Image> inner);

  Result<void> read_at(uint64_t offset, std::span<std::byte> buf) override;
  Result<void> write_at(uint64_t offset, std::span<const std::byte> buf) override;
  Result<void> flush_all() override;
  Result<void> discard_at(uint64_t offset, uint64_t length) override;
  [[nodiscard]] ImageDetails details() const override { return inner_->details(); }
  [[nodiscard]] const Image* backing() const override { return inner_->backing(); }
  [[nodiscard]] const ImageFile* file() const override { return inner_->file(); }
  [[nodiscard]] Result<Allocation> allocation(uint64_t offset, uint64_t length) override {
    return inner_->allocation(offset, length);
  }
  [[nodiscard]] DriverInfo info() const override { return inner_->info(); }
  [[nodiscard]] const std::string& path() const override { return inner_->path(); }
  [[nodiscard]] Result<uint64_t> refresh_size() override { return inner_->refresh_size(); }

  [[nodiscard]] const Image& inner() const { return *inner_; }
  [[nodiscard]] Image& inner() { return *inner_; }
  [[nodiscard]] const std::shared_ptr<NodeCounters>& counters() const { return counters_; }
  // Makes this layer count into `c` (the node's counters from an earlier opening of the
  // same file, so they continue across a snapshot or a reopen). Only while nothing does
  // I/O through this image (at open, or with the disk quiesced): the I/O path reads the
  // pointer without synchronisation.
  void share_counters(std::shared_ptr<NodeCounters> c) { counters_ = std::move(c); }

 private:
  std::unique_ptr<Image> inner_;
  std::shared_ptr<NodeCounters> counters_ = std::make_shared<NodeCounters>();
};

// `inner` wrapped in a CountingImage (an image that already is one is returned as it is).
[[nodiscard]] std::unique_ptr<Image> count_io(std::unique_ptr<Image> inner);
// The format driver under any counting wrapper (for code that needs the concrete type).
[[nodiscard]] Image* unwrap_counting(Image* image);
// The counting wrapper of one layer, or null (a driver opened without open_any_in_chain,
// such as the io_uring raw driver).
[[nodiscard]] CountingImage* as_counting(BlockDriver* driver);
[[nodiscard]] const CountingImage* as_counting(const BlockDriver* driver);

// A node name for a layer nobody named, in QEMU's style for generated names ("#block"
// and a number, util/id.c): the '#' keeps it out of the names a user may choose.
// Process-wide and never reused, as in QEMU.
[[nodiscard]] std::string generate_node_name();
// Whether `name` may be given to a node: QEMU's id_wellformed() (a letter, then letters,
// digits, '-', '.', '_'). QEMU also refuses names longer than this (the size of
// BlockDriverState.node_name, less its NUL).
[[nodiscard]] bool node_name_wellformed(std::string_view name);
inline constexpr size_t kMaxNodeNameLength = 31;

}  // namespace pvhost::block
