// Host-side argument checks of the fused block ops (dwconv_bn, pwconv_bn_relu, conv_bn_chain),
// shared by the CPU and CUDA bodies, with the layout helpers both use. Messages name the op,
// the argument and the expected value.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastshift {

inline void check_float_dtype(const char* op, const at::Tensor& x) {
  const bool ok = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  (x.is_cuda() && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16));
  TORCH_CHECK(ok, op, ": x must be float32 or float64 (or float16/bfloat16 on CUDA), got ",
              x.scalar_type());
}

// linear: x [B, C] and weight [O, C], both float32 or float64 on one device.
inline void check_linear(const at::Tensor& x, const at::Tensor& weight) {
  const char* op = "linear";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [B, C], got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [O, C], got ", weight.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight must be [O, ", x.size(1),
              "] for x of ", x.size(1), " features, got ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on ", x.device(), ", got ",
              weight.device());
}

// Statistics [G, C]: the eval statistics in, or the batch statistics out.
inline void check_stats(const char* op, const char* name, const at::Tensor& s, int64_t groups,
                        int64_t channels, const at::Tensor& x) {
  TORCH_CHECK(s.dim() == 2 && s.size(0) == groups && s.size(1) == channels, op, ": ", name,
              " must be [groups, C] = [", groups, ", ", channels, "], got ", s.sizes());
  TORCH_CHECK(s.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ",
              s.device());
}

inline void check_groups(const char* op, const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  TORCH_CHECK(x.size(0) % groups == 0, op, ": the ", x.size(0), " rows of x do not split into ",
              groups, " equal groups");
}

// x [R, C, H, W], weight [C, 1, k, k] with k odd, stride 1 or 2; padding k / 2. (The checks of
// dwconv_bn but its statistics', which a chain checks once for all its layers.)
inline void check_dwconv_input(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                               int64_t groups) {
  const char* op = "dwconv_bn";
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [R, C, H, W], got ", x.dim(), "-D");
  check_float_dtype(op, x);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              op, ": weight must be [C, 1, k, k] with C = ", x.size(1), " and k odd, got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on ", x.device());
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  check_groups(op, x, groups);
}

inline void check_dwconv_bn(const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& mean, const at::Tensor& var, int64_t stride,
                            int64_t groups) {
  check_dwconv_input(x, weight, stride, groups);
  check_stats("dwconv_bn", "mean", mean, groups, x.size(1), x);
  check_stats("dwconv_bn", "var", var, groups, x.size(1), x);
}

// x [R, C, H, W], weight [O, C, 1, 1]. (pwconv_bn_relu's checks but its statistics'.)
inline void check_pwconv_input(const at::Tensor& x, const at::Tensor& weight, int64_t groups) {
  const char* op = "pwconv_bn_relu";
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [R, C, H, W], got ", x.dim(), "-D");
  check_float_dtype(op, x);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 1 &&
                  weight.size(3) == 1,
              op, ": weight must be [O, C, 1, 1] with C = ", x.size(1), ", got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on ", x.device());
  check_groups(op, x, groups);
}

inline void check_pwconv_bn_relu(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& mean, const at::Tensor& var, int64_t groups) {
  check_pwconv_input(x, weight, groups);
  check_stats("pwconv_bn_relu", "mean", mean, groups, weight.size(0), x);
  check_stats("pwconv_bn_relu", "var", var, groups, weight.size(0), x);
}

// conv_bn_chain: layers[i] is 0 = pointwise (1x1 conv + BN + ReLU), 1 or 2 = depthwise conv
// of that stride + BN. Returns the channel count of every layer's output (its statistics'
// width).
inline std::vector<int64_t> check_chain(const char* op, at::IntArrayRef layers,
                                        at::TensorList weights, const at::Tensor& mean,
                                        const at::Tensor& var, int64_t groups) {
  const size_t n = layers.size();
  TORCH_CHECK(n >= 1, op, ": the chain needs at least one layer");
  TORCH_CHECK(weights.size() == n, op, ": one weight per layer: ", n, " layers, got ",
              weights.size(), " weights");
  std::vector<int64_t> channels(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(layers[i] >= 0 && layers[i] <= 2, op, ": layers[", i, "] must be 0 "
                "(pointwise), 1 or 2 (depthwise stride), got ", layers[i]);
    TORCH_CHECK(weights[i].dim() == 4, op, ": weights[", i, "] must be 4-D, got ",
                weights[i].sizes());
    channels[i] = weights[i].size(0);
    total += channels[i];
  }
  for (const at::Tensor* s : {&mean, &var})
    TORCH_CHECK(s->dim() == 2 && s->size(0) == groups && s->size(1) == total, op, ": ",
                s == &mean ? "mean" : "var", " must be [groups, sum of the layers' channels] = [",
                groups, ", ", total, "], got ", s->sizes());
  return channels;
}

inline int64_t conv_out_size(int64_t in, int64_t k, int64_t stride) {
  return (in + 2 * (k / 2) - k) / stride + 1;
}

// Channels-last layout shared by the CPU and CUDA bodies.
// [R, C, H, W] in any layout -> contiguous channels-last storage ([R, H, W, C] rows).
inline at::Tensor rows_last(const at::Tensor& t) {
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

// A new channels-last [R, C, H, W] tensor (storage [R, H, W, C]).
inline at::Tensor empty_rows_last(int64_t R, int64_t C, int64_t H, int64_t W,
                                  const at::Tensor& like) {
  return at::empty({R, H, W, C}, like.options()).permute({0, 3, 1, 2});
}

// The [R*H*W, C] pixel rows of an [R, C, H, W] tensor, dense (a view when it is channels-last).
inline at::Tensor pixel_rows(const at::Tensor& t) {
  return rows_last(t).permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}

// pixel_rows, but a view wherever the pixels are evenly spaced with dense channels (stride 1),
// rows stride(0) apart (pixel_stride): a channels-last tensor, or a channel range of one, as
// the halves of a split-ready ShuffleNetV2 input; else pixel_rows' dense copy. For kernels that
// take a row stride (the CPU products).
inline at::Tensor strided_pixel_rows(const at::Tensor& t) {
  const int64_t R = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  if (R * C * H * W > 0 && C > 1 && t.stride(1) == 1) {
    // the pixel stride, from the first dimension of more than one element
    const int64_t p = W > 1 ? t.stride(3) : H > 1 ? t.stride(2) : R > 1 ? t.stride(0) : C;
    if (p >= C && (W == 1 || t.stride(3) == p) && (H == 1 || t.stride(2) == W * p) &&
        (R == 1 || t.stride(0) == H * W * p))
      return t.as_strided({R * H * W, C}, {p, 1});
  }
  return pixel_rows(t);
}

// The row stride of a [M, C] pixel-rows matrix with dense channels (strided_pixel_rows).
inline int64_t pixel_stride(const at::Tensor& rows) {
  return rows.size(0) > 1 ? rows.stride(0) : rows.size(1);
}

}  // namespace fastshift
