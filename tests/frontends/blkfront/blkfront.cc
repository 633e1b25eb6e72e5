// blkfront: a PV block frontend running as a guest process on pvhost-xenemu (guest
// library), negotiating as Linux's xen-blkfront does (talk_to_blkback / blkfront_connect):
// multi-queue, multi-page rings, persistent grants, indirect descriptors, either x86 ABI,
// each switchable off, then running a workload with data verification, or one hostile
// scenario. Prints one JSON summary line on stdout.
//
//   blkfront --rundir DIR --domid N --devid D [options]
//     --queues Q          (default 2; capped by multi-queue-max-queues)
//     --ring-order K      (default: the backend's max-ring-page-order)
//     --abi native|x86_32|x86_64   (x86_32/x86_64 also write `protocol`)
//     --no-persistent --no-indirect --no-multi-queue
//     --rw read|write|randread|randwrite|randrw|verify
//     --bs BYTES (512..1 MiB, multiple of 512)  --qd N (1..128)  --ops N  --seconds S
//     --span BYTES        region of the disk used (default: min(disk, 64 MiB))
//     --no-verify         no pattern fill/check (benchmarks)
//     --image PATH        after the workload, compare the image file with what was written
//     --expect-out PATH   after the workload, write the disk's expected content (--span bytes)
//                         as a raw file: each block as last written, never-written blocks as
//                         zeroes (for a disk that started empty); an oracle for qemu-img compare
//     --extras            also exercise FLUSH, WRITE_BARRIER (with and without data), DISCARD
//     --hostile KIND      one hostile scenario (see hostile()); prints the statuses seen
//   Floors for scripts/bench-block (no Xen involved):
//     --floor-direct PATH  the same workload (--rw read|write|randread|randwrite, --bs, --qd,
//                          --seconds) as an io_uring O_DIRECT loop straight on PATH
//     --floor-notify N     N eventfd round trips between two processes (the emulated event
//                          channel's mechanism)
//     --stay              stay connected until the backend closes
//     --abandon           when the backend starts closing mid-workload, write Closed at once,
//                         leaving requests in flight (a crashed guest); default: finish them
//   Crash consistency (the backend is killed under the workload):
//     --flush-every N     in the workload, a FLUSH_DISKCACHE after every N writes started
//                         (one flush in flight at a time)
//     --stall-exit S      end the workload when requests are in flight and none has completed
//                         for S seconds (a dead backend); prints "stalled": true and skips close.
//                         SIGUSR1 ends it the same way at once (a test that killed the backend
//                         says so, rather than the workload guessing from a pause: a slow
//                         disk must not look like a dead backend)
//     --durable-out PATH  after the workload, write what a crash may leave, as JSON: per written
//                         block, the generation a completed flush made durable (0: none) and
//                         every generation issued to it (the later ones may or may not be there)
//     --check-crash LOG --image RAW   no guest: check a raw image against a --durable-out LOG;
//                         every 512-byte sector of a logged block must hold its durable
//                         generation or one issued after it (zeroes if nothing was durable)
#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "backends/block/blkif_abi.h"
#include "backends/block/ring.h"
#include "hw/xen/emu/guest/guest.h"
#include "hw/xen/xs_client.h"
#include "tests/frontends/blkfront/pattern.h"

// Set by SIGUSR1 (--stall-exit): the test killed the backend.
volatile sig_atomic_t g_backend_dead = 0;

using namespace pvhost;
using namespace pvhost::blkif;
using namespace pvhost::blkfront;
using namespace std::chrono_literals;

namespace {

struct Args {
  std::string rundir;
  DomId domid;
  std::string devid;
  uint32_t queues = 2;
  std::optional<uint32_t> ring_order;
  std::string abi = "native";
  bool persistent = true;
  bool indirect = true;
  bool multi_queue = true;
  std::string rw = "verify";
  uint64_t bs = 4096;
  uint32_t qd = 8;
  uint64_t ops = 0;
  double seconds = 0;
  uint64_t span = 0;
  bool verify = true;
  std::string image;
  std::string expect_out;
  bool extras = false;
  std::string hostile;
  bool stay = false;
  bool abandon = false;
  std::string floor_direct;
  uint64_t floor_notify = 0;
  uint32_t seed = 1;
  uint64_t flush_every = 0;
  double stall_exit = 0;
  std::string durable_out;
  std::string check_crash;
};

Result<Args> parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto value = [&]() -> Result<std::string> {
      if (i + 1 >= argc) return fail(EINVAL, k + " needs a value");
      return std::string(argv[++i]);
    };
    try {
      if (k == "--rundir") a.rundir = PVHOST_TRY(value());
      else if (k == "--domid") a.domid = DomId(static_cast<uint16_t>(std::stoul(PVHOST_TRY(value()))));
      else if (k == "--devid") a.devid = PVHOST_TRY(value());
      else if (k == "--queues") a.queues = static_cast<uint32_t>(std::stoul(PVHOST_TRY(value())));
      else if (k == "--ring-order") a.ring_order = static_cast<uint32_t>(std::stoul(PVHOST_TRY(value())));
      else if (k == "--abi") a.abi = PVHOST_TRY(value());
      else if (k == "--no-persistent") a.persistent = false;
      else if (k == "--no-indirect") a.indirect = false;
      else if (k == "--no-multi-queue") a.multi_queue = false;
      else if (k == "--rw") a.rw = PVHOST_TRY(value());
      else if (k == "--bs") a.bs = std::stoull(PVHOST_TRY(value()));
      else if (k == "--qd") a.qd = static_cast<uint32_t>(std::stoul(PVHOST_TRY(value())));
      else if (k == "--ops") a.ops = std::stoull(PVHOST_TRY(value()));
      else if (k == "--seconds") a.seconds = std::stod(PVHOST_TRY(value()));
      else if (k == "--span") a.span = std::stoull(PVHOST_TRY(value()));
      else if (k == "--no-verify") a.verify = false;
      else if (k == "--image") a.image = PVHOST_TRY(value());
      else if (k == "--expect-out") a.expect_out = PVHOST_TRY(value());
      else if (k == "--extras") a.extras = true;
      else if (k == "--hostile") a.hostile = PVHOST_TRY(value());
      else if (k == "--stay") a.stay = true;
      else if (k == "--abandon") a.abandon = true;
      else if (k == "--floor-direct") a.floor_direct = PVHOST_TRY(value());
      else if (k == "--floor-notify") a.floor_notify = std::stoull(PVHOST_TRY(value()));
      else if (k == "--seed") a.seed = static_cast<uint32_t>(std::stoul(PVHOST_TRY(value())));
      else if (k == "--flush-every") a.flush_every = std::stoull(PVHOST_TRY(value()));
      else if (k == "--stall-exit") a.stall_exit = std::stod(PVHOST_TRY(value()));
      else if (k == "--durable-out") a.durable_out = PVHOST_TRY(value());
      else if (k == "--check-crash") a.check_crash = PVHOST_TRY(value());
      else return fail(EINVAL, "unknown option " + k);
    } catch (const std::exception&) {
      return fail(EINVAL, "bad value for " + k);
    }
  }
  if (!a.floor_direct.empty() || a.floor_notify != 0) return a;
  if (!a.check_crash.empty()) {
    if (a.image.empty()) return fail(EINVAL, "--check-crash needs --image");
    return a;
  }
  if (a.rundir.empty() || a.devid.empty()) return fail(EINVAL, "--rundir, --domid and --devid are required");
  if (a.bs < 512 || a.bs > (1u << 20) || a.bs % 512 != 0) return fail(EINVAL, "--bs must be 512..1048576, a multiple of 512");
  if (a.qd < 1 || a.qd > 128) return fail(EINVAL, "--qd must be 1..128");
  if (a.abi != "native" && a.abi != "x86_32" && a.abi != "x86_64") return fail(EINVAL, "--abi native|x86_32|x86_64");
  if (a.ops == 0 && a.seconds == 0) a.ops = 256;
  return a;
}

uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

std::atomic_ref<uint32_t> idx(std::byte* page, size_t off) {
  return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(page + off));
}

// What one ring slot's request needs in guest memory.
struct Slot {
  xenemu::GuestPages data;          // the request's data pages
  std::vector<GrantRef> data_refs;  // persistent grants (granted once), else empty
  xenemu::GuestPages ind;           // one indirect page (256 descriptors fit)
  std::optional<GrantRef> ind_ref;  // persistent
  std::vector<GrantRef> temp_refs;  // per-request grants, ended after the response
  bool busy = false;
  int io = -1;          // owning I/O
  uint64_t off = 0;     // disk offset of this request
  uint64_t len = 0;
  uint8_t op = 0;
  int16_t status = 0;
  bool done = false;
};

struct Queue {
  xenemu::GuestPages ring;
  std::vector<GrantRef> ring_refs;
  Port port;
  uint32_t size = 0;
  RingIndex req_prod_pvt;
  RingIndex rsp_cons;
  std::vector<Slot> slots;
};

struct Io {
  bool write = false;
  uint64_t block = 0;
  uint64_t off = 0;
  uint64_t len = 0;
  uint32_t gen = 0;
  int remaining = 0;
  bool failed = false;
  uint64_t start = 0;
  bool active = false;
  bool flush = false;  // a FLUSH_DISKCACHE (block, off, len unused)
};

class Frontend {
 public:
  Frontend(Args a, std::unique_ptr<xenemu::Guest> g, std::unique_ptr<xen::XsClient> xs)
      : a_(std::move(a)), g_(std::move(g)), xs_(std::move(xs)) {
    fe_ = fmt::format("/local/domain/{}/device/vbd/{}", a_.domid, a_.devid);
    abi_ = a_.abi == "x86_32" ? Abi::x86_32 : Abi::x86_64;
  }

  Result<nlohmann::json> run() {
    be_ = PVHOST_TRY_CTX(xs_->read(xen::kNoTransaction, fe_ + "/backend"), "reading backend");
    PVHOST_TRY(wait_backend({"2"}));
    PVHOST_TRY(negotiate());
    PVHOST_TRY(connect());
    nlohmann::json out;
    if (!a_.hostile.empty()) {
      out = PVHOST_TRY(hostile());
    } else {
      out = PVHOST_TRY(workload());
      if (!a_.durable_out.empty()) PVHOST_TRY(write_durable());
      if (stalled_) return out;  // the backend is dead: nothing more to say to it
      if (backend_closing_) {
        out["backend_closed_during_workload"] = true;
        if (a_.abandon) return out;
      } else if (a_.extras) out["extras"] = PVHOST_TRY(extras());
      if (!a_.image.empty() && !backend_closing_) out["image_mismatches"] = PVHOST_TRY(check_image());
      if (!a_.expect_out.empty()) PVHOST_TRY(write_expected());
    }
    out["queues"] = queues_.size();
    out["ring_order"] = order_;
    out["ring_size"] = queues_.empty() ? 0 : queues_[0].size;
    out["persistent"] = persistent_;
    out["indirect_segments"] = max_indirect_;
    out["abi"] = std::string(to_string(abi_));
    out["sectors"] = sectors_;
    if (a_.stay) {
      while (!backend_is({"5", "6", "gone"})) std::this_thread::sleep_for(10ms);
    }
    if (!backend_is({"gone"})) {
      auto c = close();
      out["closed"] = static_cast<bool>(c);
      if (!c) out["close_error"] = c.error().describe();
      out["close_end_access_failures"] = close_end_access_failures_;
    }
    return out;
  }

  // blkfront_closing + a re-initialisation, so the device can be connected again: Closing,
  // Closed, every grant ended (the backend must have unmapped them all), Initialising.
  Result<void> close() {
    if (backend_state() != "6") {
      PVHOST_TRY(xs_->write(xen::kNoTransaction, fe_ + "/state", "5"));
      PVHOST_TRY(wait_backend({"5", "6"}));
    }
    PVHOST_TRY(xs_->write(xen::kNoTransaction, fe_ + "/state", "6"));
    PVHOST_TRY(wait_backend({"6"}));
    auto end = [&](GrantRef r) {
      if (!g_->end_access(r)) ++close_end_access_failures_;
    };
    for (auto& Q : queues_) {
      for (GrantRef r : Q.ring_refs) end(r);
      (void)g_->close_port(Q.port);  // the backend unbound; closing our end cannot fail usefully
      for (auto& sl : Q.slots) {
        for (GrantRef r : sl.data_refs) end(r);
        if (sl.ind_ref) end(*sl.ind_ref);
      }
    }
    PVHOST_TRY(xs_->write(xen::kNoTransaction, fe_ + "/state", "1"));
    return wait_backend({"2"});
  }

 private:
  // --- xenstore ---
  std::string backend_state() {
    auto v = xen::read_optional(*xs_, xen::kNoTransaction, be_ + "/state");
    return v && *v ? **v : std::string("gone");
  }
  bool backend_is(std::initializer_list<std::string_view> states) {
    const std::string s = backend_state();
    return std::find(states.begin(), states.end(), s) != states.end();
  }
  Result<void> wait_backend(std::initializer_list<std::string_view> states, std::chrono::milliseconds t = 10s) {
    const auto end = std::chrono::steady_clock::now() + t;
    while (!backend_is(states)) {
      if (std::chrono::steady_clock::now() > end)
        return fail(ETIMEDOUT, fmt::format("backend state {} (waiting for {})", backend_state(), *states.begin()));
      std::this_thread::sleep_for(2ms);
    }
    return {};
  }
  uint64_t be_uint(const std::string& key, uint64_t dflt) {
    auto v = xen::read_optional(*xs_, xen::kNoTransaction, be_ + "/" + key);
    if (!v || !*v) return dflt;
    try {
      return std::stoull(**v);
    } catch (const std::exception&) {
      return dflt;
    }
  }

  // talk_to_blkback: what both sides support.
  Result<void> negotiate() {
    sectors_ = be_uint("sectors", 0);
    sector_size_ = static_cast<uint32_t>(be_uint("sector-size", 512));
    info_ = static_cast<uint32_t>(be_uint("info", 0));
    const uint32_t max_order = static_cast<uint32_t>(be_uint("max-ring-page-order", 0));
    order_ = std::min(a_.ring_order.value_or(max_order), max_order);
    const uint32_t max_q = static_cast<uint32_t>(be_uint("multi-queue-max-queues", 1));
    nq_ = a_.multi_queue ? std::max(1u, std::min(a_.queues, max_q)) : 1;
    persistent_ = a_.persistent && be_uint("feature-persistent", 0) == 1;
    max_indirect_ = a_.indirect ? static_cast<uint32_t>(std::min<uint64_t>(be_uint("feature-max-indirect-segments", 0), 256)) : 0;
    if (sectors_ == 0) return fail(EINVAL, "backend has no sectors");
    return {};
  }

  uint32_t max_segments() const { return max_indirect_ > BLKIF_MAX_SEGMENTS_PER_REQUEST ? max_indirect_ : BLKIF_MAX_SEGMENTS_PER_REQUEST; }
  uint64_t max_req_bytes() const { return uint64_t{max_segments()} * kPageSize; }

