// CPU bodies of the fused mixed-choice block ops: depthwise conv + BatchNorm (dwconv_bn) and
// 1x1 conv + BatchNorm + ReLU (pwconv_bn_relu), forward and backward, for G row groups that
// each have their own statistics (the rows of G subnets stacked along the batch).
//
// Layout: activations are channels-last, so a pixel's C channels are contiguous; every inner
// loop runs over a block of channels held in registers (one cache line: 16 floats / 8
// doubles). Work is split over fixed row chunks (independent of the thread count), each chunk
// inside one group, and partial sums are reduced in chunk order: results are deterministic.
//
// Formulas (per group g and channel c, N = rows of g times output pixels):
//   conv:     z[r,o,c]  = sum_t x[r, o*S - P + t, c] * w[c, t]       (t over the k x k taps)
//   BN:       mean = sum z / N, var = sum z^2 / N - mean^2 (biased, accumulated in double),
//             xhat = (z - mean) * rstd, rstd = 1 / sqrt(var + eps)  (eval: given mean, var)
//   backward: dz = rstd * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N)  (eval: dy * rstd)
//             dx[r,i,c] = sum_t dz[r, (i + P - t) / S, c] * w[c, t]    (where divisible)
//             dw[c,t]   = sum_{r,o} x[r, o*S - P + t, c] * dz[r,o,c]
//   ReLU (pwconv_bn_relu): y = max(xhat, 0) (NaN kept), dy is masked by xhat > 0 first.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "../block_checks.h"
#include "block_kernels.h"
#include "shuffle_kernels.h"

