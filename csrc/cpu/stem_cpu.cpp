// The network's stem on the CPU: a k x k conv (odd k, padding k / 2, stride s, no bias, few
// input channels: 3 -> 16 at stride 2 in the SPOS space) + BatchNorm without affine + ReLU,
// forward and backward in one op each (stem_conv_bn_relu / stem_conv_bn_relu_backward).
//
// Why an op of its own: the stem ran as oneDNN's conv, ATen's batch norm and a ReLU (about 1.4
// ms of a 62 ms training step at batch 64, 1.3 ms of a 30 ms validation batch of 128), and
// both of those split their reductions by thread count, so a training step's values changed in
// the last bits with torch.set_num_threads while every fastshift op gave the same bits. Here
// the work is split in fixed chunks of kRows output rows and every sum (batch moments, the BN
// backward's two sums, the weight gradient) adds its chunk partials in chunk order: the values
// depend on the shapes only (test_stem_is_thread_count_invariant). The networks run it in
// training (fastshift.blocks.run_stem); in eval the modules are faster (oneDNN's forward,
// itself thread-count invariant) and the op's eval mode serves direct calls. GCC / Clang
// vector extensions (the builds this package supports).
//
// Layout: x is read channels-last ([B, H, W, C]); the weight as wt [k, k, C, Op] (output
// channel fastest, Op = O rounded up to a register block of kBlock, zero padded), so a pixel's
// output channels are kBlock-wide vector accumulators fed by broadcasts of its patch's values.
// z, the conv's raw output (kept in training for the backward), and y are channels-last.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../block_checks.h"
#include "block_kernels.h"
#include "multiversion.h"

namespace fastshift {
namespace {

constexpr int64_t kRows = 2;     // output rows per chunk (fixed: results do not depend on the
                                 // thread count)
constexpr int64_t kBlock = 16;   // output channels per register block

// kBlock lanes as one GCC vector (one 64-byte register for float32 at x86-64-v4; the compiler
// splits it for narrower levels and float64): written out so the accumulators stay in
// registers (as arrays indexed in loops they were split into scalars: 7x slower).
// (A typedef in a class template: GCC ignores the attribute on an alias template's
// dependent type.)
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kBlock * sizeof(T))));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, const Vec<T>& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// The first n (<= kBlock) lanes of v to p.
template <typename T>
inline void store_n(T* p, const Vec<T>& v, int64_t n) {
  if (n == kBlock) {
    store(p, v);
    return;
  }
  T a[kBlock];
  store(a, v);
  std::copy(a, a + n, p);
}

struct StemShape {
  int64_t B, C, H, W, O, Op, k, s, pad, Ho, Wo;
  int64_t pixels() const { return B * Ho * Wo; }
  int64_t chunks() const { return (B * Ho + kRows - 1) / kRows; }
  int64_t taps() const { return k * k * C; }
};

// The output pixels [p0, p1) of chunk q (whole output rows).
inline void chunk_pixels(const StemShape& s, int64_t q, int64_t& p0, int64_t& p1) {
  p0 = q * kRows * s.Wo;
  p1 = std::min(s.B * s.Ho, (q + 1) * kRows) * s.Wo;
}

// The output columns [lo, hi) whose tap kw lies inside the input row.
inline void valid_columns(const StemShape& s, int64_t kw, int64_t& lo, int64_t& hi) {
  const int64_t off = kw - s.pad;  // iw = ow * s + off
  lo = off >= 0 ? 0 : (-off + s.s - 1) / s.s;
  hi = std::min(s.Wo, s.W - off > 0 ? (s.W - off - 1) / s.s + 1 : 0);
  hi = std::max(hi, lo);
}

