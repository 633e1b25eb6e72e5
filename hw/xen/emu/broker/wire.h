// The wire protocol of pvhost-xenemu's hypervisor broker (ARCHITECTURE.md "The emulated
// hypervisor"). Header-only: the broker, pvhost's emulated Xen client (xen_lib) and the guest
// library all include it, and none of them links the others.
//
// Sockets (SOCK_SEQPACKET, one request and one response per message, fds via SCM_RIGHTS):
//
//   RUNDIR/hv.sock             dom0: privileged (domain create/destroy, foreign mapping,
//                              ioreq servers, interrupts of any domain).
//   RUNDIR/hv-domain-N.sock    a connection there *is* domain N. Created when the broker
//                              creates domain N, removed when N is destroyed (mirrors
//                              xenstored's RUNDIR/domain-N.sock). Privileged over another
//                              domain M only when xenstored says N is M's target (XS_SET_TARGET).
//
// The identity of a connection is the socket it was accepted on; nothing the client sends can
// change it. Each connection is a "handle" in Xen's sense: event-channel ports, grant mappings,
// guest pages and grant refs it allocated are released when it disconnects (process death
// included), as closing /dev/xen/evtchn or /dev/xen/gntdev does.
//
// Message layout: a fixed header, then `nitems` 64-bit items (grant refs, gfns, ports...).
// Requests are answered in order; a connection carries one request at a time.
#pragma once

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "src/error.h"
#include "src/fd.h"