namespace fastshift {
namespace cpu_block {
namespace {

// For every group g and channel c of per-chunk double sums s1, s2 ([chunks, C]): the group's
// chunks added in order, divided by `count` (0 for an empty group), handed to
// f(g * C + c, mean of s1, mean of s2). The chunks are the outer loop, so each step reads
// one contiguous [C] row (vectorised) instead of a column at stride C; every channel's terms
// are still added in chunk order, the same sums bit for bit.
template <typename F>
void group_means(const RowChunks& ch, int64_t C, const std::vector<double>& s1,
                 const std::vector<double>& s2, double count, const F& f) {
  std::vector<double> s(C), q(C);
  for (int64_t g = 0; g < ch.groups; ++g) {
    std::fill(s.begin(), s.end(), 0.0);
    std::fill(q.begin(), q.end(), 0.0);
    for (int64_t j = 0; j < ch.per_group; ++j) {
      const double* r1 = s1.data() + (g * ch.per_group + j) * C;
      const double* r2 = s2.data() + (g * ch.per_group + j) * C;
      for (int64_t c = 0; c < C; ++c) {
        s[c] += r1[c];
        q[c] += r2[c];
      }
    }
    for (int64_t c = 0; c < C; ++c)
      f(g * C + c, count > 0 ? s[c] / count : 0.0, count > 0 ? q[c] / count : 0.0);
  }
}

// Per-group mean and biased variance [G, C] from per-chunk double sums over `count` values
// per group.
template <typename T>
void reduce_moments(const RowChunks& ch, int64_t C, const std::vector<double>& sum,
                    const std::vector<double>& sq, double count, T* mean, T* var) {
  group_means(ch, C, sum, sq, count, [&](int64_t i, double m, double q) {
    mean[i] = static_cast<T>(m);
    var[i] = static_cast<T>(std::max(q - m * m, 0.0));
  });
}

// Per-chunk double sums of the BN backward ([chunks, C] each, channel_sums modes 1 / 2): of dy'
// and of dy' * xhat.
struct GradSums {
  std::vector<double> g, gx;
  GradSums(int64_t chunks, int64_t C) : g(chunks * C, 0.0), gx(chunks * C, 0.0) {}
};

// Training-mode gradient statistics from the sums: a = sum(dy')/N and b = sum(dy' xhat)/N per
// [G, C], the chunks of a group added in order.
template <typename T>
void reduce_grad_sums(const RowChunks& ch, int64_t C, const GradSums& sums, double count,
                      std::vector<T>& a, std::vector<T>& b) {
  a.assign(ch.groups * C, T(0));
  b.assign(ch.groups * C, T(0));
  group_means(ch, C, sums.g, sums.gx, count, [&](int64_t i, double mg, double mgx) {
    a[i] = static_cast<T>(mg);
    b[i] = static_cast<T>(mgx);
  });
}

// Training-mode gradient statistics in one pass over dy and xhat. With `shift` / `scale`
// ([G, C]), `xhat` is a raw output read through their map. `ldy`: dy's pixel stride (0: C;
// its image stride is then pixels * ldy; xhat is dense).
template <typename T>
void grad_stats(const RowChunks& ch, bool relu, const T* dy, const T* xhat, int64_t pixels,
                int64_t C, double count, std::vector<T>& a, std::vector<T>& b,
                const T* shift = nullptr, const T* scale = nullptr, int64_t ldy = 0) {
  GradSums sums(ch.count(), C);
  const int64_t py = ldy ? ldy : C;
  for_chunks(ch, [&](int64_t i) {
    const int64_t g = ch.group(i);
    const InputMap<T> map{shift ? shift + g * C : nullptr, scale ? scale + g * C : nullptr, false};
    for (int64_t r = ch.begin(i); r < ch.end(i); ++r)
      k_grad_moments(relu, dy + r * pixels * py, xhat + r * pixels * C, pixels, C,
                     sums.g.data() + i * C, sums.gx.data() + i * C, map, ldy);
  });
  reduce_grad_sums(ch, C, sums, count, a, b);
}

// Depthwise weight layouts the kernels read, from w [C, K*K] (weight [C, 1, K, K] made dense),
// written as [taps, C] rows into `out`:
//   forward:          row t = kh * K + kw holds w[:, t];
//   input gradient:   stride 2: for tap parities (tau_h, tau_w) in the order (0,0), (0,1),
//                     (1,0), (1,1), the taps tau, tau + 2, ... reversed, as [M_h * M_w, C]
//                     rows, stacked (dw_input_grad_s2); any other stride: the taps reversed,
//                     row t holds w[:, K*K - 1 - t].
template <typename T>
void forward_taps(const T* w, int64_t C, int64_t K, T* out) {
  for (int64_t t = 0; t < K * K; ++t)
    for (int64_t c = 0; c < C; ++c) out[t * C + c] = w[c * K * K + t];
}

template <typename T>
void input_grad_taps(const T* w, int64_t C, int64_t K, int64_t stride, T* out) {
  if (stride != 2) {
    for (int64_t t = 0; t < K * K; ++t)
      for (int64_t c = 0; c < C; ++c) out[t * C + c] = w[c * K * K + K * K - 1 - t];
    return;
  }
  int64_t row = 0;
  for (int64_t th = 0; th < 2; ++th)
    for (int64_t tw = 0; tw < 2; ++tw) {
      const int64_t mh = parity_taps(K, th), mw = parity_taps(K, tw);
      for (int64_t a = 0; a < mh; ++a)
        for (int64_t b = 0; b < mw; ++b, ++row) {
          const int64_t t = (th + 2 * (mh - 1 - a)) * K + tw + 2 * (mw - 1 - b);
          for (int64_t c = 0; c < C; ++c) out[row * C + c] = w[c * K * K + t];
        }
    }
}

// Rows of input_grad_taps: K*K, or the four parity sub-kernels' (also at most K*K).
inline int64_t input_grad_tap_rows(int64_t K, int64_t stride) {
  if (stride != 2) return K * K;
  int64_t n = 0;
  for (int64_t th = 0; th < 2; ++th)
    for (int64_t tw = 0; tw < 2; ++tw) n += parity_taps(K, th) * parity_taps(K, tw);
  return n;
}

// The depthwise weight gradient is summed per weight slice (a fixed run of consecutive row
// chunks, at most kWeightSlices per call, independent of the thread count), then the slices
// are added in order: deterministic, with kWeightSlices * K*K*C partial sums instead of one
// set per chunk.
constexpr int64_t kWeightSlices = 8;

// ---------------------------------------------------------------------------------------------
// dwconv_bn

// The [G, C] InputMap of group g (null arrays: no map).
template <typename T>
inline InputMap<T> group_map(const T* shift, const T* scale, bool relu, int64_t g, int64_t C) {
  if (shift == nullptr) return {};
  return {shift + g * C, scale + g * C, relu};
}

// Depthwise conv + BN forward over channels-last rows (x at its pixel stride s.xs(), y dense):
// y = (conv(h(x)) - mean) * rstd with h the per-group input map (in_shift / in_scale [G, C],
// null: none). Training: the batch
// moments go to mean / var [G, C], then one normalising pass; eval: mean / var are read and
// the normalisation is fused into the conv's store.
template <typename T>
void dw_layer_forward(const RowChunks& ch, const DwShape& s, const T* xp, const T* weight, T* yp,
                      const T* in_shift, const T* in_scale, bool in_relu, bool training,
                      double eps, T* mean, T* var) {
  const int64_t C = s.C, K = s.K;
  const std::unique_ptr<T[]> wt = scratch<T>(K * K * C);  // [k*k, C]
  forward_taps(weight, C, K, wt.get());
  const int64_t in_img = s.H * s.W * s.xs(), out_img = s.OH * s.OW * C;
  const int64_t pad_img = padded_h(s) * padded_w(s) * C;
  if (!training) {
    const std::vector<T> rstd = rstd_of<T>(var, ch.groups * C, eps);
    for_chunks_scratch<T>(ch, pad_img, [&](int64_t i, T* pad) {
      const int64_t g = ch.group(i);
      const InputMap<T> map = group_map(in_shift, in_scale, in_relu, g, C);
      for (int64_t r = ch.begin(i); r < ch.end(i); ++r)
        k_dw_forward(xp + r * in_img, wt.get(), yp + r * out_img, s, mean + g * C,
                     rstd.data() + g * C, pad, map);
    });
    return;
  }
  std::vector<double> sum(ch.count() * C, 0.0), sq(ch.count() * C, 0.0);
  for_chunks_scratch<T>(ch, pad_img, [&](int64_t i, T* pad) {
    const InputMap<T> map = group_map(in_shift, in_scale, in_relu, ch.group(i), C);
    for (int64_t r = ch.begin(i); r < ch.end(i); ++r) {
      k_dw_forward(xp + r * in_img, wt.get(), yp + r * out_img, s, nullptr, nullptr, pad, map);
      k_moments(yp + r * out_img, s.OH * s.OW, C, sum.data() + i * C, sq.data() + i * C);
    }
  });
  reduce_moments<T>(ch, C, sum, sq, double(ch.rows_per_group * s.OH * s.OW), mean, var);
  const std::vector<T> rstd = rstd_of<T>(var, ch.groups * C, eps);
  for_chunks(ch, [&](int64_t i) {
    const int64_t g = ch.group(i);
    for (int64_t r = ch.begin(i); r < ch.end(i); ++r)
      k_normalize(false, yp + r * out_img, yp + r * out_img, s.OH * s.OW, C, mean + g * C,
                  rstd.data() + g * C);
  });
}

// Depthwise conv + BN backward over channels-last rows. gp: dL/dy; yp: xhat (read in training
// only); rstd [G, C]; xp: the input, read through its map (in_*) as in the forward, at its
// pixel stride s.xs() (dense where in_sums is given); dx is written dense.
// Writes dL/dh(x) to dxp and the weight gradient [C, K*K] to dwp. in_sums (training, input
// with a ReLU map: a lazy 1x1 layer's raw output): also adds that layer's BN-backward sums
// (ReLU-masked dL/dh(x), and it times xhat) per chunk while each image of dL/dh(x) is in
// cache, the same sums grad_stats would take in a pass of its own.
template <typename T>
void dw_layer_backward(const RowChunks& ch, const DwShape& s, const T* gp, const T* xp,
                       const T* in_shift, const T* in_scale, bool in_relu, const T* yp,
                       const T* rstd, const T* weight, bool training, T* dxp, T* dwp,
                       GradSums* in_sums = nullptr) {
  const int64_t C = s.C, K = s.K, taps = K * K * C;
  TORCH_CHECK(in_sums == nullptr || s.xs() == C, "dw_layer_backward: a mapped input is dense");
  const std::unique_ptr<T[]> wflip = scratch<T>(input_grad_tap_rows(K, s.S) * C);
  input_grad_taps(weight, C, K, s.S, wflip.get());
  const int64_t in_img = s.H * s.W * C, out_img = s.OH * s.OW * C, pixels = s.OH * s.OW;
  const int64_t x_img = s.H * s.W * s.xs();
  const int64_t pad_img = std::max(padded_h(s) * padded_w(s) * C, input_grad_scratch(s));
  const int64_t slices = std::min(ch.count(), kWeightSlices);
  std::vector<T> a, b;
  if (training)
    grad_stats<T>(ch, false, gp, yp, pixels, C, double(ch.rows_per_group * pixels), a, b);
  const std::unique_ptr<T[]> dw_part = scratch<T>(std::max<int64_t>(slices, 1) * taps);
  parallel_ranges(slices, [&] { return scratch<T>(out_img + pad_img); },
                  [&](int64_t b0, int64_t e0, const std::unique_ptr<T[]>& buf) {
    T* dz = buf.get();
    T* pad = dz + out_img;
    for (int64_t j = b0; j < e0; ++j) {
      T* part = dw_part.get() + j * taps;
      std::fill(part, part + taps, T(0));
      for (int64_t i = j * ch.count() / slices; i < (j + 1) * ch.count() / slices; ++i) {
        const int64_t g = ch.group(i);
        const InputMap<T> in_map = group_map(in_shift, in_scale, in_relu, g, C);
        for (int64_t r = ch.begin(i); r < ch.end(i); ++r) {
          k_bn_input_grad(false, gp + r * out_img, training ? yp + r * out_img : gp + r * out_img,
                          pixels, C, rstd + g * C, training ? a.data() + g * C : nullptr,
                          training ? b.data() + g * C : nullptr, dz);
          k_dw_input_grad(dz, wflip.get(), dxp + r * in_img, s, pad);
          if (in_sums != nullptr)
            k_grad_moments(true, dxp + r * in_img, xp + r * in_img, s.H * s.W, C,
                           in_sums->g.data() + i * C, in_sums->gx.data() + i * C, in_map);
          k_dw_weight_grad(xp + r * x_img, dz, part, s, pad, in_map);
        }
      }
    }
  });
  // dw [C, K*K] = the slices' sums added in slice order (zero for an empty batch)
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t t = 0; t < K * K; ++t) {
        T acc = slices ? dw_part[t * C + c] : T(0);
        for (int64_t j = 1; j < slices; ++j) acc += dw_part[j * taps + t * C + c];
        dwp[c * K * K + t] = acc;
      }
  });
}

