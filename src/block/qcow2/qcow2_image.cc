#include "src/block/qcow2/qcow2_image.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>

#include "src/block/qcow2/qcow2_format.h"
#include "src/log.h"

// Crash-safe ordering
// ===================
// qcow2.txt requires that a reference to a cluster is never on disk while the cluster's
// refcount on disk is lower than the references to it (a crash would then let the cluster
// be handed out twice: corruption). The reverse (a refcount higher than the references)
// is a leak, which `qemu-img check` reports and repairs harmlessly. So:
//
//   write(guest cluster not yet allocated):
//     1. pick a free cluster (refcount 0 in the refcount cache) and increment its refcount
//        in the cache (the refcount block becomes dirty; a missing refcount block is
//        created in the cache, placed inside the range it describes and counting itself);
//     2. write the guest data (a whole cluster: the partial rest copied from the backing
//        file, the zero cluster or the old compressed/shared cluster) to the new cluster;
//     3. set the L2 entry in the L2 cache (dirty; a missing L2 table is allocated as in 1
//        and its L1 entry changed in memory, dirty).
//   Nothing metadata reaches the disk before flush; a write is acknowledged after 2.
//
//   flush (flush_all, and whenever the caches hold too many dirty tables):
//     a. write the dirty refcount blocks;                          fdatasync (also data)
//     b. write the dirty refcount-table entries (new blocks);      fdatasync
//     c. write the dirty L2 tables;                                fdatasync
//     d. write the dirty L1 entries (new L2 tables);               fdatasync
//     e. apply the deferred refcount decrements (clusters that discard, or a rewrite of a
//        compressed/zero/shared cluster, stopped referencing) and write those blocks;
//        fdatasync.
//   Each step only makes pointers to things the previous steps put on disk: refcounts
//   before the refcount table points at their blocks, data and refcounts before L2
//   entries, L2 tables before the L1 entries, and references removed before their
//   refcounts drop (a freed cluster is reused only after e, so it is never referenced
//   twice). A crash between any two writes leaves, at worst, leaked clusters; every
//   write acknowledged before a completed flush is on disk with its metadata.
//   In-place writes to an allocated cluster (L2 entry with OFLAG_COPIED) change no
//   metadata; the flush's fdatasync makes them durable.
//
//   Refcount table growth (in 1., when no free cluster is left inside what the refcount
//   table covers; qcow2.txt "Host cluster management": the table is contiguous, so it
//   moves, as QEMU's alloc_refcount_block moves it):
//     g1. write the dirty refcount blocks (the new table points at every block the old
//         one does, so they go first; they only hold increments and decrements of
//         clusters nothing on disk references, which are safe to write at any time);
//     g2. write, in one write, the new refcount blocks and then the new, larger table
//         (the old entries plus the new blocks) past the end of the file and past all the
//         old table covers; the new blocks count every cluster of that area;  fdatasync
//     g3. write refcount_table_offset and refcount_table_clusters (header bytes 48-59,
//         inside one sector);                                           fdatasync
//     g4. drop the refcounts of the old table's clusters in the cache; they reach the
//         disk with the next refcount-block write, and the clusters are reused at once
//         (nothing on disk names them after g3).
//   A crash before g3 leaves the old header and table: the area is unreferenced clusters
//   outside what it covers, refcount 0 (not even a leak; the next growth goes past them).
//   A crash after g3 leaves the new, complete table, and the old table leaked until g4
//   is written. A failed or uncertain g3 stops all metadata writes (broken_).
//
// Concurrency
// ===========
// The image's queues run requests on several worker threads (ThreadedQueue, formats.cc).
// mu_ guards the metadata and every metadata I/O; guest data moves without it where that
// is safe: a read of a normal cluster, an in-place write to an allocated cluster
// (OFLAG_COPIED) inside the file, each aligned so ImageFile needs no bounce buffer, and
// only when clusters are whole O_DIRECT blocks (no read-modify-write of metadata can then
// cover data). The mapping is looked up under mu_, the transfer runs with it released
// (Unlocked), and reads of unallocated clusters go to the backing file without it. What
// could go wrong is the host cluster changing hands during the transfer; a cluster is
// reused only after writeback step e drops its refcount, and step e first waits until no
// unlocked transfer is running (those that follow see the new mapping). Allocating writes,
// copy-on-write, discards, compressed clusters and anything unaligned stay under mu_.

namespace pvhost::block {
namespace {

using qcow2::ClusterMapping;
using qcow2::Header;

constexpr size_t kL2CacheTables = 64;
constexpr size_t kRefblockCacheTables = 16;

// Cluster-sized metadata tables (L2 tables, refcount blocks), kept by host offset.
// Dirty tables stay until written back; clean ones are evicted least recently used.
class TableCache {
 public:
  struct Table {
    AlignedBytes data;  // cluster-sized; aligned for O_DIRECT (ImageFile)
    bool dirty = false;
    uint64_t used = 0;
  };
  explicit TableCache(size_t capacity) : capacity_(capacity) {}

