// CUDA bodies of the fused block ops (dwconv_bn, pwconv_bn_relu and their backwards), with the
// contracts and formulas of csrc/cpu/block_cpu.cpp. Activations are channels-last, so with one
// thread per (pixel, channel) consecutive threads read consecutive channels (coalesced).
//
//   depthwise conv (k = 3/5/7, stride 1/2): each thread computes kTile neighbouring output
//   columns of one channel from one register row of inputs per kernel row (the taps are
//   compile-time constants); its input gradient is that same kernel on the flipped weights at
//   stride 1, and a tap-parity gather at stride 2; its weight gradient keeps all k*k taps of
//   one channel in registers over a slice of output rows (dz is read once), and a finishing
//   kernel adds the slices in a fixed order (deterministic) into the weight's own layout and
//   dtype. These read the weight as it is ([C, k*k]; no transposed or flipped copy). Other odd
//   k run generic one-output-per-thread kernels;
//   batch statistics are one pass over the data (shifted sums per thread, merged with Chan's
//   formula), the two BN-backward sums another, each with a small finishing kernel, in a fixed
//   order (deterministic); the normalisation (+ReLU) and the BN input gradient are one
//   elementwise kernel each (32-bit index arithmetic when the tensor allows it);
//   the 1x1 convs are cuBLAS products reading the pixel rows in place at their stride: at::mm,
//   or for float32 while torch.backends.cudnn.allow_tf32 is on (PyTorch's default, which the
//   1x1 conv they replace follows in cuDNN) cublasGemmEx with TF32 tensor-core math.
// float16/bfloat16 accumulate in float32; statistics are returned in the input dtype.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "../block_checks.h"

namespace fastshift {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

#define FASTSHIFT_GRID_STRIDE(i, n)                                                         \
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n);                 \
       i += (int64_t)blockDim.x * gridDim.x)

// ---------------------------------------------------------------------------------------------
// Depthwise conv, k = 3/5/7 and stride 1/2 (compile-time taps).

constexpr int kTile = 4;  // output columns per thread

// out[r, oh, ow, c] = sum_t x[r, oh*S - P + kh, ow*S - P + kw, c] * w[c, t'] with the weight
// in its own [C, K*K] layout, t' = t (flip: K*K - 1 - t, the kernel turned by 180 degrees);
// with mean/var (eval): (sum - mean[g, c]) / sqrt(var[g, c] + eps), g = r / rows_per_group.
// One thread: kTile columns ow0 .. ow0 + kTile - 1 of one (r, oh, c); per kernel row it loads
// the (kTile-1)*S + K input columns they share once.
template <typename T, typename A, int K, int S>
__global__ void dw_conv_tiled_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                     T* __restrict__ out, const A* __restrict__ mean,
                                     const A* __restrict__ var, A eps, int64_t R, int64_t H,
                                     int64_t W, int64_t C, int64_t OH, int64_t OW,
                                     int64_t rows_per_group, bool flip) {
  constexpr int P = K / 2;
  constexpr int kSpan = (kTile - 1) * S + K;
  const int64_t OWT = (OW + kTile - 1) / kTile;
  FASTSHIFT_GRID_STRIDE(i, R * OH * OWT * C) {
    const int64_t c = i % C;
    int64_t q = i / C;
    const int64_t ow0 = (q % OWT) * kTile;
    q /= OWT;
    const int64_t oh = q % OH;
    const int64_t r = q / OH;
    A acc[kTile];
#pragma unroll
    for (int t = 0; t < kTile; ++t) acc[t] = A(0);
    const int64_t iw0 = ow0 * S - P;
    const T* wc = w + c * (K * K);
#pragma unroll
    for (int kh = 0; kh < K; ++kh) {
      const int64_t ih = oh * S - P + kh;
      if (ih < 0 || ih >= H) continue;
      const T* xrow = x + (r * H + ih) * W * C + c;
      A xs[kSpan];
#pragma unroll
      for (int j = 0; j < kSpan; ++j) {
        const int64_t iw = iw0 + j;
        xs[j] = (iw >= 0 && iw < W) ? static_cast<A>(xrow[iw * C]) : A(0);
      }
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        const int t = kh * K + kw;
        const A wv = static_cast<A>(wc[flip ? K * K - 1 - t : t]);
#pragma unroll
        for (int t = 0; t < kTile; ++t) acc[t] += xs[t * S + kw] * wv;
      }
    }
    A sh = A(0), sc = A(1);
    if (mean != nullptr) {
      const int64_t g = r / rows_per_group;
      sh = mean[g * C + c];
      sc = rsqrt(var[g * C + c] + eps);
    }
    T* orow = out + (r * OH + oh) * OW * C + c;
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      if (ow0 + t < OW) {
        const A v = mean != nullptr ? (acc[t] - sh) * sc : acc[t];
        orow[(ow0 + t) * C] = static_cast<T>(v);
      }
    }
  }
}

