// Autograd of the fastshift ops, in C++ (the Autograd dispatch key).
//
// Each differentiable op gets a torch::autograd::Function whose forward calls the op below
// autograd (any device body: CPU, CUDA, or the Triton family's Python bodies) and whose
// backward calls the registered backward op, so every gradient is itself an op the
// dispatcher, opcheck and torch.compile see (the fake kernels are registered from Python,
// fastshift/ops/_registry.py). The formulas were Python `torch.library.register_autograd`
// functions before; in C++ the forward and backward of a call run no Python at all (on an
// H200 a small block's host time per forward + backward fell by a third: README, "Design").
//
// The gradient reaches x and the weights through y only: the statistics outputs, a
// pwconv_bn_relu's xhat and a chain's saved tensors are state for the backward, marked
// non-differentiable, and their (always absent) gradients are not zero-filled.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_signatures.h"

#include <string>
#include <tuple>
#include <vector>

namespace fastshift {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// `n` undefined gradients after `head`: the backward of a Function returns one entry per
// forward argument, tensor lists expanded, undefined for the arguments that are no tensors.
variable_list grads(variable_list head, size_t n) {
  head.resize(head.size() + n);
  return head;
}

// ---- channel_split / channel_interleave: each other's backward (permutations) -------------

using SplitFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&);
using InterleaveFn = at::Tensor(const at::Tensor&, const at::Tensor&);

const c10::TypedOperatorHandle<SplitFn>& split_op() {
  static const auto op = op_handle<SplitFn>("channel_split");
  return op;
}

const c10::TypedOperatorHandle<InterleaveFn>& interleave_op() {
  static const auto op = op_handle<InterleaveFn>("channel_interleave");
  return op;
}

struct ChannelSplit : torch::autograd::Function<ChannelSplit> {
  static variable_list forward(AutogradContext*, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [even, odd] = split_op().call(x);
    return {even, odd};
  }
  static variable_list backward(AutogradContext*, variable_list g) {
    return {interleave_op().call(g[0], g[1])};
  }
};

struct ChannelInterleave : torch::autograd::Function<ChannelInterleave> {
  static variable_list forward(AutogradContext*, const at::Tensor& even, const at::Tensor& odd) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return {interleave_op().call(even, odd)};
  }
  static variable_list backward(AutogradContext*, variable_list g) {
    auto [even, odd] = split_op().call(g[0]);
    return {even, odd};
  }
};

std::tuple<at::Tensor, at::Tensor> channel_split_autograd(const at::Tensor& x) {
  auto out = ChannelSplit::apply(x);
  return {out[0], out[1]};
}

at::Tensor channel_interleave_autograd(const at::Tensor& even, const at::Tensor& odd) {
  return ChannelInterleave::apply(even, odd)[0];
}

// ---- shuffle_cat / shuffle_cat_backward: also a permutation pair --------------------------

using ShuffleCatFn = at::Tensor(const at::Tensor&, const at::Tensor&);
using ShuffleCatBwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t);

const c10::TypedOperatorHandle<ShuffleCatFn>& shuffle_cat_op() {
  static const auto op = op_handle<ShuffleCatFn>("shuffle_cat");
  return op;
}

const c10::TypedOperatorHandle<ShuffleCatBwdFn>& shuffle_cat_backward_op() {
  static const auto op = op_handle<ShuffleCatBwdFn>("shuffle_cat_backward");
  return op;
}

struct ShuffleCat : torch::autograd::Function<ShuffleCat> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    ctx->saved_data["split"] = a.size(1);
    at::AutoDispatchBelowADInplaceOrView guard;
    return {shuffle_cat_op().call(a, b)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto [ga, gb] = shuffle_cat_backward_op().call(g[0], ctx->saved_data["split"].toInt());
    return {ga, gb};
  }
};

struct ShuffleCatBackward : torch::autograd::Function<ShuffleCatBackward> {
  static variable_list forward(AutogradContext*, const at::Tensor& grad, int64_t split) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [ga, gb] = shuffle_cat_backward_op().call(grad, split);
    return {ga, gb};
  }
  static variable_list backward(AutogradContext*, variable_list g) {
    return grads({shuffle_cat_op().call(g[0], g[1])}, 1);
  }
};