  Table* find(uint64_t off) {
    auto it = map_.find(off);
    if (it == map_.end()) return nullptr;
    it->second.used = ++clock_;
    return &it->second;
  }
  // Inserts a table; evicts clean tables beyond capacity (never dirty ones, never `off`).
  Table& insert(uint64_t off, AlignedBytes data, bool dirty) {
    while (map_.size() >= capacity_) {
      auto victim = map_.end();
      for (auto it = map_.begin(); it != map_.end(); ++it) {
        if (!it->second.dirty && (victim == map_.end() || it->second.used < victim->second.used)) victim = it;
      }
      if (victim == map_.end()) break;  // all dirty: over capacity until the next writeback
      map_.erase(victim);
    }
    Table& t = map_[off];
    t.data = std::move(data);
    t.dirty = dirty;
    t.used = ++clock_;
    return t;
  }
  [[nodiscard]] size_t dirty_count() const {
    return static_cast<size_t>(std::count_if(map_.begin(), map_.end(), [](const auto& e) { return e.second.dirty; }));
  }
  [[nodiscard]] bool over_capacity() const { return map_.size() > capacity_; }
  // Dirty tables in offset order.
  std::vector<std::pair<uint64_t, Table*>> dirty_tables() {
    std::vector<std::pair<uint64_t, Table*>> out;
    for (auto& [off, t] : map_) {
      if (t.dirty) out.emplace_back(off, &t);
    }
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    return out;
  }

 private:
  size_t capacity_;
  uint64_t clock_ = 0;
  std::unordered_map<uint64_t, Table> map_;
};

class Qcow2Image final : public Image {
 public:
  Qcow2Image(ImageFile file, Header h, bool read_only)
      : path_(file.path()), h_(std::move(h)), cs_(h_.cluster_size()), file_(std::move(file)),
        read_only_(read_only), l2_cache_(kL2CacheTables), rb_cache_(kRefblockCacheTables) {
    info_.format = "qcow2";
    info_.size_bytes = h_.size;
    info_.read_only = read_only;
    info_.direct_io = file_.direct();
    info_.discard = !read_only;
    info_.discard_granularity = static_cast<uint32_t>(std::min<uint64_t>(cs_, 1u << 20));
  }

  ~Qcow2Image() override {
    if (!read_only_) {
      std::lock_guard lock(mu_);
      if (auto r = writeback(); !r) log::error("{}: writing qcow2 metadata back on close: {}", path_, r.error().describe());
    }
  }

  // `direct`: the O_DIRECT wish this image was opened with, passed down the chain.
  Result<void> load_tables(ChainGuard& guard, DirectIo direct) {
    l1_.resize(h_.l1_size);
    if (h_.l1_size > 0) {
      AlignedBytes buf(h_.l1_bytes());
      PVHOST_TRY_CTX(file_.read_exact(h_.l1_table_offset, buf), "reading the L1 table");
      for (size_t i = 0; i < l1_.size(); ++i) {
        l1_[i] = load_be64(buf.data() + i * 8);
        const uint64_t l2 = l1_[i] & qcow2::kL1OffsetMask;
        if (l2 != 0) PVHOST_TRY_CTX(check_metadata(l2, fmt::format("L2 table of L1 entry {}", i)), "L1 table");
      }
    }
    rt_.resize(h_.refcount_table_bytes() / 8);
    {
      AlignedBytes buf(h_.refcount_table_bytes());
      PVHOST_TRY_CTX(file_.read_exact(h_.refcount_table_offset, buf), "reading the refcount table");
      for (size_t i = 0; i < rt_.size(); ++i) {
        rt_[i] = load_be64(buf.data() + i * 8);
        const uint64_t rb = rt_[i] & qcow2::kRefTableOffsetMask;
        if (rb != 0) PVHOST_TRY_CTX(check_metadata(rb, fmt::format("refcount block {}", i)), "refcount table");
      }
    }
    if (!h_.backing_file.empty()) {
      OpenOptions bo;
      bo.path = resolve_backing_path(path_, h_.backing_file);
      bo.read_only = ReadOnly::yes;
      bo.direct = direct;
      backing_ = PVHOST_TRY_CTX(open_any_in_chain(h_.backing_format, bo, guard),
                                fmt::format("opening backing file {}", bo.path));
    }
    return {};
  }

  [[nodiscard]] DriverInfo info() const override { return info_; }
  [[nodiscard]] const std::string& path() const override { return path_; }
  [[nodiscard]] const Image* backing() const override { return backing_.get(); }
  [[nodiscard]] const ImageFile* file() const override { return &file_; }

  [[nodiscard]] ImageDetails details() const override {
    ImageDetails d;
    d.format = "qcow2";
    d.virtual_size = h_.size;
    struct stat st {};
    if (::fstat(file_.fd(), &st) == 0) d.actual_size = static_cast<uint64_t>(st.st_blocks) * 512;
    d.cluster_size = cs_;
    d.dirty = false;
    d.backing_filename = h_.backing_file;
    if (!h_.backing_file.empty()) d.full_backing_filename = resolve_backing_path(path_, h_.backing_file);
    d.backing_format = h_.backing_format;
    nlohmann::json data = {{"compat", h_.version == 3 ? "1.1" : "0.10"}, {"refcount-bits", h_.refcount_bits()}};
    if (h_.version == 3) {
      data["lazy-refcounts"] = (h_.compatible_features & qcow2::kCompatLazyRefcounts) != 0;
      data["corrupt"] = false;
      data["extended-l2"] = false;
      data["compression-type"] = "zlib";
    }
    d.format_specific = {{"type", "qcow2"}, {"data", data}};
    return d;
  }

