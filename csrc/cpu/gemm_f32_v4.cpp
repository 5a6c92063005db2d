// The 1x1 products for float at instruction-set level v4 (gemm_kernels.inc, multiversion.h).
#include "block_kernels.h"
#include "multiversion.h"
#if FASTSHIFT_ISA_LEVELS
namespace fastshift {
namespace cpu_block {
using KernelT = float;
}  // namespace cpu_block
}  // namespace fastshift
#define FASTSHIFT_GEMM_LEVEL v4
#define FASTSHIFT_GEMM_ATTR FASTSHIFT_TARGET_V4
#include "gemm_kernels.inc"
#endif
