// qcow2 on-disk structures and their pure parsers (QEMU docs/interop/qcow2.txt).
// Parse, then execute (STYLE.md rule 6): everything read from an image goes through these
// functions, which check every field against the file size with overflow-checked
// arithmetic, before the driver (qcow2_image.cc) uses it. They are fuzzed by
// tests/fuzz/formats/formats_fuzz.cc.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "src/error.h"

namespace pvhost::block::qcow2 {

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t kV2HeaderLength = 72;
inline constexpr uint32_t kV3HeaderLength = 104;  // minimum; QEMU writes 112

// Header extension types (qcow2.txt "Header extensions").
inline constexpr uint32_t kExtEnd = 0;
inline constexpr uint32_t kExtBackingFormat = 0xE2792ACA;
inline constexpr uint32_t kExtFeatureTable = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtCrypto = 0x0537be77;
inline constexpr uint32_t kExtDataFile = 0x44415441;

// Incompatible feature bits (header bytes 72-79).
inline constexpr uint64_t kIncompatDirty = 1ULL << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ULL << 1;
inline constexpr uint64_t kIncompatDataFile = 1ULL << 2;
inline constexpr uint64_t kIncompatCompression = 1ULL << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ULL << 4;
inline constexpr uint64_t kIncompatKnown = kIncompatDirty | kIncompatCorrupt | kIncompatDataFile |
                                           kIncompatCompression | kIncompatExtendedL2;
// Compatible bit 0: lazy refcounts. Autoclear bit 0: bitmaps, bit 1: raw external data.
inline constexpr uint64_t kCompatLazyRefcounts = 1ULL << 0;

// L1 / L2 / refcount-table entry layouts (qcow2.txt "Cluster mapping", "Refcounts").
inline constexpr uint64_t kOflagCopied = 1ULL << 63;      // refcount is exactly one
inline constexpr uint64_t kOflagCompressed = 1ULL << 62;  // L2 only
inline constexpr uint64_t kOflagZero = 1ULL << 0;         // L2 standard entries, v3 only
inline constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ULL;  // bits 9-55
inline constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ULL;  // bits 9-55
inline constexpr uint64_t kRefTableOffsetMask = 0xfffffffffffffe00ULL;  // bits 9-63

// Hard bounds (QEMU's: QCOW_MAX_L1_SIZE 32 MiB, QCOW_MAX_REFTABLE_SIZE 8 MiB), so a
// hostile header cannot make us allocate gigabytes.
inline constexpr uint64_t kMaxL1Bytes = 32ULL << 20;
inline constexpr uint64_t kMaxRefTableBytes = 8ULL << 20;
inline constexpr uint32_t kMaxBackingNameLength = 1023;
// Host offsets are 56-bit (L2 bits 9-55); the virtual size is bounded so guest offset
// arithmetic stays far from overflow.
inline constexpr uint64_t kMaxVirtualSize = 1ULL << 61;

struct FeatureName {
  uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
  uint8_t bit = 0;
  std::string name;
};

struct Header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = kV2HeaderLength;
  uint8_t compression_type = 0;

  // From the header extensions and the backing-name field.
  std::string backing_file;
  std::string backing_format;
  std::vector<FeatureName> feature_names;

  [[nodiscard]] uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  [[nodiscard]] uint64_t l2_entries() const { return cluster_size() / 8; }
  [[nodiscard]] uint64_t refcount_bits() const { return uint64_t{1} << refcount_order; }
  // Refcount entries in one refcount block.
  [[nodiscard]] uint64_t refblock_entries() const { return cluster_size() * 8 / refcount_bits(); }
  [[nodiscard]] uint64_t l1_bytes() const { return uint64_t{l1_size} * 8; }
  [[nodiscard]] uint64_t refcount_table_bytes() const {
    return uint64_t{refcount_table_clusters} << cluster_bits;
  }
};

// Parses and validates the header at the start of `head` (the first bytes of the file:
// at least one cluster, or the whole file when it is shorter) of a file of `file_size`
// bytes. Refuses what this driver cannot handle safely, with a message saying why:
// unknown incompatible features (named from the feature table when it has them), the
// dirty and corrupt bits, external data files, compression other than zlib, extended L2
// entries, encryption, tables outside the file, unaligned or overlapping metadata.
[[nodiscard]] Result<Header> parse_header(std::span<const std::byte> head, uint64_t file_size);

// Serialises a header (v2 or v3, with backing-format extension and backing name) into one
// cluster. Fails when it does not fit.
[[nodiscard]] Result<std::vector<std::byte>> build_header(const Header& h);

// One decoded L2 entry.
struct ClusterMapping {
  enum class Kind { unallocated, zero, normal, compressed };
  Kind kind = Kind::unallocated;
  uint64_t host_offset = 0;      // normal (and zero with preallocation): cluster-aligned
  uint64_t compressed_size = 0;  // compressed: bytes from host_offset
  bool copied = false;
};

// Decodes an L2 entry of an image with `cluster_bits` and `version`. Fails on an unaligned
// standard cluster offset.
[[nodiscard]] Result<ClusterMapping> decode_l2_entry(uint64_t entry, uint32_t cluster_bits, uint32_t version);

// Refcount entry access inside one refcount block, for every refcount_order 0..6
// (sub-byte widths are packed from the least significant bit, as QEMU does).
[[nodiscard]] uint64_t get_refcount(std::span<const std::byte> block, uint32_t order, uint64_t index);
void set_refcount(std::span<std::byte> block, uint32_t order, uint64_t index, uint64_t value);
[[nodiscard]] inline uint64_t max_refcount(uint32_t order) {
  return order >= 6 ? ~uint64_t{0} : (uint64_t{1} << (uint64_t{1} << order)) - 1;
}

// Where a grown refcount table and the refcount blocks covering it go (qcow2.txt "Host
// cluster management": the table is contiguous, so growing it means moving it; every
// cluster needs a refcount, the new table's and its refcount blocks' own included).
// The new area starts at cluster `start_cluster`, which must lie past everything the
// current table covers, so none of its refcount blocks exists yet: first `block_count`
// refcount blocks, for table indices first_block_index.., then the table. The table
// keeps the old entries, has at least `min_entries` and covers the whole area; it grows
// at least by half (as QEMU's does) so that growing stays rare.
struct RefcountTableGrowth {
  uint64_t blocks_offset = 0;
  uint64_t block_count = 0;
  uint64_t first_block_index = 0;
  uint64_t table_offset = 0;
  uint32_t table_clusters = 0;
  [[nodiscard]] uint64_t area_clusters() const { return block_count + table_clusters; }
};

// Plans that growth for an image with header `h`. Fails (ENOSPC) when the table would
// exceed kMaxRefTableBytes or the area would end past 2^56 (qcow2.txt: metadata must lie
// below 64 PB), and (EINVAL) when `start_cluster` is inside the current table's reach.
[[nodiscard]] Result<RefcountTableGrowth> plan_refcount_table_growth(const Header& h,
                                                                     uint64_t start_cluster,
                                                                     uint64_t min_entries);

// Inflates one compressed cluster (raw deflate, windowBits -12 per qcow2.txt
// "Compressed Clusters Descriptor") into `out`, which must be filled exactly.
[[nodiscard]] Result<void> inflate_cluster(std::span<const std::byte> in, std::span<std::byte> out);

}  // namespace pvhost::block::qcow2