inline DwShape dw_shape(const at::Tensor& x, const at::Tensor& weight, int64_t stride) {
  const int64_t H = x.size(2), W = x.size(3), K = weight.size(2);
  return {H, W, x.size(1), K, stride, conv_out_size(H, K, stride), conv_out_size(W, K, stride)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& mean_in,
    const at::Tensor& var_in, int64_t stride, int64_t groups, double eps, bool training) {
  check_dwconv_bn(x_in, weight, mean_in, var_in, stride, groups);
  const at::Tensor x = rows_last(x_in);
  const DwShape s = dw_shape(x, weight, stride);
  const int64_t R = x.size(0), C = s.C;
  at::Tensor y = empty_rows_last(R, C, s.OH, s.OW, x);
  at::Tensor mean = at::empty({groups, C}, x.options());
  at::Tensor var = at::empty({groups, C}, x.options());
  if (!training) {
    mean.copy_(mean_in);
    var.copy_(var_in);
  }
  const RowChunks ch = make_chunks(R, groups);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bn_cpu", [&] {
    using T = scalar_t;
    const at::Tensor wc = weight.contiguous();
    dw_layer_forward<T>(ch, s, x.const_data_ptr<T>(), wc.const_data_ptr<T>(), y.data_ptr<T>(),
                        nullptr, nullptr, false, training, eps, mean.data_ptr<T>(),
                        var.data_ptr<T>());
  });
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor> dwconv_bn_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& y_in, const at::Tensor& var, int64_t stride, int64_t groups, double eps,
    bool training) {
  check_dwconv_bn(x_in, weight, var, var, stride, groups);
  const at::Tensor x = rows_last(x_in);
  const at::Tensor dy = rows_last(grad_in);
  const DwShape s = dw_shape(x, weight, stride);
  const int64_t R = x.size(0), C = s.C, K = s.K;
  TORCH_CHECK(dy.sizes() == at::IntArrayRef({R, C, s.OH, s.OW}),
              "dwconv_bn_backward: grad_y must be [", R, ", ", C, ", ", s.OH, ", ", s.OW,
              "], got ", dy.sizes());
  at::Tensor dx = empty_rows_last(R, C, s.H, s.W, x);
  at::Tensor dw = at::empty({C, 1, K, K}, x.options());
  const RowChunks ch = make_chunks(R, groups);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bn_backward_cpu", [&] {
    using T = scalar_t;
    const at::Tensor wc = weight.contiguous();
    const at::Tensor y = training ? rows_last(y_in) : at::Tensor();
    const at::Tensor v = var.contiguous();
    const std::vector<T> rstd = rstd_of<T>(v.const_data_ptr<T>(), v.numel(), eps);
    dw_layer_backward<T>(ch, s, dy.const_data_ptr<T>(), x.const_data_ptr<T>(), nullptr, nullptr,
                         false, training ? y.const_data_ptr<T>() : nullptr, rstd.data(),
                         wc.const_data_ptr<T>(), training, dx.data_ptr<T>(), dw.data_ptr<T>());
  });
  return {dx, dw};
}

// ---------------------------------------------------------------------------------------------
// pwconv_bn_relu: the 1x1 conv is a matrix product over the [R*H*W, C] pixel rows (gemm.h),
// whose output tiles also give the BN batch moments; the normalisation and ReLU are one pass
// over its output in training, and in eval (given statistics) one per product chunk while its
// rows are in cache (pw_forward_mapped).

// The three products of a 1x1 layer with weight w [O, C] over M pixel rows, threads splitting
// the output (no reductions across threads: the values do not depend on the thread count).
// Operands dense and row-major.
constexpr int64_t kProductRows = 8 * gemm::kTileRows;  // output rows per task

// out [M, N] = a [M, K] b [K, N] over a grid of tasks: row blocks of kProductRows and column
// blocks of `columns` (N: whole rows, as the 1x1 layers' input gradient takes them), in
// column-major order, so that two threads split the columns where M is too small to split
// (the classifier's input gradient, `linear`: M = the batch, N = its 1,024 features, with
// kGridColumns). A thread's consecutive row blocks of one column block are one product call.
// A column block that is a multiple of 64 bytes' worth of T is whole panels of every tile
// width (gemm.h), so every element is the same sum as in one product over all columns.
constexpr int64_t kGridColumns = 128;

template <typename T>
void product_grid(const T* a, const T* b, T* out, int64_t M, int64_t K, int64_t N,
                  int64_t columns) {
  const int64_t rb = (M + kProductRows - 1) / kProductRows;
  const int64_t cb = columns > 0 ? (N + columns - 1) / columns : 0;
  parallel_ranges(rb * cb, [] { return 0; }, [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1;) {
      const int64_t i0 = t % rb, i1 = std::min(rb, i0 + (t1 - t)), n0 = t / rb * columns;
      const int64_t r0 = i0 * kProductRows, r1 = std::min(M, i1 * kProductRows);
      k_gemm(a + r0 * K, K, 1, b + n0, N, out + r0 * N + n0, N, r1 - r0, K,
             std::min(columns, N - n0), false, gemm::Store{});
      t += i1 - i0;
    }
  });
}

// Chunks of whole images for the forward product (a task each): at most 64 / groups per group,
// as make_chunks, and about kProductRows pixel rows or more each.
inline RowChunks product_chunks(int64_t R, int64_t groups, int64_t pixels) {
  const int64_t n = R / groups;
  const int64_t per = std::min({n, std::max<int64_t>(1, 64 / groups),
                                n * pixels / kProductRows});
  return {groups, n, std::max<int64_t>(per, 1)};
}

// dense [cols, rows] = src [rows, cols]^T (src dense 2-D, or [O, C, 1, 1]): tasks of whole
// 8-row blocks (a multiple of the transpose's block height in either dtype), threads only from
// 2^14 elements: smaller ones take a few microseconds, about what handing half to the other
// thread costs; a single-threaded pack of the 1x1 weights above that left the other thread
// idle (1.4 % slower eval forwards).
template <typename T>
at::Tensor transposed(const at::Tensor& src) {
  const int64_t rows = src.size(0), cols = src.size(1);
  at::Tensor dst = at::empty({cols, rows}, src.options());
  const T* sp = src.const_data_ptr<T>();
  T* dp = dst.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / (8 * std::max<int64_t>(cols, 1)));
  at::parallel_for(0, (rows + 7) / 8, grain, [&](int64_t b0, int64_t b1) {
    k_transpose(sp, rows, cols, dp, b0 * 8, std::min(rows, b1 * 8));
  });
  return dst;
}

// ---- weights packed once per validation pass ----------------------------------------------
// Inside a pack_cache scope (ops.frozen_weights: the validation passes, where no weight
// changes) a weight's packed form (form 0: a 1x1 weight transposed, 1: a depthwise weight's
// forward taps) is kept per data pointer, sizes and strides (so the per-call views of a
// weight, e.g. a depthwise weight cropped to its live taps, find it too) and version, and
// reused by every later call instead of being packed again for every node, unit and batch.
// The entries hold the weight (so its memory is not reused within the scope) and are
// dropped when the outermost scope ends. Outside a scope, and for inference tensors (no
// version counter), every call packs. The cache and its scope are per thread (the op bodies
// look weights up on the calling thread, outside their parallel regions): a validation pass on
// one Python thread does not cache the weights of a training step run on another.
struct PackCache {
  struct Entry {
    at::Tensor weight, packed;
    uint32_t version;
  };
  std::mutex mutex;
  int64_t depth = 0;
  std::unordered_map<const void*, std::vector<Entry>> entries[2];  // per form, by data
};

PackCache& pack_cache() {
  thread_local PackCache cache;
  return cache;
}

int64_t pack_cache_scope(bool enter) {
  PackCache& c = pack_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  TORCH_CHECK(enter || c.depth > 0, "pack_cache: a scope ended that was not entered");
  c.depth += enter ? 1 : -1;
  if (c.depth == 0)
    for (auto& form : c.entries) form.clear();
  return c.depth;
}

template <typename F>
at::Tensor packed_weight(const at::Tensor& weight, int form, const F& pack) {
  PackCache& c = pack_cache();
  if (weight.is_inference()) return pack();
  auto same = [&](const PackCache::Entry& e) {
    return e.weight.sizes() == weight.sizes() && e.weight.strides() == weight.strides() &&
           e.weight.scalar_type() == weight.scalar_type();
  };
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (c.depth == 0) return pack();
    auto it = c.entries[form].find(weight.const_data_ptr());
    if (it != c.entries[form].end())
      for (const PackCache::Entry& e : it->second)
        if (same(e) && e.version == weight._version()) return e.packed;
  }
  at::Tensor packed = pack();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.depth > 0) {
    std::vector<PackCache::Entry>& list = c.entries[form][weight.const_data_ptr()];
    list.erase(std::remove_if(list.begin(), list.end(), same), list.end());  // stale version
    list.push_back({weight, packed, weight._version()});
  }
  return packed;
}

// w^T [C, O] of a 1x1 weight [O, C, 1, 1] (packed_weight form 0)
template <typename T>
at::Tensor packed_1x1(const at::Tensor& weight) {
  return packed_weight(weight, 0, [&] { return transposed<T>(weight.contiguous()); });
}

