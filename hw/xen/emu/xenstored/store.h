// The xenstore database: a tree of nodes with values, ordered children and permission
// lists, a global generation count, per-domain node accounting, and transactions —
// with the semantics of C xenstored (docs/misc/xenstore.txt; tools/xenstore in Xen 4.17,
// the version Debian ships, is what the real tools and libxenstore are tested against).
//
// Errors are xenstore errno values (XsResult<T> = expected<T, int>): they travel to the
// client as names ("ENOENT") and carry no further context, so no Error object is built
// on this path.
#pragma once

#include <cstdint>
#include <expected>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "hw/xen/emu/xenstored/xenstored.h"
#include "src/types.h"

namespace pvhost::xenemu {

template <class T>
using XsResult = std::expected<T, int>;

[[nodiscard]] inline std::unexpected<int> xs_fail(int code) { return std::unexpected(code); }

// Permission bits as in xenstore_lib.h (XS_PERM_*).
inline constexpr uint8_t kPermNone = 0;
inline constexpr uint8_t kPermRead = 1;
inline constexpr uint8_t kPermWrite = 2;
inline constexpr uint8_t kPermOwner = 8;

// One "<r|w|b|n><domid>" entry. The first entry of a list is the owner, and its bits are
// the default for every domain without an entry of its own (xenstore.txt).
struct Perm {
  uint32_t domid = 0;
  uint8_t bits = kPermNone;
  friend bool operator==(const Perm&, const Perm&) = default;
};
using PermList = std::vector<Perm>;

// Parses one "<r|w|b|n><domid>" (xs_strings_to_perms: strtol base 0, whole string).
[[nodiscard]] std::optional<Perm> parse_perm(std::string_view s);
[[nodiscard]] std::string perm_to_string(const Perm& p);

// Who is asking. Domain 0 is privileged (C xenstored: domid_is_unprivileged()); a domain
// given a target via SET_TARGET also gets the target's rights.
struct Caller {
  DomId domid{0};
  std::optional<DomId> target;
  [[nodiscard]] bool privileged() const { return domid == kDom0; }
};

// perm_for_conn(): the rights `caller` has on a node with `perms`.
[[nodiscard]] uint8_t perm_for(const Caller& caller, const PermList& perms);

// Path rules of xenstore.txt: canonical absolute path, or an EINVAL.
// Relative paths are taken relative to /local/domain/<caller>.
[[nodiscard]] std::string implicit_path(DomId domid);
[[nodiscard]] XsResult<std::string> canonicalize(const Caller& caller, std::string_view path,
                                                 size_t max_path_length);
[[nodiscard]] bool is_valid_chars(std::string_view path);
// True when `child` is `parent` or below it ("/" is everyone's parent).
[[nodiscard]] bool is_child(std::string_view child, std::string_view parent);
[[nodiscard]] std::string parent_of(std::string_view path);

struct Node {
  std::string value;
  std::vector<std::string> children;  // leaf names, in creation order (as DIRECTORY lists)
  PermList perms;
  uint64_t generation = 0;
};

// A modification, reported so that watches can be matched and permission-checked the way
// xenstored's fire_watches()/watch_permitted() do: the event is delivered to a
// connection when it could read the node (old or current permissions) or its parent.
struct ChangeEvent {
  std::string path;
  bool exact = false;  // true: only watches on exactly `path` (recursive rm of a subtree)
  std::optional<PermList> old_perms;
  std::optional<PermList> node_perms;
  std::optional<PermList> parent_perms;
};

class Store {
 public:
  // A transaction's private view: every node it touched, as first seen (with that
  // generation) and as modified since, in first-access order.
  class Transaction {
   public:
    struct Access {
      std::optional<Node> node;  // the transaction's view; empty: absent
      uint64_t generation = 0;   // global generation at first access
      std::optional<PermList> orig_perms;
      bool modified = false;
      bool fire = false;  // a watch event is due at commit ...
      bool exact = true;  // ... for exactly this path only (recursive rm)
    };
    std::map<std::string, Access> accessed;
    std::vector<std::string> order;
    std::unordered_map<uint32_t, int> owned_delta;  // node-count changes per owner
    bool node_created = false;
  };
  using EventSink = std::function<void(const ChangeEvent&)>;

