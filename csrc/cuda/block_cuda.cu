// CUDA bodies of the fused block ops (dwconv_bn, pwconv_bn_relu and their backwards), with the
// contracts and formulas of csrc/cpu/block_cpu.cpp. Activations are channels-last, so with one
// thread per (pixel, channel) consecutive threads read consecutive channels (coalesced).
//
//   depthwise conv, its input gradient (gather form) and its weight gradient (per-tap partial
//   sums over pixel slices, added by at::sum: deterministic) are kernels here;
//   the normalisation (+ReLU) and the BN input gradient are one elementwise kernel each;
//   batch statistics and the two gradient sums are ATen reductions in the accumulate type,
//   and the 1x1 convs are at::mm (cuBLAS).
// float16/bfloat16 accumulate in float32; statistics are returned in the input dtype.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

// out[r, oh, ow, c] = sum_t x[r, oh*S - P + kh, ow*S - P + kw, c] * wt[t, c];
// with shift/scale: (sum - shift[g, c]) * scale[g, c], g = r / rows_per_group.
template <typename T, typename A>
__global__ void dw_conv_kernel(const T* __restrict__ x, const T* __restrict__ wt,
                               T* __restrict__ out, const A* __restrict__ shift,
                               const A* __restrict__ scale, int64_t R, int64_t H, int64_t W,
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
    if (shift != nullptr) {
      const int64_t g = r / rows_per_group;
      acc = (acc - shift[g * C + c]) * scale[g * C + c];
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

// z := (z - mean[g]) * rstd[g]; with relu also y := max(z, 0) (NaN kept).
template <typename T, typename A>
__global__ void normalize_kernel(T* __restrict__ z, T* __restrict__ y, const A* __restrict__ mean,
                                 const A* __restrict__ rstd, int64_t M, int64_t C,
                                 int64_t pixels_per_group, bool relu) {
  FASTSHIFT_GRID_STRIDE(i, M * C) {
    const int64_t c = i % C;
    const int64_t g = (i / C) / pixels_per_group;
    const A v = (static_cast<A>(z[i]) - mean[g * C + c]) * rstd[g * C + c];
    z[i] = static_cast<T>(v);
    if (relu) y[i] = static_cast<T>(v < A(0) ? A(0) : v);
  }
}

// dz = rstd * (dy' - a - xhat * b) (a != null: training) or rstd * dy'; dy' = relu ?
// dy * (xh > 0) : dy.
template <typename T, typename A>
__global__ void bn_input_grad_kernel(const T* __restrict__ dy, const T* __restrict__ xh,
                                     const A* __restrict__ rstd, const A* __restrict__ a,
                                     const A* __restrict__ b, T* __restrict__ dz, int64_t M,
                                     int64_t C, int64_t pixels_per_group, bool relu) {
  FASTSHIFT_GRID_STRIDE(i, M * C) {
    const int64_t c = i % C;
    const int64_t s = ((i / C) / pixels_per_group) * C + c;
    A g = static_cast<A>(dy[i]);
    if (relu && !(static_cast<A>(xh[i]) > A(0))) g = A(0);
    const A v = a != nullptr ? rstd[s] * (g - a[s] - static_cast<A>(xh[i]) * b[s]) : rstd[s] * g;
    dz[i] = static_cast<T>(v);
  }
}

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Biased mean and variance [G, C] (accumulate type) of z2d [M, C] per row group.
std::tuple<at::Tensor, at::Tensor> group_moments(const at::Tensor& z2d, int64_t groups) {
  const auto z = z2d.to(acc_dtype(z2d)).view({groups, -1, z2d.size(1)});
  const at::Tensor mean = z.mean({1});
  const at::Tensor var = (z - mean.unsqueeze(1)).square().mean({1});  // two passes: no
  return {mean.contiguous(), var.contiguous()};                      // cancellation
}

// dz [M, C] of the BN (+ReLU) backward; `xh` is xhat (training) or the output y (eval).
at::Tensor bn_input_grad(const at::Tensor& dy2d, const at::Tensor& xh2d, const at::Tensor& var,
                         double eps, int64_t groups, bool training, bool relu) {
  const int64_t M = dy2d.size(0), C = dy2d.size(1);
  at::Tensor dz = at::empty_like(dy2d);
  if (M == 0) return dz;
  const at::Tensor rstd = at::rsqrt(var.to(acc_dtype(dy2d)) + eps).contiguous();
  at::Tensor a, b;
  if (training) {
    const auto acc = acc_dtype(dy2d);
    at::Tensor g = dy2d.to(acc);
    const at::Tensor xh = xh2d.to(acc);
    if (relu) g = at::where(xh > 0, g, at::zeros({}, g.options()));
    a = g.view({groups, -1, C}).mean({1}).contiguous();
    b = (g * xh).view({groups, -1, C}).mean({1}).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy2d.scalar_type(), "bn_input_grad",
                                  [&] {
    using A = at::acc_type<scalar_t, true>;
    bn_input_grad_kernel<scalar_t, A><<<blocks_for(M * C), kThreads, 0,
                                        at::cuda::getCurrentCUDAStream()>>>(
        dy2d.const_data_ptr<scalar_t>(), xh2d.const_data_ptr<scalar_t>(),
        rstd.const_data_ptr<A>(), training ? a.const_data_ptr<A>() : nullptr,
        training ? b.const_data_ptr<A>() : nullptr, dz.data_ptr<scalar_t>(), M, C, M / groups,
        relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dz;
}

void normalize(at::Tensor& z2d, at::Tensor& y2d, const at::Tensor& mean, const at::Tensor& rstd,
               int64_t groups, bool relu) {
  const int64_t M = z2d.size(0), C = z2d.size(1);
  if (M == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z2d.scalar_type(), "normalize", [&] {
    using A = at::acc_type<scalar_t, true>;
    normalize_kernel<scalar_t, A><<<blocks_for(M * C), kThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
        z2d.data_ptr<scalar_t>(), y2d.data_ptr<scalar_t>(), mean.const_data_ptr<A>(),
        rstd.const_data_ptr<A>(), M, C, M / groups, relu);
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
  const at::Tensor wt = weight.reshape({C, K * K}).t().contiguous();
  const auto acc = acc_dtype(x);
  at::Tensor shift, scale;
  if (!training) {
    shift = mean_in.to(acc).contiguous();
    scale = at::rsqrt(var_in.to(acc) + eps).contiguous();
  }
  if (R > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_cuda",
                                    [&] {
      using A = at::acc_type<scalar_t, true>;
      dw_conv_kernel<scalar_t, A><<<blocks_for(y.numel()), kThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
          training ? nullptr : shift.const_data_ptr<A>(),
          training ? nullptr : scale.const_data_ptr<A>(), R, H, W, C, OH, OW,
          static_cast<int>(K), static_cast<int>(stride), R / groups);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!training) return {y, mean_in.clone(), var_in.clone()};
  if (R == 0) {
    at::Tensor z = at::zeros({groups, C}, x.options());
    return {y, z, z.clone()};
  }
  at::Tensor z2d = y.permute({0, 2, 3, 1}).view({R * OH * OW, C});  // y's storage
  auto [mean, var] = group_moments(z2d, groups);
  normalize(z2d, z2d, mean, at::rsqrt(var + eps).contiguous(), groups, /*relu=*/false);
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
  const at::Tensor dz = bn_input_grad(dy2d, xh2d, var, eps, groups, training, /*relu=*/false);
  const at::Tensor wt = weight.reshape({C, K * K}).t().contiguous();
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(256, R * OH * OW / 64));
  at::Tensor part = at::empty({K * K, splits, C}, x.options().dtype(acc_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "dwconv_bn_backward_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    auto stream = at::cuda::getCurrentCUDAStream();
    dw_input_grad_kernel<scalar_t, A><<<blocks_for(dx.numel()), kThreads, 0, stream>>>(
        dz.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
        R, H, W, C, OH, OW, static_cast<int>(K), static_cast<int>(stride));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dw_weight_grad_kernel<scalar_t, A><<<blocks_for(part.numel()), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), dz.const_data_ptr<scalar_t>(), part.data_ptr<A>(), R, H,
        W, C, OH, OW, static_cast<int>(K), static_cast<int>(stride), splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor dw = part.sum(1).t().reshape({C, 1, K, K}).to(x.scalar_type()).contiguous();
  return {dx, dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pwconv_bn_relu_cuda(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& mean_in,
    const at::Tensor& var_in, int64_t groups, double eps, bool training) {
  check_pwconv_bn_relu(x_in, weight, mean_in, var_in, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_last(x_in);
  const int64_t R = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = weight.size(0);
  const at::Tensor x2d = pixel_rows(x);
  at::Tensor z = at::mm(x2d, weight.reshape({O, C}).t());
  const auto acc = acc_dtype(x);
  if (!training) {
    normalize(z, z, mean_in.to(acc).contiguous(), at::rsqrt(var_in.to(acc) + eps).contiguous(),
              groups, /*relu=*/true);
    return {z.view({R, H, W, O}).permute({0, 3, 1, 2}), at::empty({0}, x.options()),
            mean_in.clone(), var_in.clone()};
  }
  at::Tensor y = at::empty_like(z);
  at::Tensor mean = at::zeros({groups, O}, x.options().dtype(acc));
  at::Tensor var = at::zeros({groups, O}, x.options().dtype(acc));
  if (R > 0) {
    std::tie(mean, var) = group_moments(z, groups);
    normalize(z, y, mean, at::rsqrt(var + eps).contiguous(), groups, /*relu=*/true);
  }
  return {y.view({R, H, W, O}).permute({0, 3, 1, 2}), z.view({R, H, W, O}).permute({0, 3, 1, 2}),
          mean.to(x.scalar_type()), var.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> pwconv_bn_relu_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& y_in, const at::Tensor& xhat_in, const at::Tensor& var, int64_t groups,
    double eps, bool training) {
  check_pwconv_bn_relu(x_in, weight, var, var, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_last(x_in);
  const int64_t R = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = weight.size(0);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({R, O, H, W}),
              "pwconv_bn_relu_backward: grad_y must be [", R, ", ", O, ", ", H, ", ", W,
              "], got ", grad_in.sizes());
  const int64_t M = R * H * W;
  const at::Tensor dy2d = pixel_rows(grad_in);
  const at::Tensor xh2d = pixel_rows(training ? xhat_in : y_in);
  const at::Tensor dz = bn_input_grad(dy2d, xh2d, var, eps, groups, training, /*relu=*/true);
  const at::Tensor x2d = pixel_rows(x);
  at::Tensor dx = at::mm(dz, weight.reshape({O, C}));
  at::Tensor dw = at::mm(dz.t(), x2d);
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
