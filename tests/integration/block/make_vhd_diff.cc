// make-vhd-diff CHILD PARENT: creates a differencing VHD over PARENT (a VHD) with pvhost's
// own writer (src/block/vhd), since qemu-img cannot make one. For formats_test.py.
#include <cstdio>

#include "src/block/vhd/vhd_image.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: make-vhd-diff CHILD PARENT\n");
    return 2;
  }
  if (auto r = pvhost::block::create_vhd_differencing(argv[1], argv[2]); !r) {
    std::fprintf(stderr, "make-vhd-diff: %s\n", r.error().describe().c_str());
    return 1;
  }
  return 0;
}