  Result<void> connect() {
    const uint64_t span = a_.span != 0 ? std::min(a_.span, sectors_ * 512) : std::min<uint64_t>(sectors_ * 512, 64ull << 20);
    span_ = span / a_.bs * a_.bs;
    reqs_per_io_ = static_cast<uint32_t>((a_.bs + max_req_bytes() - 1) / max_req_bytes());
    const uint64_t req_bytes = std::min<uint64_t>(a_.bs, max_req_bytes());
    const size_t data_pages = (req_bytes + kPageSize - 1) / kPageSize;
    queues_.resize(nq_);
    for (uint32_t q = 0; q < nq_; ++q) {
      Queue& Q = queues_[q];
      Q.ring = PVHOST_TRY_CTX(g_->alloc_pages(size_t{1} << order_), "ring pages");
      std::memset(Q.ring.data, 0, (size_t{1} << order_) * kPageSize);
      // SHARED_RING_INIT
      idx(Q.ring.data, 4).store(1);
      idx(Q.ring.data, 12).store(1);
      Q.size = ring_entries((size_t{1} << order_) * kPageSize, entry_size(abi_));
      for (size_t i = 0; i < (size_t{1} << order_); ++i)
        Q.ring_refs.push_back(PVHOST_TRY(g_->grant_access(kDom0, Gfn(Q.ring.gfn.value() + i), xenemu::ReadOnly::no)));
      Q.port = PVHOST_TRY(g_->alloc_unbound(kDom0));
      const uint32_t per_queue = (a_.qd + nq_ - 1) / nq_ * reqs_per_io_;
      Q.slots.resize(std::min<uint32_t>(Q.size, std::max<uint32_t>(per_queue, 4)));
      for (Slot& s : Q.slots) {
        s.data = PVHOST_TRY_CTX(g_->alloc_pages(data_pages), "data pages");
        if (persistent_)
          for (size_t i = 0; i < data_pages; ++i)
            s.data_refs.push_back(PVHOST_TRY(g_->grant_access(kDom0, Gfn(s.data.gfn.value() + i), xenemu::ReadOnly::no)));
        if (max_indirect_ > 0) {
          s.ind = PVHOST_TRY(g_->alloc_pages(1));
          if (persistent_) s.ind_ref = PVHOST_TRY(g_->grant_access(kDom0, s.ind.gfn, xenemu::ReadOnly::yes));
        }
      }
    }
    // One transaction, as blkfront's talk_to_blkback.
    const bool multi = a_.multi_queue && be_uint("multi-queue-max-queues", 0) > 0;
    PVHOST_TRY(xen::transact(*xs_, [&](xen::Transaction t) -> Result<void> {
      auto w = [&](const std::string& k, const std::string& v) { return xs_->write(t, fe_ + "/" + k, v); };
      // Keys of an earlier connection must not linger (a missing node is fine).
      for (const char* k : {"ring-page-order", "multi-queue-num-queues", "protocol", "ring-ref", "event-channel"})
        (void)xs_->rm(t, fe_ + "/" + k);
      for (uint32_t q = 0; q < 16; ++q) (void)xs_->rm(t, fmt::format("{}/queue-{}", fe_, q));
      for (uint32_t i = 0; i < 16; ++i) (void)xs_->rm(t, fmt::format("{}/ring-ref{}", fe_, i));
      if (order_ > 0) PVHOST_TRY(w("ring-page-order", std::to_string(order_)));
      if (multi) PVHOST_TRY(w("multi-queue-num-queues", std::to_string(nq_)));
      for (uint32_t q = 0; q < nq_; ++q) {
        const std::string dir = multi ? fmt::format("queue-{}/", q) : "";
        for (size_t i = 0; i < queues_[q].ring_refs.size(); ++i) {
          const std::string k = order_ == 0 ? dir + "ring-ref" : fmt::format("{}ring-ref{}", dir, i);
          PVHOST_TRY(w(k, std::to_string(queues_[q].ring_refs[i].value())));
        }
        PVHOST_TRY(w(dir + "event-channel", std::to_string(queues_[q].port.value())));
      }
      if (a_.abi != "native") PVHOST_TRY(w("protocol", std::string(to_string(abi_))));
      PVHOST_TRY(w("feature-persistent", persistent_ ? "1" : "0"));
      return w("state", "3");
    }));
    PVHOST_TRY(wait_backend({"4"}));
    PVHOST_TRY(xs_->write(xen::kNoTransaction, fe_ + "/state", "4"));
    return {};
  }

  // --- ring ---
  void put_entry(Queue& Q, const void* entry, size_t n) {
    std::byte* slot = Q.ring.data + kRingHeaderBytes + Q.req_prod_pvt.slot(Q.size) * entry_size(abi_);
    std::memcpy(slot, entry, n);
    ++Q.req_prod_pvt;
  }
  Result<void> push(Queue& Q) {
    const RingIndex old(idx(Q.ring.data, 0).load(std::memory_order_relaxed));
    idx(Q.ring.data, 0).store(Q.req_prod_pvt.value(), std::memory_order_release);  // entries before index
    std::atomic_thread_fence(std::memory_order_seq_cst);                         // index before req_event read
    const RingIndex ev(idx(Q.ring.data, 4).load(std::memory_order_relaxed));
    if (needs_notify(old, Q.req_prod_pvt, ev)) {
      ++notifies_;
      return g_->notify(Q.port);
    }
    return {};
  }

  // Builds one READ/WRITE (or INDIRECT) for slot `si` of queue `Q`.
  Result<void> issue(Queue& Q, size_t si, uint8_t op, uint64_t off, uint64_t len) {
    Slot& s = Q.slots[si];
    s.busy = true;
    s.done = false;
    s.off = off;
    s.len = len;
    s.op = op;
    const size_t pages = (len + kPageSize - 1) / kPageSize;
    std::vector<Segment> segs;
    for (size_t p = 0; p < pages; ++p) {
      const uint64_t l = std::min<uint64_t>(kPageSize, len - p * kPageSize);
      GrantRef ref;
      if (persistent_) {
        ref = s.data_refs[p];
      } else {
        // The backend only reads the pages of a write: grant those read-only.
        ref = PVHOST_TRY(g_->grant_access(kDom0, Gfn(s.data.gfn.value() + p),
                                          op == BLKIF_OP_WRITE ? xenemu::ReadOnly::yes : xenemu::ReadOnly::no));
        s.temp_refs.push_back(ref);
      }
      segs.push_back(Segment{ref.value(), 0, static_cast<uint8_t>(l / 512 - 1), 0});
    }
    const uint64_t sector = off / 512;
    if (segs.size() <= BLKIF_MAX_SEGMENTS_PER_REQUEST) {
      x86_64::Request r64{};
      x86_32::Request r32{};
      if (abi_ == Abi::x86_32) {
        r32.operation = op;
        r32.nr_segments = static_cast<uint8_t>(segs.size());
        r32.id = si;
        r32.sector_number = sector;
        std::copy(segs.begin(), segs.end(), r32.seg);
        put_entry(Q, &r32, sizeof r32);
      } else {
        r64.operation = op;
        r64.nr_segments = static_cast<uint8_t>(segs.size());
        r64.id = si;
        r64.sector_number = sector;
        std::copy(segs.begin(), segs.end(), r64.seg);
        put_entry(Q, &r64, sizeof r64);
      }
      return {};
    }
    std::memcpy(s.ind.data, segs.data(), segs.size() * sizeof(Segment));
    GrantRef iref;
    if (s.ind_ref) {
      iref = *s.ind_ref;
    } else {
      iref = PVHOST_TRY(g_->grant_access(kDom0, s.ind.gfn, xenemu::ReadOnly::yes));
      s.temp_refs.push_back(iref);
    }
    if (abi_ == Abi::x86_32) {
      x86_32::Indirect r{};
      r.operation = BLKIF_OP_INDIRECT;
      r.indirect_op = op;
      r.nr_segments = static_cast<uint16_t>(segs.size());
      r.id = si;
      r.sector_number = sector;
      r.indirect_grefs[0] = iref.value();
      x86_32::Request full{};
      std::memcpy(&full, &r, sizeof r);
      put_entry(Q, &full, sizeof full);
    } else {
      x86_64::Indirect r{};
      r.operation = BLKIF_OP_INDIRECT;
      r.indirect_op = op;
      r.nr_segments = static_cast<uint16_t>(segs.size());
      r.id = si;
      r.sector_number = sector;
      r.indirect_grefs[0] = iref.value();
      x86_64::Request full{};
      std::memcpy(&full, &r, sizeof r);
      put_entry(Q, &full, sizeof full);
    }
    return {};
  }

