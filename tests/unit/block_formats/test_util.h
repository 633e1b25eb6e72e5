// Shared helpers for the image-format tests: temp directories, running qemu-img (the
// oracle), deterministic content.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "src/block/formats.h"

namespace pvhost::block::test {

struct TempDir {
  std::string path;
  // `base`: /tmp by default; /dev/shm for tests that fdatasync a lot and only need
  // process-crash (not power-loss) semantics.
  explicit TempDir(const std::string& base = "/tmp") {
    std::string tmpl = base + "/pvhost-formats-XXXXXX";
    const char* p = ::mkdtemp(tmpl.data());
    REQUIRE(p != nullptr);
    path = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  [[nodiscard]] std::string file(const std::string& name) const { return path + "/" + name; }
};

struct RunResult {
  int status = -1;  // exit code, or -1 when it did not exit normally
  std::string output;
};

// Runs a shell command, collecting stdout and stderr.
inline RunResult run(const std::string& cmd) {
  RunResult r;
  FILE* f = ::popen((cmd + " 2>&1").c_str(), "r");
  if (f == nullptr) return r;
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) r.output.append(buf, n);
  const int st = ::pclose(f);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

inline void run_ok(const std::string& cmd) {
  const RunResult r = run(cmd);
  INFO(cmd << "\n" << r.output);
  REQUIRE(r.status == 0);
}

inline std::vector<std::byte> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(c.size());
  if (!c.empty()) std::memcpy(out.data(), c.data(), c.size());
  return out;
}

inline void write_file(const std::string& path, const std::vector<std::byte>& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

// Content that compresses somewhat and differs per offset and seed; runs of zeroes so
// qemu-img convert leaves some clusters unallocated.
inline std::vector<std::byte> pattern(size_t size, uint64_t seed, size_t zero_every = 0) {
  std::vector<std::byte> v(size);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < size; i += 8) {
    const uint64_t x = rng();
    for (size_t k = 0; k < 8 && i + k < size; ++k) v[i + k] = std::byte((x >> (k * 8)) & 0x3f);
  }
  if (zero_every != 0) {
    for (size_t off = 0; off + zero_every / 2 <= size; off += zero_every)
      std::memset(v.data() + off, 0, zero_every / 2);
  }
  return v;
}

// qemu-img check's exit codes: 0 clean, 1 check failed, 2 corruptions, 3 leaks only.
inline int qemu_img_check(const std::string& fmt, const std::string& path, std::string* out = nullptr) {
  const RunResult r = run("qemu-img check -f " + fmt + " " + path);
  if (out) *out = r.output;
  return r.status;
}

// The whole image as raw bytes, per qemu-img convert.
inline std::vector<std::byte> qemu_img_raw(const std::string& fmt, const std::string& path, const std::string& tmp_raw) {
  run_ok("qemu-img convert -f " + fmt + " -O raw " + path + " " + tmp_raw);
  return read_file(tmp_raw);
}

inline std::vector<std::byte> read_all(Image& img) {
  std::vector<std::byte> out(img.info().size_bytes);
  auto r = img.read_at(0, out);
  INFO((r ? std::string() : r.error().describe()));
  REQUIRE(r);
  return out;
}

inline std::unique_ptr<Image> must_open(std::string_view fmt, const std::string& path, ReadOnly ro = ReadOnly::no) {
  OpenOptions o;
  o.path = path;
  o.read_only = ro;
  auto r = open_any(fmt, o);
  INFO(path << ": " << (r ? std::string() : r.error().describe()));
  REQUIRE(r);
  return std::move(*r);
}

inline std::string open_error(std::string_view fmt, const std::string& path, ReadOnly ro = ReadOnly::no) {
  OpenOptions o;
  o.path = path;
  o.read_only = ro;
  auto r = open_any(fmt, o);
  if (r) return "";
  return r.error().describe();
}

inline void patch_be(const std::string& path, uint64_t off, uint64_t value, int bytes) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  f.seekp(static_cast<std::streamoff>(off));
  for (int i = bytes - 1; i >= 0; --i) {
    const char c = static_cast<char>((value >> (i * 8)) & 0xff);
    f.write(&c, 1);
  }
}

inline uint64_t peek_be(const std::string& path, uint64_t off, int bytes) {
  std::ifstream f(path, std::ios::binary);
  f.seekg(static_cast<std::streamoff>(off));
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) {
    char c = 0;
    f.read(&c, 1);
    v = (v << 8) | static_cast<unsigned char>(c);
  }
  return v;
}

}  // namespace pvhost::block::test
