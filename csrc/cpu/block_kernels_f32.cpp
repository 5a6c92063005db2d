// block_kernels.h's entry points for float (the shared definitions: block_kernels.inc).
#include "block_kernels.h"
#include "multiversion.h"

namespace fastshift {
namespace cpu_block {
using KernelT = float;
}  // namespace cpu_block
}  // namespace fastshift

#include "block_kernels.inc"
