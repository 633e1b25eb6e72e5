// Image formats on top of the block driver interface (ARCHITECTURE.md "Block layer"):
// qcow2 (src/block/qcow2/), VHD (src/block/vhd/), NBD (src/block/nbd/), and the chain
// opener that follows backing files.
//
// Every format driver here is an `Image`: a BlockDriver whose core is synchronous and
// thread-safe (read_at / write_at / flush_all / discard_at may be called from any number
// of threads at once; each image takes its own mutex for its metadata and lets aligned
// data I/O on allocated space run in parallel). open_queue() wraps that core in a
// ThreadedQueue (formats.cc): submit() hands the operations to up to kMaxQueueWorkers
// worker threads (one queued alone runs on the loop thread), and completions run on the
// queue's loop afterwards (or inside drain()), as the IoQueue contract asks.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "src/block/block_driver.h"
#include "src/block/node_counters.h"
#include "src/fd.h"

namespace pvhost::block {

class ImageFile;

// What image_info_json() reports, per QEMU's ImageInfo (qapi/block-core.json).
struct ImageDetails {
  std::string format;                  // "qcow2", "vpc", "raw", "nbd"
  uint64_t virtual_size = 0;
  std::optional<uint64_t> actual_size; // bytes allocated on the host (st_blocks * 512)
  std::optional<uint64_t> cluster_size;
  bool dirty = false;
  std::string backing_filename;        // as written in the image
  std::string full_backing_filename;   // resolved
  std::string backing_format;
  nlohmann::json format_specific;      // {"type": ..., "data": {...}} or null
};

class Image : public BlockDriver {
 public:
  // Guest bytes [offset, offset + buf.size()), which must lie inside the virtual size.
  [[nodiscard]] virtual Result<void> read_at(uint64_t offset, std::span<std::byte> buf) = 0;
  [[nodiscard]] virtual Result<void> write_at(uint64_t offset, std::span<const std::byte> buf) = 0;
  // Makes every write completed before the call durable (data and metadata).
  [[nodiscard]] virtual Result<void> flush_all() = 0;
  // Afterwards [offset, offset + length) reads as zeroes.
  [[nodiscard]] virtual Result<void> discard_at(uint64_t offset, uint64_t length) = 0;
  [[nodiscard]] virtual ImageDetails details() const = 0;
  [[nodiscard]] virtual const Image* backing() const { return nullptr; }
  // The same, for operations on the layer below (allocation(), reads): the chain owns it.
  [[nodiscard]] Image* backing_image() { return const_cast<Image*>(std::as_const(*this).backing()); }
  // The file this layer's driver reads and writes (QEMU's protocol node under the format
  // node, query-blockstats "parent"), or null (NBD: the export is the protocol).
  [[nodiscard]] virtual const ImageFile* file() const { return nullptr; }
  [[nodiscard]] ImageFile* file_mut() { return const_cast<ImageFile*>(std::as_const(*this).file()); }

  // Whether this image decides the bytes at `offset` itself (its own data, or zeroes it
  // recorded) or leaves them to its backing file: the answer for the run of `bytes` > 0
  // from `offset` (at most `length`, which must be > 0) that shares it. block-commit copies
  // exactly the allocated runs. Images that cannot tell report everything allocated.
  struct Allocation {
    bool allocated = true;
    uint64_t bytes = 0;
  };
  [[nodiscard]] virtual Result<Allocation> allocation(uint64_t offset, uint64_t length);

  [[nodiscard]] Result<uint64_t> refresh_size() override { return info().size_bytes; }
  [[nodiscard]] Result<std::unique_ptr<IoQueue>> open_queue(EventLoop& loop, unsigned depth,
                                                            std::function<void()> batch_done) override;