// Stride-2 input gradient: dx[r, ih, iw, c] = sum dz[r, (ih + P - kh) / 2, (iw + P - kw) / 2, c]
// * w[c, t] over the taps of the parity that makes the division exact, in range (w: [C, K*K]).
template <typename T, typename A, int K>
__global__ void dw_input_grad_s2_kernel(const T* __restrict__ dz, const T* __restrict__ w,
                                        T* __restrict__ dx, int64_t R, int64_t H, int64_t W,
                                        int64_t C, int64_t OH, int64_t OW) {
  constexpr int P = K / 2;
  FASTSHIFT_GRID_STRIDE(i, R * H * W * C) {
    const int64_t c = i % C;
    int64_t p = i / C;
    const int64_t iw = p % W;
    p /= W;
    const int64_t ih = p % H;
    const int64_t r = p / H;
    const int kh0 = static_cast<int>((ih + P) & 1), kw0 = static_cast<int>((iw + P) & 1);
    A acc = 0;
#pragma unroll
    for (int mh = 0; mh < (K + 1) / 2; ++mh) {
      const int kh = kh0 + 2 * mh;
      const int64_t th = ih + P - kh;
      if (kh >= K || th < 0 || th / 2 >= OH) continue;
      const T* dzrow = dz + (r * OH + th / 2) * OW * C + c;
#pragma unroll
      for (int mw = 0; mw < (K + 1) / 2; ++mw) {
        const int kw = kw0 + 2 * mw;
        const int64_t tw = iw + P - kw;
        if (kw >= K || tw < 0 || tw / 2 >= OW) continue;
        acc += static_cast<A>(dzrow[(tw / 2) * C]) * static_cast<A>(w[c * (K * K) + kh * K + kw]);
      }
    }
    dx[i] = static_cast<T>(acc);
  }
}

constexpr int kLanes = 32;  // channels per block of the column kernels (one warp)
constexpr int kRows = 8;    // pixel rows per block of the column kernels (warps)
// Slice phases per block of the finishing kernels, which reduce the column kernels' per-slice
// parts: a thread adds every kFinishRows-th slice, so the dependent chain of loads is
// splits / kFinishRows long instead of splits (up to several hundred: the large maps' finish
// was a serial loop of dependent global loads, 0.2 ms per call at 64 channels on an H200).
constexpr int kFinishRows = 32;

