// C++ unit test of the fused block ops through the dispatcher, against ATen's own conv2d and
// batch_norm (per row group) with autograd for the gradients. Exits non-zero on a failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const at::Tensor& a, const at::Tensor& b, const char* what) {
  const double err = (a - b).abs().max().item<double>();
  const bool ok = a.sizes() == b.sizes() && err < 1e-9;
  std::printf("%s %s (max error %.3g)\n", ok ? "ok  " : "FAIL", what, err);
  if (!ok) ++failures;
}

using Stats3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Stats4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor>;

// per-group batch norm without affine, training mode (batch statistics)
at::Tensor grouped_bn(const at::Tensor& z, int64_t groups) {
  std::vector<at::Tensor> parts;
  for (const auto& g : z.chunk(groups, 0))
    parts.push_back(at::batch_norm(g, {}, {}, {}, {}, true, 0.1, 1e-5, false));
  return at::cat(parts, 0);
}

}  // namespace

int main() {
  auto& d = c10::Dispatcher::singleton();
  auto dw = d.findSchemaOrThrow("fastshift::dwconv_bn", "")
                .typed<Stats3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, int64_t, int64_t, double, bool)>();
  auto dw_bwd = d.findSchemaOrThrow("fastshift::dwconv_bn_backward", "")
                    .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
                                 bool)>();
  auto pw = d.findSchemaOrThrow("fastshift::pwconv_bn_relu", "")
                .typed<Stats4(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, int64_t, double, bool)>();
  auto pw_bwd = d.findSchemaOrThrow("fastshift::pwconv_bn_relu_backward", "")
                    .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 int64_t, double, bool)>();
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t groups = 2;
  for (int64_t stride : {1, 2}) {
    at::Tensor x = at::randn({4, 6, 7, 5}, f64).set_requires_grad(true);
    at::Tensor w = at::randn({6, 1, 5, 5}, f64).set_requires_grad(true);
    at::Tensor stats = at::zeros({groups, 6}, f64);
    auto [y, mean, var] = dw.call(x, w, stats, stats, stride, groups, 1e-5, true);
    at::Tensor ref = grouped_bn(at::conv2d(x, w, {}, stride, 2, 1, 6), groups);
    expect_close(y, ref, stride == 1 ? "dwconv_bn stride 1" : "dwconv_bn stride 2");
    at::Tensor g = at::randn_like(ref);
    auto ref_grads = torch::autograd::grad({ref}, {x, w}, {g});
    auto [gx, gw] = dw_bwd.call(g, x.detach(), w.detach(), y, var, stride, groups, 1e-5, true);
    expect_close(gx, ref_grads[0], "dwconv_bn_backward grad x");
    expect_close(gw, ref_grads[1], "dwconv_bn_backward grad weight");
  }
  at::Tensor x = at::randn({4, 6, 3, 5}, f64).set_requires_grad(true);
  at::Tensor w = at::randn({7, 6, 1, 1}, f64).set_requires_grad(true);
  at::Tensor stats = at::zeros({groups, 7}, f64);
  auto [y, xhat, mean, var] = pw.call(x, w, stats, stats, groups, 1e-5, true);
  at::Tensor ref = at::relu(grouped_bn(at::conv2d(x, w), groups));
  expect_close(y, ref, "pwconv_bn_relu");
  at::Tensor g = at::randn_like(ref);
  auto ref_grads = torch::autograd::grad({ref}, {x, w}, {g});
  auto [gx, gw] = pw_bwd.call(g, x.detach(), w.detach(), y, xhat, var, groups, 1e-5, true);
  expect_close(gx, ref_grads[0], "pwconv_bn_relu_backward grad x");
  expect_close(gw, ref_grads[1], "pwconv_bn_relu_backward grad weight");
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