// Chunk q: training, z = the conv and sum = its per-channel sums; eval, y = relu((conv -
// mean) * rstd) directly. KK / CC: the kernel size and input channels when known at compile
// time (0: read from s), so the tap loops unroll.
template <typename T, int KK, int CC>
void forward_chunk(const T* x, const T* wt, const StemShape& s, int64_t q, bool training,
                   const T* mean, const T* rstd, T* out, T* sum) {
  const int64_t k = KK ? KK : s.k, C = CC ? CC : s.C;
  const Vec<T> zero = {};
  for (int64_t ob = 0; ob < s.Op; ob += kBlock) {
    const int64_t n = std::min(kBlock, s.O - ob);
    Vec<T> part = {}, m = {}, r = {};
    if (!training && n == kBlock) {
      m = load(mean + ob);
      r = load(rstd + ob);
    }
    for (int64_t row = q * kRows; row < std::min(s.B * s.Ho, (q + 1) * kRows); ++row) {
      const int64_t b = row / s.Ho, oh = row % s.Ho;
      for (int64_t ow = 0; ow < s.Wo; ++ow) {
        Vec<T> acc = {};
        for (int64_t kh = 0; kh < k; ++kh) {
          const int64_t ih = oh * s.s - s.pad + kh;
          if (ih < 0 || ih >= s.H) continue;
          for (int64_t kw = 0; kw < k; ++kw) {
            const int64_t iw = ow * s.s - s.pad + kw;
            if (iw < 0 || iw >= s.W) continue;
            const T* xp = x + ((b * s.H + ih) * s.W + iw) * C;
            const T* wp = wt + (kh * k + kw) * C * s.Op + ob;
            for (int64_t c = 0; c < C; ++c) acc += xp[c] * load(wp + c * s.Op);
          }
        }
        T* o = out + (row * s.Wo + ow) * s.O + ob;
        if (training) {
          part += acc;
        } else if (n == kBlock) {
          acc = (acc - m) * r;
          acc = acc < zero ? zero : acc;  // NaN kept, as torch.relu
        } else {
          T a[kBlock];
          store(a, acc);
          for (int64_t j = 0; j < n; ++j)
            a[j] = std::max((a[j] - mean[ob + j]) * rstd[ob + j], T(0));
          acc = load(a);
        }
        store_n(o, acc, n);
      }
    }
    if (training) store_n(sum + ob, part, n);
  }
}

// The per-element passes over chunk q's [pixels, O] values run kBlock channels at a time as
// vectors where O is a multiple of kBlock (the SPOS stem's 16), else channel by channel; the
// same arithmetic either way (each lane's sum takes the pixels in order).

// Chunk q of z: sq = its per-channel sums of (z - mean)^2.
template <typename T>
void deviations_chunk(const T* z, const StemShape& s, int64_t q, const T* mean, T* sq) {
  int64_t p0, p1;
  chunk_pixels(s, q, p0, p1);
  if (s.O == s.Op) {
    for (int64_t ob = 0; ob < s.O; ob += kBlock) {
      const Vec<T> m = load(mean + ob);
      Vec<T> acc = {};
      for (int64_t p = p0; p < p1; ++p) {
        const Vec<T> d = load(z + p * s.O + ob) - m;
        acc += d * d;
      }
      store(sq + ob, acc);
    }
    return;
  }
  std::fill(sq, sq + s.O, T(0));
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t o = 0; o < s.O; ++o) {
      const T d = z[p * s.O + o] - mean[o];
      sq[o] += d * d;
    }
}

// y = relu((z - mean) * rstd) over chunk q.
template <typename T>
void normalize_chunk(const T* z, const StemShape& s, int64_t q, const T* mean, const T* rstd,
                     T* y) {
  int64_t p0, p1;
  chunk_pixels(s, q, p0, p1);
  if (s.O == s.Op) {
    const Vec<T> zero = {};
    for (int64_t ob = 0; ob < s.O; ob += kBlock) {
      const Vec<T> m = load(mean + ob), r = load(rstd + ob);
      for (int64_t p = p0; p < p1; ++p) {
        const Vec<T> v = (load(z + p * s.O + ob) - m) * r;
        store(y + p * s.O + ob, v < zero ? zero : v);  // NaN kept, as torch.relu
      }
    }
    return;
  }
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t o = 0; o < s.O; ++o)
      y[p * s.O + o] = std::max((z[p * s.O + o] - mean[o]) * rstd[o], T(0));
}

