// The 1x1 products for double at instruction-set level v3 (gemm_kernels.inc, multiversion.h).
#include "block_kernels.h"
#include "multiversion.h"
#if FASTSHIFT_ISA_LEVELS
namespace fastshift {
namespace cpu_block {
using KernelT = double;
}  // namespace cpu_block
}  // namespace fastshift
#define FASTSHIFT_GEMM_LEVEL v3
#define FASTSHIFT_GEMM_ATTR FASTSHIFT_TARGET_V3
#include "gemm_kernels.inc"
#endif
