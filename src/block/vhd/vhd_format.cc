#include "src/block/vhd/vhd_format.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "src/block/formats.h"

namespace pvhost::block::vhd {

uint32_t checksum(std::span<const std::byte> bytes, size_t checksum_offset) {
  uint32_t sum = 0;
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (i >= checksum_offset && i < checksum_offset + 4) continue;
    sum += std::to_integer<uint32_t>(bytes[i]);
  }
  return ~sum;
}

uint64_t Footer::virtual_size() const {
  const uint64_t chs = uint64_t{cylinders} * heads * sectors_per_track;
  auto is = [&](const char* app) { return std::memcmp(creator_app.data(), app, 4) == 0; };
  const bool use_current = is("win ") || is("qem2") || is("d2v ") || is("CTXS") || is("tap")  /* "tap\0": the literal's NUL is the 4th byte */;
  if (use_current || chs == kMaxGeometrySectors) return current_size;
  return chs * 512;
}

Result<Footer> parse_footer(std::span<const std::byte> b) {
  if (b.size() < 512) return fail(EINVAL, "VHD footer shorter than 512 bytes");
  if (std::memcmp(b.data(), "conectix", 8) != 0) return fail(EINVAL, "not a VHD image (no 'conectix' footer)");
  const uint32_t stored = load_be32(b.data() + 64);
  if (stored != checksum(b.first(512), 64))
    return fail(EINVAL, fmt::format("VHD footer checksum {:#x} does not match its content", stored));
  Footer f;
  f.features = load_be32(b.data() + 8);
  f.version = load_be32(b.data() + 12);
  f.data_offset = load_be64(b.data() + 16);
  f.timestamp = load_be32(b.data() + 24);
  std::memcpy(f.creator_app.data(), b.data() + 28, 4);
  f.creator_version = load_be32(b.data() + 32);
  f.creator_os = load_be32(b.data() + 36);
  f.original_size = load_be64(b.data() + 40);
  f.current_size = load_be64(b.data() + 48);
  f.cylinders = load_be16(b.data() + 56);
  f.heads = std::to_integer<uint8_t>(b[58]);
  f.sectors_per_track = std::to_integer<uint8_t>(b[59]);
  f.disk_type = load_be32(b.data() + 60);
  std::memcpy(f.unique_id.data(), b.data() + 68, 16);
  f.saved_state = std::to_integer<uint8_t>(b[84]);
  if ((f.version >> 16) != 1) return fail(ENOTSUP, fmt::format("VHD file format version {:#x} not supported", f.version));
  if (f.disk_type != kDiskFixed && f.disk_type != kDiskDynamic && f.disk_type != kDiskDifferencing)
    return fail(ENOTSUP, fmt::format("VHD disk type {} not supported", f.disk_type));
  if (f.virtual_size() > kMaxSize || f.current_size > kMaxSize)
    return fail(EFBIG, fmt::format("VHD size {} above the format's 2040 GiB", f.current_size));
  if (f.virtual_size() % 512 != 0) return fail(EINVAL, "VHD size not a multiple of 512");
  return f;
}

std::array<std::byte, 512> build_footer(const Footer& f) {
  std::array<std::byte, 512> b{};
  std::memcpy(b.data(), "conectix", 8);
  store_be32(b.data() + 8, f.features);
  store_be32(b.data() + 12, f.version);
  store_be64(b.data() + 16, f.data_offset);
  store_be32(b.data() + 24, f.timestamp);
  std::memcpy(b.data() + 28, f.creator_app.data(), 4);
  store_be32(b.data() + 32, f.creator_version);
  store_be32(b.data() + 36, f.creator_os);
  store_be64(b.data() + 40, f.original_size);
  store_be64(b.data() + 48, f.current_size);
  store_be16(b.data() + 56, f.cylinders);
  b[58] = std::byte(f.heads);
  b[59] = std::byte(f.sectors_per_track);
  store_be32(b.data() + 60, f.disk_type);
  std::memcpy(b.data() + 68, f.unique_id.data(), 16);
  b[84] = std::byte(f.saved_state);
  store_be32(b.data() + 64, checksum(b, 64));
  return b;
}

Result<DynamicHeader> parse_dynamic_header(std::span<const std::byte> b, uint64_t file_size, uint64_t virtual_size) {
  if (b.size() < 1024) return fail(EINVAL, "VHD dynamic header shorter than 1024 bytes");
  if (std::memcmp(b.data(), "cxsparse", 8) != 0) return fail(EINVAL, "VHD dynamic header has no 'cxsparse' cookie");
  const uint32_t stored = load_be32(b.data() + 36);
  if (stored != checksum(b.first(1024), 36))
    return fail(EINVAL, fmt::format("VHD dynamic header checksum {:#x} does not match its content", stored));
  DynamicHeader h;
  h.table_offset = load_be64(b.data() + 16);
  h.max_table_entries = load_be32(b.data() + 28);
  h.block_size = load_be32(b.data() + 32);
  std::memcpy(h.parent_unique_id.data(), b.data() + 40, 16);
  h.parent_timestamp = load_be32(b.data() + 56);
  h.parent_name = utf16_to_utf8(b.subspan(64, 512), true);
  for (size_t i = 0; i < 8; ++i) {
    const std::byte* e = b.data() + 576 + i * 24;
    h.locators[i] = {load_be32(e), load_be32(e + 4), load_be32(e + 8), load_be64(e + 16)};
  }
  // The spec's default block size is 2 MiB; QEMU and Hyper-V use powers of two from 512 B
  // (sector) up; bound it so a block and its bitmap stay small enough to buffer.
  if (h.block_size < 512 || h.block_size > (256u << 20) || (h.block_size & (h.block_size - 1)) != 0)
    return fail(EINVAL, fmt::format("VHD block size {} is not a power of two in 512..256M", h.block_size));
  const uint64_t bat_bytes = uint64_t{h.max_table_entries} * 4;
  if (h.table_offset % 512 != 0) return fail(EINVAL, "VHD BAT offset not sector aligned");
  if (h.table_offset > file_size || bat_bytes > file_size - h.table_offset)
    return fail(EINVAL, fmt::format("VHD BAT of {} entries at {} past the end of the file", h.max_table_entries, h.table_offset));
  if (uint64_t{h.max_table_entries} * h.block_size < virtual_size)
    return fail(EINVAL, fmt::format("VHD BAT of {} entries too small for {} bytes", h.max_table_entries, virtual_size));
  return h;
}