  Result<void> read_at(uint64_t offset, std::span<std::byte> buf) override {
    PVHOST_TRY(check_range(offset, buf.size()));
    std::unique_lock lock(mu_);
    while (!buf.empty()) {
      const uint64_t in = offset & (cs_ - 1);
      const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), cs_ - in));
      PVHOST_TRY_CTX(read_cluster_part(lock, offset, buf.first(n)), fmt::format("{}: read at {}", path_, offset));
      offset += n;
      buf = buf.subspan(n);
    }
    return {};
  }

  Result<void> write_at(uint64_t offset, std::span<const std::byte> buf) override {
    if (read_only_) return fail(EROFS, fmt::format("{} is read-only", path_));
    PVHOST_TRY(check_range(offset, buf.size()));
    std::unique_lock lock(mu_);
    while (!buf.empty()) {
      const uint64_t in = offset & (cs_ - 1);
      const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), cs_ - in));
      PVHOST_TRY_CTX(write_cluster_part(&lock, offset, buf.first(n)), fmt::format("{}: write at {}", path_, offset));
      offset += n;
      buf = buf.subspan(n);
    }
    return trim_caches();
  }

  Result<void> discard_at(uint64_t offset, uint64_t length) override {
    if (read_only_) return fail(EROFS, fmt::format("{} is read-only", path_));
    PVHOST_TRY(check_range(offset, length));
    std::lock_guard lock(mu_);
    while (length > 0) {
      const uint64_t in = offset & (cs_ - 1);
      const uint64_t n = std::min<uint64_t>(length, cs_ - in);
      PVHOST_TRY_CTX(discard_cluster_part(offset, n), fmt::format("{}: discard at {}", path_, offset));
      offset += n;
      length -= n;
    }
    return trim_caches();
  }

  Result<void> flush_all() override {
    if (read_only_) return {};
    std::lock_guard lock(mu_);
    return writeback();
  }

  // Per cluster: unallocated L2 entries (no zero flag) fall through to the backing file; a
  // missing L2 table leaves its whole range to it. One call looks at a bounded number of L2
  // entries (a run may be reported shorter than it is; callers continue from its end), so a
  // hostile or huge image never makes one call walk for long.
  Result<Allocation> allocation(uint64_t offset, uint64_t length) override {
    PVHOST_TRY(check_range(offset, length));
    if (length == 0) return fail(EINVAL, "allocation: empty range");
    std::lock_guard lock(mu_);
    Allocation a;
    uint64_t done = 0;
    const uint64_t l2_span = h_.l2_entries() << h_.cluster_bits;
    for (unsigned looked = 0; done < length && looked < 65536; ++looked) {
      const uint64_t guest = offset + done;
      const L2Slot s = PVHOST_TRY(l2_slot(guest, false));
      const ClusterMapping m = PVHOST_TRY(mapping(s));
      const bool mine = m.kind != ClusterMapping::Kind::unallocated;
      if (done == 0) a.allocated = mine;
      else if (mine != a.allocated) break;
      const uint64_t step = s.table == nullptr ? l2_span - guest % l2_span : cs_ - (guest & (cs_ - 1));
      done += std::min<uint64_t>(length - done, step);
    }
    a.bytes = done;
    PVHOST_TRY(trim_caches());
    return a;
  }

 private:
  // A metadata table (L2 table, refcount block) offset read from the image: one aligned
  // cluster inside the file, clear of the header, the L1 table and the refcount table.
  Result<void> check_metadata(uint64_t off, const std::string& what) const {
    if (off % cs_ != 0) return fail(EINVAL, fmt::format("{} at {:#x} is not cluster aligned", what, off));
    if (off > file_.size() || cs_ > file_.size() - off)
      return fail(EINVAL, fmt::format("{} at {:#x} is past the end of the file", what, off));
    return check_clear_of_fixed_metadata(off, what);
  }
  Result<void> check_clear_of_fixed_metadata(uint64_t off, const std::string& what) const {
    auto overlaps = [&](uint64_t start, uint64_t len) { return len != 0 && off < start + len && start < off + cs_; };
    if (off < cs_) return fail(EINVAL, fmt::format("{} at {:#x} overlaps the header", what, off));
    if (overlaps(h_.l1_table_offset, h_.l1_bytes()))
      return fail(EINVAL, fmt::format("{} at {:#x} overlaps the L1 table", what, off));
    if (overlaps(h_.refcount_table_offset, h_.refcount_table_bytes()))
      return fail(EINVAL, fmt::format("{} at {:#x} overlaps the refcount table", what, off));
    return {};
  }

  // ---- refcounts ----
  Result<TableCache::Table*> refblock(uint64_t off) {
    if (auto* t = rb_cache_.find(off)) return t;
    AlignedBytes data(cs_);
    PVHOST_TRY_CTX(file_.read_exact(off, data), "reading a refcount block");
    return &rb_cache_.insert(off, std::move(data), false);
  }

  Result<uint64_t> refcount(uint64_t cluster) {
    const uint64_t rt_index = cluster / h_.refblock_entries();
    if (rt_index >= rt_.size()) return 0;
    const uint64_t rb = rt_[rt_index] & qcow2::kRefTableOffsetMask;
    if (rb == 0) return 0;
    auto* t = PVHOST_TRY(refblock(rb));
    return qcow2::get_refcount(t->data, h_.refcount_order, cluster % h_.refblock_entries());
  }

  // Adds `delta` to the cached refcount of `cluster`, creating its refcount block when it
  // has none (placed inside the range it describes, at a cluster other than `cluster`,
  // and counting itself). `cluster` lies inside what the refcount table covers
  // (alloc_cluster grows the table first; a decrement outside it is a refcount of 0).
  Result<void> add_refcount(uint64_t cluster, int delta) {
    const uint64_t per_block = h_.refblock_entries();
    const uint64_t rt_index = cluster / per_block;
    if (rt_index >= rt_.size())
      return fail(EIO,
                  fmt::format("cluster {} is outside the refcount table (refcount 0)", cluster));
    uint64_t rb = rt_[rt_index] & qcow2::kRefTableOffsetMask;
    if (rb == 0) {
      if (delta < 0) return fail(EIO, fmt::format("refcount of cluster {} would drop below zero", cluster));
      // The new block lives in its own range (which it then covers), next to `cluster`, and
      // never on the header, the L1 table or the refcount table (a hostile image may leave
      // those without a refcount block).
      const uint64_t first = rt_index * per_block;
      uint64_t self = first + per_block;  // none found yet
      for (uint64_t d = 1; d < per_block && self == first + per_block; ++d) {
        for (const uint64_t cand : {cluster + d, cluster - d}) {
          if (cand < first || cand >= first + per_block) continue;
          if (check_clear_of_fixed_metadata(cand * cs_, "refcount block")) {
            self = cand;
            break;
          }
        }
      }
      if (self == first + per_block) return fail(ENOSPC, fmt::format("no cluster for the refcount block covering cluster {}", cluster));
      rb = self * cs_;
      AlignedBytes data(cs_);
      qcow2::set_refcount(data, h_.refcount_order, self - first, 1);
      rb_cache_.insert(rb, std::move(data), true);
      rt_[rt_index] = rb;
      rt_dirty_.insert(rt_index);
    }
    auto* t = PVHOST_TRY(refblock(rb));
    const uint64_t idx = cluster % per_block;
    const uint64_t v = qcow2::get_refcount(t->data, h_.refcount_order, idx);
    uint64_t nv = 0;
    if (delta > 0) {
      if (v >= qcow2::max_refcount(h_.refcount_order)) return fail(EOVERFLOW, fmt::format("refcount of cluster {} at its maximum", cluster));
      nv = v + 1;
    } else {
      if (v == 0) return fail(EIO, fmt::format("refcount of cluster {} would drop below zero", cluster));
      nv = v - 1;
    }
    qcow2::set_refcount(t->data, h_.refcount_order, idx, nv);
    t->dirty = true;
    return {};
  }

  // Allocates one cluster (refcount 0 -> 1, in the cache); returns its host offset.
  Result<uint64_t> alloc_cluster() {
    const uint64_t limit = (uint64_t{1} << 56) / cs_;
    uint64_t c = std::max<uint64_t>(free_hint_, 1);
    while (c < limit) {
      if (c / h_.refblock_entries() >= rt_.size()) {
        // Every cluster the table covers is taken. Growing it frees the old table's
        // clusters (free_hint_ moves back to them) and uses the clusters of the new area.
        PVHOST_TRY(grow_refcount_table(c));
        c = std::max<uint64_t>(free_hint_, 1);
        continue;
      }
      // A hostile image may give its own tables refcount 0; never hand those out.
      if (PVHOST_TRY(refcount(c)) != 0 || !check_clear_of_fixed_metadata(c * cs_, "free cluster")) {
        ++c;
        continue;
      }
      PVHOST_TRY(add_refcount(c, +1));
      free_hint_ = c + 1;
      return c * cs_;
    }
    return fail(ENOSPC, "no free cluster below 2^56");
  }

  // Moves the refcount table to a larger one that covers `cluster`: steps g1..g4 of the
  // comment block at the top.
  Result<void> grow_refcount_table(uint64_t cluster) {
    if (broken_) return fail(EIO, fmt::format("{}: an earlier metadata writeback failed", path_));
    const uint64_t per_block = h_.refblock_entries();
    // Past the file's end (a crash during an earlier growth may have left an area there)
    // and past all the old table covers (clusters allocated only in the caches lie inside).
    const uint64_t start = std::max<uint64_t>(rt_.size() * per_block, (file_.size() + cs_ - 1) / cs_);
    const qcow2::RefcountTableGrowth g =
        PVHOST_TRY_CTX(qcow2::plan_refcount_table_growth(h_, start, cluster / per_block + 1),
                       "growing the refcount table");
    // g1.
    PVHOST_TRY(write_dirty(rb_cache_));
    // g2. Refcount blocks, then the table, as one buffer.
    AlignedBytes area(g.area_clusters() * cs_);
    const std::span<std::byte> blocks = std::span(area).first(g.block_count * cs_);
    for (uint64_t c = start; c < start + g.area_clusters(); ++c) {
      const uint64_t b = c / per_block - g.first_block_index;
      qcow2::set_refcount(blocks.subspan(b * cs_, cs_), h_.refcount_order, c % per_block, 1);
    }
    std::vector<uint64_t> rt = rt_;
    rt.resize(uint64_t{g.table_clusters} * cs_ / 8, 0);
    for (uint64_t b = 0; b < g.block_count; ++b)
      rt[g.first_block_index + b] = g.blocks_offset + b * cs_;
    std::byte* table = area.data() + g.block_count * cs_;
    for (size_t i = 0; i < rt.size(); ++i) store_be64(table + i * 8, rt[i]);
    PVHOST_TRY_CTX(file_.write(g.blocks_offset, area), "writing a new refcount table");
    PVHOST_TRY(file_.sync());
    // g3. refcount_table_offset (bytes 48-55) and refcount_table_clusters (56-59). With
    // O_DIRECT, ImageFile makes this a read-modify-write of the file's first logical block
    // (alignment(): 512 bytes on the usual disk, 4096 at most): one pwrite of that block,
    // whose other bytes get what they hold, so still one sector changes on disk.
    std::byte hdr[12];
    store_be64(hdr, g.table_offset);
    store_be32(hdr + 8, g.table_clusters);
    auto switched = file_.write(48, hdr);
    if (switched) switched = file_.sync();
    if (!switched) {
      broken_ = true;  // the header may name either table now: no further metadata writes
      return with_context(std::move(switched), "switching to the new refcount table");
    }
    const uint64_t old_first = h_.refcount_table_offset / cs_;
    const uint64_t old_clusters = h_.refcount_table_clusters;
    h_.refcount_table_offset = g.table_offset;
    h_.refcount_table_clusters = g.table_clusters;
    rt_ = std::move(rt);
    rt_dirty_.clear();  // the new table holds them
    log::info("{}: refcount table grown to {} clusters at {:#x}", path_, g.table_clusters,
              g.table_offset);
    // g4.
    for (uint64_t c = old_first; c < old_first + old_clusters; ++c)
      PVHOST_TRY_CTX(add_refcount(c, -1), "freeing the old refcount table");
    free_hint_ = std::min(free_hint_, old_first);
    return {};
  }

  // Host clusters a mapping holds references to (released after the L2 writeback).
  void release_later(const ClusterMapping& m) {
    switch (m.kind) {
      case ClusterMapping::Kind::normal:
      case ClusterMapping::Kind::zero:
        if (m.host_offset != 0) pending_free_.push_back(m.host_offset / cs_);
        break;
      case ClusterMapping::Kind::compressed: {
        const uint64_t first = m.host_offset / cs_;
        const uint64_t last = (m.host_offset + m.compressed_size - 1) / cs_;
        for (uint64_t c = first; c <= last; ++c) pending_free_.push_back(c);
        break;
      }
      case ClusterMapping::Kind::unallocated:
        break;
    }
  }

  // ---- L2 ----
  struct L2Slot {
    TableCache::Table* table = nullptr;  // null: no L2 table (unallocated)
    uint64_t index = 0;
  };

  Result<L2Slot> l2_slot(uint64_t guest, bool allocate) {
    const uint64_t cluster = guest >> h_.cluster_bits;
    const uint64_t l1_index = cluster / h_.l2_entries();
    L2Slot s;
    s.index = cluster % h_.l2_entries();
    if (l1_index >= l1_.size()) return fail(EINVAL, "offset beyond the L1 table");
    uint64_t l2 = l1_[l1_index] & qcow2::kL1OffsetMask;
    if (l2 == 0) {
      if (!allocate) return s;
      l2 = PVHOST_TRY(alloc_cluster());
      s.table = &l2_cache_.insert(l2, AlignedBytes(cs_), true);
      l1_[l1_index] = l2 | qcow2::kOflagCopied;
      l1_dirty_.insert(l1_index);
      return s;
    }
    if (allocate && !(l1_[l1_index] & qcow2::kOflagCopied))
      return fail(ENOTSUP, "L2 table shared with a snapshot (copy-on-write of L2 tables is not implemented)");
    if (auto* t = l2_cache_.find(l2)) {
      s.table = t;
      return s;
    }
    PVHOST_TRY(check_metadata(l2, "L2 table"));
    AlignedBytes data(cs_);
    PVHOST_TRY_CTX(file_.read_exact(l2, data), "reading an L2 table");
    s.table = &l2_cache_.insert(l2, std::move(data), false);
    return s;
  }

  Result<ClusterMapping> mapping(const L2Slot& s) const {
    if (s.table == nullptr) return ClusterMapping{};
    return qcow2::decode_l2_entry(load_be64(s.table->data.data() + s.index * 8), h_.cluster_bits, h_.version);
  }

  // Reads guest bytes inside one cluster as `m` maps them.
  Result<void> read_mapped(const ClusterMapping& m, uint64_t guest, std::span<std::byte> out) {
    const uint64_t in = guest & (cs_ - 1);
    switch (m.kind) {
      case ClusterMapping::Kind::unallocated:
        return read_backing(guest, out);
      case ClusterMapping::Kind::zero:
        std::memset(out.data(), 0, out.size());
        return {};
      case ClusterMapping::Kind::normal: {
        PVHOST_TRY(check_clear_of_fixed_metadata(m.host_offset, "data cluster"));
        const size_t got = PVHOST_TRY(file_.read_full(m.host_offset + in, out));
        // A data cluster past the end of the file (preallocation=metadata) reads as zeroes.
        std::memset(out.data() + got, 0, out.size() - got);
        return {};
      }
      case ClusterMapping::Kind::compressed: {
        if (m.compressed_size > 2 * cs_ + 512) return fail(EINVAL, "compressed cluster too large");
        std::vector<std::byte> cbuf(m.compressed_size);
        const size_t got = PVHOST_TRY(file_.read_full(m.host_offset, cbuf));
        if (got == 0) return fail(EIO, fmt::format("compressed cluster at {:#x} past the end of the file", m.host_offset));
        std::vector<std::byte> plain(cs_);
        PVHOST_TRY(qcow2::inflate_cluster(std::span(cbuf).first(got), plain));
        std::memcpy(out.data(), plain.data() + in, out.size());
        return {};
      }
    }
    return fail(EINVAL, "bad cluster kind");
  }

  Result<void> read_backing(uint64_t guest, std::span<std::byte> out) {
    std::memset(out.data(), 0, out.size());
    if (!backing_) return {};
    const uint64_t bsize = backing_->info().size_bytes;
    if (guest >= bsize) return {};
    const size_t n = static_cast<size_t>(std::min<uint64_t>(out.size(), bsize - guest));
    return with_context(backing_->read_at(guest, out.first(n)), "reading the backing file");
  }

  // The data path without the mutex (see "Concurrency" at the top): while one of these
  // lives, `lock` is released and unlocked_io_ counts it.
  class Unlocked {
   public:
    Unlocked(Qcow2Image& img, std::unique_lock<std::mutex>& lock) : img_(img), lock_(lock) {
      ++img_.unlocked_io_;
      lock_.unlock();
    }
    ~Unlocked() {
      lock_.lock();
      if (--img_.unlocked_io_ == 0) img_.idle_cv_.notify_all();
    }
    Unlocked(const Unlocked&) = delete;
    Unlocked& operator=(const Unlocked&) = delete;

   private:
    Qcow2Image& img_;
    std::unique_lock<std::mutex>& lock_;
  };
  // Whether guest data at host offset `host` may move without the mutex: the transfer
  // needs no bounce buffer, and no logical block of the file holds both data and metadata
  // (clusters are whole blocks), so no metadata read-modify-write can touch its blocks.
  [[nodiscard]] bool unlocked_ok(uint64_t host, size_t n, const void* buf) const {
    return freeing_ == 0 && cs_ % file_.alignment() == 0 && file_.unbounced(host, n, buf);
  }

  Result<void> read_cluster_part(std::unique_lock<std::mutex>& lock, uint64_t guest, std::span<std::byte> out) {
    const L2Slot s = PVHOST_TRY(l2_slot(guest, false));
    const ClusterMapping m = PVHOST_TRY(mapping(s));
    const uint64_t host = m.host_offset + (guest & (cs_ - 1));
    if (m.kind == ClusterMapping::Kind::normal && unlocked_ok(host, out.size(), out.data())) {
      PVHOST_TRY(check_clear_of_fixed_metadata(m.host_offset, "data cluster"));
      const Unlocked u(*this, lock);
      const size_t got = PVHOST_TRY(file_.read_unbounced(host, out));
      std::memset(out.data() + got, 0, out.size() - got);  // past the end of the file: zeroes
      return {};
    }
    if (m.kind == ClusterMapping::Kind::unallocated && backing_) {
      // The backing file is read-only and has its own lock; nothing of ours is used.
      lock.unlock();
      auto r = read_backing(guest, out);
      lock.lock();
      return r;
    }
    return read_mapped(m, guest, out);
  }

  // `lock`: the caller's hold on mu_, released around an in-place data write that may run
  // unlocked; null: keep it.
  Result<void> write_cluster_part(std::unique_lock<std::mutex>* lock, uint64_t guest,
                                  std::span<const std::byte> data) {
    wait_not_allocating(guest);
    L2Slot s = PVHOST_TRY(l2_slot(guest, true));
    const ClusterMapping m = PVHOST_TRY(mapping(s));
    const uint64_t in = guest & (cs_ - 1);
    if (m.kind == ClusterMapping::Kind::normal && m.copied) {
      PVHOST_TRY(check_clear_of_fixed_metadata(m.host_offset, "data cluster"));
      const uint64_t host = m.host_offset + in;
      if (lock != nullptr && unlocked_ok(host, data.size(), data.data()) && host + data.size() <= file_.size()) {
        const Unlocked u(*this, *lock);
        return file_.write_unbounced(host, data);
      }
      return file_.write(host, data);
    }
    // (A whole cluster in an AlignedBytes at a cluster offset: aligned when clusters are.)
    if (lock != nullptr && (m.kind == ClusterMapping::Kind::unallocated || m.kind == ClusterMapping::Kind::zero) &&
        freeing_ == 0 && cs_ % file_.alignment() == 0)
      return allocate_unlocked(*lock, guest, m, data);
    // Copy-on-write into a new cluster (ordering: see the comment block at the top).
    AlignedBytes buf(cs_);
    if (data.size() != cs_) PVHOST_TRY(read_mapped(m, guest - in, buf));
    std::memcpy(buf.data() + in, data.data(), data.size());
    const uint64_t host = PVHOST_TRY(alloc_cluster());
    PVHOST_TRY(file_.write(host, buf));
    // alloc_cluster may have evicted tables; look the slot up again (the L2 table is dirty
    // or was just read, and dirty tables are never evicted).
    s = PVHOST_TRY(l2_slot(guest, true));
    store_be64(s.table->data.data() + s.index * 8, host | qcow2::kOflagCopied);
    s.table->dirty = true;
    release_later(m);
    return {};
  }

  // A write to an unallocated or zero cluster with the data moving outside the mutex
  // ("Concurrency" at the top): the cluster is allocated under it, the new cluster's
  // content (the backing file's or zeroes around `data`) is read and written without it,
  // then the L2 entry is set under it, as the locked path does (same ordering). While
  // that runs, the guest cluster is in allocating_: other writes and discards of it wait,
  // so the entry found first is still the one replaced.
  Result<void> allocate_unlocked(std::unique_lock<std::mutex>& lock, uint64_t guest, const ClusterMapping& m,
                                 std::span<const std::byte> data) {
    const uint64_t gc = guest >> h_.cluster_bits;
    const uint64_t in = guest & (cs_ - 1);
    const uint64_t host = PVHOST_TRY(alloc_cluster());
    if (host + cs_ > file_.size()) {
      if (auto r = file_.extend_to(host + cs_); !r) {
        pending_free_.push_back(host / cs_);  // referenced nowhere: give it back
        return r;
      }
    }
    allocating_.insert(gc);
    Result<void> r{};
    {
      AlignedBytes buf(cs_);
      const Unlocked u(*this, lock);
      if (data.size() != cs_ && m.kind == ClusterMapping::Kind::unallocated) r = read_backing(guest - in, buf);
      if (r) {
        std::memcpy(buf.data() + in, data.data(), data.size());
        r = file_.write_unbounced(host, buf);
      }
    }
    allocating_.erase(gc);
    alloc_cv_.notify_all();
    if (!r) {
      pending_free_.push_back(host / cs_);
      return r;
    }
    const L2Slot s = PVHOST_TRY(l2_slot(guest, true));
    const ClusterMapping now = PVHOST_TRY(mapping(s));
    if (now.kind != m.kind || now.host_offset != m.host_offset)
      return fail(EIO, fmt::format("L2 entry of guest cluster {} changed during its allocation", gc));
    store_be64(s.table->data.data() + s.index * 8, host | qcow2::kOflagCopied);
    s.table->dirty = true;
    release_later(m);
    return {};
  }

  // Waits (mu_ released meanwhile) while another thread allocates `guest`'s cluster.
  void wait_not_allocating(uint64_t guest) {
    const uint64_t gc = guest >> h_.cluster_bits;
    if (allocating_.count(gc) != 0) alloc_cv_.wait(mu_, [&] { return allocating_.count(gc) == 0; });
  }

  Result<void> discard_cluster_part(uint64_t guest, uint64_t n) {
    if (n != cs_ || (h_.version < 3 && backing_)) {
      // A partial cluster, or a v2 image whose unallocated clusters show the backing file:
      // zeroes are written instead.
      AlignedBytes zero(static_cast<size_t>(n));
      return write_cluster_part(nullptr, guest, zero);
    }
    wait_not_allocating(guest);
    L2Slot s = PVHOST_TRY(l2_slot(guest, false));
    if (s.table == nullptr) {
      if (!backing_) return {};  // unallocated without a backing file reads as zeroes
      s = PVHOST_TRY(l2_slot(guest, true));  // v3: a zero flag hides the backing file
    }
    const ClusterMapping m = PVHOST_TRY(mapping(s));
    if (m.kind == ClusterMapping::Kind::unallocated && !backing_) return {};
    if (!(l1_[(guest >> h_.cluster_bits) / h_.l2_entries()] & qcow2::kOflagCopied))
      return fail(ENOTSUP, "L2 table shared with a snapshot");
    // v3: a zero cluster without allocation (reads as zeroes even over a backing file);
    // v2 without backing file: unallocated.
    store_be64(s.table->data.data() + s.index * 8, h_.version >= 3 ? qcow2::kOflagZero : 0);
    s.table->dirty = true;
    release_later(m);
    return {};
  }

  // Writes metadata back when the caches hold more dirty tables than they should.
  Result<void> trim_caches() {
    if (l2_cache_.over_capacity() || rb_cache_.over_capacity() || pending_free_.size() > 4096) return writeback();
    return {};
  }

  // The flush sequence a..e of the comment block at the top.
  Result<void> writeback() {
    if (broken_) return fail(EIO, fmt::format("{}: an earlier metadata writeback failed", path_));
    auto r = writeback_steps();
    if (!r) broken_ = true;  // the on-disk state is still consistent, but stop writing
    return r;
  }

  Result<void> writeback_steps() {
    // a. refcount blocks (increments, new blocks); the sync also covers guest data.
    PVHOST_TRY(write_dirty(rb_cache_));
    PVHOST_TRY(file_.sync());
    // b. refcount table entries pointing at new refcount blocks.
    if (!rt_dirty_.empty()) {
      for (uint64_t i : rt_dirty_) {
        std::byte e[8];
        store_be64(e, rt_[i]);
        PVHOST_TRY(file_.write(h_.refcount_table_offset + i * 8, e));
      }
      rt_dirty_.clear();
      PVHOST_TRY(file_.sync());
    }
    // c. L2 tables.
    if (PVHOST_TRY(write_dirty(l2_cache_))) PVHOST_TRY(file_.sync());
    // d. L1 entries pointing at new L2 tables.
    if (!l1_dirty_.empty()) {
      for (uint64_t i : l1_dirty_) {
        std::byte e[8];
        store_be64(e, l1_[i]);
        PVHOST_TRY(file_.write(h_.l1_table_offset + i * 8, e));
      }
      l1_dirty_.clear();
      PVHOST_TRY(file_.sync());
    }
    // e. refcount decrements of clusters no longer referenced on disk. Data I/O running
    // without the mutex may still be on one of them (it looked the cluster up before
    // the reference went); wait for that to end before the cluster can be reused. New
    // data I/O takes the locked path meanwhile (freeing_), so the wait ends.
    if (!pending_free_.empty()) {
      std::vector<uint64_t> frees;
      frees.swap(pending_free_);
      if (unlocked_io_ > 0) {
        ++freeing_;
        idle_cv_.wait(mu_, [&] { return unlocked_io_ == 0; });
        --freeing_;
      }
      for (uint64_t c : frees) {
        PVHOST_TRY(add_refcount(c, -1));
        free_hint_ = std::min(free_hint_, c);
      }
      if (PVHOST_TRY(write_dirty(rb_cache_))) PVHOST_TRY(file_.sync());
    }
    return {};
  }

  Result<bool> write_dirty(TableCache& cache) {
    auto dirty = cache.dirty_tables();
    for (auto& [off, t] : dirty) {
      PVHOST_TRY(file_.write(off, t->data));
      t->dirty = false;
    }
    return !dirty.empty();
  }

  std::string path_;
  Header h_;
  uint64_t cs_;
  DriverInfo info_;
  std::unique_ptr<Image> backing_;

  std::mutex mu_;  // guards everything below (metadata, the file's data layout, its I/O)
  std::condition_variable_any idle_cv_;  // unlocked_io_ dropped to 0; waited on with mu_
  unsigned unlocked_io_ = 0;  // data transfers running with mu_ released (Unlocked)
  unsigned freeing_ = 0;      // writebacks waiting for those to end before freeing clusters
  std::set<uint64_t> allocating_;         // guest clusters in allocate_unlocked()
  std::condition_variable_any alloc_cv_;  // allocating_ lost one; waited on with mu_
  ImageFile file_;
  bool read_only_;
  bool broken_ = false;
  std::vector<uint64_t> l1_;
  std::set<uint64_t> l1_dirty_;
  std::vector<uint64_t> rt_;
  std::set<uint64_t> rt_dirty_;
  TableCache l2_cache_;
  TableCache rb_cache_;
  std::vector<uint64_t> pending_free_;  // clusters whose refcount drops at writeback step e
  uint64_t free_hint_ = 1;
};

}  // namespace

