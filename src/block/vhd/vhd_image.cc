#include "src/block/vhd/vhd_image.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <vector>

#include <fmt/format.h>

#include "src/block/counting_image.h"
#include "src/block/vhd/vhd_format.h"
#include "src/log.h"

// Write ordering (dynamic and differencing disks)
// ===============================================
// A new block is placed where the footer is (the end of the file minus 512):
//   1. the footer is written at the new end of the file first (so a crash at any point
//      leaves a file that ends in a valid footer; the copy at offset 0 never changes);
//   2. the block's sector bitmap and data are written;
//   3. the BAT entry is changed in memory only (dirty).
// Writes into allocated blocks go in place; in differencing disks the sector bitmap bits
// of newly written sectors are set in memory only (dirty).
// flush: fdatasync (data, blocks, footers) -> write dirty bitmaps and BAT sectors ->
// fdatasync. So a BAT entry or a bitmap bit never reaches the disk before what it points
// at; a crash loses at most unflushed writes and leaves unreferenced space at the end.
//
// Concurrency
// ===========
// The image's queues run requests on several worker threads (ThreadedQueue, formats.cc).
// mu_ guards the BAT, the bitmaps, the footer and all metadata I/O; guest data in
// allocated blocks (and in fixed disks) moves with it released, when the transfer needs
// no bounce buffer and the file's O_DIRECT blocks are at most a sector (every VHD
// structure is whole sectors, so no metadata read-modify-write covers data). Blocks are
// never freed or moved, so a block looked up under mu_ stays the guest's while the data
// moves. Reads that fall to the parent run without mu_ too. Allocation, bitmap updates
// and unaligned requests stay under mu_.

namespace pvhost::block {
namespace {

using vhd::DynamicHeader;
using vhd::Footer;

constexpr uint64_t kSector = 512;
using Lock = std::unique_lock<std::mutex>;

class VhdImage final : public Image {
 public:
  VhdImage(ImageFile file, Footer f, bool ro)
      : path_(file.path()), footer_(f), file_(std::move(file)), read_only_(ro) {
    info_.format = "vpc";
    info_.size_bytes = footer_.virtual_size();
    info_.read_only = ro;
    info_.direct_io = file_.direct();
    info_.discard = false;
  }
  ~VhdImage() override {
    if (!read_only_) {
      std::lock_guard lock(mu_);
      if (auto r = writeback(); !r) log::error("{}: writing VHD metadata back on close: {}", path_, r.error().describe());
    }
  }

  // `direct`: the O_DIRECT wish this image was opened with, passed down the chain.
  Result<void> load(ChainGuard& guard, DirectIo direct) {
    const uint64_t file_size = file_.size();
    if (footer_.disk_type == vhd::kDiskFixed) {
      if (info_.size_bytes > file_size - kSector) return fail(EINVAL, "fixed VHD shorter than its size");
      return {};
    }
    if (footer_.data_offset % kSector != 0 || footer_.data_offset > file_size || 1024 > file_size - footer_.data_offset)
      return fail(EINVAL, fmt::format("VHD dynamic header offset {} outside the file", footer_.data_offset));
    AlignedBytes hb(1024);
    PVHOST_TRY(file_.read_exact(footer_.data_offset, hb));
    dyn_ = PVHOST_TRY(vhd::parse_dynamic_header(hb, file_size, info_.size_bytes));
    bat_.resize(dyn_.max_table_entries);
    AlignedBytes bb(bat_.size() * 4);
    PVHOST_TRY_CTX(file_.read_exact(dyn_.table_offset, bb), "reading the BAT");
    const uint64_t span = dyn_.bitmap_bytes() + dyn_.block_size;
    for (size_t i = 0; i < bat_.size(); ++i) {
      bat_[i] = load_be32(bb.data() + i * 4);
      if (bat_[i] == vhd::kBatUnused) continue;
      const uint64_t off = uint64_t{bat_[i]} * kSector;
      // A block's bitmap must lie inside the file (its data may run into the footer
      // space of a file whose last block was never fully written: it reads as zeroes).
      if (off < dyn_.table_offset + bb.size() && off + span > dyn_.table_offset)
        return fail(EINVAL, fmt::format("VHD BAT entry {} overlaps the BAT", i));
      if (off < footer_.data_offset + 1024)
        return fail(EINVAL, fmt::format("VHD BAT entry {} overlaps the headers", i));
      if (off + dyn_.bitmap_bytes() > file_size)
        return fail(EINVAL, fmt::format("VHD BAT entry {} (sector {}) past the end of the file", i, bat_[i]));
    }
    if (footer_.disk_type == vhd::kDiskDifferencing) PVHOST_TRY(open_parent(guard, direct));
    return {};
  }

