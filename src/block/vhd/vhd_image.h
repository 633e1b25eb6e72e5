// The VHD driver ("vpc" in QEMU): fixed, dynamic and differencing disks per the Microsoft
// Virtual Hard Disk Image Format Specification (footer, dynamic disk header, BAT, sector
// bitmaps, parent locators).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "src/block/formats.h"

namespace pvhost::block {

[[nodiscard]] Result<std::unique_ptr<Image>> open_vhd(const OpenOptions& options);
[[nodiscard]] Result<std::unique_ptr<Image>> open_vhd_in_chain(const OpenOptions& options, ChainGuard& guard);

// Creates a differencing VHD whose parent is `parent_path` (a VHD), with W2ku (absolute)
// and W2ru (relative) parent locators. QEMU cannot create these; XCP/Hyper-V use them.
[[nodiscard]] Result<void> create_vhd_differencing(const std::string& path, const std::string& parent_path);

}  // namespace pvhost::block