Result<std::unique_ptr<Image>> open_qcow2_in_chain(const OpenOptions& o, ChainGuard& guard) {
  const bool ro = o.read_only == ReadOnly::yes;
  ImageFile file = PVHOST_TRY(ImageFile::open(o.path, o.read_only, o.direct));
  PVHOST_TRY(guard.enter(file.fd(), o.path));
  const uint64_t file_size = file.size();
  AlignedBytes head(static_cast<size_t>(std::min<uint64_t>(file_size, 2u << 20)));
  const size_t got = PVHOST_TRY_CTX(file.read_full(0, head), o.path);
  head.resize(got);
  Header h = PVHOST_TRY_CTX(qcow2::parse_header(head, file_size), o.path);
  if (!ro && h.nb_snapshots > 0)
    return fail(ENOTSUP, fmt::format("{}: writing qcow2 images with internal snapshots is not supported; open read-only", o.path));
  auto img = std::make_unique<Qcow2Image>(std::move(file), std::move(h), ro);
  PVHOST_TRY_CTX(img->load_tables(guard, o.direct), o.path);
  return std::unique_ptr<Image>(std::move(img));
}

Result<std::unique_ptr<Image>> open_qcow2(const OpenOptions& o) {
  ChainGuard guard;
  return open_qcow2_in_chain(o, guard);
}