  [[nodiscard]] DriverInfo info() const override { return info_; }
  [[nodiscard]] const std::string& path() const override { return path_; }
  [[nodiscard]] const Image* backing() const override { return parent_.get(); }
  [[nodiscard]] const ImageFile* file() const override { return &file_; }
  [[nodiscard]] ImageDetails details() const override {
    ImageDetails d;
    d.format = "vpc";
    d.virtual_size = info_.size_bytes;
    struct stat st {};
    if (::fstat(file_.fd(), &st) == 0) d.actual_size = static_cast<uint64_t>(st.st_blocks) * 512;
    if (footer_.disk_type != vhd::kDiskFixed) d.cluster_size = dyn_.block_size;
    if (parent_) {
      d.backing_filename = parent_->path();
      d.full_backing_filename = parent_->path();
      d.backing_format = "vpc";
    }
    return d;
  }

  Result<void> read_at(uint64_t offset, std::span<std::byte> buf) override {
    PVHOST_TRY(check_range(offset, buf.size()));
    Lock lock(mu_);
    return with_context(read_locked(&lock, offset, buf), fmt::format("{}: read at {}", path_, offset));
  }

  Result<void> write_at(uint64_t offset, std::span<const std::byte> buf) override {
    if (read_only_) return fail(EROFS, fmt::format("{} is read-only", path_));
    PVHOST_TRY(check_range(offset, buf.size()));
    Lock lock(mu_);
    return with_context(write_locked(&lock, offset, buf), fmt::format("{}: write at {}", path_, offset));
  }

  Result<void> discard_at(uint64_t offset, uint64_t length) override {
    // VHD has no way to give a block back short of rewriting the file; zeroes are written
    // where the range is not already unallocated-and-zero.
    if (read_only_) return fail(EROFS, fmt::format("{} is read-only", path_));
    PVHOST_TRY(check_range(offset, length));
    std::lock_guard lock(mu_);
    AlignedBytes zero(static_cast<size_t>(std::min<uint64_t>(length, 1u << 20)));
    while (length > 0) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(length, zero.size()));
      if (footer_.disk_type == vhd::kDiskDynamic) {
        // Unallocated blocks of a dynamic disk already read as zeroes: leave them so.
        const uint64_t block = offset / dyn_.block_size;
        n = static_cast<size_t>(std::min<uint64_t>(n, dyn_.block_size - offset % dyn_.block_size));
        if (bat_[block] == vhd::kBatUnused) {
          offset += n;
          length -= n;
          continue;
        }
      }
      PVHOST_TRY(write_locked(nullptr, offset, std::span<const std::byte>(zero).first(n)));
      offset += n;
      length -= n;
    }
    return {};
  }

  Result<void> flush_all() override {
    if (read_only_) return {};
    std::lock_guard lock(mu_);
    return writeback();
  }