// The forward z [R * pixels, O] = x [R * pixels, C] w^T of a 1x1 layer (w [O, C, 1, 1]) over
// the chunks `ch` of R images of `pixels` rows, the tiles of chunk i handed to the epilogue
// epilogue(i) (gemm.h: Store, Moments), then after(i, rows, count) (when given) called on
// the chunk's output rows while they are in cache. x2d: pixel rows with dense channels, read
// in place at any row stride (strided_pixel_rows).
template <typename T, typename F, typename A = std::nullptr_t>
at::Tensor pw_forward(const at::Tensor& x2d, const at::Tensor& weight, const RowChunks& ch,
                      int64_t pixels, const F& epilogue, const A& after = nullptr) {
  const int64_t M = x2d.size(0), C = x2d.size(1), O = weight.size(0);
  const int64_t ld = pixel_stride(x2d);
  const at::Tensor packed = packed_1x1<T>(weight);  // w^T [C, O]
  const T* wt = packed.const_data_ptr<T>();
  at::Tensor z = at::empty({M, O}, x2d.options());
  const T* xp = x2d.const_data_ptr<T>();
  T* zp = z.data_ptr<T>();
  for_chunks(ch, [&](int64_t i) {
    const int64_t r0 = ch.begin(i) * pixels, r1 = ch.end(i) * pixels;
    k_gemm(xp + r0 * ld, ld, 1, wt, O, zp + r0 * O, O, r1 - r0, C, O, false, epilogue(i));
    if constexpr (!std::is_same_v<A, std::nullptr_t>) after(i, zp + r0 * O, r1 - r0);
  });
  return z;
}

// pw_forward of the raw output z [R * pixels, O] alone.
template <typename T>
at::Tensor pw_forward_raw(const at::Tensor& x2d, const at::Tensor& weight, int64_t R,
                          int64_t groups, int64_t pixels) {
  return pw_forward<T>(x2d, weight, product_chunks(R, groups, pixels), pixels,
                       [](int64_t) { return gemm::Store{}; });
}

// pw_forward of the raw output z [R * pixels, O] with the per-group batch moments of z
// (training) into mean / var [G, O], taken from the tiles.
template <typename T>
at::Tensor pw_forward_moments(const at::Tensor& x2d, const at::Tensor& weight, int64_t R,
                              int64_t groups, int64_t pixels, T* mean, T* var) {
  const int64_t O = weight.size(0);
  const RowChunks ch = product_chunks(R, groups, pixels);
  std::vector<double> sum(ch.count() * O, 0.0), sq(ch.count() * O, 0.0);
  at::Tensor z = pw_forward<T>(x2d, weight, ch, pixels, [&](int64_t i) {
    return gemm::Moments{sum.data() + i * O, sq.data() + i * O};
  });
  reduce_moments<T>(ch, O, sum, sq, double(ch.rows_per_group * pixels), mean, var);
  return z;
}

// pw_forward with the eval-mode BatchNorm (+ ReLU) of the output applied to each chunk's rows
// right after its product, while they are in cache (the same map and arithmetic as a separate
// pass, k_map): h [R * pixels, O] = map(x w^T), shift / scale [G, O] per group. (Applying it
// to the tiles in registers instead, as an epilogue, changes the products' own sums in the
// last bit for the columns past the last whole vector: the compiler contracts a
// single-column tile's steps into FMAs differently per epilogue.)
template <typename T>
at::Tensor pw_forward_mapped(const at::Tensor& x2d, const at::Tensor& weight, int64_t R,
                             int64_t groups, int64_t pixels, const T* shift, const T* scale,
                             bool relu) {
  const int64_t O = weight.size(0);
  const RowChunks ch = product_chunks(R, groups, pixels);
  return pw_forward<T>(
      x2d, weight, ch, pixels, [](int64_t) { return gemm::Store{}; },
      [&](int64_t i, T* rows, int64_t count) {
        k_map(rows, rows, count, O, group_map(shift, scale, relu, ch.group(i), O));
      });
}

// dx [M, C] = dz [M, O] w (the input gradient)
template <typename T>
at::Tensor pw_input_grad(const at::Tensor& dz, const at::Tensor& weight) {
  const int64_t M = dz.size(0), O = dz.size(1), C = weight.size(1);
  const at::Tensor d = dz.contiguous(), w = weight.contiguous();
  at::Tensor dx = at::empty({M, C}, dz.options());
  product_grid<T>(d.const_data_ptr<T>(), w.const_data_ptr<T>(), dx.data_ptr<T>(), M, O, C, C);
  return dx;
}

// dw [O, C] = dz [M, O]^T x [M, C] (the weight gradient), dz read transposed in place and x as
// pw_forward reads it (any row stride). Tasks take an output tile (gemm::kTileRows rows) and
// one of `slices` fixed, consecutive ranges of pixel rows (more than one where the output has
// too few tiles to share), summed in blocks of kReduceRows; the slices' sums are then added in
// order. The slicing depends on the shapes only, so the values do not depend on the thread
// count.
constexpr int64_t kReduceRows = 128;

inline int64_t weight_grad_slices(int64_t M, int64_t O) {
  if ((O + gemm::kTileRows - 1) / gemm::kTileRows >= 8) return 1;
  return std::clamp<int64_t>(M / 1024, 1, kWeightSlices);
}

template <typename T>
at::Tensor pw_weight_grad(const at::Tensor& dz, const at::Tensor& x2d) {
  const int64_t M = dz.size(0), O = dz.size(1), C = x2d.size(1), ld = pixel_stride(x2d);
  const at::Tensor d = dz.contiguous();
  at::Tensor dw = at::empty({O, C}, dz.options());
  const T* dp = d.const_data_ptr<T>();
  const T* xp = x2d.const_data_ptr<T>();
  constexpr int64_t rows = gemm::kTileRows;
  const int64_t tiles = (O + rows - 1) / rows, slices = weight_grad_slices(M, O);
  const std::unique_ptr<T[]> part = scratch<T>(slices > 1 ? slices * O * C : 0);
  at::parallel_for(0, slices * tiles, 1, [&](int64_t b0, int64_t e0) {
    // A thread's tasks, slice by slice: the blocks of rows outermost, so that a block of x and
    // of dz is read from memory once and used by each of the thread's tiles while in cache (the
    // tiles outermost read all of x once per tile). Each output element is still summed over
    // its slice's rows in increasing order.
    for (int64_t task = b0; task < e0;) {
      const int64_t j = task / tiles, t0 = task % tiles, t1 = std::min(tiles, t0 + e0 - task);
      const int64_t m_begin = j * M / slices, m_end = (j + 1) * M / slices;
      T* out = (slices > 1 ? part.get() + j * O * C : dw.data_ptr<T>());
      if (m_begin == m_end) std::fill(out + t0 * rows * C, out + std::min(O, t1 * rows) * C, T(0));
      for (int64_t m0 = m_begin; m0 < m_end; m0 += kReduceRows)
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t o0 = t * rows, o1 = std::min(O, o0 + rows);
          k_gemm(dp + m0 * O + o0, 1, O, xp + m0 * ld, ld, out + o0 * C, C, o1 - o0,
                 std::min(kReduceRows, m_end - m0), C, m0 > m_begin, gemm::Store{});
        }
      task += t1 - t0;
    }
  });
  if (slices > 1) {
    T* wp = dw.data_ptr<T>();
    at::parallel_for(0, O * C, 1024, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T acc = part[i];
        for (int64_t j = 1; j < slices; ++j) acc += part[j * O * C + i];
        wp[i] = acc;
      }
    });
  }
  return dw;
}