// ---- shuffle_cat_pair / shuffle_cat_pair_backward: the same permutation, two halves --------

using PairFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&);
using PairBwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     int64_t);

const c10::TypedOperatorHandle<PairFn>& pair_op() {
  static const auto op = op_handle<PairFn>("shuffle_cat_pair");
  return op;
}

const c10::TypedOperatorHandle<PairBwdFn>& pair_backward_op() {
  static const auto op = op_handle<PairBwdFn>("shuffle_cat_pair_backward");
  return op;
}

struct ShuffleCatPair : torch::autograd::Function<ShuffleCatPair> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    ctx->saved_data["split"] = a.size(1);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [lo, hi] = pair_op().call(a, b);
    return {lo, hi};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    // an unused half's gradient arrives as zeros (the Function materializes absent ones)
    auto [ga, gb] = pair_backward_op().call(g[0], g[1], ctx->saved_data["split"].toInt());
    return {ga, gb};
  }
};

struct ShuffleCatPairBackward : torch::autograd::Function<ShuffleCatPairBackward> {
  static variable_list forward(AutogradContext*, const at::Tensor& lo, const at::Tensor& hi,
                               int64_t split) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [ga, gb] = pair_backward_op().call(lo, hi, split);
    return {ga, gb};
  }
  static variable_list backward(AutogradContext*, variable_list g) {
    auto [lo, hi] = pair_op().call(g[0], g[1]);
    return grads({lo, hi}, 1);
  }
};

std::tuple<at::Tensor, at::Tensor> shuffle_cat_pair_autograd(const at::Tensor& a,
                                                             const at::Tensor& b) {
  auto out = ShuffleCatPair::apply(a, b);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> shuffle_cat_pair_backward_autograd(const at::Tensor& lo,
                                                                      const at::Tensor& hi,
                                                                      int64_t split) {
  auto out = ShuffleCatPairBackward::apply(lo, hi, split);
  return {out[0], out[1]};
}

// ---- shuffle_regroup / shuffle_regroup_backward: a linear map and its adjoint -------------

using RegroupFn = std::vector<at::Tensor>(at::TensorList, at::TensorList, at::IntArrayRef,
                                          int64_t);
using RegroupBwdFn = std::vector<at::Tensor>(at::TensorList, at::IntArrayRef, int64_t,
                                             at::IntArrayRef, int64_t);

const c10::TypedOperatorHandle<RegroupFn>& regroup_op() {
  static const auto op = op_handle<RegroupFn>("shuffle_regroup");
  return op;
}

const c10::TypedOperatorHandle<RegroupBwdFn>& regroup_backward_op() {
  static const auto op = op_handle<RegroupBwdFn>("shuffle_regroup_backward");
  return op;
}

struct ShuffleRegroup : torch::autograd::Function<ShuffleRegroup> {
  static variable_list forward(AutogradContext* ctx, at::TensorList a, at::TensorList b,
                               at::IntArrayRef routes, int64_t batch) {
    std::vector<int64_t> rows;
    for (const at::Tensor& t : a) rows.push_back(t.size(0));
    ctx->saved_data["routes"] = routes.vec();
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["batch"] = batch;
    ctx->saved_data["split"] = a.empty() ? int64_t(0) : a[0].size(1);
    at::AutoDispatchBelowADInplaceOrView guard;
    return regroup_op().call(a, b, routes, batch);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    // absent gradients arrive as zeros (the Function materializes them)
    const std::vector<int64_t> routes = ctx->saved_data["routes"].toIntVector();
    const std::vector<int64_t> rows = ctx->saved_data["rows"].toIntVector();
    const std::vector<at::Tensor> ab = regroup_backward_op().call(
        g, routes, ctx->saved_data["batch"].toInt(), rows, ctx->saved_data["split"].toInt());
    variable_list out(ab.size());  // forward's inputs: every a, then every b
    const size_t n = ab.size() / 2;
    for (size_t i = 0; i < n; ++i) {
      out[i] = ab[2 * i];
      out[n + i] = ab[2 * i + 1];
    }
    return grads(out, 2);
  }
};

struct ShuffleRegroupBackward : torch::autograd::Function<ShuffleRegroupBackward> {
  static variable_list forward(AutogradContext* ctx, at::TensorList g, at::IntArrayRef routes,
                               int64_t batch, at::IntArrayRef rows, int64_t split) {
    ctx->saved_data["routes"] = routes.vec();
    ctx->saved_data["batch"] = batch;
    at::AutoDispatchBelowADInplaceOrView guard;
    return regroup_backward_op().call(g, routes, batch, rows, split);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    std::vector<at::Tensor> a, b;
    for (size_t i = 0; i + 1 < g.size(); i += 2) {
      a.push_back(g[i]);
      b.push_back(g[i + 1]);
    }
    const std::vector<int64_t> routes = ctx->saved_data["routes"].toIntVector();
    return grads(regroup_op().call(a, b, routes, ctx->saved_data["batch"].toInt()), 4);
  }
};

std::vector<at::Tensor> shuffle_regroup_autograd(at::TensorList a, at::TensorList b,
                                                 at::IntArrayRef routes, int64_t batch) {
  return ShuffleRegroup::apply(a, b, routes, batch);
}

std::vector<at::Tensor> shuffle_regroup_backward_autograd(at::TensorList g,
                                                          at::IntArrayRef routes, int64_t batch,
                                                          at::IntArrayRef rows, int64_t split) {
  return ShuffleRegroupBackward::apply(g, routes, batch, rows, split);
}

at::Tensor shuffle_cat_autograd(const at::Tensor& a, const at::Tensor& b) {
  return ShuffleCat::apply(a, b)[0];
}

std::tuple<at::Tensor, at::Tensor> shuffle_cat_backward_autograd(const at::Tensor& grad,
                                                                 int64_t split) {
  auto out = ShuffleCatBackward::apply(grad, split);
  return {out[0], out[1]};
}

// ---- linear / linear_backward (CPU body only) -----------------------------------------------

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&);
using LinearBwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&);

