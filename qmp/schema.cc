// query-qmp-schema (qapi/introspect.json SchemaInfo), generated from the command table.
// As QEMU does, non-builtin type names are masked as numbers ("0", "1", ...); "0" is the
// empty object, used for commands without arguments or return value.
#include <map>

#include <fmt/format.h>

#include "qmp/server_impl.h"

namespace pvhost::qmp {

using nlohmann::json;

namespace {

class SchemaBuilder {
 public:
  SchemaBuilder() { object_type({}); }  // "0"

  std::string builtin(ArgType t) {
    std::string name, json_type;
    switch (t) {
      case ArgType::string: name = "str"; json_type = "string"; break;
      case ArgType::integer: name = "int"; json_type = "int"; break;
      case ArgType::boolean: name = "bool"; json_type = "boolean"; break;
      case ArgType::number: name = "number"; json_type = "number"; break;
      case ArgType::object:
      case ArgType::array:
      case ArgType::any: name = "any"; json_type = "value"; break;
    }
    if (seen_.emplace(name, name).second)
      entities_.push_back({{"name", name}, {"meta-type", "builtin"}, {"json-type", json_type}});
    return name;
  }

  std::string object_type(const std::vector<ArgSpec>& members) {
    json m = json::array();
    std::string sig = "{";
    for (const ArgSpec& a : members) {
      json row{{"name", a.name}, {"type", builtin(a.type)}};
      if (a.optional) row["default"] = nullptr;
      sig += fmt::format("{}:{}:{},", a.name, arg_type_name(a.type), a.optional);
      m.push_back(std::move(row));
    }
    sig += "}";
    auto [it, fresh] = seen_.emplace(sig, std::to_string(next_++));
    if (fresh) entities_.push_back({{"name", it->second}, {"meta-type", "object"}, {"members", std::move(m)}});
    return it->second;
  }

  std::string array_type(const std::string& element) {
    std::string name = "[" + element + "]";
    if (seen_.emplace(name, name).second)
      entities_.push_back({{"name", name}, {"meta-type", "array"}, {"element-type", element}});
    return name;
  }

  std::string return_type(const Returns& r) {
    switch (r.type) {
      case ArgType::object: return object_type(r.members);
      case ArgType::array:
        return array_type(r.element == ArgType::object ? object_type(r.members) : builtin(r.element));
      case ArgType::string:
      case ArgType::integer:
      case ArgType::boolean:
      case ArgType::number:
      case ArgType::any: return builtin(r.type);
    }
    return "0";
  }

  void command(const CommandSpec& c) {
    json e{{"name", c.name}, {"meta-type", "command"}, {"arg-type", object_type(c.args)},
           {"ret-type", return_type(c.returns)}};
    commands_.push_back(std::move(e));
  }

  void event(std::string name, const std::vector<ArgSpec>& members) {
    commands_.push_back({{"name", std::move(name)}, {"meta-type", "event"}, {"arg-type", object_type(members)}});
  }

  json finish() {
    json all = std::move(commands_);
    for (auto& e : entities_) all.push_back(std::move(e));
    return all;
  }

 private:
  std::map<std::string, std::string> seen_;
  int next_ = 0;
  json entities_ = json::array();
  json commands_ = json::array();
};

}  // namespace

json build_qmp_schema(const Server::Impl& impl) {
  SchemaBuilder b;
  for (const auto& [name, spec] : impl.commands) b.command(spec);
  // The events pvhost itself sends (qapi/run-state.json).
  b.event("STOP", {});
  b.event("RESUME", {});
  b.event("SHUTDOWN", {{"guest", ArgType::boolean}, {"reason", ArgType::string}});
  return b.finish();
}

}  // namespace pvhost::qmp
