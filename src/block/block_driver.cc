#include "src/block/block_driver.h"

#include <fmt/format.h>

#include "src/block/formats.h"
#include "src/block/raw_driver.h"

namespace pvhost::block {

std::string_view to_string(Format f) {
  switch (f) {
    case Format::raw: return "raw";
    case Format::qcow2: return "qcow2";
    case Format::vpc: return "vpc";
    case Format::nbd: return "nbd";
  }
  return "?";
}

Result<Format> parse_format(std::string_view name) {
  // "aio" is what libxl writes for raw images in qdisk `params` (aio:/path).
  if (name == "raw" || name == "aio") return Format::raw;
  if (name == "qcow2") return Format::qcow2;
  if (name == "vpc" || name == "vhd") return Format::vpc;
  if (name == "nbd") return Format::nbd;
  return fail(ENOTSUP, fmt::format("format '{}' is not supported (raw, qcow2, vhd, nbd)", name));
}

Result<std::unique_ptr<BlockDriver>> open_image(Format format, const OpenOptions& options) {
  switch (format) {
    case Format::raw:
      return open_raw(options);
    case Format::qcow2:
    case Format::vpc:
    case Format::nbd:
      // qcow2/VHD (with their backing chains) and NBD: src/block/formats.h.
      return open_format_driver(to_string(format), options);
  }
  return fail(EINVAL, "unknown format");
}

}  // namespace pvhost::block