struct Linear : torch::autograd::Function<Linear> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight) {
    static const auto op = op_handle<LinearFn>("linear");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->set_materialize_grads(false);
    return {op.call(x, weight)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    static const auto op = op_handle<LinearBwdFn>("linear_backward");
    if (!g[0].defined()) return grads({}, 2);
    const auto s = ctx->get_saved_variables();
    auto [gx, gw] = op.call(g[0], s[0], s[1]);
    return {gx, gw};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight) {
  return Linear::apply(x, weight)[0];
}

// ---- stem_conv_bn_relu (CPU body only): the weight's gradient alone --------------------------

using StemFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
    bool);
using StemBwdFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, int64_t, double, bool);

struct StemConvBnRelu : torch::autograd::Function<StemConvBnRelu> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& mean,
                               const at::Tensor& var, int64_t stride, double eps, bool training) {
    static const auto op = op_handle<StemFn>("stem_conv_bn_relu");
    TORCH_CHECK(!x.requires_grad(), "stem_conv_bn_relu: x requires grad, but the op gives the "
                "weight's gradient only (x is the network's input); use the modules instead");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, z, m, v] = op.call(x, weight, mean, var, stride, eps, training);
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["training"] = training;
    ctx->save_for_backward({x, weight, y, z, m, v});
    ctx->mark_non_differentiable({z, m, v});
    ctx->set_materialize_grads(false);
    return {y, z, m, v};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    static const auto op = op_handle<StemBwdFn>("stem_conv_bn_relu_backward");
    constexpr size_t kArgs = 7;
    if (!g[0].defined()) return grads({}, kArgs);
    const auto s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    at::Tensor gw = op.call(g[0], s[0], s[1], s[2], s[3], s[4], s[5], d["stride"].toInt(),
                            d["eps"].toDouble(), d["training"].toBool());
    return grads({at::Tensor(), gw}, kArgs - 2);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stem_conv_bn_relu_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var,
    int64_t stride, double eps, bool training) {
  auto out = StemConvBnRelu::apply(x, weight, mean, var, stride, eps, training);
  return {out[0], out[1], out[2], out[3]};
}

