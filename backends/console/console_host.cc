#include "backends/console/console_host.h"

namespace pvhost::console {

void ConsoleHost::Entry::reset() noexcept {
  if (host_ != nullptr) std::exchange(host_, nullptr)->remove(id_);
}

ConsoleHost::Entry ConsoleHost::add(std::string label, FilenameFn filename, OpenFn frontend_open) {
  const uint64_t id = next_id_++;
  Item item{std::move(label), std::move(filename), std::move(frontend_open), {}};
  if (sink_) item.undo = sink_(item.label, item.filename, item.frontend_open);
  items_.emplace(id, std::move(item));
  return Entry(this, id);
}

void ConsoleHost::remove(uint64_t id) noexcept {
  auto it = items_.find(id);
  if (it == items_.end()) return;
  auto undo = std::move(it->second.undo);
  items_.erase(it);
  if (undo) undo();
}

std::vector<ChardevRow> ConsoleHost::rows() const {
  std::vector<ChardevRow> out;
  out.reserve(items_.size());
  for (const auto& [id, item] : items_) out.push_back({item.label, item.filename(), item.frontend_open()});
  return out;
}

void ConsoleHost::set_sink(Sink sink) {
  sink_ = std::move(sink);
  for (auto& [id, item] : items_) {
    if (item.undo) std::exchange(item.undo, nullptr)();
    if (sink_) item.undo = sink_(item.label, item.filename, item.frontend_open);
  }
}

ConsoleHost& process_console_host() {
  // Process-wide by design (see the header): configured once at start-up on the main thread.
  static ConsoleHost host;
  return host;
}

}  // namespace pvhost::console