// The BN backward's sums over chunk q: s1 = sum of g, s2 = sum of g * xhat (g = grad_y masked
// by y > 0, xhat = (z - mean) * rstd).
template <typename T>
void grad_sums_chunk(const T* gy, const T* y, const T* z, const StemShape& s, int64_t q,
                     const T* mean, const T* rstd, T* s1, T* s2) {
  int64_t p0, p1;
  chunk_pixels(s, q, p0, p1);
  if (s.O == s.Op) {
    const Vec<T> zero = {};
    for (int64_t ob = 0; ob < s.O; ob += kBlock) {
      const Vec<T> m = load(mean + ob), r = load(rstd + ob);
      Vec<T> a1 = {}, a2 = {};
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t i = p * s.O + ob;
        const Vec<T> g = load(y + i) > zero ? load(gy + i) : zero;
        a1 += g;
        a2 += g * (load(z + i) - m) * r;
      }
      store(s1 + ob, a1);
      store(s2 + ob, a2);
    }
    return;
  }
  std::fill(s1, s1 + s.O, T(0));
  std::fill(s2, s2 + s.O, T(0));
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t o = 0; o < s.O; ++o) {
      const int64_t i = p * s.O + o;
      const T g = y[i] > T(0) ? gy[i] : T(0);
      s1[o] += g;
      s2[o] += g * (z[i] - mean[o]) * rstd[o];
    }
}

// Chunk q's weight-gradient part dw [taps, Op]: the sum over its pixels of their patch values
// times dz, the conv output's gradient (training rstd * (g - m1 - xhat * m2), eval rstd * g),
// written for the chunk into dz [pixels of the chunk, Op] first (lanes past O zero). Tap by
// tap, C accumulators of kBlock lanes each that share a pixel's dz load.
template <typename T, int KK, int CC>
void weight_grad_chunk(const T* x, const T* gy, const T* y, const T* z, const StemShape& s,
                       int64_t q, bool training, const T* mean, const T* rstd, const T* m1,
                       const T* m2, T* dz, T* dw) {
  const int64_t k = KK ? KK : s.k, C = CC ? CC : s.C;
  int64_t p0, p1;
  chunk_pixels(s, q, p0, p1);
  if (s.O == s.Op) {
    const Vec<T> zero = {};
    for (int64_t ob = 0; ob < s.O; ob += kBlock) {
      const Vec<T> m = load(mean + ob), r = load(rstd + ob);
      const Vec<T> c1 = training ? load(m1 + ob) : zero, c2 = training ? load(m2 + ob) : zero;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t i = p * s.O + ob;
        const Vec<T> g = load(y + i) > zero ? load(gy + i) : zero;
        store(dz + (p - p0) * s.Op + ob,
              training ? r * (g - c1 - (load(z + i) - m) * r * c2) : r * g);
      }
    }
  }
  for (int64_t p = s.O == s.Op ? p1 : p0; p < p1; ++p) {
    T* d = dz + (p - p0) * s.Op;
    for (int64_t o = 0; o < s.O; ++o) {
      const int64_t i = p * s.O + o;
      const T g = y[i] > T(0) ? gy[i] : T(0);
      d[o] = training ? rstd[o] * (g - m1[o] - (z[i] - mean[o]) * rstd[o] * m2[o])
                      : rstd[o] * g;
    }
    for (int64_t o = s.O; o < s.Op; ++o) d[o] = T(0);
  }
  const int64_t row0 = q * kRows, row1 = std::min(s.B * s.Ho, (q + 1) * kRows);
  for (int64_t kh = 0; kh < k; ++kh)
    for (int64_t kw = 0; kw < k; ++kw) {
      int64_t lo, hi;
      valid_columns(s, kw, lo, hi);
      for (int64_t ob = 0; ob < s.Op; ob += kBlock)
        for (int64_t c0 = 0; c0 < C; c0 += 3) {
          // three input channels at a time (the SPOS stem's C), sharing each dz load
          const int64_t nc = std::min<int64_t>(3, C - c0);
          Vec<T> a0 = {}, a1 = {}, a2 = {};
          for (int64_t row = row0; row < row1; ++row) {
            const int64_t b = row / s.Ho, oh = row % s.Ho, ih = oh * s.s - s.pad + kh;
            if (ih < 0 || ih >= s.H) continue;
            const int64_t xrow = (b * s.H + ih) * s.W;
            const T* dr = dz + ((row - row0) * s.Wo) * s.Op + ob;
            for (int64_t ow = lo; ow < hi; ++ow) {
              const T* xp = x + (xrow + ow * s.s + kw - s.pad) * C + c0;
              const Vec<T> d = load(dr + ow * s.Op);
              a0 += xp[0] * d;
              if (nc > 1) a1 += xp[1] * d;
              if (nc > 2) a2 += xp[2] * d;
            }
          }
          T* dp = dw + ((kh * k + kw) * C + c0) * s.Op + ob;
          store(dp, a0);
          if (nc > 1) store(dp + s.Op, a1);
          if (nc > 2) store(dp + 2 * s.Op, a2);
        }
    }
}

