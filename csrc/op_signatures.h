// The C++ signatures of the block op schemas (csrc/fastshift.cpp), for the code that calls
// them through the dispatcher (csrc/chain.cpp, csrc/autograd.cpp), and the typed handle of
// `fastshift::<name>`. Each family (the compiled bodies, the Triton ones: schema suffix
// "_triton") has the same signatures.
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

}  // namespace fastshift
