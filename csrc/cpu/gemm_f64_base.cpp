// The 1x1 products for double at the generic level (gemm_kernels.inc).
#define FASTSHIFT_GEMM_T double
#define FASTSHIFT_GEMM_LEVEL base
#include "gemm_kernels.inc"