Result<void> create_qcow2(const std::string& path, uint64_t size, const Qcow2CreateOptions& o) {
  if (o.cluster_size < 512 || o.cluster_size > (2u << 20) || (o.cluster_size & (o.cluster_size - 1)) != 0)
    return fail(EINVAL, fmt::format("cluster size {} is not a power of two in 512..2M", o.cluster_size));
  if (o.version != 2 && o.version != 3) return fail(EINVAL, "qcow2 version must be 2 or 3");
  if (size > qcow2::kMaxVirtualSize) return fail(EFBIG, "size too large");
  Header h;
  h.version = o.version;
  h.cluster_bits = static_cast<uint32_t>(__builtin_ctzll(o.cluster_size));
  h.size = size;
  h.refcount_order = 4;
  h.backing_file = o.backing_file;
  h.backing_format = o.backing_format;
  const uint64_t cs = h.cluster_size();
  const uint64_t l1_covers = cs * h.l2_entries();
  const uint64_t l1_size = size / l1_covers + (size % l1_covers != 0);
  if (l1_size * 8 > qcow2::kMaxL1Bytes) return fail(EFBIG, "size too large for this cluster size (L1 table)");
  h.l1_size = static_cast<uint32_t>(l1_size);
  const uint64_t l1_clusters = std::max<uint64_t>(1, (l1_size * 8 + cs - 1) / cs);
  // The refcount table is sized for a fully allocated image (data, L2 tables, refcount
  // blocks, with slack), so that it does not have to grow (grow_refcount_table) unless
  // the image fills up past that, e.g. with many rewrites of compressed clusters.
  const uint64_t data_clusters = size / cs + 1;
  const uint64_t host_clusters = data_clusters + data_clusters / h.l2_entries() + 64 + l1_clusters;
  const uint64_t blocks = host_clusters / h.refblock_entries() + 2;
  const uint64_t rt_clusters =
      std::min<uint64_t>(std::max<uint64_t>(1, (blocks * 8 + cs - 1) / cs), qcow2::kMaxRefTableBytes / cs);
  // Layout: header | refcount table | refcount block 0 | L1 table.
  h.refcount_table_offset = cs;
  h.refcount_table_clusters = static_cast<uint32_t>(rt_clusters);
  const uint64_t rb_offset = (1 + rt_clusters) * cs;
  h.l1_table_offset = rb_offset + cs;
  const uint64_t clusters = 2 + rt_clusters + l1_clusters;
  if (clusters > h.refblock_entries()) return fail(EFBIG, "size too large for this cluster size (refcounts)");
  std::vector<std::byte> head = PVHOST_TRY(qcow2::build_header(h));

  ImageFile f = PVHOST_TRY(ImageFile::create(path));
  std::vector<std::byte> rt(rt_clusters * cs), rb(cs), l1(l1_clusters * cs);
  store_be64(rt.data(), rb_offset);
  for (uint64_t c = 0; c < clusters; ++c) qcow2::set_refcount(rb, h.refcount_order, c, 1);
  PVHOST_TRY_CTX(f.write(0, head), path);
  PVHOST_TRY_CTX(f.write(cs, rt), path);
  PVHOST_TRY_CTX(f.write(rb_offset, rb), path);
  PVHOST_TRY_CTX(f.write(h.l1_table_offset, l1), path);
  if (::fsync(f.fd()) < 0) return fail_errno(fmt::format("fsync {}", path));
  return {};
}

}  // namespace pvhost::block