template <typename T>
void stem_forward(const T* x, const T* wt, const StemShape& s, int64_t q, bool training,
                  const T* mean, const T* rstd, T* out, T* sum) {
  if (s.k == 3 && s.C == 3)
    forward_chunk<T, 3, 3>(x, wt, s, q, training, mean, rstd, out, sum);
  else
    forward_chunk<T, 0, 0>(x, wt, s, q, training, mean, rstd, out, sum);
}

template <typename T>
void stem_weight_grad(const T* x, const T* gy, const T* y, const T* z, const StemShape& s,
                      int64_t q, bool training, const T* mean, const T* rstd, const T* m1,
                      const T* m2, T* dz, T* dw) {
  if (s.k == 3 && s.C == 3)
    weight_grad_chunk<T, 3, 3>(x, gy, y, z, s, q, training, mean, rstd, m1, m2, dz, dw);
  else
    weight_grad_chunk<T, 0, 0>(x, gy, y, z, s, q, training, mean, rstd, m1, m2, dz, dw);
}

// The multiversioned entry points (each level compiled whole: multiversion.h).
#define FASTSHIFT_STEM_KERNELS(T)                                                              \
  FASTSHIFT_MULTIVERSION void k_stem_forward(const T* x, const T* wt, const StemShape& s,      \
                                             int64_t q, bool training, const T* mean,         \
                                             const T* rstd, T* out, T* sum) {                 \
    stem_forward<T>(x, wt, s, q, training, mean, rstd, out, sum);                             \
  }                                                                                            \
  FASTSHIFT_MULTIVERSION void k_stem_weight_grad(const T* x, const T* gy, const T* y,         \
                                                 const T* z, const StemShape& s, int64_t q,   \
                                                 bool training, const T* mean, const T* rstd, \
                                                 const T* m1, const T* m2, T* dz, T* dw) {    \
    stem_weight_grad<T>(x, gy, y, z, s, q, training, mean, rstd, m1, m2, dz, dw);             \
  }                                                                                            \
  FASTSHIFT_MULTIVERSION void k_stem_passes(const T* z, const StemShape& s, int64_t q,        \
                                            int pass, const T* mean, const T* rstd, T* out,   \
                                            T* out2, const T* gy, const T* y) {               \
    if (pass == 0) deviations_chunk<T>(z, s, q, mean, out);                                   \
    else if (pass == 1) normalize_chunk<T>(z, s, q, mean, rstd, out);                         \
    else grad_sums_chunk<T>(gy, y, z, s, q, mean, rstd, out, out2);                           \
  }
FASTSHIFT_STEM_KERNELS(float)
FASTSHIFT_STEM_KERNELS(double)
#undef FASTSHIFT_STEM_KERNELS

StemShape check_stem(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                     const char* op) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, op, ": x must be [B, C, H, W] and weight "
              "[O, C, k, k], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight has ", weight.size(1),
              " input channels, x has ", x.size(1));
  TORCH_CHECK(weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1, op,
              ": the kernel must be square of odd size, got ", weight.size(2), "x",
              weight.size(3));
  TORCH_CHECK(stride >= 1, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              op, ": x and weight must be both float32 or both float64, got ", x.scalar_type(),
              " and ", weight.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": CPU tensors only");
  StemShape s;
  s.B = x.size(0);
  s.C = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  s.O = weight.size(0);
  s.Op = (s.O + kBlock - 1) / kBlock * kBlock;
  s.k = weight.size(2);
  s.s = stride;
  s.pad = s.k / 2;
  s.Ho = conv_out_size(s.H, s.k, s.s);
  s.Wo = conv_out_size(s.W, s.k, s.s);
  TORCH_CHECK(s.H + 2 * s.pad >= s.k && s.W + 2 * s.pad >= s.k, op, ": the input ", s.H, "x",
              s.W, " is smaller than the kernel");
  return s;
}