  explicit Store(XenstoredQuotas quotas);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Where change events of non-transactional operations and of commits go.
  void set_event_sink(EventSink sink) { sink_ = std::move(sink); }

  // Operations. `tx` is null outside a transaction. Paths are as the client sent them.
  [[nodiscard]] XsResult<std::string> read(const Caller& c, Transaction* tx, std::string_view path);
  [[nodiscard]] XsResult<void> write(const Caller& c, Transaction* tx, std::string_view path,
                                     std::string_view value);
  [[nodiscard]] XsResult<void> mkdir(const Caller& c, Transaction* tx, std::string_view path);
  [[nodiscard]] XsResult<void> rm(const Caller& c, Transaction* tx, std::string_view path);
  [[nodiscard]] XsResult<std::vector<std::string>> directory(const Caller& c, Transaction* tx,
                                                             std::string_view path);
  // DIRECTORY_PART reply payload: "<gencnt>|<child>|*" plus the final empty string once
  // the list is complete (xenstore.txt; send_directory_part()).
  [[nodiscard]] XsResult<std::string> directory_part(const Caller& c, Transaction* tx,
                                                     std::string_view path,
                                                     std::string_view offset);
  [[nodiscard]] XsResult<PermList> get_perms(const Caller& c, Transaction* tx, std::string_view path);
  [[nodiscard]] XsResult<void> set_perms(const Caller& c, Transaction* tx, std::string_view path,
                                         const PermList& perms);

  // Transactions (transaction.c): reads copy the node into the transaction and remember
  // its generation; commit fails with EAGAIN when any accessed node changed globally
  // since; writes become visible, and their watch events fire, only at commit.
  [[nodiscard]] XsResult<std::unique_ptr<Transaction>> begin();
  [[nodiscard]] XsResult<void> commit(const Caller& c, std::unique_ptr<Transaction> tx);

  // Domain release (destroy_domain()): removes every node owned by `domid` with its
  // subtree, firing watches as a privileged rm would.
  void remove_domain_nodes(DomId domid);

  // CONTROL check: structural consistency (every node listed by its parent, every child
  // present, node accounting matches ownership). Empty when consistent, else what is wrong.
  [[nodiscard]] std::string check() const;
  [[nodiscard]] size_t node_count() const { return nodes_.size(); }
  [[nodiscard]] size_t nodes_owned_by(DomId domid) const;
  [[nodiscard]] const XenstoredQuotas& quotas() const { return quotas_; }

 private:
  struct Ctx;
  [[nodiscard]] const Node* lookup(Ctx& ctx, const std::string& path);
  [[nodiscard]] XsResult<const Node*> get_node(Ctx& ctx, const std::string& path, uint8_t perm);
  [[nodiscard]] int errno_from_parents(Ctx& ctx, const std::string& path, int err, uint8_t perm);
  [[nodiscard]] XsResult<void> put(Ctx& ctx, const std::string& path, Node node);
  void erase(Ctx& ctx, const std::string& path);
  [[nodiscard]] XsResult<void> check_size(const Ctx& ctx, const Node& n) const;
  [[nodiscard]] XsResult<void> create(Ctx& ctx, const std::string& path, std::string_view value);
  void fire(Ctx& ctx, const std::string& path, bool exact, std::optional<PermList> old_perms);
  [[nodiscard]] XsResult<void> rm_node(Ctx& ctx, const std::string& path);
  void count_owner(Ctx& ctx, uint32_t owner, int delta);
  [[nodiscard]] int owned_count(Ctx& ctx, uint32_t owner) const;
  [[nodiscard]] ChangeEvent make_event(const std::string& path, bool exact,
                                       std::optional<PermList> old_perms) const;

  XenstoredQuotas quotas_;
  std::map<std::string, Node> nodes_;  // key: canonical path
  std::unordered_map<uint32_t, int> owned_;  // nodes per owning domain
  uint64_t generation_ = 0;
  EventSink sink_;
};

}  // namespace pvhost::xenemu
