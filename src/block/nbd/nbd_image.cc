#include "src/block/nbd/nbd_image.h"
namespace pvhost::block {
Result<std::unique_ptr<Image>> open_nbd(std::string_view, ReadOnly) { return fail(ENOTSUP, "nbd: todo"); }
}
