// libFuzzer target over the qcow2 and VHD parsers and drivers (STYLE.md rule 14):
// the input is taken as an image file (in a memfd) and opened read-only as qcow2 and as
// VHD; when it opens, a few reads at the start, the middle and the end walk the L1/L2
// tables, compressed clusters, the BAT and sector bitmaps, and the allocation map is walked. The header parsers also get
// the raw bytes directly. Anything but an error value (crash, sanitizer report, hang)
// is a bug. Backing files named by the input are opened only if they exist, read-only.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "src/block/formats.h"
#include "src/block/qcow2/qcow2_format.h"
#include "src/block/qcow2/qcow2_image.h"
#include "src/block/vhd/vhd_format.h"
#include "src/block/vhd/vhd_image.h"

using namespace pvhost::block;

namespace {

void exercise(Image& img) {
  const uint64_t size = img.info().size_bytes;
  std::vector<std::byte> buf(65536 + 512);
  for (uint64_t off : {uint64_t{0}, size / 2, size > buf.size() ? size - buf.size() : 0}) {
    const uint64_t n = std::min<uint64_t>(buf.size(), size - std::min(off, size));
    (void)img.read_at(off, std::span(buf).first(static_cast<size_t>(n)));  // errors are fine
  }
  // What block-commit asks of a layer: its allocation map, run by run (bounded: a huge
  // hostile size must not make the fuzzer walk forever).
  uint64_t off = 0;
  for (int runs = 0; off < size && runs < 64; ++runs) {
    auto a = img.allocation(off, size - off);
    if (!a || a->bytes == 0) break;
    off += a->bytes;
  }
  (void)image_info_json(img);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  (void)qcow2::parse_header(in, size);
  if (size >= 512) {
    (void)vhd::parse_footer(in.first(512));
    (void)vhd::parse_footer(in.last(512));
  }
  if (size >= 1536) (void)vhd::parse_dynamic_header(in.subspan(512, 1024), size, 1ULL << 30);

  const int fd = ::memfd_create("fuzz-image", MFD_CLOEXEC);
  if (fd < 0) return 0;
  if (::write(fd, data, size) == static_cast<ssize_t>(size)) {
    OpenOptions o;
    o.path = "/proc/self/fd/" + std::to_string(fd);
    o.read_only = ReadOnly::yes;
    if (auto q = open_qcow2(o)) exercise(**q);
    if (auto v = open_vhd(o)) exercise(**v);
  }
  ::close(fd);
  return 0;
}