// part[t, s, c] = sum over the s-th slice of the R*OH output rows (r, oh), all ow, of
// x[r, oh*S - P + kh, ow*S - P + kw, c] * dz[r, oh, ow, c]. Block (kLanes, kRows): channel
// lanes x column phases; the kRows phase sums are added in order at the end.
template <typename T, typename A, int K, int S>
__global__ void __launch_bounds__(kLanes* kRows)
    dw_weight_grad_tiled_kernel(const T* __restrict__ x, const T* __restrict__ dz,
                                A* __restrict__ part, int64_t R, int64_t H, int64_t W, int64_t C,
                                int64_t OH, int64_t OW, int64_t splits) {
  constexpr int P = K / 2;
  __shared__ A red[kRows][kLanes];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * (int64_t)kLanes + tx;
  const int64_t s = blockIdx.y;
  const int64_t rows = R * OH;
  const int64_t per = (rows + splits - 1) / splits;
  const int64_t row_end = std::min(rows, (s + 1) * per);
  A acc[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) acc[t] = A(0);
  if (c < C) {
    for (int64_t row = s * per; row < row_end; ++row) {
      const int64_t r = row / OH, oh = row - r * OH;
      const T* dzrow = dz + row * OW * C + c;
      for (int64_t ow = ty; ow < OW; ow += kRows) {
        const A g = static_cast<A>(dzrow[ow * C]);
#pragma unroll
        for (int kh = 0; kh < K; ++kh) {
          const int64_t ih = oh * S - P + kh;
          if (ih < 0 || ih >= H) continue;
          const T* xrow = x + (r * H + ih) * W * C + c;
#pragma unroll
          for (int kw = 0; kw < K; ++kw) {
            const int64_t iw = ow * S - P + kw;
            if (iw >= 0 && iw < W) acc[kh * K + kw] += static_cast<A>(xrow[iw * C]) * g;
          }
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < K * K; ++t) {
    red[ty][tx] = acc[t];
    __syncthreads();
    if (ty == 0 && c < C) {
      A sum = red[0][tx];
#pragma unroll
      for (int j = 1; j < kRows; ++j) sum += red[j][tx];
      part[(t * splits + s) * C + c] = sum;
    }
    __syncthreads();
  }
}

// dw[c, t] = the sum over the slices s of part[t, s, c], in the weight's dtype. Block (kLanes,
// kFinishRows) over kLanes channels of one tap, grid (ceil(C / kLanes), taps); see
// moments_finish_kernel for the order of the sums.
template <typename T, typename A>
__global__ void __launch_bounds__(kLanes* kFinishRows)
    dw_weight_finish_kernel(const A* __restrict__ part, T* __restrict__ dw, int64_t taps,
                            int64_t splits, int64_t C) {
  __shared__ A red[kFinishRows][kLanes];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * (int64_t)kLanes + tx, t = blockIdx.y;
  A sum = 0;
  if (c < C) {
    const A* col = part + t * splits * C + c;
#pragma unroll 4
    for (int64_t s = ty; s < splits; s += kFinishRows) sum += col[s * C];
  }
  red[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && c < C) {
#pragma unroll
    for (int j = 1; j < kFinishRows; ++j) sum += red[j][tx];
    dw[c * taps + t] = static_cast<T>(sum);
  }
}

// f(integral_constant K, integral_constant S) for the compiled tap sets; false for others.
template <typename F>
bool with_taps(int64_t K, int64_t S, F&& f) {
  using std::integral_constant;
  if (S == 1) {
    if (K == 3) return f(integral_constant<int, 3>{}, integral_constant<int, 1>{}), true;
    if (K == 5) return f(integral_constant<int, 5>{}, integral_constant<int, 1>{}), true;
    if (K == 7) return f(integral_constant<int, 7>{}, integral_constant<int, 1>{}), true;
  } else if (S == 2) {
    if (K == 3) return f(integral_constant<int, 3>{}, integral_constant<int, 2>{}), true;
    if (K == 5) return f(integral_constant<int, 5>{}, integral_constant<int, 2>{}), true;
    if (K == 7) return f(integral_constant<int, 7>{}, integral_constant<int, 2>{}), true;
  }
  return false;
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Slices for a column kernel with `blocks` blocks per slice over `n` rows: about four blocks
// per SM in all, at most one slice per row.
int64_t column_splits(int64_t n, int64_t blocks) {
  const int64_t want = (4 * sm_count() + blocks - 1) / blocks;
  return std::max<int64_t>(1, std::min<int64_t>({want, n, 65535}));
}

// ---------------------------------------------------------------------------------------------
// Generic depthwise kernels (any odd k): one output per thread.

// out[r, oh, ow, c] = sum_t x[r, oh*S - P + kh, ow*S - P + kw, c] * wt[t, c];
// with mean/var (eval): (sum - mean[g, c]) / sqrt(var[g, c] + eps), g = r / rows_per_group.
template <typename T, typename A>
__global__ void dw_conv_kernel(const T* __restrict__ x, const T* __restrict__ wt,
                               T* __restrict__ out, const A* __restrict__ mean,
                               const A* __restrict__ var, A eps, int64_t R, int64_t H, int64_t W,
                               int64_t C, int64_t OH, int64_t OW, int K, int S,
                               int64_t rows_per_group) {
  const int P = K / 2;
  FASTSHIFT_GRID_STRIDE(i, R * OH * OW * C) {
    const int64_t c = i % C;
    int64_t p = i / C;
    const int64_t ow = p % OW;
    p /= OW;
    const int64_t oh = p % OH;
    const int64_t r = p / OH;
    A acc = 0;
    for (int kh = 0; kh < K; ++kh) {
      const int64_t ih = oh * S - P + kh;
      if (ih < 0 || ih >= H) continue;
      for (int kw = 0; kw < K; ++kw) {
        const int64_t iw = ow * S - P + kw;
        if (iw < 0 || iw >= W) continue;
        acc += static_cast<A>(x[((r * H + ih) * W + iw) * C + c]) *
               static_cast<A>(wt[(kh * K + kw) * C + c]);
      }
    }
    if (mean != nullptr) {
      const int64_t g = r / rows_per_group;
      acc = (acc - mean[g * C + c]) * rsqrt(var[g * C + c] + eps);
    }
    out[i] = static_cast<T>(acc);
  }
}

// dx[r, ih, iw, c] = sum_t dz[r, (ih + P - kh) / S, (iw + P - kw) / S, c] * wt[t, c] over the
// taps where the division is exact and in range.
template <typename T, typename A>
__global__ void dw_input_grad_kernel(const T* __restrict__ dz, const T* __restrict__ wt,
                                     T* __restrict__ dx, int64_t R, int64_t H, int64_t W,
                                     int64_t C, int64_t OH, int64_t OW, int K, int S) {
  const int P = K / 2;
  FASTSHIFT_GRID_STRIDE(i, R * H * W * C) {
    const int64_t c = i % C;
    int64_t p = i / C;
    const int64_t iw = p % W;
    p /= W;
    const int64_t ih = p % H;
    const int64_t r = p / H;
    A acc = 0;
    for (int kh = 0; kh < K; ++kh) {
      const int64_t th = ih + P - kh;
      if (th < 0 || th % S != 0 || th / S >= OH) continue;
      for (int kw = 0; kw < K; ++kw) {
        const int64_t tw = iw + P - kw;
        if (tw < 0 || tw % S != 0 || tw / S >= OW) continue;
        acc += static_cast<A>(dz[((r * OH + th / S) * OW + tw / S) * C + c]) *
               static_cast<A>(wt[(kh * K + kw) * C + c]);
      }
    }
    dx[i] = static_cast<T>(acc);
  }
}

// part[t, s, c] = sum over the s-th slice of the R*OH*OW output pixels o of
// x[r, oh*S - P + kh, ow*S - P + kw, c] * dz[o, c].
template <typename T, typename A>
__global__ void dw_weight_grad_kernel(const T* __restrict__ x, const T* __restrict__ dz,
                                      A* __restrict__ part, int64_t R, int64_t H, int64_t W,
                                      int64_t C, int64_t OH, int64_t OW, int K, int S,
                                      int64_t splits) {
  const int P = K / 2;
  const int64_t total = R * OH * OW;
  const int64_t per = (total + splits - 1) / splits;
  FASTSHIFT_GRID_STRIDE(i, (int64_t)K * K * splits * C) {
    const int64_t c = i % C;
    const int64_t s = (i / C) % splits;
    const int64_t t = i / (C * splits);
    const int kh = static_cast<int>(t / K), kw = static_cast<int>(t % K);
    A acc = 0;
    const int64_t end = std::min(total, (s + 1) * per);
    for (int64_t o = s * per; o < end; ++o) {
      const int64_t ow = o % OW, oh = (o / OW) % OH, r = o / (OW * OH);
      const int64_t ih = oh * S - P + kh, iw = ow * S - P + kw;
      if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
      acc += static_cast<A>(x[((r * H + ih) * W + iw) * C + c]) * static_cast<A>(dz[o * C + c]);
    }
    part[i] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// Per-group column statistics of [M, C] rows (G groups of Mg rows): block (kLanes, kRows) over
// kLanes channels of one slice of one group; grid (ceil(C / kLanes), splits, G).

// Merges the (count, mean, M2) of a second part into the first (Chan et al.).
template <typename A>
__device__ inline void chan_merge(A& n, A& mean, A& m2, A nb, A meanb, A m2b) {
  if (nb == A(0)) return;
  if (n == A(0)) {
    n = nb, mean = meanb, m2 = m2b;
    return;
  }
  const A tot = n + nb;
  const A d = meanb - mean;
  mean += d * (nb / tot);
  m2 += m2b + d * d * (n * nb / tot);
  n = tot;
}

// part[0 / 1 / 2][(g * splits + s) * C + c] = count / mean / M2 of z[g * Mg + p, c] over the
// slice's rows p. Each thread sums its rows shifted by its first value (no cancellation when
// the mean is large against the spread); the kRows thread results merge in order.
template <typename T, typename A>
__global__ void __launch_bounds__(kLanes* kRows)
    moments_partial_kernel(const T* __restrict__ z, A* __restrict__ part, int64_t Mg, int64_t C,
                           int64_t splits) {
  __shared__ A rn[kRows][kLanes], rmean[kRows][kLanes], rm2[kRows][kLanes];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * (int64_t)kLanes + tx;
  const int64_t s = blockIdx.y, g = blockIdx.z;
  const int64_t per = (Mg + splits - 1) / splits;
  const int64_t end = std::min(Mg, (s + 1) * per);
  A n = 0, s1 = 0, s2 = 0, k = 0;
  if (c < C) {
    const T* col = z + g * Mg * C + c;
    int64_t p = s * per + ty;
    if (p < end) k = static_cast<A>(col[p * C]);
    for (; p < end; p += kRows) {
      const A d = static_cast<A>(col[p * C]) - k;
      n += A(1);
      s1 += d;
      s2 += d * d;
    }
  }
  A mean = 0, m2 = 0;
  if (n > A(0)) {
    mean = k + s1 / n;
    m2 = s2 - s1 * (s1 / n);
    if (m2 < A(0)) m2 = A(0);
  }
  rn[ty][tx] = n, rmean[ty][tx] = mean, rm2[ty][tx] = m2;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int j = 1; j < kRows; ++j) chan_merge(n, mean, m2, rn[j][tx], rmean[j][tx], rm2[j][tx]);
    const int64_t slot = (g * splits + s) * C + c, size = gridDim.z * splits * C;
    part[slot] = n, part[size + slot] = mean, part[2 * size + slot] = m2;
  }
}

// mean / var[g, c] (biased) from the slices' parts. Block (kLanes, kFinishRows) over kLanes
// channels of one group, grid (ceil(C / kLanes), G): thread row ty merges slices ty,
// ty + kFinishRows, ... in that order, then row 0 merges the rows' results in row order. The
// order depends only on `splits` (deterministic).
template <typename A>
__global__ void __launch_bounds__(kLanes* kFinishRows)
    moments_finish_kernel(const A* __restrict__ part, A* __restrict__ mean, A* __restrict__ var,
                          int64_t G, int64_t C, int64_t splits) {
  __shared__ A rn[kFinishRows][kLanes], rmean[kFinishRows][kLanes], rm2[kFinishRows][kLanes];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * (int64_t)kLanes + tx, g = blockIdx.y;
  const int64_t size = G * splits * C;
  A n = 0, mu = 0, m2 = 0;
  if (c < C) {
#pragma unroll 4
    for (int64_t s = ty; s < splits; s += kFinishRows) {
      const int64_t slot = (g * splits + s) * C + c;
      chan_merge(n, mu, m2, part[slot], part[size + slot], part[2 * size + slot]);
    }
  }
  rn[ty][tx] = n, rmean[ty][tx] = mu, rm2[ty][tx] = m2;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int j = 1; j < kFinishRows; ++j) {
      chan_merge(n, mu, m2, rn[j][tx], rmean[j][tx], rm2[j][tx]);
    }
    mean[g * C + c] = mu;
    var[g * C + c] = n > A(0) ? m2 / n : A(0);
  }
}

// part[0 / 1][(g * splits + s) * C + c] = the slice's sums of g' and g' * xh, g' = relu ?
// (xh > 0 ? dy : 0) : dy (the BN backward's two reductions in one pass); dy's rows are ldy
// apart (>= C), xh's C.
template <typename T, typename A>
__global__ void __launch_bounds__(kLanes* kRows)
    bn_sums_partial_kernel(const T* __restrict__ dy, const T* __restrict__ xh,
                           A* __restrict__ part, int64_t Mg, int64_t C, int64_t ldy,
                           int64_t splits, bool relu) {
  __shared__ A r1[kRows][kLanes], r2[kRows][kLanes];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * (int64_t)kLanes + tx;
  const int64_t s = blockIdx.y, g = blockIdx.z;
  const int64_t per = (Mg + splits - 1) / splits;
  const int64_t end = std::min(Mg, (s + 1) * per);
  A s1 = 0, s2 = 0;
  if (c < C) {
    const T* xcol = xh + g * Mg * C + c;
    const T* dcol = dy + g * Mg * ldy + c;
    for (int64_t p = s * per + ty; p < end; p += kRows) {
      const A xv = static_cast<A>(xcol[p * C]);
      A gv = static_cast<A>(dcol[p * ldy]);
      if (relu && !(xv > A(0))) gv = A(0);
      s1 += gv;
      s2 += gv * xv;
    }
  }
  r1[ty][tx] = s1, r2[ty][tx] = s2;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int j = 1; j < kRows; ++j) s1 += r1[j][tx], s2 += r2[j][tx];
    const int64_t slot = (g * splits + s) * C + c, size = gridDim.z * splits * C;
    part[slot] = s1, part[size + slot] = s2;
  }
}

