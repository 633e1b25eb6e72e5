// The `raw` driver: a file or block device, O_DIRECT where the file system allows it, I/O
// through one io_uring per queue (liburing), completions signalled by an eventfd on the
// queue's loop.
#pragma once

#include "src/block/block_driver.h"

namespace pvhost::block {

[[nodiscard]] Result<std::unique_ptr<BlockDriver>> open_raw(const OpenOptions& options);

}  // namespace pvhost::block