void check_stem_stats(const at::Tensor& t, const StemShape& s, const at::Tensor& x,
                      const char* op, const char* name) {
  TORCH_CHECK(t.numel() == s.O && t.scalar_type() == x.scalar_type() && t.device().is_cpu(),
              op, ": ", name, " must hold ", s.O, " values of x's dtype on the CPU, got ",
              t.sizes(), " ", t.scalar_type());
}

// wt [k, k, C, Op] from weight [O, C, k, k], zero padded.
at::Tensor stem_weight(const at::Tensor& weight, const StemShape& s) {
  at::Tensor wt = at::zeros({s.k, s.k, s.C, s.Op}, weight.options());
  wt.narrow(3, 0, s.O).copy_(weight.permute({2, 3, 1, 0}));
  return wt;
}

// Sums the [chunks, n] partials into [n] in chunk order (in double).
template <typename T>
std::vector<double> chunk_sum(const std::vector<T>& parts, int64_t chunks, int64_t n) {
  std::vector<double> total(n, 0.0);
  for (int64_t q = 0; q < chunks; ++q)
    for (int64_t i = 0; i < n; ++i) total[i] += double(parts[q * n + i]);
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stem_conv_bn_relu_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& mean_in,
    const at::Tensor& var_in, int64_t stride, double eps, bool training) {
  const char* op = "stem_conv_bn_relu";
  const StemShape s = check_stem(x_in, weight, stride, op);
  if (!training) {
    check_stem_stats(mean_in, s, x_in, op, "mean");
    check_stem_stats(var_in, s, x_in, op, "var");
  }
  const at::Tensor x = rows_last(x_in);
  at::Tensor y = empty_rows_last(s.B, s.O, s.Ho, s.Wo, x);
  at::Tensor z =
      training ? empty_rows_last(s.B, s.O, s.Ho, s.Wo, x) : at::empty({0}, x.options());
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stem_conv_bn_relu", [&] {
    using T = scalar_t;
    const at::Tensor wt = stem_weight(weight, s);
    const int64_t Q = s.chunks(), N = s.pixels();
    if (!training) {
      mean = mean_in.reshape({s.O}).clone();
      var = var_in.reshape({s.O}).clone();
      const std::vector<T> rstd = cpu_block::rstd_of<T>(var.const_data_ptr<T>(), s.O, eps);
      at::parallel_for(0, Q, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q)
          k_stem_forward(x.const_data_ptr<T>(), wt.const_data_ptr<T>(), s, q, false,
                         mean.const_data_ptr<T>(), rstd.data(), y.data_ptr<T>(), nullptr);
      });
      return;
    }
    mean = at::zeros({s.O}, x.options());
    var = at::zeros({s.O}, x.options());
    if (N == 0) return;
    std::vector<T> parts(Q * s.O);
    at::parallel_for(0, Q, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q)
        k_stem_forward(x.const_data_ptr<T>(), wt.const_data_ptr<T>(), s, q, true, nullptr,
                       nullptr, z.data_ptr<T>(), parts.data() + q * s.O);
    });
    const std::vector<double> sum = chunk_sum(parts, Q, s.O);
    T* m = mean.data_ptr<T>();
    for (int64_t o = 0; o < s.O; ++o) m[o] = T(sum[o] / double(N));
    at::parallel_for(0, Q, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q)
        k_stem_passes(z.const_data_ptr<T>(), s, q, 0, m, nullptr, parts.data() + q * s.O,
                      nullptr, nullptr, nullptr);
    });
    const std::vector<double> sq = chunk_sum(parts, Q, s.O);
    T* v = var.data_ptr<T>();
    for (int64_t o = 0; o < s.O; ++o) v[o] = T(sq[o] / double(N));
    const std::vector<T> rstd = cpu_block::rstd_of<T>(v, s.O, eps);
    at::parallel_for(0, Q, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q)
        k_stem_passes(z.const_data_ptr<T>(), s, q, 1, m, rstd.data(), y.data_ptr<T>(), nullptr,
                      nullptr, nullptr);
    });
  });
  return {y, z, mean, var};
}

