// conv_bn_chain: a whole branch of a choice block (a chain of dwconv_bn / pwconv_bn_relu
// layers) as one op, forward and backward.
//
// The bodies are device-generic compositions: each layer calls the registered layer op through
// the dispatcher, which picks the CPU, CUDA or Triton body from the tensors' device and the op
// family (`suffix`: "" for the compiled bodies, "_triton" for the Triton ones). What the chain
// saves is per-layer overhead outside the kernels: one autograd node, one Python wrapper call
// and one set of argument checks per branch instead of per layer (README, "Performance").
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace fastshift {
namespace {

using DwFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
    int64_t, double, bool);
using DwBwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, int64_t, int64_t, double,
                                                   bool);
using PwFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
    bool);
using PwBwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&, int64_t,
                                                   double, bool);

// The four layer ops of one family (suffix "" or "_triton"), looked up once.
struct LayerOps {
  c10::TypedOperatorHandle<DwFn> dw;
  c10::TypedOperatorHandle<DwBwdFn> dw_backward;
  c10::TypedOperatorHandle<PwFn> pw;
  c10::TypedOperatorHandle<PwBwdFn> pw_backward;
};

LayerOps find_ops(const std::string& suffix) {
  auto& d = c10::Dispatcher::singleton();
  return {d.findSchemaOrThrow(("fastshift::dwconv_bn" + suffix).c_str(), "").typed<DwFn>(),
          d.findSchemaOrThrow(("fastshift::dwconv_bn_backward" + suffix).c_str(), "")
              .typed<DwBwdFn>(),
          d.findSchemaOrThrow(("fastshift::pwconv_bn_relu" + suffix).c_str(), "").typed<PwFn>(),
          d.findSchemaOrThrow(("fastshift::pwconv_bn_relu_backward" + suffix).c_str(), "")
              .typed<PwBwdFn>()};
}

const LayerOps& layer_ops(bool triton) {
  static const LayerOps compiled = find_ops("");
  static const LayerOps tri = find_ops("_triton");
  return triton ? tri : compiled;
}

// layers[i]: 0 = pointwise (1x1 conv + BN + ReLU), 1 or 2 = depthwise conv of that stride + BN.
void check_chain(const char* op, at::IntArrayRef layers, size_t weights, size_t mean,
                 size_t var) {
  const size_t n = layers.size();
  TORCH_CHECK(n >= 1, op, ": the chain needs at least one layer");
  TORCH_CHECK(weights == n && mean == n && var == n, op, ": layers, weights, mean and var must "
              "have one entry per layer, got ", n, ", ", weights, ", ", mean, " and ", var);
  for (size_t i = 0; i < n; ++i)
    TORCH_CHECK(layers[i] >= 0 && layers[i] <= 2, op, ": layers[", i, "] must be 0 "
                "(pointwise), 1 or 2 (depthwise stride), got ", layers[i]);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
chain_forward(bool triton, const at::Tensor& x, at::TensorList weights, at::IntArrayRef layers,
              at::TensorList mean, at::TensorList var, int64_t groups, double eps,
              bool training) {
  check_chain("conv_bn_chain", layers, weights.size(), mean.size(), var.size());
  const LayerOps& ops = layer_ops(triton);
  const size_t n = layers.size();
  // saved: the outputs of layers 0 .. n-2 (the inputs of layers 1 .. n-1), then one xhat per
  // layer (pointwise layers in training; an empty tensor otherwise)
  std::vector<at::Tensor> saved, xhats, means, vars;
  saved.reserve(2 * n - 1);
  means.reserve(n);
  vars.reserve(n);
  at::Tensor h = x;
  for (size_t i = 0; i < n; ++i) {
    at::Tensor y, xhat, m, v;
    if (layers[i] == 0) {
      std::tie(y, xhat, m, v) = ops.pw.call(h, weights[i], mean[i], var[i], groups, eps, training);
    } else {
      std::tie(y, m, v) =
          ops.dw.call(h, weights[i], mean[i], var[i], layers[i], groups, eps, training);
      xhat = at::empty({0}, x.options());
    }
    if (i + 1 < n) saved.push_back(y);
    xhats.push_back(std::move(xhat));
    means.push_back(std::move(m));
    vars.push_back(std::move(v));
    h = std::move(y);
  }
  saved.insert(saved.end(), xhats.begin(), xhats.end());
  return {h, saved, means, vars};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> chain_backward(
    bool triton, const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights,
    at::IntArrayRef layers, const at::Tensor& y, at::TensorList saved, at::TensorList var,
    int64_t groups, double eps, bool training) {
  const size_t n = layers.size();
  check_chain("conv_bn_chain_backward", layers, weights.size(), var.size(), var.size());
  TORCH_CHECK(saved.size() == 2 * n - 1, "conv_bn_chain_backward: saved must hold ", 2 * n - 1,
              " tensors (the forward's), got ", saved.size());
  const LayerOps& ops = layer_ops(triton);
  std::vector<at::Tensor> grad_w(n);
  at::Tensor g = grad_y;
  for (size_t j = n; j-- > 0;) {
    const at::Tensor& in = j == 0 ? x : saved[j - 1];
    const at::Tensor& out = j + 1 == n ? y : saved[j];
    if (layers[j] == 0) {
      std::tie(g, grad_w[j]) = ops.pw_backward.call(g, in, weights[j], out, saved[n - 1 + j],
                                                    var[j], groups, eps, training);
    } else {
      std::tie(g, grad_w[j]) = ops.dw_backward.call(g, in, weights[j], out, var[j], layers[j],
                                                    groups, eps, training);
    }
  }
  return {g, grad_w};
}

template <bool Triton>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
forward_body(const at::Tensor& x, at::TensorList weights, at::IntArrayRef layers,
             at::TensorList mean, at::TensorList var, int64_t groups, double eps, bool training) {
  return chain_forward(Triton, x, weights, layers, mean, var, groups, eps, training);
}

template <bool Triton>
std::tuple<at::Tensor, std::vector<at::Tensor>> backward_body(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights,
    at::IntArrayRef layers, const at::Tensor& y, at::TensorList saved, at::TensorList var,
    int64_t groups, double eps, bool training) {
  return chain_backward(Triton, grad_y, x, weights, layers, y, saved, var, groups, eps,
                        training);
}

}  // namespace

// CPU and CUDA: the layer ops' own bodies are picked per device by the dispatcher.
TORCH_LIBRARY_IMPL(fastshift, CPU, m) {
  m.impl("conv_bn_chain", &forward_body<false>);
  m.impl("conv_bn_chain_backward", &backward_body<false>);
  m.impl("conv_bn_chain_triton", &forward_body<true>);
  m.impl("conv_bn_chain_backward_triton", &backward_body<true>);
}

TORCH_LIBRARY_IMPL(fastshift, CUDA, m) {
  m.impl("conv_bn_chain", &forward_body<false>);
  m.impl("conv_bn_chain_backward", &backward_body<false>);
  m.impl("conv_bn_chain_triton", &forward_body<true>);
  m.impl("conv_bn_chain_backward_triton", &backward_body<true>);
}

}  // namespace fastshift