 protected:
  // Checks that [offset, offset + length) lies inside the virtual size, without overflow.
  [[nodiscard]] Result<void> check_range(uint64_t offset, uint64_t length) const;
};

// Backing chains: at most this many images below the top one (QEMU has no fixed limit;
// a bound turns a hostile or looping chain into an error instead of a stack overflow).
inline constexpr unsigned kMaxBackingDepth = 32;

// State carried down a chain while opening it: depth and the files already open, so a
// chain that comes back to one of its own files (a -> b -> a) is refused.
struct ChainGuard {
  unsigned depth = 0;
  std::vector<std::pair<dev_t, ino_t>> seen;
  // Records `fd`'s file; an error if it is already in the chain or the chain is too deep.
  [[nodiscard]] Result<void> enter(int fd, const std::string& path);
};

// "qcow2", "vpc" (also "vhd"), "raw", or "" to probe by content.
[[nodiscard]] Result<std::string> probe_format(const std::string& path);

// Opens an image of any supported format, following its backing chain (backing files are
// opened read-only, with their recorded backing format or by probing). For "nbd" the
// path is an NBD spec (nbd:unix:/path[:exportname=NAME], nbd://host[:port]/export).
[[nodiscard]] Result<std::unique_ptr<Image>> open_any(std::string_view format, const OpenOptions& options);
// open_any() as a BlockDriver, for open_image() (block_driver.cc):
//   case Format::qcow2: case Format::vpc: case Format::nbd:
//     return open_format_driver(to_string(format), options);
[[nodiscard]] Result<std::unique_ptr<BlockDriver>> open_format_driver(std::string_view format,
                                                                      const OpenOptions& options);
// Same, continuing a chain (used by the drivers for their backing files).
[[nodiscard]] Result<std::unique_ptr<Image>> open_any_in_chain(std::string_view format,
                                                               const OpenOptions& options,
                                                               ChainGuard& guard);

// A backing file name as recorded in an image, resolved the way QEMU does: absolute names
// stay, relative ones are relative to the directory of the image that names them.
[[nodiscard]] std::string resolve_backing_path(const std::string& image_path, const std::string& backing);

// A plain file (or block device) with synchronous I/O through ImageFile (O_DIRECT as the
// options ask): raw images at the bottom of chains.
[[nodiscard]] Result<std::unique_ptr<Image>> open_raw_image(const OpenOptions& options, ChainGuard& guard);

// QEMU's ImageInfo for query-block's `inserted.image`: filename, format, virtual-size,
// actual-size, cluster-size, dirty-flag, backing-filename, full-backing-filename,
// backing-filename-format, backing-image (nested, down the chain), format-specific.
// For a driver that is not an Image (the io_uring raw driver), what DriverInfo knows.
[[nodiscard]] nlohmann::json image_info_json(const BlockDriver& driver);

// Byte helpers shared by the format parsers (all on-disk fields here are big-endian,
// except VHD parent locators, which are UTF-16LE text).
[[nodiscard]] inline uint16_t load_be16(const std::byte* p) {
  return static_cast<uint16_t>((std::to_integer<unsigned>(p[0]) << 8) | std::to_integer<unsigned>(p[1]));
}
[[nodiscard]] inline uint32_t load_be32(const std::byte* p) {
  return (uint32_t{load_be16(p)} << 16) | load_be16(p + 2);
}
[[nodiscard]] inline uint64_t load_be64(const std::byte* p) {
  return (uint64_t{load_be32(p)} << 32) | load_be32(p + 4);
}
inline void store_be16(std::byte* p, uint16_t v) {
  p[0] = std::byte(v >> 8);
  p[1] = std::byte(v & 0xff);
}
inline void store_be32(std::byte* p, uint32_t v) {
  store_be16(p, static_cast<uint16_t>(v >> 16));
  store_be16(p + 2, static_cast<uint16_t>(v & 0xffff));
}
inline void store_be64(std::byte* p, uint64_t v) {
  store_be32(p, static_cast<uint32_t>(v >> 32));
  store_be32(p + 4, static_cast<uint32_t>(v & 0xffffffffu));
}

// Buffers whose address every O_DIRECT file accepts (kDirectIoMemAlign; the page size,
// more than any file system or block device asks for), zero-filled like std::vector's.
// The format drivers keep clusters, tables and bitmaps they read or write whole in these,
// so ImageFile hands them to the kernel without a bounce.
inline constexpr size_t kDirectIoMemAlign = 4096;
template <class T>
struct DirectIoAllocator {
  using value_type = T;
  DirectIoAllocator() = default;
  template <class U>
  DirectIoAllocator(const DirectIoAllocator<U>& /*other*/) noexcept {}
  [[nodiscard]] T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kDirectIoMemAlign}));
  }
  void deallocate(T* p, size_t /*n*/) noexcept { ::operator delete(p, std::align_val_t{kDirectIoMemAlign}); }
  template <class U>
  bool operator==(const DirectIoAllocator<U>& /*other*/) const noexcept { return true; }
};
using AlignedBytes = std::vector<std::byte, DirectIoAllocator<std::byte>>;