// a / b[g, c] = the slices' sums / Mg; block and grid as moments_finish_kernel, same order.
template <typename A>
__global__ void __launch_bounds__(kLanes* kFinishRows)
    bn_sums_finish_kernel(const A* __restrict__ part, A* __restrict__ a, A* __restrict__ b,
                          int64_t G, int64_t C, int64_t splits, int64_t Mg) {
  __shared__ A r1[kFinishRows][kLanes], r2[kFinishRows][kLanes];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * (int64_t)kLanes + tx, g = blockIdx.y;
  const int64_t size = G * splits * C;
  A s1 = 0, s2 = 0;
  if (c < C) {
#pragma unroll 4
    for (int64_t s = ty; s < splits; s += kFinishRows) {
      const int64_t slot = (g * splits + s) * C + c;
      s1 += part[slot], s2 += part[size + slot];
    }
  }
  r1[ty][tx] = s1, r2[ty][tx] = s2;
  __syncthreads();
  if (ty == 0 && c < C) {
#pragma unroll
    for (int j = 1; j < kFinishRows; ++j) s1 += r1[j][tx], s2 += r2[j][tx];
    a[g * C + c] = s1 / static_cast<A>(Mg);
    b[g * C + c] = s2 / static_cast<A>(Mg);
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise kernels on [M, C] rows; I = int32_t where M * C allows (cheaper index arithmetic).

// z := (z - mean[g]) / sqrt(var[g] + eps); with relu also y := max(z, 0) (NaN kept).
template <typename T, typename A, typename I>
__global__ void normalize_kernel(T* __restrict__ z, T* __restrict__ y, const A* __restrict__ mean,
                                 const A* __restrict__ var, A eps, I M, I C, I pixels_per_group,
                                 bool relu) {
  for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < M * C; i += (I)blockDim.x * gridDim.x) {
    const I c = i % C;
    const I s = ((i / C) / pixels_per_group) * C + c;
    const A v = (static_cast<A>(z[i]) - mean[s]) * rsqrt(var[s] + eps);
    z[i] = static_cast<T>(v);
    if (relu) y[i] = static_cast<T>(v < A(0) ? A(0) : v);
  }
}

// dz = rstd * (dy' - a - xhat * b) (a != null: training) or rstd * dy'; dy' = relu ?
// dy * (xh > 0) : dy; rstd = 1 / sqrt(var + eps). dy's rows are ldy apart (>= C); xh and dz
// are dense [M, C].
template <typename T, typename A, typename I>
__global__ void bn_input_grad_kernel(const T* __restrict__ dy, const T* __restrict__ xh,
                                     const A* __restrict__ var, A eps, const A* __restrict__ a,
                                     const A* __restrict__ b, T* __restrict__ dz, I M, I C,
                                     I ldy, I pixels_per_group, bool relu) {
  for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < M * C; i += (I)blockDim.x * gridDim.x) {
    const I c = i % C, p = i / C;
    const I s = (p / pixels_per_group) * C + c;
    A g = static_cast<A>(dy[p * ldy + c]);
    if (relu && !(static_cast<A>(xh[i]) > A(0))) g = A(0);
    const A rstd = rsqrt(var[s] + eps);
    const A v = a != nullptr ? rstd * (g - a[s] - static_cast<A>(xh[i]) * b[s]) : rstd * g;
    dz[i] = static_cast<T>(v);
  }
}

