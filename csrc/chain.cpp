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

// The chain through the layer ops of one family (BlockOps<Family>: 0 compiled, 1 Triton).
template <int Family>
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> chain_forward(
    const at::Tensor& x, at::TensorList weights, at::IntArrayRef layers,
    const at::Tensor& mean, const at::Tensor& var, int64_t groups, double eps, bool training) {
  const std::vector<int64_t> channels =
      check_chain("conv_bn_chain", layers, weights, mean, var, groups);
  using Ops = BlockOps<Family>;
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
      std::tie(y, xhat, m, v) = Ops::pw().call(h, weights[i], m_in, v_in, groups, eps, training);
      xhats.push_back(std::move(xhat));
    } else {
      std::tie(y, m, v) =
          Ops::dw().call(h, weights[i], m_in, v_in, layers[i], groups, eps, training);
    }
    if (i + 1 < n) saved.push_back(y);
    means.push_back(std::move(m));
    vars.push_back(std::move(v));
    h = std::move(y);
  }
  saved.insert(saved.end(), xhats.begin(), xhats.end());
  return {h, saved, at::cat(means, 1), at::cat(vars, 1)};
}

template <int Family>
std::tuple<at::Tensor, std::vector<at::Tensor>> chain_backward(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights,
    at::IntArrayRef layers, const at::Tensor& y, at::TensorList saved, const at::Tensor& var,
    int64_t groups, double eps, bool training) {
  const char* op = "conv_bn_chain_backward";
  const std::vector<int64_t> channels = check_chain(op, layers, weights, var, var, groups);
  const size_t n = layers.size();
  size_t pointwise = 0;
  for (size_t i = 0; i < n; ++i) pointwise += layers[i] == 0;
  TORCH_CHECK(saved.size() == n - 1 + pointwise, op, ": saved must hold ", n - 1 + pointwise,
              " tensors (the forward's), got ", saved.size());
  using Ops = BlockOps<Family>;
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
      std::tie(g, grad_w[j]) = Ops::pw_backward().call(g, in, weights[j], out, saved[--xhat], v,
                                                       groups, eps, training);
    } else {
      std::tie(g, grad_w[j]) =
          Ops::dw_backward().call(g, in, weights[j], out, v, layers[j], groups, eps, training);
    }
  }
  return {g, grad_w};
}

// The Triton family on every device; the compiled family on CUDA (its CPU body is
// conv_bn_chain_cpu). The layer ops' own bodies are picked per device by the dispatcher.
void register_triton_chain(torch::Library& m) {
  m.impl("conv_bn_chain_triton", &chain_forward<1>);
  m.impl("conv_bn_chain_backward_triton", &chain_backward<1>);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastshift, CPU, m) { register_triton_chain(m); }

TORCH_LIBRARY_IMPL(fastshift, CUDA, m) {
  m.impl("conv_bn_chain", &chain_forward<0>);
  m.impl("conv_bn_chain_backward", &chain_backward<0>);
  register_triton_chain(m);
}

}  // namespace fastshift
