// The 1x1 products for double at x86-64-v4 (gemm_kernels.inc).
#define FASTSHIFT_GEMM_T double
#define FASTSHIFT_GEMM_LEVEL v4
#include "gemm_kernels.inc"
