// The qcow2 driver (QEMU docs/interop/qcow2.txt): v2 and v3 images, backing chains,
// compressed clusters (read), zero clusters, cluster allocation with refcounts, discard,
// crash-safe metadata ordering (see the comment block in qcow2_image.cc), and creation of
// images (snapshot overlays).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "src/block/formats.h"

namespace pvhost::block {

[[nodiscard]] Result<std::unique_ptr<Image>> open_qcow2(const OpenOptions& options);
[[nodiscard]] Result<std::unique_ptr<Image>> open_qcow2_in_chain(const OpenOptions& options, ChainGuard& guard);

struct Qcow2CreateOptions {
  uint64_t cluster_size = 65536;  // power of two, 512 .. 2 MiB
  std::string backing_file;       // recorded as given (relative to the new image's directory)
  std::string backing_format;     // "qcow2", "raw", "vpc"; empty: not recorded
  unsigned version = 3;           // 2 (compat=0.10) or 3 (compat=1.1)
};

// Creates (or truncates and rewrites) `path` as an empty qcow2 image of `size` bytes:
// header (+ backing-format extension and backing name), one refcount table cluster, one
// refcount block, the L1 table; refcounts of those clusters set. `qemu-img check` finds
// it clean. For a snapshot overlay, `backing_file` is the current image.
[[nodiscard]] Result<void> create_qcow2(const std::string& path, uint64_t size, const Qcow2CreateOptions& options);
// The signature in the brief: create_qcow2(path, size, cluster_size, backing_file, backing_fmt).
[[nodiscard]] inline Result<void> create_qcow2(const std::string& path, uint64_t size, uint64_t cluster_size,
                                               const std::string& backing_file, const std::string& backing_fmt) {
  Qcow2CreateOptions o;
  o.cluster_size = cluster_size;
  o.backing_file = backing_file;
  o.backing_format = backing_fmt;
  return create_qcow2(path, size, o);
}

}  // namespace pvhost::block
