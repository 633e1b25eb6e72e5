#include "src/block/qcow2/qcow2_format.h"

#include <zlib.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "src/block/formats.h"

namespace pvhost::block::qcow2 {
namespace {

bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
  return alen != 0 && blen != 0 && a < b + blen && b < a + alen;
}

// [offset, offset + length) lies inside a file of `file_size` bytes, without overflow.
bool inside(uint64_t offset, uint64_t length, uint64_t file_size) {
  return offset <= file_size && length <= file_size - offset;
}

std::string feature_list(const Header& h, uint64_t bits) {
  std::string out;
  for (unsigned b = 0; b < 64; ++b) {
    if (!(bits & (uint64_t{1} << b))) continue;
    std::string name = fmt::format("bit {}", b);
    for (const auto& f : h.feature_names) {
      if (f.type == 0 && f.bit == b) name = fmt::format("'{}' (bit {})", f.name, b);
    }
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

}  // namespace

Result<Header> parse_header(std::span<const std::byte> head, uint64_t file_size) {
  Header h;
  if (head.size() < kV2HeaderLength) return fail(EINVAL, "file too short for a qcow2 header");
  const std::byte* p = head.data();
  if (load_be32(p) != kMagic) return fail(EINVAL, "not a qcow2 image (bad magic)");
  h.version = load_be32(p + 4);
  if (h.version != 2 && h.version != 3) return fail(ENOTSUP, fmt::format("qcow2 version {} not supported", h.version));
  h.backing_file_offset = load_be64(p + 8);
  h.backing_file_size = load_be32(p + 16);
  h.cluster_bits = load_be32(p + 20);
  h.size = load_be64(p + 24);
  h.crypt_method = load_be32(p + 32);
  h.l1_size = load_be32(p + 36);
  h.l1_table_offset = load_be64(p + 40);
  h.refcount_table_offset = load_be64(p + 48);
  h.refcount_table_clusters = load_be32(p + 56);
  h.nb_snapshots = load_be32(p + 60);
  h.snapshots_offset = load_be64(p + 64);

  // qcow2.txt: cluster_bits "must not be less than 9 (i.e. 512 byte clusters)"; QEMU
  // caps it at 21 (2 MiB).
  if (h.cluster_bits < 9 || h.cluster_bits > 21)
    return fail(EINVAL, fmt::format("cluster_bits {} outside 9..21", h.cluster_bits));
  const uint64_t cs = h.cluster_size();
  if (h.version == 3) {
    if (head.size() < kV3HeaderLength) return fail(EINVAL, "file too short for a qcow2 v3 header");
    h.incompatible_features = load_be64(p + 72);
    h.compatible_features = load_be64(p + 80);
    h.autoclear_features = load_be64(p + 88);
    h.refcount_order = load_be32(p + 96);
    h.header_length = load_be32(p + 100);
    if (h.header_length < kV3HeaderLength || h.header_length % 8 != 0 || h.header_length > cs ||
        h.header_length > head.size())
      return fail(EINVAL, fmt::format("bad v3 header_length {}", h.header_length));
    if (h.header_length > 104) h.compression_type = std::to_integer<uint8_t>(p[104]);
    if (h.refcount_order > 6) return fail(EINVAL, fmt::format("refcount_order {} above 6", h.refcount_order));
  } else {
    h.refcount_order = 4;  // v2: always 16-bit refcounts
    h.header_length = kV2HeaderLength;
  }
  if (head.size() < std::min<uint64_t>(cs, file_size))
    return fail(EINVAL, "header buffer shorter than one cluster");
  const uint64_t header_end = std::min<uint64_t>(cs, head.size());

  // Header extensions: from header_length up to the first cluster's end, 8-aligned.
  uint64_t off = h.header_length;
  for (unsigned n = 0;; ++n) {
    if (n > 1024) return fail(EINVAL, "too many header extensions");
    if (off + 8 > header_end) {
      if (h.version == 2 && off >= header_end) break;  // v2 may have none and no end marker
      return fail(EINVAL, "header extensions run past the first cluster");
    }
    const uint32_t type = load_be32(p + off);
    const uint32_t len = load_be32(p + off + 4);
    off += 8;
    if (type == kExtEnd) break;
    if (len > header_end - off) return fail(EINVAL, fmt::format("header extension {:#x} runs past the first cluster", type));
    const std::byte* d = p + off;
    switch (type) {
      case kExtBackingFormat:
        h.backing_format.assign(reinterpret_cast<const char*>(d), len);
        break;
      case kExtFeatureTable:
        for (uint32_t i = 0; i + 48 <= len; i += 48) {
          FeatureName f;
          f.type = std::to_integer<uint8_t>(d[i]);
          f.bit = std::to_integer<uint8_t>(d[i + 1]);
          const char* name = reinterpret_cast<const char*>(d + i + 2);
          f.name.assign(name, strnlen(name, 46));
          h.feature_names.push_back(std::move(f));
        }
        break;
      case kExtCrypto:
        return fail(ENOTSUP, "encrypted qcow2 images are not supported");
      case kExtDataFile:
        return fail(ENOTSUP, "qcow2 external data files are not supported");
      default:
        // qcow2.txt: unknown header extensions may be ignored (bitmaps among them; the
        // autoclear bit tells QEMU that we did not keep them up to date).
        break;
    }
    const uint64_t padded = (uint64_t{len} + 7) & ~uint64_t{7};
    if (padded > header_end - off) return fail(EINVAL, "header extension padding runs past the first cluster");
    off += padded;
  }

  // Features: refuse what we cannot honour, naming it.
  if (h.incompatible_features & ~kIncompatKnown)
    return fail(ENOTSUP, fmt::format("unknown incompatible qcow2 features: {}",
                                     feature_list(h, h.incompatible_features & ~kIncompatKnown)));
  if (h.incompatible_features & kIncompatCorrupt)
    return fail(EUCLEAN, "image is marked corrupt; run 'qemu-img check -r all'");
  if (h.incompatible_features & kIncompatDirty)
    return fail(EUCLEAN, "image is dirty (lazy refcounts were not written back); run 'qemu-img check -r all'");
  if (h.incompatible_features & kIncompatDataFile) return fail(ENOTSUP, "qcow2 external data files are not supported");
  if (h.incompatible_features & kIncompatExtendedL2) return fail(ENOTSUP, "qcow2 extended L2 entries (subclusters) are not supported");
  if (h.incompatible_features & kIncompatCompression) {
    if (h.compression_type != 0) return fail(ENOTSUP, fmt::format("qcow2 compression type {} not supported (zlib only)", h.compression_type));
  } else if (h.compression_type != 0) {
    return fail(EINVAL, "compression type set without its incompatible feature bit");
  }
  if (h.crypt_method != 0) return fail(ENOTSUP, "encrypted qcow2 images are not supported");

  // Sizes and tables.
  if (h.size > kMaxVirtualSize) return fail(EFBIG, fmt::format("virtual size {} too large", h.size));
  const uint64_t l1_covers = cs * h.l2_entries();  // <= 2^39
  const uint64_t l1_needed = h.size / l1_covers + (h.size % l1_covers != 0);
  if (h.l1_bytes() > kMaxL1Bytes) return fail(EFBIG, fmt::format("L1 table of {} entries too large", h.l1_size));
  if (h.l1_size < l1_needed)
    return fail(EINVAL, fmt::format("L1 table of {} entries too small for {} bytes", h.l1_size, h.size));
  if (h.l1_size > 0) {
    if (h.l1_table_offset % cs != 0) return fail(EINVAL, "L1 table offset not cluster aligned");
    if (h.l1_table_offset == 0) return fail(EINVAL, "L1 table overlaps the header");
    if (!inside(h.l1_table_offset, h.l1_bytes(), file_size)) return fail(EINVAL, "L1 table past the end of the file");
  }
  if (h.refcount_table_clusters == 0) return fail(EINVAL, "no refcount table");
  if (h.refcount_table_bytes() > kMaxRefTableBytes)
    return fail(EFBIG, fmt::format("refcount table of {} clusters too large", h.refcount_table_clusters));
  if (h.refcount_table_offset % cs != 0 || h.refcount_table_offset == 0)
    return fail(EINVAL, "refcount table offset not cluster aligned or overlapping the header");
  if (!inside(h.refcount_table_offset, h.refcount_table_bytes(), file_size))
    return fail(EINVAL, "refcount table past the end of the file");
  if (ranges_overlap(h.l1_table_offset, h.l1_bytes(), h.refcount_table_offset, h.refcount_table_bytes()))
    return fail(EINVAL, "L1 table overlaps the refcount table");
  if (h.nb_snapshots > 0 && (h.snapshots_offset % cs != 0 || h.snapshots_offset == 0))
    return fail(EINVAL, "snapshot table offset not cluster aligned");

  if (h.backing_file_offset != 0) {
    if (h.backing_file_size == 0 || h.backing_file_size > kMaxBackingNameLength)
      return fail(EINVAL, fmt::format("backing file name length {} invalid", h.backing_file_size));
    if (!inside(h.backing_file_offset, h.backing_file_size, header_end))
      return fail(EINVAL, "backing file name outside the first cluster");
    h.backing_file.assign(reinterpret_cast<const char*>(p + h.backing_file_offset), h.backing_file_size);
    if (h.backing_file.find('\0') != std::string::npos) return fail(EINVAL, "backing file name contains NUL");
  }
  return h;
}

Result<std::vector<std::byte>> build_header(const Header& h) {
  const uint64_t cs = h.cluster_size();
  std::vector<std::byte> out(cs);
  std::byte* p = out.data();
  const uint32_t hl = h.version == 3 ? 112 : kV2HeaderLength;
  store_be32(p, kMagic);
  store_be32(p + 4, h.version);
  store_be32(p + 20, h.cluster_bits);
  store_be64(p + 24, h.size);
  store_be32(p + 32, 0);
  store_be32(p + 36, h.l1_size);
  store_be64(p + 40, h.l1_table_offset);
  store_be64(p + 48, h.refcount_table_offset);
  store_be32(p + 56, h.refcount_table_clusters);
  store_be32(p + 60, 0);
  store_be64(p + 64, 0);
  if (h.version == 3) {
    store_be64(p + 72, h.incompatible_features);
    store_be64(p + 80, h.compatible_features);
    store_be64(p + 88, h.autoclear_features);
    store_be32(p + 96, h.refcount_order);
    store_be32(p + 100, hl);
  }
  uint64_t off = hl;
  auto put_ext = [&](uint32_t type, std::string_view data) -> bool {
    const uint64_t padded = (data.size() + 7) & ~size_t{7};
    if (off + 8 + padded > cs) return false;
    store_be32(p + off, type);
    store_be32(p + off + 4, static_cast<uint32_t>(data.size()));
    if (!data.empty()) std::memcpy(p + off + 8, data.data(), data.size());  // an empty view may be null
    off += 8 + padded;
    return true;
  };
  if (!h.backing_format.empty() && !put_ext(kExtBackingFormat, h.backing_format))
    return fail(ENAMETOOLONG, "backing format name does not fit in the header cluster");
  if (!put_ext(kExtEnd, {})) return fail(ENAMETOOLONG, "header does not fit in one cluster");
  if (!h.backing_file.empty()) {
    if (h.backing_file.size() > kMaxBackingNameLength || off + h.backing_file.size() > cs)
      return fail(ENAMETOOLONG, "backing file name does not fit in the header cluster");
    std::memcpy(p + off, h.backing_file.data(), h.backing_file.size());
    store_be64(p + 8, off);
    store_be32(p + 16, static_cast<uint32_t>(h.backing_file.size()));
  }
  return out;
}

Result<ClusterMapping> decode_l2_entry(uint64_t entry, uint32_t cluster_bits, uint32_t version) {
  ClusterMapping m;
  m.copied = (entry & kOflagCopied) != 0;
  if (entry & kOflagCompressed) {
    // qcow2.txt "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8); bits 0..x-1
    // host offset, bits x..61 the number of additional 512-byte sectors.
    const uint32_t x = 62 - (cluster_bits - 8);
    const uint64_t desc = entry & ~(kOflagCopied | kOflagCompressed);
    m.kind = ClusterMapping::Kind::compressed;
    m.host_offset = desc & ((uint64_t{1} << x) - 1);
    const uint64_t sectors = (desc >> x) + 1;
    m.compressed_size = sectors * 512 - (m.host_offset & 511);
    if (m.host_offset == 0) return fail(EINVAL, "compressed cluster at offset 0");
    return m;
  }
  m.host_offset = entry & kL2OffsetMask;
  // Bits 1-8 and 56-61 are reserved; QEMU ignores them on read, and so do we.
  if (version >= 3 && (entry & kOflagZero)) {
    m.kind = ClusterMapping::Kind::zero;
  } else if (m.host_offset != 0) {
    m.kind = ClusterMapping::Kind::normal;
  } else {
    m.kind = ClusterMapping::Kind::unallocated;
  }
  if (m.host_offset % (uint64_t{1} << cluster_bits) != 0)
    return fail(EINVAL, fmt::format("L2 entry {:#x}: data cluster offset not cluster aligned", entry));
  return m;
}

uint64_t get_refcount(std::span<const std::byte> block, uint32_t order, uint64_t index) {
  const std::byte* b = block.data();
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const uint64_t bits = uint64_t{1} << order;
      const uint64_t per_byte = 8 / bits;
      const unsigned shift = static_cast<unsigned>((index % per_byte) * bits);
      return (std::to_integer<uint64_t>(b[index / per_byte]) >> shift) & ((uint64_t{1} << bits) - 1);
    }
    case 3:
      return std::to_integer<uint64_t>(b[index]);
    case 4:
      return load_be16(b + index * 2);
    case 5:
      return load_be32(b + index * 4);
    default:
      return load_be64(b + index * 8);
  }
}

