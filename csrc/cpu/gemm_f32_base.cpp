// The 1x1 products for float at instruction-set level base (gemm_kernels.inc, multiversion.h).
#include "block_kernels.h"
#include "multiversion.h"
namespace fastshift {
namespace cpu_block {
using KernelT = float;
}  // namespace cpu_block
}  // namespace fastshift
#define FASTSHIFT_GEMM_LEVEL base
#define FASTSHIFT_GEMM_ATTR FASTSHIFT_TARGET_BASE
#include "gemm_kernels.inc"