// ---- dwconv_bn / pwconv_bn_relu / conv_bn_chain, each of two families ---------------------
// (Family = 0: the compiled bodies; 1: the Triton bodies. Their handles: BlockOps.)

// The non-tensor arguments every layer op shares, kept for the backward.
void save_args(AutogradContext* ctx, int64_t groups, double eps, bool training) {
  ctx->saved_data["groups"] = groups;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["training"] = training;
}

template <int Family>
struct DwconvBn : torch::autograd::Function<DwconvBn<Family>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& mean,
                               const at::Tensor& var, int64_t stride, int64_t groups, double eps,
                               bool training) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, m, v] =
        BlockOps<Family>::dw().call(x, weight, mean, var, stride, groups, eps, training);
    ctx->saved_data["stride"] = stride;
    save_args(ctx, groups, eps, training);
    ctx->save_for_backward({x, weight, y, v});
    ctx->mark_non_differentiable({m, v});
    ctx->set_materialize_grads(false);
    return {y, m, v};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    constexpr size_t kArgs = 8;
    if (!g[0].defined()) return grads({}, kArgs);
    const auto s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    auto [gx, gw] = BlockOps<Family>::dw_backward().call(
        g[0], s[0], s[1], s[2], s[3], d["stride"].toInt(), d["groups"].toInt(),
        d["eps"].toDouble(), d["training"].toBool());
    return grads({gx, gw}, kArgs - 2);
  }
};

template <int Family>
struct PwconvBnRelu : torch::autograd::Function<PwconvBnRelu<Family>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& mean,
                               const at::Tensor& var, int64_t groups, double eps, bool training) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, xhat, m, v] =
        BlockOps<Family>::pw().call(x, weight, mean, var, groups, eps, training);
    save_args(ctx, groups, eps, training);
    ctx->save_for_backward({x, weight, y, xhat, v});
    ctx->mark_non_differentiable({xhat, m, v});
    // without this every backward would zero-fill an xhat-sized gradient it never reads
    ctx->set_materialize_grads(false);
    return {y, xhat, m, v};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    constexpr size_t kArgs = 7;
    if (!g[0].defined()) return grads({}, kArgs);
    const auto s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    auto [gx, gw] = BlockOps<Family>::pw_backward().call(
        g[0], s[0], s[1], s[2], s[3], s[4], d["groups"].toInt(), d["eps"].toDouble(),
        d["training"].toBool());
    return grads({gx, gw}, kArgs - 2);
  }
};

template <int Family>
struct ConvBnChain : torch::autograd::Function<ConvBnChain<Family>> {
  // returns y, mean, var, then the saved tensors
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               at::TensorList weights, at::IntArrayRef layers,
                               const at::Tensor& mean, const at::Tensor& var, int64_t groups,
                               double eps, bool training) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, saved, m, v] =
        BlockOps<Family>::chain().call(x, weights, layers, mean, var, groups, eps, training);
    ctx->saved_data["layers"] = layers.vec();
    save_args(ctx, groups, eps, training);
    variable_list keep{x, y, v};
    keep.insert(keep.end(), weights.begin(), weights.end());
    keep.insert(keep.end(), saved.begin(), saved.end());
    ctx->save_for_backward(keep);
    variable_list out{y, m, v};
    out.insert(out.end(), saved.begin(), saved.end());
    ctx->mark_non_differentiable(variable_list(out.begin() + 1, out.end()));
    ctx->set_materialize_grads(false);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto& d = ctx->saved_data;
    const std::vector<int64_t> layers = d["layers"].toIntVector();
    const size_t n = layers.size();
    // x, the n weights, mean, var, then layers, groups, eps, training
    const size_t args = n + 7;
    if (!g[0].defined()) return grads({}, args);
    const auto s = ctx->get_saved_variables();
    const std::vector<at::Tensor> weights(s.begin() + 3, s.begin() + 3 + n);
    const std::vector<at::Tensor> saved(s.begin() + 3 + n, s.end());
    auto [gx, gw] = BlockOps<Family>::chain_backward().call(
        g[0], s[0], weights, layers, s[1], saved, s[2], d["groups"].toInt(),
        d["eps"].toDouble(), d["training"].toBool());
    variable_list out{gx};
    out.insert(out.end(), gw.begin(), gw.end());
    return grads(std::move(out), args - 1 - n);
  }
};