// The BN (+ ReLU) backward of a 1x1 layer's output: dz [R * pixels, O] from dL/dy (gp, at
// pixel stride ldg; 0: O) and xhat (xp; or the raw output through the map y_shift, rstd when
// y_shift is given). `sums`: the training-mode sums already taken (dw_layer_backward's
// in_sums), else one pass here.
template <typename T>
void pw_dz(const RowChunks& ch, bool relu, const T* gp, const T* xp, const T* y_shift,
           const T* rstd, int64_t pixels, int64_t O, bool training, T* dzp,
           const GradSums* sums = nullptr, int64_t ldg = 0) {
  const int64_t img = pixels * O, g_img = pixels * (ldg ? ldg : O);
  const double count = double(ch.rows_per_group * pixels);
  std::vector<T> a, b;
  if (training && sums != nullptr) reduce_grad_sums(ch, O, *sums, count, a, b);
  else if (training)
    grad_stats<T>(ch, relu, gp, xp, pixels, O, count, a, b, y_shift, y_shift ? rstd : nullptr,
                  ldg);
  for_chunks(ch, [&](int64_t i) {
    const int64_t g = ch.group(i);
    const InputMap<T> map = group_map(y_shift, rstd, false, g, O);
    for (int64_t r = ch.begin(i); r < ch.end(i); ++r)
      k_bn_input_grad(relu, gp + r * g_img, xp + r * img, pixels, O, rstd + g * O,
                      training ? a.data() + g * O : nullptr, training ? b.data() + g * O : nullptr,
                      dzp + r * img, map, ldg);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pwconv_bn_relu_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& mean_in,
    const at::Tensor& var_in, int64_t groups, double eps, bool training) {
  check_pwconv_bn_relu(x_in, weight, mean_in, var_in, groups);
  const at::Tensor& x = x_in;  // read as pixel rows in place where it has their layout
  const int64_t R = x.size(0), H = x.size(2), W = x.size(3), O = weight.size(0);
  const int64_t pixels = H * W;
  at::Tensor z, y;
  at::Tensor mean = at::empty({groups, O}, x.options());
  at::Tensor var = at::empty({groups, O}, x.options());
  if (!training) {
    mean.copy_(mean_in);
    var.copy_(var_in);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pwconv_bn_relu_cpu", [&] {
    using T = scalar_t;
    T* mp = mean.data_ptr<T>();
    const at::Tensor rows = strided_pixel_rows(x);
    if (!training) {  // eval: the BN + ReLU per product chunk, in cache
      const std::vector<T> rstd = rstd_of<T>(var.const_data_ptr<T>(), groups * O, eps);
      y = pw_forward_mapped<T>(rows, weight, R, groups, pixels, mp, rstd.data(), true);
      return;
    }
    z = pw_forward_moments<T>(rows, weight, R, groups, pixels, mp, var.data_ptr<T>());
    y = at::empty_like(z);
    T* zp = z.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const int64_t img = pixels * O;
    const std::vector<T> rstd = rstd_of<T>(var.const_data_ptr<T>(), groups * O, eps);
    const RowChunks ch = make_chunks(R, groups);
    for_chunks(ch, [&](int64_t i) {
      const int64_t g = ch.group(i);
      for (int64_t r = ch.begin(i); r < ch.end(i); ++r)
        k_normalize(true, zp + r * img, yp + r * img, pixels, O, mp + g * O, rstd.data() + g * O);
    });
  });
  at::Tensor out = y.view({R, H, W, O}).permute({0, 3, 1, 2});
  at::Tensor xhat = training ? z.view({R, H, W, O}).permute({0, 3, 1, 2})
                             : at::empty({0}, x.options());
  return {out, xhat, mean, var};
}

std::tuple<at::Tensor, at::Tensor> pwconv_bn_relu_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& y_in, const at::Tensor& xhat_in, const at::Tensor& var, int64_t groups,
    double eps, bool training) {
  check_pwconv_bn_relu(x_in, weight, var, var, groups);
  const at::Tensor& x = x_in;  // as in the forward
  const int64_t R = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = weight.size(0);
  const int64_t pixels = H * W;
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({R, O, H, W}),
              "pwconv_bn_relu_backward: grad_y must be [", R, ", ", O, ", ", H, ", ", W,
              "], got ", grad_in.sizes());
  const at::Tensor dy = rows_last(grad_in);
  // the sign source of the ReLU mask and the xhat of the BN backward
  const at::Tensor xh = rows_last(training ? xhat_in : y_in);
  at::Tensor dz = at::empty({R * pixels, O}, x.options());
  at::Tensor dx, dw;
  const RowChunks ch = make_chunks(R, groups);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pwconv_bn_relu_backward_cpu", [&] {
    using T = scalar_t;
    const at::Tensor v = var.contiguous();
    const std::vector<T> rstd = rstd_of<T>(v.const_data_ptr<T>(), v.numel(), eps);
    pw_dz<T>(ch, true, dy.const_data_ptr<T>(), xh.const_data_ptr<T>(), nullptr, rstd.data(),
             pixels, O, training, dz.data_ptr<T>());
    dx = pw_input_grad<T>(dz, weight);         // [R*H*W, C]
    dw = pw_weight_grad<T>(dz, strided_pixel_rows(x));  // [O, C]
  });
  return {dx.view({R, H, W, C}).permute({0, 3, 1, 2}), dw.view({O, C, 1, 1})};
}

// ---------------------------------------------------------------------------------------------
// linear: the network's classifier, y [B, O] = x [B, C] w^T (w [O, C], no bias), and its
// gradients, on the products above (PyTorch runs it in MKL's sgemm, at about half their rate
// on this project's machine for the SPOS head: README, "Performance"). The forward computes
// y^T = w x^T, so the large operand, w, is read in place as the broadcast one and only x (B x
// C) is packed; y^T [O, B] is transposed back. Values depend on the shapes only.

at::Tensor linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in) {
  check_linear(x_in, weight_in);
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), O = w.size(0);
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_cpu", [&] {
    using T = scalar_t;
    // x^T's columns padded with zero columns to whole 64-byte vectors: a column past the last
    // whole vector would take the products' single-column tiles (at B = 37, 5 such columns
    // made the product 1.6x slower than at B = 64)
    constexpr int64_t lanes = 64 / sizeof(T);
    const int64_t Bp = (B + lanes - 1) / lanes * lanes;
    at::Tensor xp = x;
    if (Bp != B) {
      xp = at::zeros({Bp, C}, x.options());
      xp.narrow(0, 0, B).copy_(x);
    }
    const at::Tensor xt = transposed<T>(xp);  // [C, Bp]
    at::Tensor yt = at::empty({O, Bp}, x.options());
    product_grid<T>(w.const_data_ptr<T>(), xt.const_data_ptr<T>(), yt.data_ptr<T>(), O, C, Bp,
                    kGridColumns);
    y = transposed<T>(yt).narrow(0, 0, B);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> linear_backward_cpu(const at::Tensor& grad_in,
                                                       const at::Tensor& x_in,
                                                       const at::Tensor& weight_in) {
  check_linear(x_in, weight_in);
  const int64_t B = x_in.size(0), C = x_in.size(1), O = weight_in.size(0);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({B, O}), "linear_backward: grad_y must be [",
              B, ", ", O, "], got ", grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(),
              "linear_backward: grad_y must have x's dtype ", x_in.scalar_type(), ", got ",
              grad_in.scalar_type());
  const at::Tensor dy = grad_in.contiguous(), x = x_in.contiguous(), w = weight_in.contiguous();
  at::Tensor dx = at::empty({B, C}, x.options()), dw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_backward_cpu", [&] {
    using T = scalar_t;
    product_grid<T>(dy.const_data_ptr<T>(), w.const_data_ptr<T>(), dx.data_ptr<T>(), B, O, C,
                    kGridColumns);
    dw = pw_weight_grad<T>(dy, x);  // dy^T x
  });
  return {dx, dw};
}