// f(int32_t{}) when n elements (plus one grid stride) fit 32-bit indices, else f(int64_t{}).
template <typename F>
void with_index_type(int64_t n, F&& f) {
  if (n < std::numeric_limits<int32_t>::max() / 2) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Biased mean and variance [G, C] (accumulate type) of z2d [M, C] (contiguous, M > 0) per
// row group: one pass over z2d.
std::tuple<at::Tensor, at::Tensor> group_moments(const at::Tensor& z2d, int64_t groups) {
  TORCH_INTERNAL_ASSERT(z2d.is_contiguous());
  TORCH_CHECK(z2d.size(0) > 0, "fastshift CUDA ops: batch statistics of no pixels");
  TORCH_CHECK(groups <= 65535, "fastshift CUDA ops: at most 65535 row groups, got ", groups);
  const int64_t M = z2d.size(0), C = z2d.size(1), Mg = M / groups;
  const auto opts = z2d.options().dtype(acc_dtype(z2d));
  const int64_t cblocks = (C + kLanes - 1) / kLanes;
  const int64_t splits = column_splits(Mg, cblocks * groups);
  at::Tensor part = at::empty({3, groups * splits * C}, opts);
  at::Tensor mean = at::empty({groups, C}, opts), var = at::empty({groups, C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z2d.scalar_type(), "group_moments",
                                  [&] {
    using A = at::acc_type<scalar_t, true>;
    auto stream = at::cuda::getCurrentCUDAStream();
    moments_partial_kernel<scalar_t, A>
        <<<dim3(cblocks, splits, groups), dim3(kLanes, kRows), 0, stream>>>(
            z2d.const_data_ptr<scalar_t>(), part.data_ptr<A>(), Mg, C, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    moments_finish_kernel<A><<<dim3(cblocks, groups), dim3(kLanes, kFinishRows), 0, stream>>>(
        part.const_data_ptr<A>(), mean.data_ptr<A>(), var.data_ptr<A>(), groups, C, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

// dz [M, C] (dense) of the BN (+ReLU) backward; `xh` is xhat (training) or the output y (eval),
// dense; dy2d's rows may be further apart than C (strided_pixel_rows: a channel range of a
// channels-last gradient, read in place).
at::Tensor bn_input_grad(const at::Tensor& dy2d, const at::Tensor& xh2d, const at::Tensor& var,
                         double eps, int64_t groups, bool training, bool relu) {
  const int64_t M = dy2d.size(0), C = dy2d.size(1);
  at::Tensor dz = at::empty({M, C}, dy2d.options());
  if (M == 0) return dz;
  const int64_t ldy = pixel_stride(dy2d);
  TORCH_INTERNAL_ASSERT((C == 1 || dy2d.stride(1) == 1) && ldy >= C && xh2d.is_contiguous());
  TORCH_CHECK(groups <= 65535, "fastshift CUDA ops: at most 65535 row groups, got ", groups);
  const auto opts = dy2d.options().dtype(acc_dtype(dy2d));
  const at::Tensor var_acc = var.to(opts.dtype()).contiguous();
  const int64_t Mg = M / groups, cblocks = (C + kLanes - 1) / kLanes;
  at::Tensor buf;  // training: the slices' parts, then a and b [G, C] (one allocation)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy2d.scalar_type(), "bn_input_grad",
                                  [&] {
    using A = at::acc_type<scalar_t, true>;
    auto stream = at::cuda::getCurrentCUDAStream();
    A* a = nullptr;
    A* b = nullptr;
    if (training) {
      const int64_t splits = column_splits(Mg, cblocks * groups);
      const int64_t size = groups * splits * C;
      buf = at::empty({2 * size + 2 * groups * C}, opts);
      A* part = buf.data_ptr<A>();
      a = part + 2 * size;
      b = a + groups * C;
      bn_sums_partial_kernel<scalar_t, A>
          <<<dim3(cblocks, splits, groups), dim3(kLanes, kRows), 0, stream>>>(
              dy2d.const_data_ptr<scalar_t>(), xh2d.const_data_ptr<scalar_t>(), part, Mg, C,
              ldy, splits, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      bn_sums_finish_kernel<A>
          <<<dim3(cblocks, groups), dim3(kLanes, kFinishRows), 0, stream>>>(
              part, a, b, groups, C, splits, Mg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    with_index_type(M * ldy, [&](auto idx) {
      using I = decltype(idx);
      bn_input_grad_kernel<scalar_t, A, I><<<blocks_for(M * C), kThreads, 0, stream>>>(
          dy2d.const_data_ptr<scalar_t>(), xh2d.const_data_ptr<scalar_t>(),
          var_acc.const_data_ptr<A>(), static_cast<A>(eps), a, b, dz.data_ptr<scalar_t>(),
          I(M), I(C), I(ldy), I(Mg), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dz;
}

// z2d := (z2d - mean) / sqrt(var + eps) per row group (mean, var [G, C] contiguous, in the
// accumulate type); with relu also y2d := max(z2d, 0).
void normalize(at::Tensor& z2d, at::Tensor& y2d, const at::Tensor& mean, const at::Tensor& var,
               double eps, int64_t groups, bool relu) {
  const int64_t M = z2d.size(0), C = z2d.size(1);
  if (M == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z2d.scalar_type(), "normalize", [&] {
    using A = at::acc_type<scalar_t, true>;
    with_index_type(M * C, [&](auto idx) {
      using I = decltype(idx);
      normalize_kernel<scalar_t, A, I><<<blocks_for(M * C), kThreads, 0,
                                         at::cuda::getCurrentCUDAStream()>>>(
          z2d.data_ptr<scalar_t>(), y2d.data_ptr<scalar_t>(), mean.const_data_ptr<A>(),
          var.const_data_ptr<A>(), static_cast<A>(eps), I(M), I(C), I(M / groups), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// The "conv" operation of ATen's cuDNN TF32 setting, for the torch versions whose
// Context::allowTF32CuDNN takes an operation: by name (std::string) or as the Float32Op enum.
struct ConvOp {
  operator std::string() const { return "conv"; }
  template <typename E, typename = std::enable_if_t<std::is_enum_v<E>>>
  operator std::optional<E>() const {
    return E::CONV;
  }
};

// Whether cuDNN runs float32 convolutions in TF32 (torch.backends.cudnn.allow_tf32, or
// torch.backends.cudnn.conv.fp32_precision): asked for the conv operation where the installed
// torch takes one (its question without one fails when the conv and RNN settings differ),
// else the single flag of older versions.
template <typename Ctx>
auto conv_allows_tf32(const Ctx& ctx, int) -> decltype(bool(ctx.allowTF32CuDNN(ConvOp{}))) {
  return ctx.allowTF32CuDNN(ConvOp{});
}
template <typename Ctx>
bool conv_allows_tf32(const Ctx& ctx, long) {
  return ctx.allowTF32CuDNN();
}

// Whether the float32 products of a 1x1 layer run in TF32: as the 1x1 conv it replaces does in
// cuDNN (on by default), and only for sizes cuBLAS's 32-bit arguments take and no empty
// operand (else at::mm, which follows the matmul setting).
bool pw_tf32(const at::Tensor& x, int64_t M, int64_t C, int64_t O) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  return x.scalar_type() == at::kFloat && M > 0 && C > 0 && O > 0 && M < kMax && C < kMax &&
         O < kMax && conv_allows_tf32(at::globalContext(), 0);
}

// c [m x n] = op(a) op(b), column-major (cuBLAS's convention; the callers pass row-major
// matrices as their transposes), float32 with TF32 tensor-core math.
void gemm_tf32(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
               const float* b, int64_t ldb, float* c, int64_t ldc) {
  const float alpha = 1.0f, beta = 0.0f;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      at::cuda::getCurrentCUDABlasHandle(), ta ? CUBLAS_OP_T : CUBLAS_OP_N,
      tb ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(m), static_cast<int>(n),
      static_cast<int>(k), &alpha, a, CUDA_R_32F, static_cast<int>(lda), b, CUDA_R_32F,
      static_cast<int>(ldb), &beta, c, CUDA_R_32F, static_cast<int>(ldc),
      CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
}

// z [M, O] = x2d [M, C] (rows ldx apart) w [O, C]^T.
at::Tensor pw_product(const at::Tensor& x2d, const at::Tensor& w2d) {
  const int64_t M = x2d.size(0), C = x2d.size(1), O = w2d.size(0);
  if (!pw_tf32(x2d, M, C, O)) return at::mm(x2d, w2d.t());
  at::Tensor z = at::empty({M, O}, x2d.options());
  // z^T [O x M] = w (read as [C x O]) transposed, times x2d^T ([C x M], ld = the row stride)
  gemm_tf32(true, false, O, M, C, w2d.const_data_ptr<float>(), C, x2d.const_data_ptr<float>(),
            pixel_stride(x2d), z.data_ptr<float>(), O);
  return z;
}

// dx [M, C] = dz [M, O] w [O, C], dw [O, C] = dz^T x2d (x2d's rows ldx apart).
std::tuple<at::Tensor, at::Tensor> pw_products_backward(const at::Tensor& dz,
                                                        const at::Tensor& x2d,
                                                        const at::Tensor& w2d) {
  const int64_t M = x2d.size(0), C = x2d.size(1), O = w2d.size(0);
  if (!pw_tf32(x2d, M, C, O)) return {at::mm(dz, w2d), at::mm(dz.t(), x2d)};
  at::Tensor dx = at::empty({M, C}, x2d.options()), dw = at::empty({O, C}, x2d.options());
  // dx^T [C x M] = w^T ([C x O]) dz^T ([O x M])
  gemm_tf32(false, false, C, M, O, w2d.const_data_ptr<float>(), C, dz.const_data_ptr<float>(),
            O, dx.data_ptr<float>(), C);
  // dw^T [C x O] = x2d^T ([C x M], ld = the row stride) dz ([M x O], dz^T read transposed)
  gemm_tf32(false, true, C, O, M, x2d.const_data_ptr<float>(), pixel_stride(x2d),
            dz.const_data_ptr<float>(), O, dw.data_ptr<float>(), C);
  return {dx, dw};
}

// The [K*K, C] tap-major weights of a [C, 1, K, K] depthwise weight (the generic kernels').
at::Tensor taps_by_channel(const at::Tensor& weight) {
  const int64_t C = weight.size(0), K = weight.size(2);
  return weight.reshape({C, K * K}).t().contiguous();
}

// y = depthwise conv of x (channels-last [R, H, W, C] storage) with weight ([C, 1, K, K]
// contiguous; flip: turned by 180 degrees), optionally normalised by mean / var [G, C]
// (accumulate type, contiguous; undefined: no normalisation) and eps.
void dw_conv(const at::Tensor& x, const at::Tensor& weight, bool flip, at::Tensor& y,
             const at::Tensor& mean, const at::Tensor& var, double eps, int64_t K, int64_t S,
             int64_t rows_per_group) {
  const int64_t R = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = y.size(2), OW = y.size(3);
  const bool norm = mean.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_conv", [&] {
    using A = at::acc_type<scalar_t, true>;
    auto stream = at::cuda::getCurrentCUDAStream();
    const A* mp = norm ? mean.const_data_ptr<A>() : nullptr;
    const A* vp = norm ? var.const_data_ptr<A>() : nullptr;
    const bool tiled = with_taps(K, S, [&](auto k, auto s) {
      constexpr int kK = decltype(k)::value, kS = decltype(s)::value;
      const int64_t n = R * OH * ((OW + kTile - 1) / kTile) * C;
      dw_conv_tiled_kernel<scalar_t, A, kK, kS><<<blocks_for(n), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          y.data_ptr<scalar_t>(), mp, vp, static_cast<A>(eps), R, H, W, C, OH, OW,
          rows_per_group, flip);
    });
    if (!tiled) {
      const at::Tensor wt = taps_by_channel(flip ? weight.flip({2, 3}) : weight);
      dw_conv_kernel<scalar_t, A><<<blocks_for(y.numel()), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
          mp, vp, static_cast<A>(eps), R, H, W, C, OH, OW, static_cast<int>(K),
          static_cast<int>(S), rows_per_group);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_cuda(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& mean_in,
    const at::Tensor& var_in, int64_t stride, int64_t groups, double eps, bool training) {
  check_dwconv_bn(x_in, weight, mean_in, var_in, stride, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_last(x_in);
  const int64_t R = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = weight.size(2);
  const int64_t OH = conv_out_size(H, K, stride), OW = conv_out_size(W, K, stride);
  at::Tensor y = empty_rows_last(R, C, OH, OW, x);
  const at::Tensor w = weight.contiguous();
  const auto acc = acc_dtype(x);
  at::Tensor mean_acc, var_acc;  // eval: the given statistics (undefined: training)
  if (!training) {
    mean_acc = mean_in.to(acc).contiguous();
    var_acc = var_in.to(acc).contiguous();
  }
  if (R > 0 && y.numel() > 0) {
    dw_conv(x, w, false, y, mean_acc, var_acc, eps, K, stride, R / groups);
  }
  if (!training) return {y, mean_in.clone(), var_in.clone()};
  if (y.numel() == 0) {
    at::Tensor z = at::zeros({groups, C}, x.options());
    return {y, z, z.clone()};
  }
  at::Tensor z2d = y.permute({0, 2, 3, 1}).view({R * OH * OW, C});  // y's storage
  auto [mean, var] = group_moments(z2d, groups);
  normalize(z2d, z2d, mean, var, eps, groups, /*relu=*/false);
  return {y, mean.to(x.scalar_type()), var.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> dwconv_bn_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& y_in, const at::Tensor& var, int64_t stride, int64_t groups, double eps,
    bool training) {
  check_dwconv_bn(x_in, weight, var, var, stride, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_last(x_in);
  const int64_t R = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = weight.size(2);
  const int64_t OH = conv_out_size(H, K, stride), OW = conv_out_size(W, K, stride);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({R, C, OH, OW}),
              "dwconv_bn_backward: grad_y must be [", R, ", ", C, ", ", OH, ", ", OW, "], got ",
              grad_in.sizes());
  at::Tensor dx = empty_rows_last(R, C, H, W, x);
  if (R == 0) return {dx, at::zeros_like(weight, at::MemoryFormat::Contiguous)};
  const at::Tensor dy2d = pixel_rows(grad_in);
  const at::Tensor xh2d = training ? pixel_rows(y_in) : dy2d;
  const at::Tensor dz2d = bn_input_grad(dy2d, xh2d, var, eps, groups, training, /*relu=*/false);
  const at::Tensor w = weight.contiguous();
  const bool tiled = with_taps(K, stride, [](auto, auto) {});
  const at::Tensor wt = tiled ? at::Tensor() : taps_by_channel(w);
  if (tiled && stride == 1) {
    // at stride 1 the input gradient is the same conv with the kernel flipped (P = (K-1)/2)
    const at::Tensor dz = dz2d.view({R, OH, OW, C}).permute({0, 3, 1, 2});
    dw_conv(dz, w, /*flip=*/true, dx, at::Tensor(), at::Tensor(), eps, K, 1, R);
  }
  const int64_t splits = tiled ? column_splits(R * OH, (C + kLanes - 1) / kLanes)
                               : std::max<int64_t>(1, std::min<int64_t>(256, R * OH * OW / 64));
  at::Tensor part = at::empty({K * K, splits, C}, x.options().dtype(acc_dtype(x)));
  at::Tensor dw = at::empty({C, 1, K, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "dwconv_bn_backward_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    auto stream = at::cuda::getCurrentCUDAStream();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dzp = dz2d.const_data_ptr<scalar_t>();
    if (tiled) {
      with_taps(K, stride, [&](auto k, auto s) {
        constexpr int kK = decltype(k)::value, kS = decltype(s)::value;
        if constexpr (kS == 2) {
          dw_input_grad_s2_kernel<scalar_t, A, kK><<<blocks_for(dx.numel()), kThreads, 0,
                                                     stream>>>(
              dzp, w.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), R, H, W, C, OH, OW);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        dw_weight_grad_tiled_kernel<scalar_t, A, kK, kS>
            <<<dim3((C + kLanes - 1) / kLanes, splits), dim3(kLanes, kRows), 0, stream>>>(
                xp, dzp, part.data_ptr<A>(), R, H, W, C, OH, OW, splits);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      dw_input_grad_kernel<scalar_t, A><<<blocks_for(dx.numel()), kThreads, 0, stream>>>(
          dzp, wt.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), R, H, W, C, OH, OW,
          static_cast<int>(K), static_cast<int>(stride));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dw_weight_grad_kernel<scalar_t, A><<<blocks_for(part.numel()), kThreads, 0, stream>>>(
          xp, dzp, part.data_ptr<A>(), R, H, W, C, OH, OW, static_cast<int>(K),
          static_cast<int>(stride), splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dw_weight_finish_kernel<scalar_t, A>
        <<<dim3((C + kLanes - 1) / kLanes, K * K), dim3(kLanes, kFinishRows), 0, stream>>>(
            part.const_data_ptr<A>(), dw.data_ptr<scalar_t>(), K * K, splits, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pwconv_bn_relu_cuda(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& mean_in,
    const at::Tensor& var_in, int64_t groups, double eps, bool training) {
  check_pwconv_bn_relu(x_in, weight, mean_in, var_in, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t R = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t O = weight.size(0);
  // read in place where the pixels are evenly spaced (cuBLAS takes the row stride): a
  // channel range of a channels-last tensor, as a stride-1 unit's second half, is no copy
  const at::Tensor x2d = strided_pixel_rows(x_in);
  at::Tensor z = pw_product(x2d, weight.reshape({O, C}).contiguous());
  const auto acc = acc_dtype(x_in);
  if (!training) {
    normalize(z, z, mean_in.to(acc).contiguous(), var_in.to(acc).contiguous(), eps, groups,
              /*relu=*/true);
    return {z.view({R, H, W, O}).permute({0, 3, 1, 2}), at::empty({0}, x_in.options()),
            mean_in.clone(), var_in.clone()};
  }
  at::Tensor y = at::empty_like(z);
  at::Tensor mean, var;
  if (z.size(0) > 0) {
    std::tie(mean, var) = group_moments(z, groups);
    normalize(z, y, mean, var, eps, groups, /*relu=*/true);
  } else {
    mean = at::zeros({groups, O}, x_in.options().dtype(acc));
    var = at::zeros({groups, O}, x_in.options().dtype(acc));
  }
  return {y.view({R, H, W, O}).permute({0, 3, 1, 2}), z.view({R, H, W, O}).permute({0, 3, 1, 2}),
          mean.to(x_in.scalar_type()), var.to(x_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> pwconv_bn_relu_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& y_in, const at::Tensor& xhat_in, const at::Tensor& var, int64_t groups,
    double eps, bool training) {
  check_pwconv_bn_relu(x_in, weight, var, var, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t R = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t O = weight.size(0);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({R, O, H, W}),
              "pwconv_bn_relu_backward: grad_y must be [", R, ", ", O, ", ", H, ", ", W,
              "], got ", grad_in.sizes());
  // x and grad_y read in place where their pixels are evenly spaced (the forward's comment)
  const at::Tensor dy2d = strided_pixel_rows(grad_in);
  const at::Tensor xh2d = pixel_rows(training ? xhat_in : y_in);
  const at::Tensor dz = bn_input_grad(dy2d, xh2d, var, eps, groups, training, /*relu=*/true);
  const at::Tensor x2d = strided_pixel_rows(x_in);
  auto [dx, dw] = pw_products_backward(dz, x2d, weight.reshape({O, C}).contiguous());
  return {dx.view({R, H, W, C}).permute({0, 3, 1, 2}), dw.view({O, C, 1, 1})};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastshift, CUDA, m) {
  m.impl("dwconv_bn", &dwconv_bn_cuda);
  m.impl("dwconv_bn_backward", &dwconv_bn_backward_cuda);
  m.impl("pwconv_bn_relu", &pwconv_bn_relu_cuda);
  m.impl("pwconv_bn_relu_backward", &pwconv_bn_relu_backward_cuda);
}

}  // namespace fastshift