template <int Family>
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var,
    int64_t stride, int64_t groups, double eps, bool training) {
  auto out = DwconvBn<Family>::apply(x, weight, mean, var, stride, groups, eps, training);
  return {out[0], out[1], out[2]};
}

template <int Family>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pwconv_bn_relu_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var,
    int64_t groups, double eps, bool training) {
  auto out = PwconvBnRelu<Family>::apply(x, weight, mean, var, groups, eps, training);
  return {out[0], out[1], out[2], out[3]};
}

template <int Family>
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> conv_bn_chain_autograd(
    const at::Tensor& x, at::TensorList weights, at::IntArrayRef layers, const at::Tensor& mean,
    const at::Tensor& var, int64_t groups, double eps, bool training) {
  auto out =
      ConvBnChain<Family>::apply(x, weights, layers, mean, var, groups, eps, training);
  return {out[0], std::vector<at::Tensor>(out.begin() + 3, out.end()), out[1], out[2]};
}

// conv_bn_chain_eval keeps nothing for a backward: with gradients wanted it refuses by name
// (fastshift.ops.conv_bn_chain calls it only without autograd), else it runs below autograd.
at::Tensor conv_bn_chain_eval_autograd(const at::Tensor& x, at::TensorList weights,
                                       at::IntArrayRef layers, const at::Tensor& mean,
                                       const at::Tensor& var, int64_t groups, double eps,
                                       const std::optional<at::Tensor>& shuffle_with) {
  if (at::GradMode::is_enabled()) {
    bool wants = x.requires_grad() || (shuffle_with && shuffle_with->requires_grad());
    for (const at::Tensor& w : weights) wants = wants || w.requires_grad();
    TORCH_CHECK(!wants, "conv_bn_chain_eval is not differentiable (it keeps no saved "
                "tensors): use conv_bn_chain, or run it under torch.no_grad()");
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastshift::conv_bn_chain_eval", "")
                             .typed<at::Tensor(const at::Tensor&, at::TensorList, at::IntArrayRef,
                                               const at::Tensor&, const at::Tensor&, int64_t,
                                               double, const std::optional<at::Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, weights, layers, mean, var, groups, eps, shuffle_with);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastshift, Autograd, m) {
  m.impl("conv_bn_chain_eval", &conv_bn_chain_eval_autograd);
  m.impl("channel_split", &channel_split_autograd);
  m.impl("channel_interleave", &channel_interleave_autograd);
  m.impl("shuffle_cat", &shuffle_cat_autograd);
  m.impl("shuffle_cat_backward", &shuffle_cat_backward_autograd);
  m.impl("shuffle_cat_pair", &shuffle_cat_pair_autograd);
  m.impl("shuffle_cat_pair_backward", &shuffle_cat_pair_backward_autograd);
  m.impl("shuffle_regroup", &shuffle_regroup_autograd);
  m.impl("shuffle_regroup_backward", &shuffle_regroup_backward_autograd);
  m.impl("linear", &linear_autograd);
  m.impl("stem_conv_bn_relu", &stem_conv_bn_relu_autograd);
  m.impl("dwconv_bn", &dwconv_bn_autograd<0>);
  m.impl("pwconv_bn_relu", &pwconv_bn_relu_autograd<0>);
  m.impl("conv_bn_chain", &conv_bn_chain_autograd<0>);
  m.impl("dwconv_bn_triton", &dwconv_bn_autograd<1>);
  m.impl("pwconv_bn_relu_triton", &pwconv_bn_relu_autograd<1>);
  m.impl("conv_bn_chain_triton", &conv_bn_chain_autograd<1>);
}

}  // namespace fastshift