// ---------------------------------------------------------------------------------------------
// conv_bn_chain (CPU body): a branch's layers, with the BatchNorm + ReLU of every 1x1 layer
// but the last applied lazily, so their normalised outputs are never written.
//
// A 1x1 layer stores its raw output s (the matmul's, before the BN) with its map h = relu((s
// - shift) * scale) (InputMap; shift: the batch mean in training, the running mean in eval;
// scale = rsqrt(var + eps)). A depthwise layer after it reads h through the map while
// copying each image into its padded scratch, in the forward and again for its weight
// gradient; the backward of the 1x1 layer recomputes xhat (and the ReLU mask) from s and the
// map. Same arithmetic as the layer ops' normalising pass, so the same values bit for bit
// (test_cpu_chain_is_the_layer_ops_bit_for_bit). A depthwise layer stores its normalised
// output as the layer op does (its consumer, a 1x1 layer, needs it as a matmul operand); a
// 1x1 layer followed by a 1x1 layer (no SPOS branch has one) hands h over written out; the
// last layer's output is written normalised (y): in eval, where its statistics are given, a
// last 1x1 layer normalises each product chunk while it is in cache (pw_forward_mapped), so
// its raw output is never read back from memory (saved holds an empty tensor for it; the
// backward takes the ReLU mask from y). Compared with the layer ops in turn, each
// lazy 1x1 layer saves the pass that wrote xhat and y (two full tensors) and keeps one
// tensor alive instead of two.
// saved (CPU layout): every layer's stored output (raw for 1x1 layers, xhat for depthwise
// ones; empty for an eval chain's last 1x1 layer), then the maps' shifts [G, sum C_i]: the
// values of the mean output (batch means in training, running means in eval), copied because
// outputs may not alias; the scales follow from the var output.

// A stored tensor and its map: shift / scale point to [G, C] arrays (shift null: no map) that
// outlive it (the chain keeps them in a StatsStore).
template <typename T>
struct Lazy {
  at::Tensor s;
  const T* shift = nullptr;
  const T* scale = nullptr;
  bool relu = false;
  bool mapped() const { return shift != nullptr; }
};

// Owner of the chain's per-layer [G, C_i] arrays: plain heap arrays, so the statistics of a
// layer cost no tensor (no dispatcher call) of their own.
template <typename T>
struct StatsStore {
  std::vector<std::vector<T>> arrays;
  T* make(int64_t n) {
    arrays.emplace_back(size_t(n));
    return arrays.back().data();
  }
};

// Columns [off, off + C) of the [G, total] rows at src as a dense [G, C] array dst, and back.
template <typename T>
void take_columns(const T* src, int64_t total, int64_t off, int64_t G, int64_t C, T* dst) {
  for (int64_t g = 0; g < G; ++g) std::copy_n(src + g * total + off, C, dst + g * C);
}

template <typename T>
void put_columns(const T* src, int64_t G, int64_t C, T* dst, int64_t total, int64_t off) {
  for (int64_t g = 0; g < G; ++g) std::copy_n(src + g * C, C, dst + g * total + off);
}

// h = map(s) written out: [R, C, H, W] channels-last, dense.
template <typename T>
at::Tensor materialize(const Lazy<T>& t, int64_t groups) {
  const at::Tensor& s = t.s;
  const int64_t R = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3), img = H * W * C;
  at::Tensor out = empty_rows_last(R, C, H, W, s);
  const RowChunks ch = make_chunks(R, groups);
  const T* sp = s.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  for_chunks(ch, [&](int64_t i) {
    const InputMap<T> map = group_map(t.shift, t.scale, t.relu, ch.group(i), C);
    for (int64_t r = ch.begin(i); r < ch.end(i); ++r)
      k_map(sp + r * img, op + r * img, H * W, C, map);
  });
  return out;
}

// t itself where its pixel rows are evenly spaced with dense channels (a channels-last tensor,
// or a channel range of one: strided_pixel_rows without a copy), their stride in `ps`; else a
// dense channels-last copy (ps = its channel count). How the chain reads its input, in the
// forward and the backward alike (the halves of a split-ready input in place: a 1x1 first
// layer takes the stride through strided_pixel_rows, a depthwise one through DwShape::XS),
// and its last 1x1 layer the output gradient (a concat's backward hands a branch a channel
// range).
inline at::Tensor in_place_rows(const at::Tensor& t, int64_t& ps) {
  if (t.numel() > 0) {
    const at::Tensor rows = strided_pixel_rows(t);
    if (rows.is_alias_of(t) && rows.const_data_ptr() == t.const_data_ptr()) {
      ps = pixel_stride(rows);
      return t;
    }
  }
  ps = t.size(1);
  return rows_last(t);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> conv_bn_chain_cpu(
    const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef layers,
    const at::Tensor& mean_in, const at::Tensor& var_in, int64_t groups, double eps,
    bool training) {
  const std::vector<int64_t> channels =
      check_chain("conv_bn_chain", layers, weights, mean_in, var_in, groups);
  check_float_dtype("conv_bn_chain", x_in);  // before the dtype dispatch below
  const size_t n = layers.size();
  int64_t x_ps = 0;
  const at::Tensor x = in_place_rows(x_in, x_ps);
  const at::TensorOptions opt = x.options();
  const int64_t total = mean_in.size(1);
  check_stats("conv_bn_chain", "mean", mean_in, groups, total, x);
  check_stats("conv_bn_chain", "var", var_in, groups, total, x);
  // the outputs' [G, total] statistics, each layer's columns written from its own [G, C_i]
  // arrays (the StatsStore) by pointer
  at::Tensor mean = at::empty({groups, total}, opt), var = at::empty({groups, total}, opt);
  at::Tensor shift = at::empty({groups, total}, opt);
  std::vector<at::Tensor> saved;
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_bn_chain_cpu", [&] {
    using T = scalar_t;
    const at::Tensor mean_c = training ? at::Tensor() : mean_in.to(x.scalar_type()).contiguous();
    const at::Tensor var_c = training ? at::Tensor() : var_in.to(x.scalar_type()).contiguous();
    StatsStore<T> store;
    Lazy<T> in{x};
    int64_t off = 0;
    const bool map_last = !training && layers[n - 1] == 0;
    for (size_t i = 0; i < n; ++i) {
      const int64_t Ci = channels[i];
      T* m = store.make(groups * Ci);
      T* v = store.make(groups * Ci);
      if (!training) {
        take_columns(mean_c.const_data_ptr<T>(), total, off, groups, Ci, m);
        take_columns(var_c.const_data_ptr<T>(), total, off, groups, Ci, v);
      }
      at::Tensor out;
      if (layers[i] == 0) {
        check_pwconv_input(in.s, weights[i], groups);
        if (in.mapped()) in = Lazy<T>{materialize<T>(in, groups)};
        const int64_t R = in.s.size(0), H = in.s.size(2), W = in.s.size(3);
        const at::Tensor rows = strided_pixel_rows(in.s);
        if (map_last && i + 1 == n) {
          // eval, last layer: its BN + ReLU per product chunk; y is the result, saved holds
          // an empty tensor in its place (the backward reads y)
          T* scale = store.make(groups * Ci);
          rstd_into<T>(v, groups * Ci, eps, scale);
          y = pw_forward_mapped<T>(rows, weights[i], R, groups, H * W, m, scale, true)
                  .view({R, H, W, Ci})
                  .permute({0, 3, 1, 2});
          out = at::empty({0}, opt);
        } else {
          const at::Tensor z =
              training ? pw_forward_moments<T>(rows, weights[i], R, groups, H * W, m, v)
                       : pw_forward_raw<T>(rows, weights[i], R, groups, H * W);
          out = z.view({R, H, W, Ci}).permute({0, 3, 1, 2});
        }
      } else {
        check_dwconv_input(in.s, weights[i], layers[i], groups);
        const at::Tensor wc = weights[i].contiguous();
        DwShape s = dw_shape(in.s, weights[i], layers[i]);
        if (i == 0) s.XS = x_ps;  // the chain's input, read in place
        out = empty_rows_last(in.s.size(0), Ci, s.OH, s.OW, x);
        dw_layer_forward<T>(make_chunks(in.s.size(0), groups), s, in.s.const_data_ptr<T>(),
                            wc.const_data_ptr<T>(), out.data_ptr<T>(), in.shift, in.scale,
                            in.relu, training, eps, m, v);
      }
      put_columns(m, groups, Ci, mean.data_ptr<T>(), total, off);
      put_columns(v, groups, Ci, var.data_ptr<T>(), total, off);
      put_columns(m, groups, Ci, shift.data_ptr<T>(), total, off);
      saved.push_back(out);
      if (y.defined()) break;  // (the eval last layer above)
      in = Lazy<T>{out};
      if (layers[i] == 0) {
        T* scale = store.make(groups * Ci);
        rstd_into<T>(v, groups * Ci, eps, scale);
        in.shift = m;
        in.scale = scale;
        in.relu = true;
      }
      off += Ci;
    }
    // (a depthwise last layer: a copy, since outputs may not alias each other)
    if (!y.defined())
      y = in.mapped() ? materialize<T>(in, groups) : in.s.clone(at::MemoryFormat::ChannelsLast);
  });
  saved.push_back(shift);
  return {y, saved, mean, var};
}