namespace pvhost::xenemu::wire {

inline constexpr std::string_view kDom0Socket = "hv.sock";
inline std::string domain_socket_name(uint16_t domid) { return "hv-domain-" + std::to_string(domid) + ".sock"; }

inline constexpr size_t kMaxItems = 8192;  // a map of up to 8192 refs in one request
inline constexpr size_t kMaxFds = 16;
inline constexpr size_t kNameMax = 64;

enum class Op : uint32_t {
  // -> vals[0] = own domid, vals[1] = 1 in strict mode, vals[2] = privileged
  hello = 1,
  // toolstack (dom0). name, args: memory MiB, vCPUs, max grant frames -> vals[0] = domid
  domain_create,
  domain_destroy,  // args[0] = domid
  domain_list,     // -> items: domids
  // args[0] = domid -> vals: exists, dying, max_vcpu_id, memory MiB, max grant frames; name
  domain_info,
  // args[0] = domid -> fds [ram memfd, grant table memfd], vals[0] = ram pages,
  // vals[1] = grant entries. Needed by anyone mapping or copying that domain's grants.
  domain_memory,
  // args: domid (the granter), writable; items: refs -> vals[0] = mapping id; items: gfns
  grant_map,
  grant_unmap,  // args[0] = mapping id
  // args: domid; items: gfns -> ok when the caller is privileged over domid (dom0 or target)
  foreign_map,
  // args[0] = remote domid -> vals[0] = port; fds [recv eventfd, send eventfd]
  evtchn_alloc_unbound,
  // args: remote domid, remote port -> vals[0] = local port; fds [recv, send]
  evtchn_bind_interdomain,
  evtchn_close,   // args[0] = port
  evtchn_status,  // args: domid, port -> vals: state (0 free, 1 unbound, 2 interdomain), remote dom, remote port
  // hvm/dm_op.h, caller privileged over args[0] = domid
  ioreq_create,      // args: domid -> vals[0] = server id
  ioreq_info,        // args: domid, id -> vals[0] = vCPUs; items: vp_eport per vCPU; fds [ioreq page]
  ioreq_map_range,   // args: domid, id, mmio, start, end
  ioreq_unmap_range, // args: domid, id, mmio, start, end
  ioreq_set_state,   // args: domid, id, enabled
  ioreq_destroy,     // args: domid, id
  set_irq_level,     // args: domid, irq, level
  inject_msi,        // args: domid, addr, data
  // guest side (a domain socket)
  guest_alloc_pages,  // args[0] = count -> vals[0] = first gfn of a contiguous run
  guest_free_pages,   // args: gfn, count
  guest_alloc_refs,   // args[0] = count -> items: grant refs now owned by this connection
  guest_free_refs,    // items: refs
  // args: mmio, addr, vcpu -> vals: found, server id; fds [ioreq page, recv, send] of the vCPU's vp_eport
  guest_ioreq_lookup,
  guest_interrupts,   // -> fds [SOCK_SEQPACKET end receiving InterruptRecord]
};

struct Request {
  uint32_t op = 0;
  uint32_t nitems = 0;
  uint64_t args[6] = {};
  char name[kNameMax] = {};
};

struct Response {
  int32_t error = 0;  // 0 or a positive errno
  uint32_t nitems = 0;
  uint64_t vals[6] = {};
  char message[128] = {};  // on error; also the name for domain_info
};

// Sent by the broker on a guest_interrupts socket.
struct InterruptRecord {
  uint32_t kind = 0;  // 1: irq line level, 2: MSI
  uint32_t irq = 0;
  uint32_t level = 0;
  uint32_t data = 0;  // MSI data
  uint64_t addr = 0;  // MSI address
};
inline constexpr uint32_t kInterruptIrq = 1;
inline constexpr uint32_t kInterruptMsi = 2;

// One received message: header bytes, items, fds.
template <class Header>
struct Message {
  Header hdr{};
  std::vector<uint64_t> items;
  std::vector<UniqueFd> fds;
};

inline void copy_name(char (&dst)[kNameMax], std::string_view s) {
  const size_t n = std::min(s.size(), kNameMax - 1);
  if (n != 0) std::memcpy(dst, s.data(), n);  // an empty view may carry a null pointer
  dst[n] = '\0';
}

template <class Header>
[[nodiscard]] Result<void> send_message(int sock, const Header& hdr, std::span<const uint64_t> items,
                                        std::span<const int> fds) {
  if (items.size() > kMaxItems || fds.size() > kMaxFds) return fail(E2BIG, "message too large");
  iovec iov[2] = {{const_cast<Header*>(&hdr), sizeof hdr},
                  {const_cast<uint64_t*>(items.data()), items.size() * sizeof(uint64_t)}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = items.empty() ? 1 : 2;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)] = {};
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  for (;;) {
    ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n >= 0) return {};
    if (errno != EINTR) return fail_errno("sendmsg");
  }
}

// Receives one message. ECONNRESET when the peer closed; EAGAIN on an empty nonblocking socket.
template <class Header>
[[nodiscard]] Result<Message<Header>> recv_message(int sock) {
  Message<Header> m;
  m.items.resize(kMaxItems);
  iovec iov[2] = {{&m.hdr, sizeof m.hdr}, {m.items.data(), m.items.size() * sizeof(uint64_t)}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = 2;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)] = {};
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  do {
    n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return fail_errno("recvmsg");
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      m.fds.emplace_back(fd);
    }
  }
  if (n == 0) return fail(ECONNRESET, "peer closed the connection");
  if ((msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0) return fail(EMSGSIZE, "truncated message");
  const auto len = static_cast<size_t>(n);
  if (len < sizeof m.hdr) return fail(EPROTO, "short message");
  const size_t body = len - sizeof m.hdr;
  if (body % sizeof(uint64_t) != 0 || body / sizeof(uint64_t) != m.hdr.nitems)
    return fail(EPROTO, "item count does not match the message length");
  m.items.resize(m.hdr.nitems);
  return m;
}

// A unix SOCK_SEQPACKET connection to `path`.
[[nodiscard]] inline Result<UniqueFd> connect_seqpacket(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return fail(ENAMETOOLONG, "socket path too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd) return fail_errno("socket");
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
    return fail_errno("connect " + path);
  return fd;
}

}  // namespace pvhost::xenemu::wire