  // Fixed disks own every byte; dynamic ones their allocated blocks; differencing ones the
  // sectors whose bitmap bit is set.
  Result<Allocation> allocation(uint64_t offset, uint64_t length) override {
    PVHOST_TRY(check_range(offset, length));
    if (length == 0) return fail(EINVAL, "allocation: empty range");
    if (footer_.disk_type == vhd::kDiskFixed) return Allocation{true, length};
    std::lock_guard lock(mu_);
    Allocation a;
    uint64_t done = 0;
    auto extend = [&](bool mine, uint64_t n) {
      if (done == 0) a.allocated = mine;
      else if (mine != a.allocated) return false;
      done += n;
      return true;
    };
    while (done < length) {
      const uint64_t pos = offset + done;
      const uint64_t block = pos / dyn_.block_size;
      const uint64_t in = pos % dyn_.block_size;
      const uint64_t n = std::min<uint64_t>(length - done, dyn_.block_size - in);
      if (bat_[block] == vhd::kBatUnused || footer_.disk_type == vhd::kDiskDynamic) {
        if (!extend(bat_[block] != vhd::kBatUnused, n)) break;
        continue;
      }
      auto* bm = PVHOST_TRY(bitmap(block));
      const uint64_t end = pos + n;
      bool stop = false;
      for (uint64_t p = pos; p < end && !stop;) {
        const uint64_t step = std::min<uint64_t>(end - p, kSector - p % kSector);
        stop = !extend(bit(*bm, (p % dyn_.block_size) / kSector), step);
        p += step;
      }
      if (stop) break;
    }
    a.bytes = done;
    return a;
  }

 private:
  Result<void> open_parent(ChainGuard& guard, DirectIo direct) {
    // Parent locators (spec "Parent Locator Entry"): W2ru (relative) first, then W2ku
    // (absolute), then MacX; finally the parent's unicode name next to this file.
    std::vector<std::string> candidates;
    for (uint32_t code : {vhd::kPlatformW2ru, vhd::kPlatformW2ku, vhd::kPlatformMacX}) {
      for (const auto& l : dyn_.locators) {
        if (l.platform_code != code || l.data_length == 0) continue;
        if (l.data_length > 65536 || l.data_offset > file_.size() || l.data_length > file_.size() - l.data_offset)
          return fail(EINVAL, "VHD parent locator data outside the file");
        std::vector<std::byte> raw(l.data_length);
        PVHOST_TRY(file_.read_exact(l.data_offset, raw));
        std::string p;
        if (code == vhd::kPlatformMacX) {
          p.assign(reinterpret_cast<const char*>(raw.data()), raw.size());
          p = p.substr(0, p.find('\0'));
          if (p.starts_with("file://")) p = p.substr(7);
        } else {
          p = vhd::utf16_to_utf8(raw, false);
          std::replace(p.begin(), p.end(), '\\', '/');
          if (p.starts_with("./")) p = p.substr(2);
          // "C:/dir/x.vhd" cannot be opened here; only its file name next to us can.
          if (p.size() > 2 && p[1] == ':') p = p.substr(p.rfind('/') + 1);
        }
        if (!p.empty()) candidates.push_back(resolve_backing_path(path_, p));
      }
    }
    if (!dyn_.parent_name.empty()) candidates.push_back(resolve_backing_path(path_, dyn_.parent_name));
    if (candidates.empty()) return fail(EINVAL, "differencing VHD names no parent");
    std::string tried;
    for (const auto& c : candidates) {
      if (::access(c.c_str(), R_OK) != 0) {
        tried += (tried.empty() ? "" : ", ") + c;
        continue;
      }
      OpenOptions po;
      po.path = c;
      po.read_only = ReadOnly::yes;
      po.direct = direct;
      auto parent = PVHOST_TRY_CTX(open_any_in_chain("vpc", po, guard), fmt::format("opening parent {}", c));
      auto* pv = dynamic_cast<VhdImage*>(unwrap_counting(parent.get()));
      if (pv == nullptr) return fail(EINVAL, "VHD parent is not a VHD");
      if (pv->footer_.unique_id != dyn_.parent_unique_id)
        return fail(EINVAL, fmt::format("VHD parent {} has another unique id than the one recorded (modified or replaced parent)", c));
      if (pv->info().size_bytes < info_.size_bytes) return fail(EINVAL, fmt::format("VHD parent {} is smaller than the child", c));
      parent_ = std::move(parent);
      return {};
    }
    return fail(ENOENT, fmt::format("VHD parent not found (tried {})", tried));
  }

