#include "src/block/vhd/vhd_image.h"
namespace pvhost::block {
Result<std::unique_ptr<Image>> open_vhd_in_chain(const OpenOptions&, ChainGuard&) { return fail(ENOTSUP, "vhd: todo"); }
Result<std::unique_ptr<Image>> open_vhd(const OpenOptions& o) { ChainGuard g; return open_vhd_in_chain(o, g); }
Result<void> create_vhd_differencing(const std::string&, const std::string&) { return fail(ENOTSUP, "todo"); }
}