at::Tensor stem_conv_bn_relu_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x_in,
                                          const at::Tensor& weight, const at::Tensor& y_in,
                                          const at::Tensor& z_in, const at::Tensor& mean_in,
                                          const at::Tensor& var_in, int64_t stride, double eps,
                                          bool training) {
  const char* op = "stem_conv_bn_relu_backward";
  const StemShape s = check_stem(x_in, weight, stride, op);
  const std::vector<int64_t> out_shape{s.B, s.O, s.Ho, s.Wo};
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(out_shape) && y_in.sizes() == grad_y.sizes(),
              op, ": grad_y and y must be ", at::IntArrayRef(out_shape), ", got ",
              grad_y.sizes(), " and ", y_in.sizes());
  TORCH_CHECK(!training || z_in.sizes() == grad_y.sizes(), op, ": z (the forward's raw conv "
              "output, kept in training) must be ", grad_y.sizes(), ", got ", z_in.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x_in.scalar_type(), op, ": grad_y must have x's dtype");
  check_stem_stats(mean_in, s, x_in, op, "mean");
  check_stem_stats(var_in, s, x_in, op, "var");
  const at::Tensor x = rows_last(x_in), gy = rows_last(grad_y), y = rows_last(y_in);
  const at::Tensor z = training ? rows_last(z_in) : z_in;
  at::Tensor dw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stem_conv_bn_relu_backward", [&] {
    using T = scalar_t;
    const int64_t Q = s.chunks(), N = s.pixels();
    const at::Tensor mean = mean_in.reshape({s.O}).contiguous();
    const at::Tensor var = var_in.reshape({s.O}).contiguous();
    const std::vector<T> rstd = cpu_block::rstd_of<T>(var.const_data_ptr<T>(), s.O, eps);
    std::vector<T> m1(s.Op, T(0)), m2(s.Op, T(0));
    if (training && N > 0) {
      std::vector<T> p1(Q * s.O), p2(Q * s.O);
      at::parallel_for(0, Q, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q)
          k_stem_passes(z.const_data_ptr<T>(), s, q, 2, mean.const_data_ptr<T>(), rstd.data(),
                        p1.data() + q * s.O, p2.data() + q * s.O, gy.const_data_ptr<T>(),
                        y.const_data_ptr<T>());
      });
      const std::vector<double> s1 = chunk_sum(p1, Q, s.O), s2 = chunk_sum(p2, Q, s.O);
      for (int64_t o = 0; o < s.O; ++o) {
        m1[o] = T(s1[o] / double(N));
        m2[o] = T(s2[o] / double(N));
      }
    }
    const int64_t n = s.taps() * s.Op;
    std::vector<T> parts(Q * n);
    at::parallel_for(0, Q, 1, [&](int64_t q0, int64_t q1) {
      std::vector<T> dz(kRows * s.Wo * s.Op);
      for (int64_t q = q0; q < q1; ++q)
        k_stem_weight_grad(x.const_data_ptr<T>(), gy.const_data_ptr<T>(), y.const_data_ptr<T>(),
                           training ? z.const_data_ptr<T>() : nullptr, s, q, training,
                           mean.const_data_ptr<T>(), rstd.data(), m1.data(), m2.data(),
                           dz.data(), parts.data() + q * n);
    });
    const std::vector<double> total = chunk_sum(parts, Q, n);
    at::Tensor wt = at::empty({s.k, s.k, s.C, s.Op}, x.options());
    T* w = wt.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) w[i] = T(total[i]);
    dw = wt.narrow(3, 0, s.O).permute({3, 2, 0, 1}).contiguous();
  });
  return dw;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastshift, CPU, m) {
  m.impl("stem_conv_bn_relu", &stem_conv_bn_relu_cpu);
  m.impl("stem_conv_bn_relu_backward", &stem_conv_bn_relu_backward_cpu);
}

}  // namespace fastshift