  Result<AlignedBytes*> bitmap(uint64_t block) {
    auto it = bitmaps_.find(block);
    if (it != bitmaps_.end()) return &it->second;
    AlignedBytes bm(dyn_.bitmap_bytes());
    PVHOST_TRY_CTX(file_.read_exact(uint64_t{bat_[block]} * kSector, bm), "reading a sector bitmap");
    if (bitmaps_.size() > 256) {
      for (auto i = bitmaps_.begin(); i != bitmaps_.end();) {
        i = dirty_bitmaps_.count(i->first) ? std::next(i) : bitmaps_.erase(i);
      }
    }
    return &bitmaps_.emplace(block, std::move(bm)).first->second;
  }
  // Spec "Sector bitmap": bit 7 of byte 0 is the first sector of the block.
  static bool bit(const AlignedBytes& bm, uint64_t s) {
    return (std::to_integer<unsigned>(bm[s / 8]) >> (7 - s % 8)) & 1;
  }
  static void set_bit(AlignedBytes& bm, uint64_t s) {
    bm[s / 8] |= std::byte(0x80 >> (s % 8));
  }

  // Whether data at file offset `off` may move without the mutex (see "Concurrency" at
  // the top): no bounce buffer, and every structure of the file is whole O_DIRECT blocks.
  [[nodiscard]] bool unlocked_ok(uint64_t off, size_t n, const void* buf) const {
    return file_.alignment() <= kSector && file_.unbounced(off, n, buf);
  }

  // Reads file data at `off`; with `lock` (the caller's hold on mu_) released around the
  // transfer where that is safe. Past the end of the file: zeroes.
  Result<void> read_file_data(Lock* lock, uint64_t off, std::span<std::byte> out) {
    size_t got = 0;
    if (lock != nullptr && unlocked_ok(off, out.size(), out.data())) {
      lock->unlock();
      auto r = file_.read_unbounced(off, out);
      lock->lock();
      got = PVHOST_TRY(std::move(r));
    } else {
      got = PVHOST_TRY(file_.read_full(off, out));
    }
    std::memset(out.data() + got, 0, out.size() - got);
    return {};
  }
  // Writes file data at `off`, inside the file or growing it.
  Result<void> write_file_data(Lock* lock, uint64_t off, std::span<const std::byte> data) {
    if (lock != nullptr && unlocked_ok(off, data.size(), data.data()) && off + data.size() <= file_.size()) {
      lock->unlock();
      auto r = file_.write_unbounced(off, data);
      lock->lock();
      return r;
    }
    return file_.write(off, data);
  }

  Result<void> read_parent_or_zero(Lock* lock, uint64_t offset, std::span<std::byte> out) {
    if (!parent_) {
      std::memset(out.data(), 0, out.size());
      return {};
    }
    // The parent is read-only and has its own lock; nothing of ours is used.
    if (lock != nullptr) lock->unlock();
    auto r = with_context(parent_->read_at(offset, out), "reading the parent");
    if (lock != nullptr) lock->lock();
    return r;
  }