std::array<std::byte, 1024> build_dynamic_header(const DynamicHeader& h) {
  std::array<std::byte, 1024> b{};
  std::memcpy(b.data(), "cxsparse", 8);
  store_be64(b.data() + 8, ~uint64_t{0});
  store_be64(b.data() + 16, h.table_offset);
  store_be32(b.data() + 24, 0x00010000);
  store_be32(b.data() + 28, h.max_table_entries);
  store_be32(b.data() + 32, h.block_size);
  std::memcpy(b.data() + 40, h.parent_unique_id.data(), 16);
  store_be32(b.data() + 56, h.parent_timestamp);
  auto name = utf8_to_utf16(h.parent_name, true);
  std::memcpy(b.data() + 64, name.data(), std::min<size_t>(name.size(), 512));
  for (size_t i = 0; i < 8; ++i) {
    std::byte* e = b.data() + 576 + i * 24;
    store_be32(e, h.locators[i].platform_code);
    store_be32(e + 4, h.locators[i].data_space);
    store_be32(e + 8, h.locators[i].data_length);
    store_be64(e + 16, h.locators[i].data_offset);
  }
  store_be32(b.data() + 36, checksum(b, 36));
  return b;
}

std::string utf16_to_utf8(std::span<const std::byte> b, bool big_endian) {
  std::string out;
  auto unit = [&](size_t i) -> uint32_t {
    const uint32_t a = std::to_integer<uint32_t>(b[i]), c = std::to_integer<uint32_t>(b[i + 1]);
    return big_endian ? (a << 8) | c : (c << 8) | a;
  };
  for (size_t i = 0; i + 1 < b.size(); i += 2) {
    uint32_t cp = unit(i);
    if (cp == 0) break;
    if (cp >= 0xD800 && cp < 0xDC00 && i + 3 < b.size()) {
      const uint32_t lo = unit(i + 2);
      if (lo >= 0xDC00 && lo < 0xE000) {
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        i += 2;
      } else {
        cp = 0xFFFD;
      }
    } else if (cp >= 0xD800 && cp < 0xE000) {
      cp = 0xFFFD;
    }
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  return out;
}

std::vector<std::byte> utf8_to_utf16(const std::string& s, bool big_endian) {
  std::vector<std::byte> out;
  auto put = [&](uint32_t u) {
    const std::byte hi{static_cast<unsigned char>(u >> 8)}, lo{static_cast<unsigned char>(u & 0xff)};
    if (big_endian) {
      out.push_back(hi);
      out.push_back(lo);
    } else {
      out.push_back(lo);
      out.push_back(hi);
    }
  };
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    uint32_t cp = 0xFFFD;
    size_t n = 1;
    if (c < 0x80) {
      cp = c;
    } else if ((c >> 5) == 6 && i + 1 < s.size()) {
      cp = ((c & 0x1Fu) << 6) | (static_cast<unsigned char>(s[i + 1]) & 0x3Fu);
      n = 2;
    } else if ((c >> 4) == 14 && i + 2 < s.size()) {
      cp = ((c & 0x0Fu) << 12) | ((static_cast<unsigned char>(s[i + 1]) & 0x3Fu) << 6) |
           (static_cast<unsigned char>(s[i + 2]) & 0x3Fu);
      n = 3;
    } else if ((c >> 3) == 30 && i + 3 < s.size()) {
      cp = ((c & 0x07u) << 18) | ((static_cast<unsigned char>(s[i + 1]) & 0x3Fu) << 12) |
           ((static_cast<unsigned char>(s[i + 2]) & 0x3Fu) << 6) | (static_cast<unsigned char>(s[i + 3]) & 0x3Fu);
      n = 4;
    }
    i += n;
    if (cp >= 0x10000) {
      cp -= 0x10000;
      put(0xD800 + (cp >> 10));
      put(0xDC00 + (cp & 0x3FF));
    } else {
      put(cp);
    }
  }
  return out;
}

void chs_for_size(uint64_t size, uint16_t& cylinders, uint8_t& heads, uint8_t& sectors) {
  // Spec appendix "CHS Calculation".
  uint64_t total = size / 512;
  if (total > kMaxGeometrySectors) total = kMaxGeometrySectors;
  uint64_t spt = 0, hh = 0, cth = 0;
  if (total >= 65535ULL * 16 * 63) {
    spt = 255;
    hh = 16;
    cth = total / spt;
  } else {
    spt = 17;
    cth = total / spt;
    hh = (cth + 1023) / 1024;
    if (hh < 4) hh = 4;
    if (cth >= hh * 1024 || hh > 16) {
      spt = 31;
      hh = 16;
      cth = total / spt;
    }
    if (cth >= hh * 1024) {
      spt = 63;
      hh = 16;
      cth = total / spt;
    }
  }
  cylinders = static_cast<uint16_t>(std::min<uint64_t>(cth / hh, 65535));
  heads = static_cast<uint8_t>(hh);
  sectors = static_cast<uint8_t>(spt);
}

}  // namespace pvhost::block::vhd
