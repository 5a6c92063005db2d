// The C++ signatures of the block op schemas (csrc/fastshift.cpp), for the code that calls
// them through the dispatcher (csrc/chain.cpp, csrc/autograd.cpp), the typed handle of
// `fastshift::<name>` and those of one family's block ops (BlockOps). Each family (the
// compiled bodies, the Triton ones: schema suffix "_triton") has the same signatures.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <tuple>
#include <vector>

namespace fastshift {

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
using ChainFn = std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor>(
    const at::Tensor&, at::TensorList, at::IntArrayRef, const at::Tensor&, const at::Tensor&,
    int64_t, double, bool);
using ChainBwdFn = std::tuple<at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, const at::Tensor&, at::TensorList, at::IntArrayRef, const at::Tensor&,
    at::TensorList, const at::Tensor&, int64_t, double, bool);

// The typed handle of the operator `fastshift::<name>` (throws if it is not registered).
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const std::string& name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(("fastshift::" + name).c_str(), "")
      .template typed<Sig>();
}

// The block ops of one family (Family 0: the compiled bodies, schema suffix ""; 1: the Triton
// bodies, "_triton"), each handle looked up once.
template <int Family>
struct BlockOps {
  static std::string name(const char* base) {
    return Family ? std::string(base) + "_triton" : std::string(base);
  }
  static const c10::TypedOperatorHandle<DwFn>& dw() {
    static const auto op = op_handle<DwFn>(name("dwconv_bn"));
    return op;
  }
  static const c10::TypedOperatorHandle<DwBwdFn>& dw_backward() {
    static const auto op = op_handle<DwBwdFn>(name("dwconv_bn_backward"));
    return op;
  }
  static const c10::TypedOperatorHandle<PwFn>& pw() {
    static const auto op = op_handle<PwFn>(name("pwconv_bn_relu"));
    return op;
  }
  static const c10::TypedOperatorHandle<PwBwdFn>& pw_backward() {
    static const auto op = op_handle<PwBwdFn>(name("pwconv_bn_relu_backward"));
    return op;
  }
  static const c10::TypedOperatorHandle<ChainFn>& chain() {
    static const auto op = op_handle<ChainFn>(name("conv_bn_chain"));
    return op;
  }
  static const c10::TypedOperatorHandle<ChainBwdFn>& chain_backward() {
    static const auto op = op_handle<ChainBwdFn>(name("conv_bn_chain_backward"));
    return op;
  }
};

}  // namespace fastshift
