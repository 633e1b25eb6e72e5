// Serialises JSON the way QEMU's QMP output does (qobject/qjson.c, to_json with
// pretty=false): `{"key": value, "k2": v2}`, `[a, b]`, and strings in pure ASCII with
// every other code point as \uXXXX (surrogate pairs above the BMP). Invalid UTF-8 in a
// string we produce (a file name, say) becomes U+FFFD rather than breaking the stream.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace pvhost::qmp {

void write_json(std::string& out, const nlohmann::json& value);
[[nodiscard]] std::string to_json(const nlohmann::json& value);
void write_json_string(std::string& out, std::string_view s);

}  // namespace pvhost::qmp