  Result<void> read_locked(Lock* lock, uint64_t offset, std::span<std::byte> buf) {
    if (footer_.disk_type == vhd::kDiskFixed) return read_file_data(lock, offset, buf);
    while (!buf.empty()) {
      const uint64_t block = offset / dyn_.block_size;
      const uint64_t in = offset % dyn_.block_size;
      const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), dyn_.block_size - in));
      auto part = buf.first(n);
      if (bat_[block] == vhd::kBatUnused) {
        PVHOST_TRY(read_parent_or_zero(lock, offset, part));
      } else if (footer_.disk_type == vhd::kDiskDynamic) {
        PVHOST_TRY(read_data(lock, block, in, part));
      } else {
        // Differencing: per run of sectors with the same bitmap bit (the bitmap looked up
        // again for each: the cache may drop it while the lock is released).
        size_t done = 0;
        while (done < n) {
          auto* bm = PVHOST_TRY(bitmap(block));
          const uint64_t s = (in + done) / kSector;
          const bool mine = bit(*bm, s);
          size_t run = static_cast<size_t>(std::min<uint64_t>(n - done, (s + 1) * kSector - (in + done)));
          while (done + run < n && bit(*bm, (in + done + run) / kSector) == mine)
            run += static_cast<size_t>(std::min<uint64_t>(n - done - run, kSector));
          auto sub = part.subspan(done, run);
          if (mine) {
            PVHOST_TRY(read_data(lock, block, in + done, sub));
          } else {
            PVHOST_TRY(read_parent_or_zero(lock, offset + done, sub));
          }
          done += run;
        }
      }
      offset += n;
      buf = buf.subspan(n);
    }
    return {};
  }

  Result<void> read_data(Lock* lock, uint64_t block, uint64_t in, std::span<std::byte> out) {
    return read_file_data(lock, uint64_t{bat_[block]} * kSector + dyn_.bitmap_bytes() + in, out);
  }

  // `lock`: as for read_file_data (null: keep it).
  Result<void> write_locked(Lock* lock, uint64_t offset, std::span<const std::byte> buf) {
    if (footer_.disk_type == vhd::kDiskFixed) return write_file_data(lock, offset, buf);
    // Whole sectors only (bitmaps are per sector): widen with what is there now.
    const uint64_t start = offset / kSector * kSector;
    const uint64_t end = (offset + buf.size() + kSector - 1) / kSector * kSector;
    AlignedBytes widened;
    if (start != offset || end != offset + buf.size()) {
      widened.resize(end - start);
      PVHOST_TRY(read_locked(nullptr, start, std::span(widened).first(kSector)));
      PVHOST_TRY(read_locked(nullptr, end - kSector, std::span(widened).last(kSector)));
      std::memcpy(widened.data() + (offset - start), buf.data(), buf.size());
      buf = widened;
      offset = start;
    }
    while (!buf.empty()) {
      const uint64_t block = offset / dyn_.block_size;
      const uint64_t in = offset % dyn_.block_size;
      const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), dyn_.block_size - in));
      if (bat_[block] == vhd::kBatUnused) PVHOST_TRY(allocate_block(block));
      const uint64_t off = uint64_t{bat_[block]} * kSector + dyn_.bitmap_bytes() + in;
      PVHOST_TRY(write_file_data(lock, off, buf.first(n)));
      if (footer_.disk_type == vhd::kDiskDifferencing) {
        // After the data (in memory; on disk at the next flush), so a bit never marks a
        // sector whose data is not there. The lock is held again here.
        auto* bm = PVHOST_TRY(bitmap(block));
        for (uint64_t s = in / kSector; s < (in + n) / kSector; ++s) set_bit(*bm, s);
        dirty_bitmaps_.insert(block);
      }
      offset += n;
      buf = buf.subspan(n);
    }
    return {};
  }

  // Ordering: see the comment block at the top.
  Result<void> allocate_block(uint64_t block) {
    const uint64_t span = dyn_.bitmap_bytes() + dyn_.block_size;
    // The block goes where the footer is: the end of the file, minus the footer.
    uint64_t at = file_.size() >= kSector ? (file_.size() - kSector) / kSector * kSector : 0;
    at = std::max(at, dyn_.table_offset + (uint64_t{dyn_.max_table_entries} * 4 + kSector - 1) / kSector * kSector);
    if ((at / kSector) >= vhd::kBatUnused) return fail(EFBIG, "VHD file would exceed 2 TiB of sectors");
    const auto f = vhd::build_footer(footer_);
    PVHOST_TRY(file_.write(at + span, f));
    AlignedBytes blk(span);
    if (footer_.disk_type == vhd::kDiskDynamic) {
      // Dynamic disks: every sector of an allocated block is "in use" (QEMU does the same).
      std::memset(blk.data(), 0xff, static_cast<size_t>(dyn_.block_size / kSector / 8));
    }
    PVHOST_TRY(file_.write(at, blk));
    bat_[block] = static_cast<uint32_t>(at / kSector);
    dirty_bat_.insert(block);
    if (footer_.disk_type == vhd::kDiskDifferencing) bitmaps_[block] = AlignedBytes(dyn_.bitmap_bytes());
    return {};
  }

  Result<void> writeback() {
    PVHOST_TRY(file_.sync());
    if (dirty_bitmaps_.empty() && dirty_bat_.empty()) return {};
    for (uint64_t b : dirty_bitmaps_) PVHOST_TRY(file_.write(uint64_t{bat_[b]} * kSector, bitmaps_[b]));
    dirty_bitmaps_.clear();
    std::set<uint64_t> sectors;
    for (uint64_t b : dirty_bat_) sectors.insert(b * 4 / kSector);
    for (uint64_t s : sectors) {
      AlignedBytes sec(kSector);
      for (uint64_t i = 0; i < kSector / 4; ++i) {
        const uint64_t e = s * (kSector / 4) + i;
        store_be32(sec.data() + i * 4, e < bat_.size() ? bat_[e] : vhd::kBatUnused);
      }
      const uint64_t off = dyn_.table_offset + s * kSector;
      // The last BAT sector may be partial: with O_DIRECT, ImageFile reads the rest of
      // the sector (padding) and writes it back unchanged.
      const uint64_t len = std::min<uint64_t>(kSector, bat_.size() * 4 - s * kSector);
      PVHOST_TRY(file_.write(off, std::span<const std::byte>(sec).first(len)));
    }
    dirty_bat_.clear();
    return file_.sync();
  }

  std::string path_;
  Footer footer_;
  DynamicHeader dyn_;
  DriverInfo info_;
  std::unique_ptr<Image> parent_;
  std::mutex mu_;  // guards everything below (also the I/O on file_)
  ImageFile file_;
  bool read_only_;
  std::vector<uint32_t> bat_;
  std::set<uint64_t> dirty_bat_;
  std::map<uint64_t, AlignedBytes> bitmaps_;
  std::set<uint64_t> dirty_bitmaps_;
};

