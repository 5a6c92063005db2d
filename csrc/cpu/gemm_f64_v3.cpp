// The 1x1 products for double at x86-64-v3 (gemm_kernels.inc).
#define FASTSHIFT_GEMM_T double
#define FASTSHIFT_GEMM_LEVEL v3
#include "gemm_kernels.inc"
