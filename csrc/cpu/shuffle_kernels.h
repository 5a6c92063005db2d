// The channel shuffle's per-pixel kernels (csrc/cpu/shuffle_cpu.cpp), for the other CPU bodies.
#pragma once

#include <cstdint>

namespace fastshift {

// Pixel rows [b, e) of t = [s0 (n0 channels) | s1 (n1)] split into d0[j] = t[2j] and
// d1[j] = t[2j + 1] (j < (n0 + n1) / 2): shuffle_cat's layout. ss0, ss1, ds0, ds1: the pixel
// strides; tmp: scratch of n0 + n1 values (used when n0 is odd).
void k_deinterleave(const float* s0, int64_t ss0, int64_t n0, const float* s1, int64_t ss1,
                    int64_t n1, float* d0, int64_t ds0, float* d1, int64_t ds1, int64_t b,
                    int64_t e, float* tmp);
void k_deinterleave(const double* s0, int64_t ss0, int64_t n0, const double* s1, int64_t ss1,
                    int64_t n1, double* d0, int64_t ds0, double* d1, int64_t ds1, int64_t b,
                    int64_t e, double* tmp);

}  // namespace fastshift