Result<Footer> read_footer(ImageFile& file) {
  const std::string& path = file.path();
  const uint64_t file_size = file.size();
  if (file_size < 512) return fail(EINVAL, fmt::format("{}: too short for a VHD footer", path));
  std::byte b[512];
  PVHOST_TRY(file.read_full(file_size - 512, b));
  auto f = vhd::parse_footer(b);
  if (f) return f;
  // Dynamic disks keep a copy at offset 0 (spec "Dynamic Disk Header Format"): a file
  // whose end was lost in a crash is still readable through it.
  std::byte c[512];
  PVHOST_TRY(file.read_full(0, c));
  auto copy = vhd::parse_footer(c);
  if (copy && copy->disk_type != vhd::kDiskFixed) return copy;
  return std::unexpected(std::move(f).error().add_context(path));
}

}  // namespace

Result<std::unique_ptr<Image>> open_vhd_in_chain(const OpenOptions& o, ChainGuard& guard) {
  ImageFile file = PVHOST_TRY(ImageFile::open(o.path, o.read_only, o.direct));
  PVHOST_TRY(guard.enter(file.fd(), o.path));
  Footer f = PVHOST_TRY(read_footer(file));
  auto img = std::make_unique<VhdImage>(std::move(file), f, o.read_only == ReadOnly::yes);
  PVHOST_TRY_CTX(img->load(guard, o.direct), o.path);
  return std::unique_ptr<Image>(std::move(img));
}

