// VHD on-disk structures and their pure parsers, per the Microsoft "Virtual Hard Disk
// Image Format Specification" (v1.0, 2006): the 512-byte footer (at the end of every
// image, copied at offset 0 for dynamic and differencing disks), the 1024-byte dynamic
// disk header, the BAT, parent locators. All fields are big-endian; parent locator data
// for the W2ku/W2ru platform codes is UTF-16LE, the parent unicode name UTF-16BE.
// Fuzzed by tests/fuzz/formats/formats_fuzz.cc.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "src/error.h"

namespace pvhost::block::vhd {

inline constexpr uint32_t kDiskFixed = 2;
inline constexpr uint32_t kDiskDynamic = 3;
inline constexpr uint32_t kDiskDifferencing = 4;
inline constexpr uint32_t kBatUnused = 0xFFFFFFFFu;
inline constexpr uint32_t kPlatformW2ku = 0x57326B75;  // "W2ku": absolute Windows path, UTF-16LE
inline constexpr uint32_t kPlatformW2ru = 0x57327275;  // "W2ru": relative Windows path, UTF-16LE
inline constexpr uint32_t kPlatformMacX = 0x4D616358;  // "MacX": file:// URL, UTF-8
// Spec: "the maximum size of a dynamic hard disk is 2040 GB".
inline constexpr uint64_t kMaxSize = 2040ULL << 30;
// The spec's CHS geometry limit: 65535 cylinders, 16 heads, 255 sectors per track.
inline constexpr uint64_t kMaxGeometrySectors = 65535ULL * 16 * 255;

struct Footer {
  uint32_t features = 2;
  uint32_t version = 0x00010000;
  uint64_t data_offset = ~uint64_t{0};
  uint32_t timestamp = 0;  // seconds since 2000-01-01 00:00:00 UTC
  std::array<char, 4> creator_app{};
  uint32_t creator_version = 0;
  uint32_t creator_os = 0;
  uint64_t original_size = 0;
  uint64_t current_size = 0;
  uint16_t cylinders = 0;
  uint8_t heads = 0;
  uint8_t sectors_per_track = 0;
  uint32_t disk_type = kDiskFixed;
  std::array<std::byte, 16> unique_id{};
  uint8_t saved_state = 0;

  // The guest-visible size, as QEMU's vpc driver computes it: CHS geometry for images
  // from Virtual PC and old QEMU, current_size for Hyper-V ("win "), QEMU's "qem2",
  // Disk2vhd ("d2v "), XenServer ("tap\0"), XenConverter ("CTXS"), or when the geometry
  // is the maximum one (the size would not fit in CHS).
  [[nodiscard]] uint64_t virtual_size() const;
};

struct ParentLocator {
  uint32_t platform_code = 0;
  uint32_t data_space = 0;
  uint32_t data_length = 0;
  uint64_t data_offset = 0;
};

struct DynamicHeader {
  uint64_t table_offset = 0;
  uint32_t max_table_entries = 0;
  uint32_t block_size = 2u << 20;
  std::array<std::byte, 16> parent_unique_id{};
  uint32_t parent_timestamp = 0;
  std::string parent_name;  // UTF-8, from the UTF-16BE field
  std::array<ParentLocator, 8> locators{};

  // Bytes of the sector bitmap in front of each block, rounded up to a sector.
  [[nodiscard]] uint64_t bitmap_bytes() const {
    const uint64_t bits = block_size / 512;
    return ((bits + 7) / 8 + 511) / 512 * 512;
  }
};

// One's complement of the byte sum with the checksum field taken as zero (spec "Checksum").
[[nodiscard]] uint32_t checksum(std::span<const std::byte> bytes, size_t checksum_offset);

[[nodiscard]] Result<Footer> parse_footer(std::span<const std::byte> b);
[[nodiscard]] std::array<std::byte, 512> build_footer(const Footer& f);
// `file_size` bounds the BAT and locators; `virtual_size` must be covered by the BAT.
[[nodiscard]] Result<DynamicHeader> parse_dynamic_header(std::span<const std::byte> b, uint64_t file_size,
                                                         uint64_t virtual_size);
[[nodiscard]] std::array<std::byte, 1024> build_dynamic_header(const DynamicHeader& h);

// UTF-16 (LE or BE) to UTF-8; stops at the first NUL. Unpaired surrogates become U+FFFD.
[[nodiscard]] std::string utf16_to_utf8(std::span<const std::byte> b, bool big_endian);
[[nodiscard]] std::vector<std::byte> utf8_to_utf16(const std::string& s, bool big_endian);

// CHS geometry for a size, per the spec's appendix algorithm.
void chs_for_size(uint64_t size, uint16_t& cylinders, uint8_t& heads, uint8_t& sectors);

}  // namespace pvhost::block::vhd
