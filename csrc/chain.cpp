// conv_bn_chain: a whole branch of a choice block (a chain of dwconv_bn / pwconv_bn_relu
// layers) as one op, forward and backward.
//
// The bodies here are device-generic compositions: each layer calls the registered layer op
// through the dispatcher, which picks the CUDA or Triton body from the tensors' device and the
// op family (`suffix`: "" for the compiled bodies, "_triton" for the Triton ones). What the
// chain saves is per-layer overhead outside the kernels: one autograd node and one Python
// wrapper call per branch instead of per layer (README, "Performance"). They serve CUDA
// tensors and the Triton family on any device; CPU tensors of the compiled family have their
// own body (csrc/cpu/block_cpu.cpp, conv_bn_chain_cpu), which also fuses across the layers.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "block_checks.h"
#include "op_signatures.h"

#include <string>
#include <tuple>
#include <vector>

namespace fastshift {
namespace {

// The four layer ops of one family (suffix "" or "_triton"), looked up once.
struct LayerOps {
  c10::TypedOperatorHandle<DwFn> dw;
  c10::TypedOperatorHandle<DwBwdFn> dw_backward;
  c10::TypedOperatorHandle<PwFn> pw;
  c10::TypedOperatorHandle<PwBwdFn> pw_backward;
};

LayerOps find_ops(const std::string& suffix) {
  return {op_handle<DwFn>("dwconv_bn" + suffix),
          op_handle<DwBwdFn>("dwconv_bn_backward" + suffix),
          op_handle<PwFn>("pwconv_bn_relu" + suffix),
          op_handle<PwBwdFn>("pwconv_bn_relu_backward" + suffix)};
}

const LayerOps& layer_ops(bool triton) {
  static const LayerOps compiled = find_ops("");
  static const LayerOps tri = find_ops("_triton");
  return triton ? tri : compiled;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> chain_forward(
    bool triton, const at::Tensor& x, at::TensorList weights, at::IntArrayRef layers,
    const at::Tensor& mean, const at::Tensor& var, int64_t groups, double eps, bool training) {
  const std::vector<int64_t> channels =
      check_chain("conv_bn_chain", layers, weights, mean, var, groups);
  const LayerOps& ops = layer_ops(triton);
  const size_t n = layers.size();
  // saved: the outputs of layers 0 .. n-2 (the inputs of layers 1 .. n-1), then the xhat of
  // each pointwise layer (training; empty in eval)
  std::vector<at::Tensor> saved, xhats, means, vars;
  means.reserve(n);
  vars.reserve(n);
  at::Tensor h = x;
  int64_t off = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor m_in = mean.narrow(1, off, channels[i]);
    const at::Tensor v_in = var.narrow(1, off, channels[i]);
    off += channels[i];
    at::Tensor y, xhat, m, v;
    if (layers[i] == 0) {
      std::tie(y, xhat, m, v) = ops.pw.call(h, weights[i], m_in, v_in, groups, eps, training);
      xhats.push_back(std::move(xhat));
    } else {
      std::tie(y, m, v) = ops.dw.call(h, weights[i], m_in, v_in, layers[i], groups, eps, training);
    }
    if (i + 1 < n) saved.push_back(y);
    means.push_back(std::move(m));
    vars.push_back(std::move(v));
    h = std::move(y);
  }
  saved.insert(saved.end(), xhats.begin(), xhats.end());
  return {h, saved, at::cat(means, 1), at::cat(vars, 1)};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> chain_backward(
    bool triton, const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights,
    at::IntArrayRef layers, const at::Tensor& y, at::TensorList saved, const at::Tensor& var,
    int64_t groups, double eps, bool training) {
  const char* op = "conv_bn_chain_backward";
  const std::vector<int64_t> channels = check_chain(op, layers, weights, var, var, groups);
  const size_t n = layers.size();
  size_t pointwise = 0;
  for (size_t i = 0; i < n; ++i) pointwise += layers[i] == 0;
  TORCH_CHECK(saved.size() == n - 1 + pointwise, op, ": saved must hold ", n - 1 + pointwise,
              " tensors (the forward's), got ", saved.size());
  const LayerOps& ops = layer_ops(triton);
  std::vector<at::Tensor> grad_w(n);
  at::Tensor g = grad_y;
  int64_t off = var.size(1);
  size_t xhat = saved.size();
  for (size_t j = n; j-- > 0;) {
    const at::Tensor& in = j == 0 ? x : saved[j - 1];
    const at::Tensor& out = j + 1 == n ? y : saved[j];
    off -= channels[j];
    const at::Tensor v = var.narrow(1, off, channels[j]);
    if (layers[j] == 0) {
      std::tie(g, grad_w[j]) = ops.pw_backward.call(g, in, weights[j], out, saved[--xhat], v,
                                                    groups, eps, training);
    } else {
      std::tie(g, grad_w[j]) =
          ops.dw_backward.call(g, in, weights[j], out, v, layers[j], groups, eps, training);
    }
  }
  return {g, grad_w};
}

template <bool Triton>
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> forward_body(
    const at::Tensor& x, at::TensorList weights, at::IntArrayRef layers, const at::Tensor& mean,
    const at::Tensor& var, int64_t groups, double eps, bool training) {
  return chain_forward(Triton, x, weights, layers, mean, var, groups, eps, training);
}

template <bool Triton>
std::tuple<at::Tensor, std::vector<at::Tensor>> backward_body(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights,
    at::IntArrayRef layers, const at::Tensor& y, at::TensorList saved, const at::Tensor& var,
    int64_t groups, double eps, bool training) {
  return chain_backward(Triton, grad_y, x, weights, layers, y, saved, var, groups, eps,
                        training);
}

// The Triton family on every device; the compiled family on CUDA (its CPU body is
// conv_bn_chain_cpu). The layer ops' own bodies are picked per device by the dispatcher.
void register_triton_chain(torch::Library& m) {
  m.impl("conv_bn_chain_triton", &forward_body<true>);
  m.impl("conv_bn_chain_backward_triton", &backward_body<true>);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastshift, CPU, m) { register_triton_chain(m); }

TORCH_LIBRARY_IMPL(fastshift, CUDA, m) {
  m.impl("conv_bn_chain", &forward_body<false>);
  m.impl("conv_bn_chain_backward", &backward_body<false>);
  register_triton_chain(m);
}

}  // namespace fastshift