// conv_bn_chain in eval without autograd (conv_bn_chain_eval): y alone, the layers run image
// chunk by image chunk. Each task takes a chunk of images (product_chunks of the input)
// through every layer in turn, its intermediate outputs in scratch buffers of the thread
// (a few images' worth: in L2) where conv_bn_chain_cpu writes each layer's output for the
// whole batch to memory and reads it back in the next layer. The same kernels on the same
// rows in the same order (a 1x1 layer's raw product normalised lazily by its reader, the
// last one's BN + ReLU per chunk; the depthwise layers per image), so y equals
// conv_bn_chain_cpu's bit for bit. With shuffle_with (a [R, Ca, H', W']), the output is
// shuffle_cat(a, y) instead, each chunk's y deinterleaved with a from the thread's scratch.
at::Tensor conv_bn_chain_eval_cpu(const at::Tensor& x_in, at::TensorList weights,
                                  at::IntArrayRef layers, const at::Tensor& mean_in,
                                  const at::Tensor& var_in, int64_t groups, double eps,
                                  const std::optional<at::Tensor>& shuffle_with) {
  const char* op = "conv_bn_chain_eval";
  const std::vector<int64_t> channels = check_chain(op, layers, weights, mean_in, var_in, groups);
  check_float_dtype(op, x_in);
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be 4-D [R, C, H, W], got ", x_in.dim(), "-D");
  const size_t n = layers.size();
  int64_t x_ps = 0;
  const at::Tensor x = in_place_rows(x_in, x_ps);
  const int64_t total = mean_in.size(1);
  check_stats(op, "mean", mean_in, groups, total, x);
  check_stats(op, "var", var_in, groups, total, x);
  // the layers' geometry, checked as the layer ops check their inputs (on a zero-stride view
  // of x with the layer input's sizes)
  const int64_t R = x.size(0);
  std::vector<int64_t> H(n + 1), W(n + 1), Cin(n + 1);
  H[0] = x.size(2);
  W[0] = x.size(3);
  Cin[0] = x.size(1);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor shape = x.as_strided({R, Cin[i], H[i], W[i]}, {0, 0, 0, 0});
    if (layers[i] == 0) {
      check_pwconv_input(shape, weights[i], groups);
      H[i + 1] = H[i];
      W[i + 1] = W[i];
    } else {
      check_dwconv_input(shape, weights[i], layers[i], groups);
      const int64_t K = weights[i].size(2);
      H[i + 1] = conv_out_size(H[i], K, layers[i]);
      W[i + 1] = conv_out_size(W[i], K, layers[i]);
    }
    Cin[i + 1] = channels[i];
  }
  // the split-ready partner: pixel rows (read in place, pixel stride a_ps) of y's geometry
  const bool shuffled = shuffle_with.has_value();
  at::Tensor a;
  int64_t a_ps = 0, Ca = 0;
  if (shuffled) {
    const at::Tensor& a_in = *shuffle_with;
    TORCH_CHECK(a_in.dim() == 4 && a_in.size(0) == R && a_in.size(2) == H[n] &&
                    a_in.size(3) == W[n],
                op, ": shuffle_with must be [", R, ", C, ", H[n], ", ", W[n],
                "] (the output's rows and map), got ", a_in.sizes());
    TORCH_CHECK(a_in.scalar_type() == x.scalar_type() && a_in.device() == x.device(), op,
                ": shuffle_with must have x's dtype and device");
    Ca = a_in.size(1);
    TORCH_CHECK((Ca + Cin[n]) % 2 == 0, op, ": shuffle_cat needs an even channel count, got ",
                Ca, " + ", Cin[n]);
    a = in_place_rows(a_in, a_ps);
  }
  const int64_t Cout = Ca + Cin[n];
  at::Tensor y = empty_rows_last(R, Cout, H[n], W[n], x);
  if (R == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_bn_chain_eval_cpu", [&] {
    using T = scalar_t;
    const at::Tensor mean_c = mean_in.to(x.scalar_type()).contiguous();
    const at::Tensor var_c = var_in.to(x.scalar_type()).contiguous();
    StatsStore<T> store;
    std::vector<const T*> shift(n), scale(n);
    std::vector<at::Tensor> packs(n);  // w^T [C, O] of a 1x1 layer; taps [K*K, C] of a depthwise
    std::vector<DwShape> shapes(n);
    int64_t off = 0, buffer = 0, pad = 1;
    const RowChunks ch = product_chunks(R, groups, H[0] * W[0]);
    const int64_t per_chunk = (ch.rows_per_group + ch.per_group - 1) / ch.per_group;
    for (size_t i = 0; i < n; ++i) {
      const int64_t Ci = channels[i];
      T* m = store.make(groups * Ci);
      T* r = store.make(groups * Ci);
      take_columns(mean_c.const_data_ptr<T>(), total, off, groups, Ci, m);
      take_columns(var_c.const_data_ptr<T>(), total, off, groups, Ci, r);
      rstd_into<T>(r, groups * Ci, eps, r);
      shift[i] = m;
      scale[i] = r;
      off += Ci;
      if (layers[i] == 0) {
        packs[i] = packed_1x1<T>(weights[i]);
      } else {
        const int64_t K = weights[i].size(2);
        packs[i] = packed_weight(weights[i], 1, [&] {
          at::Tensor taps = at::empty({K * K, Ci}, x.options());
          forward_taps(weights[i].contiguous().const_data_ptr<T>(), Ci, K, taps.data_ptr<T>());
          return taps;
        });
        shapes[i] = {H[i], W[i], Cin[i], K, layers[i], H[i + 1], W[i + 1]};
        pad = std::max(pad, padded_h(shapes[i]) * padded_w(shapes[i]) * Cin[i]);
      }
      // layer i's output lives in a scratch buffer unless it is the last layer's (then only
      // when it is deinterleaved with shuffle_with)
      if (i + 1 < n || shuffled) buffer = std::max(buffer, per_chunk * H[i + 1] * W[i + 1] * Ci);
      // a 1x1 layer reading a mapped input (another 1x1 layer's raw output) maps it first
      if (layers[i] == 0 && i > 0 && layers[i - 1] == 0)
        buffer = std::max(buffer, per_chunk * H[i] * W[i] * Cin[i]);
    }
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const T* ap = shuffled ? a.const_data_ptr<T>() : nullptr;
    parallel_ranges(ch.count(), [&] { return scratch<T>(3 * buffer + pad + Cout); },
                    [&](int64_t b0, int64_t b1, const std::unique_ptr<T[]>& scratch_all) {
      T* bufs[3] = {scratch_all.get(), scratch_all.get() + buffer,
                    scratch_all.get() + 2 * buffer};
      T* padp = scratch_all.get() + 3 * buffer;
      T* tmp = padp + pad;  // one pixel of shuffle_cat's t
      for (int64_t c = b0; c < b1; ++c) {
        const int64_t g = ch.group(c), r0 = ch.begin(c), images = ch.end(c) - r0;
        const T* cur = xp + r0 * H[0] * W[0] * x_ps;  // this chunk's input rows
        int64_t cur_ps = x_ps;
        InputMap<T> map;  // the pending BN + ReLU of the previous 1x1 layer's raw output
        int next = 0;
        for (size_t i = 0; i < n; ++i) {
          const int64_t Ci = channels[i], pixels_in = H[i] * W[i], pixels = H[i + 1] * W[i + 1];
          const bool last = i + 1 == n;
          T* dst = last && !shuffled ? yp + r0 * pixels * Ci : bufs[next];
          if (layers[i] == 0) {
            if (map.shift != nullptr) {  // (not in the SPOS branches: 1x1 after 1x1)
              // cur is then the previous 1x1 layer's dense output in scratch
              T* mapped = bufs[(next + 1) % 3];
              k_map(cur, mapped, images * pixels_in, Cin[i], map);
              cur = mapped;
            }
            k_gemm(cur, cur_ps, 1, packs[i].const_data_ptr<T>(), Ci, dst, Ci, images * pixels,
                   Cin[i], Ci, false, gemm::Store{});
            map = group_map(shift[i], scale[i], true, g, Ci);
            if (last) k_map(dst, dst, images * pixels, Ci, map);
          } else {
            DwShape s = shapes[i];
            s.XS = cur_ps == Cin[i] ? 0 : cur_ps;  // the chain's input read in place
            for (int64_t r = 0; r < images; ++r)
              k_dw_forward(cur + r * pixels_in * cur_ps, packs[i].const_data_ptr<T>(),
                           dst + r * pixels * Ci, s, shift[i] + g * Ci, scale[i] + g * Ci, padp,
                           map);
            map = {};
          }
          cur = dst;
          cur_ps = Ci;
          next = (next + 1) % 3;
        }
        if (shuffled) {  // y's rows of this chunk (in scratch) with a's into the output
          const int64_t pixels = H[n] * W[n], p0 = r0 * pixels;
          k_deinterleave(ap + p0 * a_ps, a_ps, Ca, cur, Cin[n], Cin[n], yp + p0 * Cout, Cout,
                         yp + p0 * Cout + Cout / 2, Cout, 0, images * pixels, tmp);
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> conv_bn_chain_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, at::TensorList weights,
    at::IntArrayRef layers, const at::Tensor& y, at::TensorList saved, const at::Tensor& var,
    int64_t groups, double eps, bool training) {
  const char* op = "conv_bn_chain_backward";
  const std::vector<int64_t> channels = check_chain(op, layers, weights, var, var, groups);
  check_float_dtype(op, x_in);
  const size_t n = layers.size();
  TORCH_CHECK(saved.size() == n + 1, op, ": saved must hold ", n + 1, " tensors (the CPU "
              "forward's: every layer's stored output, then the shifts), got ", saved.size());
  int64_t x_ps = 0;
  const at::Tensor x = in_place_rows(x_in, x_ps);
  const at::TensorOptions opt = x.options();
  const int64_t total = var.size(1);
  TORCH_CHECK(saved[n].dim() == 2 && saved[n].size(0) == groups && saved[n].size(1) == total,
              op, ": saved[", n, "] (the shifts) must be [", groups, ", ", total, "], got ",
              saved[n].sizes());
  std::vector<at::Tensor> grad_w(n);
  // dL/dh of the current layer's output; the last layer's (grad_y) read in place at its pixel
  // stride g_ps by a 1x1 layer
  int64_t g_ps = 0;
  at::Tensor g = layers[n - 1] == 0 ? in_place_rows(grad_y, g_ps) : rows_last(grad_y);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_bn_chain_backward_cpu", [&] {
    using T = scalar_t;
    const at::Tensor shift_all = saved[n].contiguous();
    const at::Tensor var_c = var.contiguous();
    std::vector<T> scale_all(size_t(groups * total));
    rstd_into<T>(var_c.const_data_ptr<T>(), groups * total, eps, scale_all.data());
    std::vector<int64_t> offs(n, 0);
    for (size_t i = 1; i < n; ++i) offs[i] = offs[i - 1] + channels[i - 1];
    // every layer's [G, C_i] shift and scale: columns of the [G, total] arrays (in place for
    // one group, where the columns are contiguous)
    StatsStore<T> store;
    std::vector<const T*> shifts(n), scales(n);
    for (size_t i = 0; i < n; ++i) {
      const int64_t Ci = channels[i];
      if (groups == 1) {
        shifts[i] = shift_all.const_data_ptr<T>() + offs[i];
        scales[i] = scale_all.data() + offs[i];
      } else {
        T* sh = store.make(groups * Ci);
        T* sc = store.make(groups * Ci);
        take_columns(shift_all.const_data_ptr<T>(), total, offs[i], groups, Ci, sh);
        take_columns(scale_all.data(), total, offs[i], groups, Ci, sc);
        shifts[i] = sh;
        scales[i] = sc;
      }
    }
    auto lazy = [&](size_t i) {  // layer i's stored output, with its map for a 1x1 layer
      // (an eval chain's last 1x1 layer normalised per product chunk, saved empty: its
      // output y, whose sign is the map's ReLU mask: y > 0 exactly where h > 0)
      if (i + 1 == n && layers[i] == 0 && !training && saved[i].numel() == 0)
        return Lazy<T>{rows_last(y)};
      Lazy<T> t{rows_last(saved[i])};
      if (layers[i] == 0) {
        t.shift = shifts[i];
        t.scale = scales[i];
        t.relu = true;
      }
      return t;
    };
    std::unique_ptr<GradSums> sums;  // layer j's BN-backward sums, taken by layer j + 1
    for (size_t j = n; j-- > 0;) {
      const Lazy<T> out = lazy(j);
      Lazy<T> in = j == 0 ? Lazy<T>{x} : lazy(j - 1);
      std::unique_ptr<GradSums> out_sums = std::move(sums);
      TORCH_CHECK(g.sizes() == out.s.sizes(), op, ": grad_y must be ", out.s.sizes(), ", got ",
                  g.sizes());
      const int64_t R = in.s.size(0), C = in.s.size(1), H = in.s.size(2), W = in.s.size(3);
      const RowChunks ch = make_chunks(R, groups);
      if (layers[j] == 0) {
        const int64_t O = channels[j], pixels = H * W;
        at::Tensor dz = at::empty({R * pixels, O}, opt);
        pw_dz<T>(ch, true, g.const_data_ptr<T>(), out.s.const_data_ptr<T>(), out.shift,
                 scales[j], pixels, O, training, dz.data_ptr<T>(), out_sums.get(),
                 j == n - 1 ? g_ps : 0);
        if (in.mapped()) in = Lazy<T>{materialize<T>(in, groups)};
        grad_w[j] = pw_weight_grad<T>(dz, strided_pixel_rows(in.s)).view({O, C, 1, 1});
        g = pw_input_grad<T>(dz, weights[j]).view({R, H, W, C}).permute({0, 3, 1, 2});
      } else {
        DwShape s = dw_shape(in.s, weights[j], layers[j]);
        if (j == 0) s.XS = x_ps;  // the chain's input, read in place
        const at::Tensor wc = weights[j].contiguous();
        at::Tensor dx = empty_rows_last(R, C, H, W, x);
        at::Tensor dw = at::empty({C, 1, s.K, s.K}, opt);
        if (training && in.mapped()) sums = std::make_unique<GradSums>(ch.count(), C);
        dw_layer_backward<T>(ch, s, g.const_data_ptr<T>(), in.s.const_data_ptr<T>(), in.shift,
                             in.scale, in.relu, out.s.const_data_ptr<T>(), scales[j],
                             wc.const_data_ptr<T>(), training, dx.data_ptr<T>(),
                             dw.data_ptr<T>(), sums.get());
        grad_w[j] = dw;
        g = dx;
      }
    }
  });
  return {g, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastshift, CPU, m) {
  m.impl("conv_bn_chain", &conv_bn_chain_cpu);
  m.impl("conv_bn_chain_eval", &conv_bn_chain_eval_cpu);
  m.impl("conv_bn_chain_backward", &conv_bn_chain_backward_cpu);
  m.impl("dwconv_bn", &dwconv_bn_cpu);
  m.impl("dwconv_bn_backward", &dwconv_bn_backward_cpu);
  m.impl("pwconv_bn_relu", &pwconv_bn_relu_cpu);
  m.impl("pwconv_bn_relu_backward", &pwconv_bn_relu_backward_cpu);
  m.impl("linear", &linear_cpu);
  m.impl("linear_backward", &linear_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastshift, CompositeExplicitAutograd, m) {
  m.impl("cpu_kernel_level", [] { return int64_t{isa_level()}; });
  m.impl("pack_cache", &pack_cache_scope);
}

}  // namespace cpu_block
}  // namespace fastshift