void set_refcount(std::span<std::byte> block, uint32_t order, uint64_t index, uint64_t value) {
  std::byte* b = block.data();
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const uint64_t bits = uint64_t{1} << order;
      const uint64_t per_byte = 8 / bits;
      const unsigned shift = static_cast<unsigned>((index % per_byte) * bits);
      const unsigned mask = ((1u << bits) - 1) << shift;
      unsigned v = std::to_integer<unsigned>(b[index / per_byte]);
      v = (v & ~mask) | ((static_cast<unsigned>(value) << shift) & mask);
      b[index / per_byte] = std::byte(v & 0xff);
      return;
    }
    case 3:
      b[index] = std::byte(value & 0xff);
      return;
    case 4:
      store_be16(b + index * 2, static_cast<uint16_t>(value));
      return;
    case 5:
      store_be32(b + index * 4, static_cast<uint32_t>(value));
      return;
    default:
      store_be64(b + index * 8, value);
      return;
  }
}

Result<RefcountTableGrowth> plan_refcount_table_growth(const Header& h, uint64_t start_cluster,
                                                       uint64_t min_entries) {
  const uint64_t cs = h.cluster_size();
  const uint64_t per_block = h.refblock_entries();
  const uint64_t per_table_cluster = cs / 8;
  const uint64_t old_entries = h.refcount_table_bytes() / 8;
  const uint64_t max_clusters = (uint64_t{1} << 56) / cs;
  if (start_cluster / per_block < old_entries)
    return fail(EINVAL,
                fmt::format("new refcount area at cluster {} is inside what the old table covers",
                            start_cluster));
  if (start_cluster >= max_clusters)
    return fail(ENOSPC, "no room for a larger refcount table below 2^56");
  // Half as large again (QEMU's next_refcount_table_size does the same), but not past the
  // limit when what is really needed still fits.
  const uint64_t want = std::max(
      {min_entries, std::min(old_entries + old_entries / 2, kMaxRefTableBytes / 8), uint64_t{1}});
  auto clusters_for = [&](uint64_t entries) {
    return entries / per_table_cluster + (entries % per_table_cluster != 0);
  };
  // The area [start, start + blocks + table) needs blocks for every table index it
  // touches, and the table needs entries up to the last of them: both only grow, so this
  // reaches a fixed point (bounded by the size checks).
  uint64_t blocks = 1;
  uint64_t table = clusters_for(want);
  for (;;) {
    if (table > kMaxRefTableBytes / cs)
      return fail(ENOSPC, fmt::format("refcount table would need more than {} bytes (QEMU's "
                                      "limit); the image cannot grow further",
                                      kMaxRefTableBytes));
    const uint64_t end =
        start_cluster + blocks + table;  // no overflow: start < 2^47, the rest < 2^24
    if (end > max_clusters) return fail(ENOSPC, "no room for a larger refcount table below 2^56");
    const uint64_t last_index = (end - 1) / per_block;
    const uint64_t need_blocks = last_index - start_cluster / per_block + 1;
    const uint64_t need_table = clusters_for(std::max(want, last_index + 1));
    if (need_blocks <= blocks && need_table <= table) break;
    blocks = std::max(blocks, need_blocks);
    table = std::max(table, need_table);
  }
  RefcountTableGrowth g;
  g.blocks_offset = start_cluster * cs;
  g.block_count = blocks;
  g.first_block_index = start_cluster / per_block;
  g.table_offset = (start_cluster + blocks) * cs;
  g.table_clusters = static_cast<uint32_t>(table);  // <= 8 MiB / 512
  return g;
}

Result<void> inflate_cluster(std::span<const std::byte> in, std::span<std::byte> out) {
  z_stream z{};
  if (inflateInit2(&z, -12) != Z_OK) return fail(ENOMEM, "inflateInit2");
  z.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  z.avail_in = static_cast<uInt>(in.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  const int r = inflate(&z, Z_FINISH);
  const bool full = z.avail_out == 0;
  inflateEnd(&z);
  // The compressed data may be followed by the rest of its last sector (qcow2.txt), so a
  // full output buffer with input left over (Z_BUF_ERROR) is as good as Z_STREAM_END.
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR) && full) return {};
  return fail(EIO, fmt::format("compressed cluster does not inflate to one cluster (zlib {})", r));
}

}  // namespace pvhost::block::qcow2
