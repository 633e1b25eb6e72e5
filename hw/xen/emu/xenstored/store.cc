#include "hw/xen/emu/xenstored/store.h"

#include <cerrno>
#include <cstdlib>
#include <set>

#include <fmt/format.h>

#include "hw/xen/emu/xenstored/wire.h"
#include "src/error.h"

namespace pvhost::xenemu {

namespace {

// A node that does not exist has no generation (NO_GENERATION in xenstored): a
// transaction that read "missing" conflicts with a later creation.
constexpr uint64_t kNoGeneration = ~uint64_t{0};
// C xenstored's fixed quotas that XenstoredQuotas does not carry (-P and -T defaults).
constexpr size_t kMaxPermsPerNode = 5;
constexpr size_t kMaxTransactionNodes = 1024;
// sizeof(struct xs_tdb_record_hdr) and sizeof(struct xs_permissions) in 4.17: the node
// size that the node-size quota counts is header + perms + value + children.
constexpr size_t kNodeHeaderSize = 24;
constexpr size_t kPermEntrySize = 8;

std::string child_path(const std::string& parent, std::string_view leaf) {
  if (parent == "/") return "/" + std::string(leaf);
  return parent + "/" + std::string(leaf);
}

std::string_view basename(std::string_view path) { return path.substr(path.rfind('/') + 1); }

// atoi() as xenstored applies it to DIRECTORY_PART offsets and domids: leading digits,
// anything else stops the number; out-of-range wraps like the C int -> unsigned cast.
uint32_t c_atoi_u32(std::string_view s) {
  std::string tmp(s);
  return static_cast<uint32_t>(std::atoi(tmp.c_str()));
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Permissions and paths.

std::optional<Perm> parse_perm(std::string_view s) {
  if (s.size() < 2) return std::nullopt;
  Perm p;
  switch (s[0]) {
    case 'r': p.bits = kPermRead; break;
    case 'w': p.bits = kPermWrite; break;
    case 'b': p.bits = kPermRead | kPermWrite; break;
    case 'n': p.bits = kPermNone; break;
    default: return std::nullopt;
  }
  std::string num(s.substr(1));
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(num.c_str(), &end, 0);
  if (end == num.c_str() || *end != '\0' || errno != 0) return std::nullopt;
  // Domain ids are 16 bits (domid_t); anything else cannot name a domain.
  if (v < 0 || v > 0xFFFF) return std::nullopt;
  p.domid = static_cast<uint32_t>(v);
  return p;
}

std::string perm_to_string(const Perm& p) {
  char c = 'n';
  switch (p.bits & (kPermRead | kPermWrite)) {
    case kPermRead: c = 'r'; break;
    case kPermWrite: c = 'w'; break;
    case kPermRead | kPermWrite: c = 'b'; break;
    default: c = 'n'; break;
  }
  return fmt::format("{}{}", c, p.domid);
}

uint8_t perm_for(const Caller& caller, const PermList& perms) {
  constexpr uint8_t kAll = kPermRead | kPermWrite | kPermOwner;
  if (caller.privileged()) return kAll;
  if (perms.empty()) return kPermNone;
  auto matches = [&](uint32_t id) {
    return id == caller.domid.value() || (caller.target && id == caller.target->value());
  };
  // Owners get it all; then the first explicit entry; else the owner entry's default.
  if (matches(perms[0].domid)) return kAll;
  for (size_t i = 1; i < perms.size(); ++i)
    if (matches(perms[i].domid)) return perms[i].bits & (kPermRead | kPermWrite);
  return perms[0].bits & (kPermRead | kPermWrite);
}

std::string implicit_path(DomId domid) { return fmt::format("/local/domain/{}", domid.value()); }

bool is_valid_chars(std::string_view path) {
  for (char c : path) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '/' || c == '_' || c == '@';
    if (!ok) return false;
  }
  return true;
}

XsResult<std::string> canonicalize(const Caller& caller, std::string_view path,
                                   size_t max_path_length) {
  if (path.empty() || path[0] == '@' || !is_valid_chars(path)) return xs_fail(EINVAL);
  std::string name = path[0] == '/' ? std::string(path)
                                    : implicit_path(caller.domid) + "/" + std::string(path);
  if (name.size() > 1 && name.back() == '/') return xs_fail(EINVAL);
  if (name.find("//") != std::string::npos) return xs_fail(EINVAL);
  // is_valid_nodename(): the part below /local/domain/<N>/ may be at most
  // XENSTORE_REL_PATH_MAX long; the whole path at most the absolute limit.
  size_t local_off = 0;
  constexpr std::string_view kLocal = "/local/domain/";
  if (name.starts_with(kLocal)) {
    size_t i = kLocal.size();
    size_t digits = 0;
    while (i < name.size() && digits < 5 && name[i] >= '0' && name[i] <= '9') {
      ++i;
      ++digits;
    }
    if (digits > 0 && i < name.size() && name[i] == '/') local_off = i + 1;
  }
  if (name.size() > max_path_length || name.size() - local_off > kRelPathMax)
    return xs_fail(EINVAL);
  return name;
}

bool is_child(std::string_view child, std::string_view parent) {
  if (parent == "/") return true;
  if (!child.starts_with(parent)) return false;
  return child.size() == parent.size() || child[parent.size()] == '/';
}

std::string parent_of(std::string_view path) {
  const size_t slash = path.rfind('/');
  if (slash == 0 || slash == std::string_view::npos) return "/";
  return std::string(path.substr(0, slash));
}

// ---------------------------------------------------------------------------------------
// Transactions.

struct Store::Ctx {
  const Caller& caller;
  Transaction* tx;
};

Store::Store(XenstoredQuotas quotas) : quotas_(quotas) {
  // setup_structure() plus what the toolstack's init adds for dom0: all owned by dom0,
  // no access for others.
  const PermList dom0_only{Perm{0, kPermNone}};
  auto add = [&](const std::string& path, std::vector<std::string> children) {
    Node n;
    n.children = std::move(children);
    n.perms = dom0_only;
    n.generation = ++generation_;
    nodes_.emplace(path, std::move(n));
    owned_[0] += 1;
  };
  add("/", {"tool", "local"});
  add("/tool", {"xenstored"});
  add("/tool/xenstored", {});
  add("/local", {"domain"});
  add("/local/domain", {"0"});
  add("/local/domain/0", {});
}

Store::~Store() = default;

size_t Store::nodes_owned_by(DomId domid) const {
  auto it = owned_.find(domid.value());
  return it == owned_.end() ? 0 : static_cast<size_t>(it->second);
}

const Node* Store::lookup(Ctx& ctx, const std::string& path) {
  auto git = nodes_.find(path);
  const Node* global = git == nodes_.end() ? nullptr : &git->second;
  if (ctx.tx == nullptr) return global;
  auto [it, inserted] = ctx.tx->accessed.try_emplace(path);
  if (inserted) {
    Transaction::Access& a = it->second;
    if (global) {
      a.node = *global;
      a.generation = global->generation;
      a.orig_perms = global->perms;
    } else {
      a.generation = kNoGeneration;
    }
    ctx.tx->order.push_back(path);
  }
  return it->second.node ? &*it->second.node : nullptr;
}

int Store::errno_from_parents(Ctx& ctx, const std::string& path, int err, uint8_t perm) {
  // We have a weird permissions system (xenstored's words): the errno must not tell a
  // domain about a node it may not see, so the nearest existing ancestor decides
  // between the real error and EACCES.
  std::string p = path;
  const Node* anc = nullptr;
  do {
    p = parent_of(p);
    anc = lookup(ctx, p);
  } while (!anc && p != "/");
  const uint8_t parent_perm = anc ? perm_for(ctx.caller, anc->perms) : kPermNone;
  return (parent_perm & perm) ? err : EACCES;
}

XsResult<const Node*> Store::get_node(Ctx& ctx, const std::string& path, uint8_t perm) {
  if (ctx.tx && !ctx.caller.privileged() &&
      ctx.tx->accessed.size() >= kMaxTransactionNodes && !ctx.tx->accessed.contains(path))
    return xs_fail(ENOSPC);
  const Node* n = lookup(ctx, path);
  if (n && (perm_for(ctx.caller, n->perms) & perm) == perm) return n;
  return xs_fail(errno_from_parents(ctx, path, n ? EACCES : ENOENT, perm));
}

XsResult<void> Store::check_size(const Ctx& ctx, const Node& n) const {
  if (ctx.caller.privileged()) return {};
  size_t size = kNodeHeaderSize + kPermEntrySize * n.perms.size() + n.value.size();
  for (const auto& c : n.children) size += c.size() + 1;
  // write_node_raw(): unprivileged nodes at or above the entry-size quota get ENOSPC.
  if (size >= quotas_.max_node_size) return xs_fail(ENOSPC);
  return {};
}

XsResult<void> Store::put(Ctx& ctx, const std::string& path, Node node) {
  node.generation = ++generation_;
  if (ctx.tx == nullptr) {
    nodes_[path] = std::move(node);
    return {};
  }
  (void)lookup(ctx, path);  // records the access (and its generation) if new
  Transaction::Access& a = ctx.tx->accessed[path];
  a.node = std::move(node);
  a.modified = true;
  return {};
}

void Store::erase(Ctx& ctx, const std::string& path) {
  if (ctx.tx == nullptr) {
    nodes_.erase(path);
    return;
  }
  (void)lookup(ctx, path);
  Transaction::Access& a = ctx.tx->accessed[path];
  a.node.reset();
  a.modified = true;
}

void Store::count_owner(Ctx& ctx, uint32_t owner, int delta) {
  if (ctx.tx) {
    ctx.tx->owned_delta[owner] += delta;
  } else {
    owned_[owner] += delta;
  }
}

int Store::owned_count(Ctx& ctx, uint32_t owner) const {
  int n = 0;
  if (auto it = owned_.find(owner); it != owned_.end()) n = it->second;
  if (ctx.tx) {
    if (auto it = ctx.tx->owned_delta.find(owner); it != ctx.tx->owned_delta.end()) n += it->second;
  }
  return n;
}

ChangeEvent Store::make_event(const std::string& path, bool exact,
                              std::optional<PermList> old_perms) const {
  ChangeEvent ev;
  ev.path = path;
  ev.exact = exact;
  ev.old_perms = std::move(old_perms);
  if (auto it = nodes_.find(path); it != nodes_.end()) ev.node_perms = it->second.perms;
  if (path != "/") {
    if (auto it = nodes_.find(parent_of(path)); it != nodes_.end())
      ev.parent_perms = it->second.perms;
  }
  return ev;
}

void Store::fire(Ctx& ctx, const std::string& path, bool exact,
                 std::optional<PermList> old_perms) {
  if (ctx.tx == nullptr) {
    if (sink_) sink_(make_event(path, exact, std::move(old_perms)));
    return;
  }
  // queue_watches(): a non-exact event replaces an exact one, not the other way round.
  Transaction::Access& a = ctx.tx->accessed[path];
  if (!a.fire) {
    a.fire = true;
    a.exact = exact;
  } else if (!exact) {
    a.exact = false;
  }
}

// ---------------------------------------------------------------------------------------
// Operations.

XsResult<std::string> Store::read(const Caller& c, Transaction* tx, std::string_view path) {
  Ctx ctx{c, tx};
  const std::string name = PVHOST_TRY(canonicalize(c, path, quotas_.max_path_length));
  const Node* n = PVHOST_TRY(get_node(ctx, name, kPermRead));
  return n->value;
}

XsResult<void> Store::create(Ctx& ctx, const std::string& path, std::string_view value) {
  // construct_node(): walk up to the nearest existing ancestor, then create the missing
  // nodes top-down. Each inherits its parent's permissions; an unprivileged creator
  // becomes the owner (first entry).
  std::vector<std::string> missing{path};
  std::string p = parent_of(path);
  const Node* anc = lookup(ctx, p);
  while (anc == nullptr) {
    if (p == "/") return xs_fail(EIO);  // the root always exists
    missing.push_back(p);
    p = parent_of(p);
    anc = lookup(ctx, p);
  }
  PermList perms = anc->perms;
  if (!ctx.caller.privileged()) perms[0].domid = ctx.caller.domid.value();
  const uint32_t owner = perms[0].domid;

  if (!ctx.caller.privileged() &&
      static_cast<size_t>(owned_count(ctx, owner)) + missing.size() > quotas_.max_nodes_per_domain)
    return xs_fail(ENOSPC);

  std::vector<std::pair<std::string, Node>> writes;
  Node cur = *anc;
  std::string cur_path = p;
  for (size_t i = missing.size(); i-- > 0;) {
    cur.children.emplace_back(basename(missing[i]));
    writes.emplace_back(cur_path, std::move(cur));
    cur = Node{};
    cur.perms = perms;
    cur_path = missing[i];
  }
  cur.value.assign(value);
  writes.emplace_back(cur_path, std::move(cur));
  for (const auto& [wp, wn] : writes) PVHOST_TRY(check_size(ctx, wn));
  for (auto& [wp, wn] : writes) PVHOST_TRY(put(ctx, wp, std::move(wn)));
  count_owner(ctx, owner, static_cast<int>(missing.size()));
  if (ctx.tx) ctx.tx->node_created = true;
  return {};
}

XsResult<void> Store::write(const Caller& c, Transaction* tx, std::string_view path,
                            std::string_view value) {
  Ctx ctx{c, tx};
  const std::string name = PVHOST_TRY(canonicalize(c, path, quotas_.max_path_length));
  auto n = get_node(ctx, name, kPermWrite);
  if (!n) {
    if (n.error() != ENOENT) return xs_fail(n.error());
    PVHOST_TRY(create(ctx, name, value));
  } else {
    Node copy = **n;
    copy.value.assign(value);
    PVHOST_TRY(check_size(ctx, copy));
    PVHOST_TRY(put(ctx, name, std::move(copy)));
  }
  fire(ctx, name, false, std::nullopt);
  return {};
}

XsResult<void> Store::mkdir(const Caller& c, Transaction* tx, std::string_view path) {
  Ctx ctx{c, tx};
  const std::string name = PVHOST_TRY(canonicalize(c, path, quotas_.max_path_length));
  auto n = get_node(ctx, name, kPermWrite);
  if (n) return {};  // exists already: nothing changes, no watch fires
  if (n.error() != ENOENT) return xs_fail(n.error());
  PVHOST_TRY(create(ctx, name, {}));
  fire(ctx, name, false, std::nullopt);
  return {};
}

XsResult<void> Store::rm_node(Ctx& ctx, const std::string& path) {
  const std::string pname = parent_of(path);
  const Node* parent = lookup(ctx, pname);
  if (parent == nullptr) return xs_fail(EINVAL);
  Node parent_copy = *parent;

  // delnode_sub(): post-order; each node's watches fire while its permissions are still
  // known — the removed root for watches on it and its ancestors, every descendant only
  // for watches set exactly on it.
  struct Frame {
    std::string path;
    std::vector<std::string> children;
    size_t next = 0;
  };
  std::vector<Frame> stack;
  if (const Node* root = lookup(ctx, path)) stack.push_back({path, root->children, 0});
  while (!stack.empty()) {
    Frame& f = stack.back();
    if (f.next < f.children.size()) {
      std::string cp = child_path(f.path, f.children[f.next++]);
      if (const Node* child = lookup(ctx, cp)) {
        std::vector<std::string> kids = child->children;
        stack.push_back({std::move(cp), std::move(kids), 0});
      }
      continue;
    }
    const Node* n = lookup(ctx, f.path);
    if (n) {
      const uint32_t owner = n->perms.empty() ? 0 : n->perms[0].domid;
      fire(ctx, f.path, f.path != path, std::nullopt);
      count_owner(ctx, owner, -1);
      erase(ctx, f.path);
    }
    stack.pop_back();
  }

  const std::string_view leaf = basename(path);
  std::erase(parent_copy.children, std::string(leaf));
  return put(ctx, pname, std::move(parent_copy));
}

XsResult<void> Store::rm(const Caller& c, Transaction* tx, std::string_view path) {
  Ctx ctx{c, tx};
  const std::string name = PVHOST_TRY(canonicalize(c, path, quotas_.max_path_length));
  auto n = get_node(ctx, name, kPermWrite);
  if (!n) {
    // Not there: fine, if the parent exists (xenstore.txt RM).
    if (n.error() == ENOENT && lookup(ctx, parent_of(name)) != nullptr) return {};
    return xs_fail(n.error());
  }
  if (name == "/") return xs_fail(EINVAL);
  return rm_node(ctx, name);
}

XsResult<std::vector<std::string>> Store::directory(const Caller& c, Transaction* tx,
                                                    std::string_view path) {
  Ctx ctx{c, tx};
  const std::string name = PVHOST_TRY(canonicalize(c, path, quotas_.max_path_length));
  const Node* n = PVHOST_TRY(get_node(ctx, name, kPermRead));
  return n->children;
}

XsResult<std::string> Store::directory_part(const Caller& c, Transaction* tx,
                                            std::string_view path, std::string_view offset) {
  Ctx ctx{c, tx};
  const std::string name = PVHOST_TRY(canonicalize(c, path, quotas_.max_path_length));
  const Node* n = PVHOST_TRY(get_node(ctx, name, kPermRead));
  const uint32_t off = c_atoi_u32(offset);
  std::string blob;
  for (const auto& ch : n->children) {
    blob += ch;
    blob += '\0';
  }
  std::string out = fmt::format("{}", n->generation);
  out += '\0';
  const size_t genlen = out.size();
  if (off >= blob.size()) {
    out += '\0';  // offset behind the list: the list's terminating empty string only
    return out;
  }
  // Whole names only, as many as fit in one payload with the generation in front.
  const size_t maxlen = kPayloadMax - genlen - 1;
  size_t len = 0;
  size_t pos = off;
  while (pos < blob.size()) {
    const size_t l = std::char_traits<char>::length(blob.data() + pos);
    if (len + l >= maxlen) break;
    len += l + 1;
    pos += l + 1;
  }
  out.append(blob, off, len);
  if (off + len == blob.size()) out += '\0';
  return out;
}

XsResult<PermList> Store::get_perms(const Caller& c, Transaction* tx, std::string_view path) {
  Ctx ctx{c, tx};
  const std::string name = PVHOST_TRY(canonicalize(c, path, quotas_.max_path_length));
  const Node* n = PVHOST_TRY(get_node(ctx, name, kPermRead));
  return n->perms;
}

XsResult<void> Store::set_perms(const Caller& c, Transaction* tx, std::string_view path,
                                const PermList& perms) {
  Ctx ctx{c, tx};
  if (perms.empty()) return xs_fail(EINVAL);
  if (!c.privileged() && perms.size() > kMaxPermsPerNode) return xs_fail(ENOSPC);
  const std::string name = PVHOST_TRY(canonicalize(c, path, quotas_.max_path_length));
  // Only the owner (or a privileged domain) may change permissions ...
  const Node* n = PVHOST_TRY(get_node(ctx, name, kPermWrite | kPermOwner));
  // ... and only the control domain may change the owner (xenstore.txt).
  if (!c.privileged() && perms[0].domid != n->perms[0].domid) return xs_fail(EPERM);
  Node copy = *n;
  PermList old = copy.perms;
  copy.perms = perms;
  PVHOST_TRY(check_size(ctx, copy));
  count_owner(ctx, old[0].domid, -1);
  count_owner(ctx, perms[0].domid, +1);
  PVHOST_TRY(put(ctx, name, std::move(copy)));
  fire(ctx, name, false, std::move(old));
  return {};
}

XsResult<std::unique_ptr<Store::Transaction>> Store::begin() {
  return std::make_unique<Transaction>();
}

XsResult<void> Store::commit(const Caller& c, std::unique_ptr<Transaction> tx) {
  // transaction_fix_domains(): the node quota is checked again against the global count.
  if (tx->node_created && !c.privileged()) {
    for (const auto& [dom, delta] : tx->owned_delta) {
      auto it = owned_.find(dom);
      const int cur = it == owned_.end() ? 0 : it->second;
      if (delta > 0 && static_cast<size_t>(cur + delta) > quotas_.max_nodes_per_domain)
        return xs_fail(ENOSPC);
    }
  }
  // finalize_transaction(): every node the transaction looked at must be unchanged.
  for (const auto& path : tx->order) {
    const auto& a = tx->accessed.at(path);
    auto it = nodes_.find(path);
    const uint64_t gen = it == nodes_.end() ? kNoGeneration : it->second.generation;
    if (gen != a.generation) return xs_fail(EAGAIN);
  }
  for (const auto& path : tx->order) {
    auto& a = tx->accessed.at(path);
    if (!a.modified) continue;
    if (a.node) {
      a.node->generation = ++generation_;
      nodes_[path] = *a.node;
    } else {
      nodes_.erase(path);
    }
  }
  for (const auto& [dom, delta] : tx->owned_delta) owned_[dom] += delta;
  for (const auto& path : tx->order) {
    auto& a = tx->accessed.at(path);
    if (a.fire && sink_) sink_(make_event(path, a.exact, a.orig_perms));
  }
  return {};
}

void Store::remove_domain_nodes(DomId domid) {
  // domain_tree_remove(): pre-order walk; a node owned by the departing domain goes with
  // its whole subtree (watches fire as for a privileged rm).
  const Caller dom0{kDom0, std::nullopt};
  Ctx ctx{dom0, nullptr};
  std::vector<std::string> todo{"/"};
  while (!todo.empty()) {
    std::string p = std::move(todo.back());
    todo.pop_back();
    auto it = nodes_.find(p);
    if (it == nodes_.end()) continue;
    if (p != "/" && !it->second.perms.empty() && it->second.perms[0].domid == domid.value()) {
      // A failure leaves the node in place; the walk goes on, as in xenstored.
      (void)rm_node(ctx, p);
      continue;
    }
    for (const auto& ch : it->second.children) todo.push_back(child_path(p, ch));
  }
}

std::string Store::check() const {
  std::string problems;
  std::unordered_map<uint32_t, int> owned;
  for (const auto& [path, n] : nodes_) {
    if (n.perms.empty()) problems += fmt::format("{}: no permissions; ", path);
    else owned[n.perms[0].domid] += 1;
    if (path != "/") {
      auto pit = nodes_.find(parent_of(path));
      if (pit == nodes_.end()) {
        problems += fmt::format("{}: parent missing; ", path);
      } else if (std::find(pit->second.children.begin(), pit->second.children.end(),
                           std::string(basename(path))) == pit->second.children.end()) {
        problems += fmt::format("{}: not listed in parent; ", path);
      }
    }
    std::set<std::string> seen;
    for (const auto& ch : n.children) {
      if (!seen.insert(ch).second) problems += fmt::format("{}: duplicate child {}; ", path, ch);
      if (!nodes_.contains(child_path(path, ch)))
        problems += fmt::format("{}: child {} missing; ", path, ch);
    }
  }
  for (const auto& [dom, count] : owned_) {
    auto it = owned.find(dom);
    const int actual = it == owned.end() ? 0 : it->second;
    if (actual != count) problems += fmt::format("domain {}: {} nodes accounted, {} owned; ", dom, count, actual);
  }
  return problems;
}

}  // namespace pvhost::xenemu