// One image file (or block device) with synchronous positional I/O: what the qcow2, VHD and
// raw-in-a-chain drivers read and write through. Move-only owner of the descriptor.
//
// O_DIRECT: open() asks for it when the options do, and falls back to buffered I/O where the
// file system refuses it (open(2) fails with EINVAL, as on tmpfs before Linux 6.6 and some
// FUSE file systems; statx(2) STATX_DIOALIGN reports no direct I/O support; or a first
// aligned read fails with EINVAL); direct() says which is in use. With O_DIRECT the kernel
// wants the file offset and the length to be multiples of alignment() and the buffer
// address one of mem_alignment() (open(2) "O_DIRECT"). Requests that are aligned go
// straight to the kernel; any other goes through an aligned bounce buffer: a read reads the
// aligned blocks around it, a write reads the first and last of them when the request
// covers them only partly, patches them, and writes all of them back in one pwrite
// (read-modify-write). The blocks rewritten around the request get the bytes they already
// hold, so a crash tears at most what a buffered write of the request would tear, and a
// change inside one logical block stays one block-sized write.
//
// Not thread-safe, except read_unbounced()/write_unbounced() (below). Invariant: between
// the read and the write of a read-modify-write, nothing else writes to the blocks it
// rewrites (a write in between would be undone), and nothing uses the shared bounce buffer.
// Every user keeps it by doing all other I/O on its ImageFile under its image's one mutex
// (Qcow2Image::mu_, VhdImage::mu_, RawImage::mu_), using the unbounced calls without it only
// on blocks no read-modify-write of metadata covers (guest data), and by giving each
// open file one writer: a chain's backing files and VHD parents are opened read-only, and
// where one file is open twice (block-commit's read-write base beside the read-only handle
// the chain keeps on it: QdiskDevice::start_commit, backends/block/qdisk.cc) only one handle
// writes. A reader through another handle is unaffected: the bytes a read-modify-write puts
// back around the request are the ones already there.
class ImageFile {
 public:
  // Opens an existing file or block device (O_NONBLOCK: a FIFO named as an image must not
  // block the open; anything but a regular file or a block device is refused).
  [[nodiscard]] static Result<ImageFile> open(const std::string& path, ReadOnly read_only, DirectIo direct);
  // Creates (or truncates) a regular file for writing a new image, buffered.
  [[nodiscard]] static Result<ImageFile> create(const std::string& path);

  ImageFile(ImageFile&&) noexcept = default;
  ImageFile& operator=(ImageFile&&) noexcept = default;
  ImageFile(const ImageFile&) = delete;
  ImageFile& operator=(const ImageFile&) = delete;
  ~ImageFile() = default;

  [[nodiscard]] int fd() const { return fd_.get(); }
  [[nodiscard]] const std::string& path() const { return path_; }
  // The file's size as of open(), grown by write()s past it (BLKGETSIZE64 for a device).
  [[nodiscard]] uint64_t size() const { return size_; }
  [[nodiscard]] bool direct() const { return direct_; }
  [[nodiscard]] bool block_device() const { return block_device_; }
  // O_DIRECT's file offset and length alignment, and buffer address alignment (1 when
  // buffered): statx(2) STATX_DIOALIGN for files, BLKSSZGET for block devices, 4096 for
  // files whose file system does not report it.
  [[nodiscard]] uint32_t alignment() const { return align_; }
  [[nodiscard]] uint32_t mem_alignment() const { return mem_align_; }

