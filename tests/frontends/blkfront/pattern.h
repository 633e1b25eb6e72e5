// The data pattern blkfront writes and checks: every byte is a function of its byte offset
// on the disk and a generation number, so a read can be checked without remembering data,
// and the image file can be checked directly.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pvhost::blkfront {

[[nodiscard]] inline std::byte pattern_byte(uint64_t disk_offset, uint32_t generation) {
  uint64_t x = (disk_offset >> 3) * 0x9E3779B97F4A7C15ULL + generation * 0xC2B2AE3D27D4EB4FULL;
  x ^= x >> 29;
  return std::byte(static_cast<uint8_t>(x >> (8 * (disk_offset & 7))));
}

inline void fill_pattern(std::byte* dst, uint64_t disk_offset, size_t len, uint32_t generation) {
  for (size_t i = 0; i < len; ++i) dst[i] = pattern_byte(disk_offset + i, generation);
}

// Offset of the first byte that differs from the pattern, or `len` when all match.
[[nodiscard]] inline size_t check_pattern(const std::byte* src, uint64_t disk_offset, size_t len, uint32_t generation) {
  for (size_t i = 0; i < len; ++i)
    if (src[i] != pattern_byte(disk_offset + i, generation)) return i;
  return len;
}

}  // namespace pvhost::blkfront
