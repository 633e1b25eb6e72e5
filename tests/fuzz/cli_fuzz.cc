// Command-line parser: argv split on NUL bytes. Any input must give a value or an error.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "src/cli.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> argv{"pvhost"};
  std::string cur;
  for (size_t i = 0; i < size; ++i) {
    if (data[i] == 0) {
      argv.push_back(cur);
      cur.clear();
    } else {
      cur += static_cast<char>(data[i]);
    }
  }
  argv.push_back(cur);
  auto r = pvhost::parse_command_line(argv);
  if (!r) (void)r.error().describe();
  (void)pvhost::parse_key_values(cur, "backend");
  return 0;
}