  // Takes every response; returns how many.
  Result<size_t> reap(Queue& Q) {
    size_t n = 0;
    for (;;) {
      const RingIndex rp(idx(Q.ring.data, 8).load(std::memory_order_acquire));  // responses before index
      while (Q.rsp_cons != rp) {
        const std::byte* slot = Q.ring.data + kRingHeaderBytes + Q.rsp_cons.slot(Q.size) * entry_size(abi_);
        uint64_t id = 0;
        int16_t status = 0;
        std::memcpy(&id, slot, 8);
        std::memcpy(&status, slot + 10, 2);
        ++Q.rsp_cons;
        ++n;
        if (id >= Q.slots.size() || !Q.slots[id].busy) {
          unknown_responses_.push_back(fmt::format("id {} status {}", id, status));
          continue;
        }
        Slot& s = Q.slots[id];
        s.status = status;
        s.done = true;
        s.busy = false;
        for (GrantRef r : s.temp_refs)
          if (auto e = g_->end_access(r); !e) ++end_access_failures_;
        s.temp_refs.clear();
        if (s.io >= 0) complete_part(s);
        s.io = -1;
      }
      // RING_FINAL_CHECK_FOR_RESPONSES
      idx(Q.ring.data, 12).store(Q.rsp_cons.value() + 1, std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      if (RingIndex(idx(Q.ring.data, 8).load(std::memory_order_acquire)) == Q.rsp_cons) break;
    }
    return n;
  }

  // True when an event arrived within `t`.
  Result<bool> wait_events(std::chrono::milliseconds t) {
    auto p = PVHOST_TRY(g_->wait_event(t));
    if (p) {
      ++wakeups_;
      PVHOST_TRY(g_->unmask(*p));
    }
    return p.has_value();
  }

  // Issues one request (raw entry or built) on queue 0 and waits for its status.
  Result<int16_t> sync(size_t si, const std::function<Result<void>(Queue&)>& put, std::chrono::milliseconds t = 5s) {
    Queue& Q = queues_[0];
    Q.slots[si].busy = true;
    Q.slots[si].done = false;
    Q.slots[si].io = -1;
    PVHOST_TRY(put(Q));
    PVHOST_TRY(push(Q));
    const auto end = std::chrono::steady_clock::now() + t;
    while (!Q.slots[si].done) {
      if (std::chrono::steady_clock::now() > end) return fail(ETIMEDOUT, "no response");
      PVHOST_TRY(wait_events(20ms));
      PVHOST_TRY(reap(Q));
    }
    return Q.slots[si].status;
  }

  // --- workload ---
  void complete_part(Slot& s) {
    Io& io = ios_[static_cast<size_t>(s.io)];
    if (s.status != BLKIF_RSP_OKAY) io.failed = true;
    if (io.flush) {
      // Every write completed before this flush was issued is now durable.
      io.active = false;
      flush_active_ = false;
      ++completed_;
      if (io.failed) {
        ++errors_;
      } else {
        ++flushes_;
        for (size_t b = 0; b < durable_.size(); ++b) durable_[b] = std::max(durable_[b], flush_snapshot_[b]);
      }
      return;
    }
    if (!io.write && a_.verify && !io.failed) {
      const uint32_t gen = block_gen_[io.block];
      if (gen != 0) {
        size_t bad = check_pattern(s.data.data, s.off, s.len, gen);
        if (bad != s.len) {
          if (verify_failures_ == 0)
            first_failure_ = fmt::format("offset {} (block {}, gen {})", s.off + bad, io.block, gen);
          ++verify_failures_;
        }
      }
    }
    if (--io.remaining == 0) {
      io.active = false;
      busy_blocks_.erase(io.block);
      lat_total_ += now_ns() - io.start;
      ++completed_;
      if (io.failed) ++errors_;
      else if (io.write) {
        ++writes_;
        block_gen_[io.block] = io.gen;
      } else {
        ++reads_;
      }
      bytes_ += io.failed ? 0 : io.len;
    }
  }

  bool more_to_start() const {
    if (backend_closing_) return false;
    if (a_.ops != 0 && started_ >= a_.ops) return false;
    if (a_.seconds > 0 && now_ns() - t0_ > static_cast<uint64_t>(a_.seconds * 1e9)) return false;
    return true;
  }

  // Starts I/O number `started_`; false when no free I/O slot, block, or ring slots.
  Result<bool> start_io(size_t slot_index) {
    const uint64_t nblocks = span_ / a_.bs;
    if (nblocks == 0) return fail(EINVAL, "span smaller than one block");
    Io& io = ios_[slot_index];
    if (a_.flush_every != 0 && writes_since_flush_ >= a_.flush_every && !flush_active_) return start_flush(slot_index);
    const std::string& rw = a_.rw;
    bool write = false;
    uint64_t block = 0;
    if (rw == "verify") {
      // First pass writes every block, second reads them all, then random mixed.
      const uint64_t n = started_;
      if (n < nblocks) {
        write = true;
        block = n;
      } else if (n < 2 * nblocks) {
        block = n - nblocks;
      } else {
        write = rng_() % 2 == 0;
        block = rng_() % nblocks;
      }
    } else if (rw == "read" || rw == "write") {
      write = rw == "write";
      block = started_ % nblocks;
    } else {
      write = rw == "randwrite" || (rw == "randrw" && rng_() % 2 == 0);
      block = rng_() % nblocks;
    }
    if (busy_blocks_.count(block) != 0) {
      // Never two I/Os on one block at once (the verification needs an order).
      if (rw == "verify" && started_ < 2 * nblocks) return false;
      for (int tries = 0; tries < 8 && busy_blocks_.count(block) != 0; ++tries) block = rng_() % nblocks;
      if (busy_blocks_.count(block) != 0) return false;
    }
    Queue& Q = queues_[slot_index % queues_.size()];
    // Free ring slots for all parts of this I/O.
    std::vector<size_t> free;
    for (size_t i = 0; i < Q.slots.size() && free.size() < reqs_per_io_; ++i)
      if (!Q.slots[i].busy) free.push_back(i);
    if (free.size() < reqs_per_io_) return false;
    io = Io{write, block, block * a_.bs, a_.bs, 0, static_cast<int>(reqs_per_io_), false, now_ns(), true};
    if (write) {
      io.gen = ++gen_counter_;
      ++writes_since_flush_;
      if (!a_.durable_out.empty()) issued_[block].push_back(io.gen);
    }
    busy_blocks_.insert(block);
    ++started_;
    const uint64_t step = max_req_bytes();
    for (uint32_t part = 0; part < reqs_per_io_; ++part) {
      const uint64_t off = io.off + part * step;
      const uint64_t len = std::min<uint64_t>(step, io.len - part * step);
      Slot& s = Q.slots[free[part]];
      s.io = static_cast<int>(slot_index);
      if (write && a_.verify) fill_pattern(s.data.data, off, len, io.gen);
      PVHOST_TRY(issue(Q, free[part], write ? BLKIF_OP_WRITE : BLKIF_OP_READ, off, len));
    }
    return true;
  }

  Result<bool> start_flush(size_t slot_index) {
    Queue& Q = queues_[slot_index % queues_.size()];
    size_t si = Q.slots.size();
    for (size_t i = 0; i < Q.slots.size() && si == Q.slots.size(); ++i)
      if (!Q.slots[i].busy) si = i;
    if (si == Q.slots.size()) return false;
    Io& io = ios_[slot_index];
    io = Io{};
    io.flush = true;
    io.remaining = 1;
    io.start = now_ns();
    io.active = true;
    flush_active_ = true;
    writes_since_flush_ = 0;
    flush_snapshot_ = block_gen_;
    Q.slots[si].io = static_cast<int>(slot_index);
    PVHOST_TRY(issue(Q, si, BLKIF_OP_FLUSH_DISKCACHE, 0, 0));
    return true;
  }

  // What a crash of the backend may leave: see --durable-out.
  Result<void> write_durable() {
    nlohmann::json blocks = nlohmann::json::array();
    for (const auto& [b, gens] : issued_) blocks.push_back({b, durable_[b], gens});
    const nlohmann::json j = {{"bs", a_.bs}, {"flushes", flushes_}, {"blocks", blocks}};
    FILE* f = std::fopen(a_.durable_out.c_str(), "we");
    if (!f) return fail_errno("open " + a_.durable_out);
    const std::string text = j.dump();
    const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
    if (std::fclose(f) != 0 || !ok) return fail_errno("write " + a_.durable_out);
    return {};
  }

  Result<nlohmann::json> workload() {
    rng_.seed(a_.seed);
    block_gen_.assign(span_ / a_.bs, 0);
    durable_.assign(span_ / a_.bs, 0);
    if (a_.rw == "verify" && a_.ops < 2 * (span_ / a_.bs)) a_.ops = 2 * (span_ / a_.bs) + a_.ops;
    ios_.assign(a_.qd, Io{});
    t0_ = now_ns();
    last_progress_ = t0_;
    for (;;) {
      bool started_any = false;
      for (size_t i = 0; i < ios_.size(); ++i) {
        if (ios_[i].active || !more_to_start()) continue;
        if (PVHOST_TRY(start_io(i))) started_any = true;
      }
      if (started_any)
        for (auto& Q : queues_) PVHOST_TRY(push(Q));
      const bool any_active = std::any_of(ios_.begin(), ios_.end(), [](const Io& io) { return io.active; });
      if (!any_active && !more_to_start()) break;
      size_t got = 0;
      for (auto& Q : queues_) got += PVHOST_TRY(reap(Q));
      if (got != 0 || !any_active) last_progress_ = now_ns();
      if (a_.stall_exit > 0 &&
          (g_backend_dead != 0 || now_ns() - last_progress_ > static_cast<uint64_t>(a_.stall_exit * 1e9))) {
        stalled_ = true;
        break;
      }
      bool quiet = false;
      if (got == 0 && any_active) quiet = !PVHOST_TRY(wait_events(100ms));
      // Unplug (blkfront's backend_changed: Closing): start nothing new, let what is in
      // flight finish, then close; or, abandoning, write Closed at once. (xenstore is
      // looked at now and then, not per round: it costs a round trip.)
      if ((++rounds_ % 4096 == 0 || quiet) && !backend_closing_ && backend_is({"5", "6", "gone"})) {
        backend_closing_ = true;
        if (a_.abandon) {
          in_flight_at_abandon_ = static_cast<uint64_t>(std::count_if(ios_.begin(), ios_.end(), [](const Io& io) { return io.active; }));
          (void)xs_->write(xen::kNoTransaction, fe_ + "/state", "6");  // best effort: the device may be gone
          break;
        }
      }
    }
    const double secs = static_cast<double>(now_ns() - t0_) / 1e9;
    nlohmann::json j = {
        {"ok", errors_ == 0 && verify_failures_ == 0 && unknown_responses_.empty()},
        {"rw", a_.rw},
        {"bs", a_.bs},
        {"qd", a_.qd},
        {"ops", completed_},
        {"reads", reads_},
        {"writes", writes_},
        {"errors", errors_},
        {"verify_failures", verify_failures_},
        {"bytes", bytes_},
        {"seconds", secs},
        {"iops", secs > 0 ? static_cast<double>(completed_) / secs : 0.0},
        {"mbps", secs > 0 ? static_cast<double>(bytes_) / secs / 1e6 : 0.0},
        {"lat_us_avg", completed_ > 0 ? static_cast<double>(lat_total_) / static_cast<double>(completed_) / 1e3 : 0.0},
        {"notifies", notifies_},
        {"wakeups", wakeups_},
        {"end_access_failures", end_access_failures_},
    };
    if (a_.abandon) j["in_flight_at_abandon"] = in_flight_at_abandon_;
    if (a_.flush_every != 0) j["flushes"] = flushes_;
    if (stalled_) j["stalled"] = true;
    if (!first_failure_.empty()) j["first_failure"] = first_failure_;
    if (!unknown_responses_.empty()) j["unknown_responses"] = unknown_responses_;
    return j;
  }

  // The disk as the workload left it, from the generations alone.
  Result<void> write_expected() {
    int fd = ::open(a_.expect_out.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return fail_errno("open " + a_.expect_out);
    std::vector<std::byte> buf(a_.bs);
    Result<void> r;
    for (uint64_t b = 0; b < block_gen_.size() && r; ++b) {
      if (block_gen_[b] == 0) std::fill(buf.begin(), buf.end(), std::byte{0});
      else fill_pattern(buf.data(), b * a_.bs, a_.bs, block_gen_[b]);
      if (::pwrite(fd, buf.data(), a_.bs, static_cast<off_t>(b * a_.bs)) != static_cast<ssize_t>(a_.bs))
        r = fail_errno("write " + a_.expect_out);
    }
    ::close(fd);
    return r;
  }

  // Reads the image file directly and compares every block with a known generation.
  Result<uint64_t> check_image() {
    int fd = ::open(a_.image.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fail_errno("open " + a_.image);
    std::vector<std::byte> buf(a_.bs);
    uint64_t mismatches = 0;
    for (uint64_t b = 0; b < block_gen_.size(); ++b) {
      if (block_gen_[b] == 0) continue;
      if (::pread(fd, buf.data(), a_.bs, static_cast<off_t>(b * a_.bs)) != static_cast<ssize_t>(a_.bs)) {
        ++mismatches;
        continue;
      }
      if (check_pattern(buf.data(), b * a_.bs, a_.bs, block_gen_[b]) != a_.bs) ++mismatches;
    }
    ::close(fd);
    return mismatches;
  }

  template <class Fill>
  Result<int16_t> raw(size_t si, Fill fill) {
    return sync(si, [&](Queue& Q) -> Result<void> {
      x86_64::Request r64{};
      x86_32::Request r32{};
      if (abi_ == Abi::x86_32) {
        fill(r32);
        r32.id = si;
        put_entry(Q, &r32, sizeof r32);
      } else {
        fill(r64);
        r64.id = si;
        put_entry(Q, &r64, sizeof r64);
      }
      return {};
    });
  }
  template <class D>
  Result<int16_t> discard(size_t si, uint64_t sector, uint64_t n, uint8_t flag) {
    return sync(si, [&](Queue& Q) -> Result<void> {
      D d{};
      d.operation = BLKIF_OP_DISCARD;
      d.flag = flag;
      d.id = si;
      d.sector_number = sector;
      d.nr_sectors = n;
      std::byte full[kMaxEntrySize]{};
      std::memcpy(full, &d, sizeof d);
      put_entry(Q, full, entry_size(abi_));
      return {};
    });
  }
  Result<int16_t> data_op(size_t si, uint8_t op, uint64_t off, uint64_t len) {
    return sync(si, [&](Queue& Q) { return issue(Q, si, op, off, len); });
  }

  // FLUSH, WRITE_BARRIER (with and without data), DISCARD, each checked.
  Result<nlohmann::json> extras() {
    nlohmann::json j;
    auto flush = raw(0, [](auto& r) { r.operation = BLKIF_OP_FLUSH_DISKCACHE; });
    j["flush"] = flush ? *flush : -100;
    auto empty_barrier = raw(0, [](auto& r) { r.operation = BLKIF_OP_WRITE_BARRIER; });
    j["barrier_empty"] = empty_barrier ? *empty_barrier : -100;
    // A barrier write, read back.
    Slot& s = queues_[0].slots[0];
    const uint64_t len = std::min<uint64_t>(a_.bs, BLKIF_MAX_SEGMENTS_PER_REQUEST * kPageSize);
    fill_pattern(s.data.data, 0, len, 777);
    j["barrier_write"] = PVHOST_TRY(data_op(0, BLKIF_OP_WRITE_BARRIER, 0, len));
    std::memset(s.data.data, 0, len);
    j["barrier_readback"] = PVHOST_TRY(data_op(0, BLKIF_OP_READ, 0, len));
    j["barrier_data_ok"] = check_pattern(s.data.data, 0, len, 777) == len;
    if (!block_gen_.empty()) {
      // Blocks covering [0, len) now hold generation 777 only if len is a whole block.
      for (uint64_t b = 0; b * a_.bs < len && b < block_gen_.size(); ++b) block_gen_[b] = 0;
    }
    // Discard one page (if advertised), which then reads back as zeroes.
    if (be_uint("feature-discard", 0) == 1) {
      const uint64_t sector = 8;
      auto d = abi_ == Abi::x86_32 ? discard<x86_32::Discard>(0, sector, 8, 0) : discard<x86_64::Discard>(0, sector, 8, 0);
      j["discard"] = d ? *d : -100;
      std::memset(s.data.data, 0xff, kPageSize);
      j["discard_readback"] = PVHOST_TRY(data_op(0, BLKIF_OP_READ, sector * 512, kPageSize));
      bool zero = true;
      for (size_t i = 0; i < kPageSize; ++i) zero = zero && s.data.data[i] == std::byte{0};
      j["discard_zeroes"] = zero;
      for (uint64_t b = 0; b < block_gen_.size(); ++b)
        if (b * a_.bs < (sector + 8) * 512 && (b + 1) * a_.bs > sector * 512) block_gen_[b] = 0;
    }
    return j;
  }

  // --- hostile scenarios: every bad request answered, or the device closed ---
  Result<nlohmann::json> hostile() {
    nlohmann::json j;
    j["hostile"] = a_.hostile;
    const std::string& h = a_.hostile;
    auto status = [&](Result<int16_t> r) -> nlohmann::json {
      if (!r) return r.error().describe();
      return *r;
    };
    Slot& s0 = queues_[0].slots[0];
    auto rw_with = [&](uint8_t op, uint8_t nseg, uint64_t sector, Segment seg) {
      return raw(0, [&](auto& r) {
        r.operation = op;
        r.nr_segments = nseg;
        r.sector_number = sector;
        for (auto& x : r.seg) x = seg;
      });
    };
    // A usable grant for the data page of slot 0.
    GrantRef good = persistent_ ? s0.data_refs[0]
                                : PVHOST_TRY(g_->grant_access(kDom0, s0.data.gfn, xenemu::ReadOnly::no));
    const Segment full{good.value(), 0, 7, 0};
    if (h == "fields") {
      j["unknown_op"] = status(rw_with(99, 1, 0, full));
      j["reserved_op"] = status(rw_with(BLKIF_OP_RESERVED_1, 1, 0, full));
      j["nseg_0"] = status(rw_with(BLKIF_OP_READ, 0, 0, full));
      j["nseg_12"] = status(rw_with(BLKIF_OP_READ, 12, 0, full));
      j["first_gt_last"] = status(rw_with(BLKIF_OP_READ, 1, 0, Segment{good.value(), 5, 2, 0}));
      j["last_8"] = status(rw_with(BLKIF_OP_READ, 1, 0, Segment{good.value(), 0, 8, 0}));
      j["beyond_end"] = status(rw_with(BLKIF_OP_READ, 1, sectors_ - 4, full));
      j["sector_overflow"] = status(rw_with(BLKIF_OP_READ, 1, ~uint64_t{0} - 2, full));
      j["indirect_bad_op"] = status(raw(0, [&](auto& r) {
        r.operation = BLKIF_OP_INDIRECT;
        r.nr_segments = BLKIF_OP_FLUSH_DISKCACHE;  // the indirect_op byte
      }));
      j["good_read_after"] = status(rw_with(BLKIF_OP_READ, 1, 0, full));
    } else if (h == "grants") {
      j["ungranted"] = status(rw_with(BLKIF_OP_READ, 1, 0, Segment{4000, 0, 7, 0}));
      auto ro = PVHOST_TRY(g_->grant_access(kDom0, queues_[0].slots.back().data.gfn, xenemu::ReadOnly::yes));
      j["read_into_readonly"] = status(rw_with(BLKIF_OP_READ, 1, 0, Segment{ro.value(), 0, 7, 0}));
      auto other = PVHOST_TRY(g_->grant_access(DomId(7), queues_[0].slots.back().data.gfn, xenemu::ReadOnly::no));
      j["wrong_domid"] = status(rw_with(BLKIF_OP_WRITE, 1, 0, Segment{other.value(), 0, 7, 0}));
      j["good_read_after"] = status(rw_with(BLKIF_OP_READ, 1, 0, full));
    } else if (h == "indirect") {
      auto ind = [&](uint16_t nseg, uint32_t ref) {
        return raw(0, [&](auto& r) {
          r.operation = BLKIF_OP_INDIRECT;
          r.nr_segments = BLKIF_OP_READ;  // indirect_op
          uint16_t n = nseg;
          std::memcpy(reinterpret_cast<std::byte*>(&r) + 2, &n, 2);
          uint32_t refv = ref;
          const size_t gref_off = abi_ == Abi::x86_32 ? 24 : 28;
          std::memcpy(reinterpret_cast<std::byte*>(&r) + gref_off, &refv, 4);
        });
      };
      j["nseg_0"] = status(ind(0, 0));
      j["nseg_257"] = status(ind(257, 0));
      j["ungranted_page"] = status(ind(4, 4001));
      // A granted indirect page whose descriptors are bad (last_sect 9).
      if (max_indirect_ > 0) {
        Segment bad[2] = {{good.value(), 0, 7, 0}, {good.value(), 0, 9, 0}};
        std::memcpy(s0.ind.data, bad, sizeof bad);
        auto iref = PVHOST_TRY(g_->grant_access(kDom0, s0.ind.gfn, xenemu::ReadOnly::yes));
        j["bad_descriptor"] = status(ind(2, iref.value()));
      }
      j["good_read_after"] = status(rw_with(BLKIF_OP_READ, 1, 0, full));
    } else if (h == "flood") {
      // Fill the ring again and again with a mix of good and bad requests; all answered.
      Queue& Q = queues_[0];
      uint64_t sent = 0, answered = 0;
      std::map<int16_t, uint64_t> by_status;
      for (int round = 0; round < 200; ++round) {
        const uint32_t n = std::min<uint32_t>(Q.size, static_cast<uint32_t>(Q.slots.size()));
        for (uint32_t i = 0; i < n; ++i) {
          Q.slots[i].busy = true;
          Q.slots[i].done = false;
          Q.slots[i].io = -1;
          x86_64::Request r{};
          r.operation = i % 3 == 0 ? uint8_t{77} : BLKIF_OP_READ;
          r.nr_segments = i % 3 == 1 ? uint8_t{40} : uint8_t{1};
          r.id = i;
          r.seg[0] = full;
          if (abi_ == Abi::x86_32) {
            x86_32::Request r32{};
            r32.operation = r.operation;
            r32.nr_segments = r.nr_segments;
            r32.id = i;
            r32.seg[0] = full;
            put_entry(Q, &r32, sizeof r32);
          } else {
            put_entry(Q, &r, sizeof r);
          }
          ++sent;
        }
        PVHOST_TRY(push(Q));
        const auto end = std::chrono::steady_clock::now() + 5s;
        for (;;) {
          bool all = true;
          for (uint32_t i = 0; i < n; ++i) all = all && Q.slots[i].done;
          if (all) break;
          if (std::chrono::steady_clock::now() > end) return fail(ETIMEDOUT, "flood: responses missing");
          PVHOST_TRY(wait_events(20ms));
          PVHOST_TRY(reap(Q));
        }
        for (uint32_t i = 0; i < n; ++i) {
          ++answered;
          ++by_status[Q.slots[i].status];
        }
      }
      j["sent"] = sent;
      j["answered"] = answered;
      for (auto [st, c] : by_status) j["status_" + std::to_string(st)] = c;
    } else if (h == "ring-overflow") {
      // req_prod more than a ring ahead: the backend must close the device.
      Queue& Q = queues_[0];
      idx(Q.ring.data, 0).store(Q.req_prod_pvt.value() + Q.size + 5, std::memory_order_release);
      PVHOST_TRY(g_->notify(Q.port));
      auto closed = wait_backend({"5", "6"});
      j["backend_closed"] = static_cast<bool>(closed);
      auto err = xen::read_optional(*xs_, xen::kNoTransaction, be_ + "/error");
      j["error"] = err && *err ? **err : "";
    } else if (h == "after-closing") {
      // While Closing the backend may still answer (blkback does); once Closed it has
      // unmapped the ring and nothing more may appear in it.
      Queue& Q = queues_[0];
      auto produce = [&](int n) -> Result<void> {
        for (int i = 0; i < n; ++i) {
          x86_64::Request r{};
          r.operation = BLKIF_OP_READ;
          r.nr_segments = 1;
          r.id = 0;
          r.seg[0] = full;
          put_entry(Q, &r, entry_size(abi_));
        }
        PVHOST_TRY(push(Q));
        (void)g_->notify(Q.port);  // after Closed the backend's end is gone; errors are expected
        return {};
      };
      PVHOST_TRY(xs_->write(xen::kNoTransaction, fe_ + "/state", "5"));
      PVHOST_TRY(wait_backend({"5", "6"}));
      PVHOST_TRY(produce(4));
      std::this_thread::sleep_for(200ms);
      PVHOST_TRY(xs_->write(xen::kNoTransaction, fe_ + "/state", "6"));
      PVHOST_TRY(wait_backend({"6"}));
      const uint32_t before = idx(Q.ring.data, 8).load();
      PVHOST_TRY(produce(8));
      std::this_thread::sleep_for(300ms);
      j["responses_after_closed"] = idx(Q.ring.data, 8).load() - before;
      j["backend_state"] = backend_state();
    } else {
      return fail(EINVAL, "unknown --hostile " + h);
    }
    j["backend_state_end"] = backend_state();
    return j;
  }

  Args a_;
  std::unique_ptr<xenemu::Guest> g_;
  std::unique_ptr<xen::XsClient> xs_;
  std::string fe_, be_;
  Abi abi_;
  uint64_t sectors_ = 0;
  uint32_t sector_size_ = 512;
  uint32_t info_ = 0;
  uint32_t order_ = 0;
  uint32_t nq_ = 1;
  bool persistent_ = false;
  uint32_t max_indirect_ = 0;
  uint64_t span_ = 0;
  uint32_t reqs_per_io_ = 1;
  std::vector<Queue> queues_;
  std::vector<Io> ios_;
  std::vector<uint32_t> block_gen_;
  std::set<uint64_t> busy_blocks_;
  std::mt19937_64 rng_;
  uint32_t gen_counter_ = 0;
  uint64_t started_ = 0, completed_ = 0, reads_ = 0, writes_ = 0, errors_ = 0, bytes_ = 0;
  uint64_t verify_failures_ = 0, lat_total_ = 0, notifies_ = 0, wakeups_ = 0, end_access_failures_ = 0;
  uint64_t t0_ = 0;
  uint64_t close_end_access_failures_ = 0;
  uint64_t rounds_ = 0, in_flight_at_abandon_ = 0;
  bool backend_closing_ = false;
  std::string first_failure_;
  std::vector<std::string> unknown_responses_;
  // Crash consistency (--flush-every, --durable-out, --stall-exit).
  std::vector<uint32_t> durable_;         // per block: the generation a completed flush covers
  std::vector<uint32_t> flush_snapshot_;  // block_gen_ when the flush in flight was issued
  std::map<uint64_t, std::vector<uint32_t>> issued_;  // per block: every generation issued
  uint64_t writes_since_flush_ = 0, flushes_ = 0, last_progress_ = 0;
  bool flush_active_ = false, stalled_ = false;
};

// --check-crash: does a raw image hold, in every 512-byte sector of every logged block, the
// durable generation or one issued after it? (A crash keeps or loses each write whole per
// sector; it may never lose one a completed flush covered.)
Result<nlohmann::json> check_crash(const Args& a) {
  std::ifstream in(a.check_crash);
  if (!in) return fail(ENOENT, "cannot read " + a.check_crash);
  nlohmann::json log;
  try {
    log = nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    return fail(EINVAL, fmt::format("{}: {}", a.check_crash, e.what()));
  }
  const uint64_t bs = log.at("bs").get<uint64_t>();
  int fd = ::open(a.image.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail_errno("open " + a.image);
  std::vector<std::byte> buf(bs), want(512);
  uint64_t blocks = 0, durable_blocks = 0, lost = 0, foreign = 0, later = 0;
  std::string first;
  for (const auto& entry : log.at("blocks")) {
    const uint64_t b = entry.at(0).get<uint64_t>();
    const uint32_t durable = entry.at(1).get<uint32_t>();
    std::vector<uint32_t> allowed;
    for (uint32_t g : entry.at(2)) if (g > durable) allowed.push_back(g);
    ++blocks;
    if (durable != 0) ++durable_blocks;
    if (::pread(fd, buf.data(), bs, static_cast<off_t>(b * bs)) != static_cast<ssize_t>(bs)) {
      ::close(fd);
      return fail(EIO, fmt::format("{}: block {} is past the end", a.image, b));
    }
    for (uint64_t sec = 0; sec < bs; sec += 512) {
      const std::byte* got = buf.data() + sec;
      const uint64_t off = b * bs + sec;
      auto holds = [&](uint32_t g) {
        if (g != 0) return check_pattern(got, off, 512, g) == 512;
        return std::all_of(got, got + 512, [](std::byte x) { return x == std::byte{0}; });
      };
      if (holds(durable)) continue;
      if (std::any_of(allowed.begin(), allowed.end(), holds)) {
        ++later;
        continue;
      }
      // Neither: a flushed write is lost (an older generation is there) or junk.
      bool older = false;
      for (uint32_t g : entry.at(2)) older = older || (g < durable && holds(g));
      older = older || (durable != 0 && holds(0));
      ++(older ? lost : foreign);
      if (first.empty())
        first = fmt::format("offset {} (block {}): {} (durable generation {})", off, b,
                            older ? "an older generation: a flushed write is lost" : "data no write put there", durable);
    }
  }
  ::close(fd);
  nlohmann::json j = {{"ok", lost == 0 && foreign == 0}, {"blocks", blocks}, {"durable_blocks", durable_blocks},
                      {"flushes", log.value("flushes", 0)}, {"sectors_lost", lost}, {"sectors_foreign", foreign},
                      {"sectors_newer_than_durable", later}};
  if (!first.empty()) j["first_failure"] = first;
  return j;
}

// The I/O floor: the workload's shape as io_uring O_DIRECT on the file itself.
Result<nlohmann::json> floor_direct(const Args& a) {
  int fd = ::open(a.floor_direct.c_str(), (a.rw.find("write") != std::string::npos ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC);
  if (fd < 0) return fail_errno("open " + a.floor_direct);
  const off_t size = ::lseek(fd, 0, SEEK_END);
  const uint64_t span = a.span != 0 ? std::min<uint64_t>(a.span, static_cast<uint64_t>(size)) : static_cast<uint64_t>(size);
  const uint64_t nblocks = span / a.bs;
  io_uring ring{};
  if (io_uring_queue_init(a.qd * 2, &ring, 0) < 0) return fail(EIO, "io_uring_queue_init");
  std::vector<void*> bufs(a.qd);
  for (auto& b : bufs) b = std::aligned_alloc(4096, a.bs);
  std::mt19937_64 rng(a.seed);
  const bool write = a.rw.find("write") != std::string::npos;
  const bool random = a.rw.rfind("rand", 0) == 0;
  uint64_t seq = 0, done = 0, started = 0;
  const uint64_t t0 = now_ns();
  auto more = [&] {
    if (a.ops != 0 && started >= a.ops) return false;
    return a.seconds <= 0 || now_ns() - t0 < static_cast<uint64_t>(a.seconds * 1e9);
  };
  auto submit_one = [&](size_t i) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    const uint64_t block = random ? rng() % nblocks : seq++ % nblocks;
    if (write)
      io_uring_prep_write(sqe, fd, bufs[i], static_cast<unsigned>(a.bs), block * a.bs);
    else
      io_uring_prep_read(sqe, fd, bufs[i], static_cast<unsigned>(a.bs), block * a.bs);
    io_uring_sqe_set_data64(sqe, i);
    ++started;
  };
  for (size_t i = 0; i < a.qd && more(); ++i) submit_one(i);
  io_uring_submit(&ring);
  uint64_t inflight = started, errors = 0;
  while (inflight > 0) {
    io_uring_cqe* cqe = nullptr;
    if (io_uring_wait_cqe(&ring, &cqe) < 0) break;
    const size_t i = io_uring_cqe_get_data64(cqe);
    if (cqe->res != static_cast<int>(a.bs)) ++errors;
    io_uring_cqe_seen(&ring, cqe);
    --inflight;
    ++done;
    if (more()) {
      submit_one(i);
      ++inflight;
      io_uring_submit(&ring);
    }
  }
  const double secs = static_cast<double>(now_ns() - t0) / 1e9;
  io_uring_queue_exit(&ring);
  for (auto* b : bufs) std::free(b);
  ::close(fd);
  return nlohmann::json{{"floor", "io_uring O_DIRECT"}, {"rw", a.rw}, {"bs", a.bs}, {"qd", a.qd}, {"ops", done},
                        {"errors", errors}, {"seconds", secs}, {"iops", static_cast<double>(done) / secs},
                        {"mbps", static_cast<double>(done * a.bs) / secs / 1e6}};
}

// The notification floor: eventfd ping-pong between two processes, as the emulated event
// channel delivers notifications.
Result<nlohmann::json> floor_notify(uint64_t n) {
  int ping = ::eventfd(0, EFD_CLOEXEC), pong = ::eventfd(0, EFD_CLOEXEC);
  if (ping < 0 || pong < 0) return fail_errno("eventfd");
  auto wait_read = [](int fd) {
    pollfd p{fd, POLLIN, 0};
    (void)::poll(&p, 1, -1);
    uint64_t v = 0;
    return ::read(fd, &v, sizeof v) == sizeof v;
  };
  const uint64_t one = 1;
  pid_t child = ::fork();
  if (child == 0) {
    for (uint64_t i = 0; i < n; ++i) {
      if (!wait_read(ping)) _exit(1);
      if (::write(pong, &one, sizeof one) != sizeof one) _exit(1);
    }
    _exit(0);
  }
  const uint64_t t0 = now_ns();
  for (uint64_t i = 0; i < n; ++i) {
    if (::write(ping, &one, sizeof one) != sizeof one) return fail_errno("write");
    if (!wait_read(pong)) return fail_errno("read");
  }
  const double us = static_cast<double>(now_ns() - t0) / 1e3 / static_cast<double>(n);
  int st = 0;
  ::waitpid(child, &st, 0);
  return nlohmann::json{{"floor", "eventfd round trip across processes"}, {"round_trips", n}, {"rtt_us", us}};
}

}  // namespace

int main(int argc, char** argv) {
  auto args = parse(argc, argv);
  if (!args) {
    std::fprintf(stderr, "blkfront: %s\n", args.error().what().c_str());
    return 2;
  }
  if (args->stall_exit > 0) {
    struct sigaction sa {};
    sa.sa_handler = [](int) { g_backend_dead = 1; };
    sa.sa_flags = SA_RESTART;
    ::sigaction(SIGUSR1, &sa, nullptr);
  }
  if (!args->floor_direct.empty() || args->floor_notify != 0 || !args->check_crash.empty()) {
    auto r = !args->check_crash.empty()    ? check_crash(*args)
             : !args->floor_direct.empty() ? floor_direct(*args)
                                           : floor_notify(args->floor_notify);
    if (!r) {
      std::printf("%s\n", nlohmann::json{{"ok", false}, {"error", r.error().describe()}}.dump().c_str());
      return 1;
    }
    std::printf("%s\n", r->dump().c_str());
    return 0;
  }
  auto guest = xenemu::Guest::connect(args->rundir, args->domid);
  if (!guest) {
    std::fprintf(stderr, "blkfront: guest: %s\n", guest.error().describe().c_str());
    return 1;
  }
  auto xs = xen::XsClient::open(fmt::format("{}/domain-{}.sock", args->rundir, args->domid));
  if (!xs) {
    std::fprintf(stderr, "blkfront: xenstore: %s\n", xs.error().describe().c_str());
    return 1;
  }
  Frontend fe(*args, std::move(*guest), std::move(*xs));
  auto r = fe.run();
  if (!r) {
    nlohmann::json j = {{"ok", false}, {"error", r.error().describe()}};
    std::printf("%s\n", j.dump().c_str());
    return 1;
  }
  std::printf("%s\n", r->dump().c_str());
  return 0;
}
