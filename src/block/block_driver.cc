#include "src/block/block_driver.h"

#include <fmt/format.h>

#include "src/block/raw_driver.h"

namespace pvhost::block {

std::string_view to_string(Format f) {
  switch (f) {
    case Format::raw:
      return "raw";
  }
  return "?";
}

Result<Format> parse_format(std::string_view name) {
  // "aio" is what libxl writes for raw images in qdisk `params` (aio:/path).
  if (name == "raw" || name == "aio") return Format::raw;
  return fail(ENOTSUP, fmt::format("format '{}' not supported yet", name));
}

Result<std::unique_ptr<BlockDriver>> open_image(Format format, const OpenOptions& options) {
  switch (format) {
    case Format::raw:
      return open_raw(options);
  }
  return fail(EINVAL, "unknown format");
}

}  // namespace pvhost::block
