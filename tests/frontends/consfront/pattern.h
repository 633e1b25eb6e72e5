// The byte stream consfront sends and the integration tests check: byte i of the stream is
// pattern_byte(i). Not periodic at any small period, so a lost, repeated or reordered piece
// shows up at its offset.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pvhost::test {

[[nodiscard]] constexpr std::byte pattern_byte(uint64_t i) {
  return static_cast<std::byte>((i * 7 + i / 251 + (i >> 16) * 13) & 0xff);
}

}  // namespace pvhost::test
