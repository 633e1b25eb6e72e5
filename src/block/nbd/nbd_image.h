// The NBD driver, through libnbd: remote and distributed storage.
#pragma once

#include <memory>
#include <string_view>

#include "src/block/formats.h"

namespace pvhost::block {

// `spec`: nbd:unix:/path[:exportname=NAME] or nbd://host[:port]/export (also
// nbd+unix:///export?socket=/path, libnbd's URI form). A lost connection is re-established
// and the failed request retried (reads, writes, flushes, trims are all idempotent).
[[nodiscard]] Result<std::unique_ptr<Image>> open_nbd(std::string_view spec, ReadOnly read_only = ReadOnly::no);

}  // namespace pvhost::block