  // Reads [offset, offset + buf.size()); returns the bytes read, fewer only at end of file.
  [[nodiscard]] Result<size_t> read_full(uint64_t offset, std::span<std::byte> buf);
  // The same; a read that ends early is an error (EIO, "file ends early").
  [[nodiscard]] Result<void> read_exact(uint64_t offset, std::span<std::byte> buf);
  // Writes all of `buf` at `offset`; size() grows to cover it (and the file to exactly
  // that, also when a read-modify-write had to write a whole block past it).
  [[nodiscard]] Result<void> write(uint64_t offset, std::span<const std::byte> buf);
  // Grows a regular file to `size` bytes so unbounced writes may land there: allocated
  // with fallocate(2) (reads as zeroes), a hole where that fails; a block device cannot
  // grow (ENOSPC past its end). Never shrinks.
  [[nodiscard]] Result<void> extend_to(uint64_t size);
  // fdatasync(2): every write() before it is durable, with what is needed to read it back.
  [[nodiscard]] Result<void> sync();
  // Deallocates [offset, offset + length) of a regular file (fallocate(2) PUNCH_HOLE, the
  // size kept): afterwards it reads as zeroes. False, with nothing done, where the file
  // is a block device or fallocate(2) refuses (a file system that cannot punch holes):
  // the caller writes zeroes.
  [[nodiscard]] bool punch_hole(uint64_t offset, uint64_t length);

  // What went through this file: each read_full()/read_exact(), write(), read_unbounced(),
  // write_unbounced(), sync() and punch_hole() counts as one operation (a bounced request
  // as the one request, not its read-modify-write), metadata as much as data. This is the
  // "parent" node of the format layer in query-blockstats; its wr_highest_offset is how
  // far the format driver has written into the file (what libvirt reports as a thin
  // image's allocation on a block device).
  [[nodiscard]] const std::shared_ptr<NodeCounters>& counters() const { return counters_; }
  // Makes this file count into `c` (the counters of an earlier opening of it, so they
  // continue across a snapshot or a reopen). Only while nothing does I/O on the file.
  void share_counters(std::shared_ptr<NodeCounters> c) { counters_ = std::move(c); }

  // The data path of the format drivers, which may run on several threads at once without
  // the image's mutex: transfers that need no bounce buffer, straight pread(2)/pwrite(2).
  // unbounced() says whether a request is one (always, with buffered I/O). read_unbounced()
  // returns the bytes read, fewer only at the end of the file; write_unbounced() must lie
  // inside size() (it never grows the file). Each is safe beside any other I/O on the file
  // as long as no read-modify-write (a bounced write) covers the same logical blocks: the
  // drivers use them only for data whose blocks hold no metadata (see formats.h users).
  [[nodiscard]] bool unbounced(uint64_t offset, size_t length, const void* buf) const {
    return aligned(offset, length, buf);
  }
  [[nodiscard]] Result<size_t> read_unbounced(uint64_t offset, std::span<std::byte> buf) const;
  [[nodiscard]] Result<void> write_unbounced(uint64_t offset, std::span<const std::byte> buf) const;

 private:
  ImageFile(std::string path, UniqueFd fd) : path_(std::move(path)), fd_(std::move(fd)) {}
  // Type, size, and (with O_DIRECT) alignment; clears O_DIRECT where it does not work.
  [[nodiscard]] Result<void> probe();
  [[nodiscard]] bool aligned(uint64_t offset, size_t length, const void* buf) const;
  [[nodiscard]] std::span<std::byte> bounce(size_t bytes);
  // One aligned pread of `buf` at `offset`, retried while it ends short on a block boundary
  // before the end of the file; the bytes read.
  [[nodiscard]] Result<size_t> pread_blocks(uint64_t offset, std::span<std::byte> buf) const;
  [[nodiscard]] Result<size_t> pwrite_all(uint64_t offset, std::span<const std::byte> buf) const;
  // read_full() and write() without counting them.
  [[nodiscard]] Result<size_t> read_full_uncounted(uint64_t offset, std::span<std::byte> buf);
  [[nodiscard]] Result<void> write_uncounted(uint64_t offset, std::span<const std::byte> buf);
  // One bounced step of read_full()/write() at `offset`: the bytes transferred (a read may
  // transfer 0: end of file).
  [[nodiscard]] Result<size_t> read_bounced(uint64_t offset, std::span<std::byte> buf);
  [[nodiscard]] Result<size_t> write_bounced(uint64_t offset, std::span<const std::byte> buf);

  std::string path_;
  UniqueFd fd_;
  uint64_t size_ = 0;
  bool direct_ = false;
  bool block_device_ = false;
  uint32_t align_ = 1;
  uint32_t mem_align_ = 1;
  AlignedBytes bounce_;  // grown on demand up to kMaxBounce (formats.cc) plus one block
  std::shared_ptr<NodeCounters> counters_ = std::make_shared<NodeCounters>();
};

}  // namespace pvhost::block
