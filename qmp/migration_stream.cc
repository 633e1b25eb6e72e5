#include "qmp/migration_stream.h"

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>

#include "src/fd.h"

namespace pvhost::qmp {
namespace {

// migration/savevm.c section types.
constexpr uint8_t kVmEof = 0x00;
constexpr uint8_t kVmSectionStart = 0x01;
constexpr uint8_t kVmSectionFull = 0x04;
constexpr uint8_t kVmConfiguration = 0x07;
constexpr uint8_t kVmSectionFooter = 0x7e;

void put_be32(std::string& s, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) s.push_back(static_cast<char>((v >> shift) & 0xFF));
}

class Reader {
 public:
  explicit Reader(std::string_view b) : b_(b) {}
  bool u8(uint8_t& v) {
    if (pos_ + 1 > b_.size()) return false;
    v = static_cast<uint8_t>(b_[pos_++]);
    return true;
  }
  bool be32(uint32_t& v) {
    if (pos_ + 4 > b_.size()) return false;
    v = 0;
    for (int i = 0; i < 4; ++i) v = (v << 8) | static_cast<uint8_t>(b_[pos_++]);
    return true;
  }
  bool bytes(size_t n, std::string_view& out) {
    if (pos_ + n > b_.size()) return false;
    out = b_.substr(pos_, n);
    pos_ += n;
    return true;
  }
  bool peek(uint8_t& v) const {
    if (pos_ >= b_.size()) return false;
    v = static_cast<uint8_t>(b_[pos_]);
    return true;
  }
  [[nodiscard]] size_t pos() const { return pos_; }

 private:
  std::string_view b_;
  size_t pos_ = 0;
};

}  // namespace

std::string empty_device_state() {
  std::string s;
  put_be32(s, kQemuVmFileMagic);
  put_be32(s, kQemuVmFileVersion);
  s.push_back(static_cast<char>(kVmEof));
  return s;
}

Result<void> check_device_state(std::string_view bytes) {
  Reader r(bytes);
  uint32_t v = 0;
  if (!r.be32(v) || v != kQemuVmFileMagic) return fail(EINVAL, "Not a migration stream");
  if (!r.be32(v)) return fail(EINVAL, "truncated migration stream");
  if (v == 2) return fail(ENOTSUP, "SaveVM v2 format is obsolete and don't work anymore");
  if (v != kQemuVmFileVersion) return fail(ENOTSUP, "Unsupported migration stream version");
  for (;;) {
    uint8_t type = 0;
    if (!r.u8(type)) return fail(EINVAL, "truncated migration stream (no EOF marker)");
    if (type == kVmEof) {
      if (r.pos() != bytes.size()) return fail(EINVAL, "data after the migration stream's EOF marker");
      return {};
    }
    if (type == kVmConfiguration) {  // vmstate_configuration: be32 length + machine name
      uint32_t len = 0;
      std::string_view name;
      if (!r.be32(len) || !r.bytes(len, name)) return fail(EINVAL, "truncated configuration section");
      continue;
    }
    if (type != kVmSectionFull && type != kVmSectionStart)
      return fail(EINVAL, fmt::format("unknown savevm section type {}", type));
    uint32_t section_id = 0, instance_id = 0, version_id = 0;
    uint8_t len = 0;
    std::string_view idstr;
    if (!r.be32(section_id) || !r.u8(len) || !r.bytes(len, idstr) || !r.be32(instance_id) || !r.be32(version_id))
      return fail(EINVAL, "truncated section header");
    // softmmu/cpu-timers.c vmstate_timers: int64 cpu_ticks_offset, 8 unused bytes,
    // int64 cpu_clock_offset (version 2 only). Its icount subsections are never sent
    // for Xen (no icount).
    if (idstr != "timer" || instance_id != 0 || version_id < 1 || version_id > 2)
      return fail(EINVAL, fmt::format("Unknown savevm section or instance '{}' {}. Make sure that your current VM "
                                      "setup matches your saved VM setup, including any hotplugged devices",
                                      idstr, instance_id));
    std::string_view payload;
    if (!r.bytes(version_id == 2 ? 24 : 16, payload)) return fail(EINVAL, "truncated timer section");
    uint8_t next = 0;
    if (r.peek(next) && next == kVmSectionFooter) {
      uint32_t footer_id = 0;
      (void)r.u8(next);
      if (!r.be32(footer_id) || footer_id != section_id) return fail(EINVAL, "bad section footer");
    }
  }
}

Result<void> save_device_state_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0660));
  if (!fd) return fail_errno(fmt::format("Unable to open {}", path));
  PVHOST_TRY_CTX(write_all(fd.get(), empty_device_state()), fmt::format("writing {}", path));
  if (::fsync(fd.get()) != 0 && errno != EINVAL) return fail_errno(fmt::format("fsync {}", path));
  return {};
}

Result<void> load_device_state_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail_errno(fmt::format("Unable to open {}", path));
  std::string data;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno(fmt::format("reading {}", path));
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
    if (data.size() > (1u << 20)) return fail(EFBIG, fmt::format("{}: device state larger than 1 MiB", path));
  }
  return with_context(check_device_state(data), path);
}

}  // namespace pvhost::qmp