Result<std::unique_ptr<Image>> open_vhd(const OpenOptions& o) {
  ChainGuard g;
  return open_vhd_in_chain(o, g);
}

Result<void> create_vhd_differencing(const std::string& path, const std::string& parent_path) {
  // The parent's footer: size, geometry and the unique id the child records.
  ImageFile pfile = PVHOST_TRY(ImageFile::open(parent_path, ReadOnly::yes, DirectIo::no));
  Footer pf = PVHOST_TRY(read_footer(pfile));

  Footer f = pf;
  f.disk_type = vhd::kDiskDifferencing;
  f.data_offset = 512;
  // Seconds since 2000-01-01 00:00:00 UTC (spec "Time Stamp").
  f.timestamp = static_cast<uint32_t>(::time(nullptr) - 946684800);
  std::memcpy(f.creator_app.data(), "pvh ", 4);
  f.creator_version = 0x00010000;
  f.creator_os = 0x5769326B;  // "Wi2k", as the spec's example
  f.saved_state = 0;
  std::random_device rd;
  for (auto& b : f.unique_id) b = std::byte(rd() & 0xff);
  // Keep the parent's size semantics: if it was sized by CHS, so is the child (same CHS).

  DynamicHeader h;
  h.block_size = 2u << 20;
  const uint64_t vsize = pf.virtual_size();
  h.max_table_entries = static_cast<uint32_t>((vsize + h.block_size - 1) / h.block_size);
  h.table_offset = 512 + 1024;
  h.parent_unique_id = pf.unique_id;
  h.parent_timestamp = pf.timestamp;
  const auto slash = parent_path.rfind('/');
  const std::string base = slash == std::string::npos ? parent_path : parent_path.substr(slash + 1);
  h.parent_name = base;
  const uint64_t bat_bytes = (uint64_t{h.max_table_entries} * 4 + 511) / 512 * 512;

  char real[PATH_MAX];
  std::string abs = ::realpath(parent_path.c_str(), real) ? std::string(real) : parent_path;
  std::string w2ku = abs;
  std::replace(w2ku.begin(), w2ku.end(), '/', '\\');
  const std::string w2ru = ".\\" + base;
  const auto ku = vhd::utf8_to_utf16(w2ku, false);
  const auto ru = vhd::utf8_to_utf16(w2ru, false);
  uint64_t off = h.table_offset + bat_bytes;
  auto place = [&](size_t i, uint32_t code, const std::vector<std::byte>& data) {
    const uint64_t sectors = (data.size() + 511) / 512;
    h.locators[i] = {code, static_cast<uint32_t>(sectors), static_cast<uint32_t>(data.size()), off};
    const uint64_t at = off;
    off += sectors * 512;
    return at;
  };
  const uint64_t ku_at = place(0, vhd::kPlatformW2ku, ku);
  const uint64_t ru_at = place(1, vhd::kPlatformW2ru, ru);

  ImageFile out = PVHOST_TRY(ImageFile::create(path));
  const auto fb = vhd::build_footer(f);
  const auto hb = vhd::build_dynamic_header(h);
  std::vector<std::byte> bat(bat_bytes, std::byte{0xff});
  PVHOST_TRY(out.write(0, fb));
  PVHOST_TRY(out.write(512, hb));
  PVHOST_TRY(out.write(h.table_offset, bat));
  std::vector<std::byte> kus((ku.size() + 511) / 512 * 512), rus((ru.size() + 511) / 512 * 512);
  std::memcpy(kus.data(), ku.data(), ku.size());
  std::memcpy(rus.data(), ru.data(), ru.size());
  PVHOST_TRY(out.write(ku_at, kus));
  PVHOST_TRY(out.write(ru_at, rus));
  PVHOST_TRY(out.write(off, fb));
  if (::fsync(out.fd()) < 0) return fail_errno(fmt::format("fsync {}", path));
  return {};
}

}  // namespace pvhost::block
