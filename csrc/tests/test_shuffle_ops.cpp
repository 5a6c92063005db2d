// C++ unit test of the channel shuffle ops (channel_split, channel_interleave, shuffle_cat and
// its backward) through the dispatcher, against the ATen formulation of the reference (strided
// slices, stack and cat). Exits non-zero on the first failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <tuple>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

std::tuple<at::Tensor, at::Tensor> split(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastshift::channel_split", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(x);
}

at::Tensor interleave(const at::Tensor& a, const at::Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastshift::channel_interleave", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(a, b);
}

at::Tensor shuffle_cat(const at::Tensor& a, const at::Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastshift::shuffle_cat", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(a, b);
}

std::tuple<at::Tensor, at::Tensor> shuffle_cat_backward(const at::Tensor& g, int64_t split) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastshift::shuffle_cat_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  return op.call(g, split);
}

// shuffle_cat against cat(t[:, 0::2], t[:, 1::2]) with t = cat(a, b), and its backward as the
// inverse permutation, for NCHW and channels-last inputs and an odd split.
void check_shuffle_cat(int64_t ca, int64_t cb, at::MemoryFormat fmt, const char* what) {
  using at::indexing::None;
  using at::indexing::Slice;
  at::Tensor a = at::randn({3, ca, 4, 5}).contiguous(fmt);
  at::Tensor b = at::randn({3, cb, 4, 5}).contiguous(fmt);
  at::Tensor t = at::cat({a, b}, 1);
  at::Tensor want = at::cat({t.index({Slice(), Slice(0, None, 2)}),
                             t.index({Slice(), Slice(1, None, 2)})}, 1);
  at::Tensor out = shuffle_cat(a, b);
  expect(at::equal(out, want), what);
  auto [ga, gb] = shuffle_cat_backward(out, ca);
  expect(at::equal(ga, a) && at::equal(gb, b), "shuffle_cat_backward inverts shuffle_cat");
}

}  // namespace

int main() {
  check_shuffle_cat(4, 4, at::MemoryFormat::Contiguous, "shuffle_cat NCHW");
  check_shuffle_cat(4, 4, at::MemoryFormat::ChannelsLast, "shuffle_cat channels-last");
  check_shuffle_cat(3, 5, at::MemoryFormat::ChannelsLast, "shuffle_cat odd split");
  for (auto dtype : {at::kFloat, at::kDouble}) {
    for (auto shape : {std::vector<int64_t>{2, 6, 5, 3}, std::vector<int64_t>{1, 2, 1, 1},
                       std::vector<int64_t>{0, 4, 2, 2}}) {
      at::Tensor x = at::randn(shape, at::TensorOptions().dtype(dtype));
      auto [even, odd] = split(x);
      using at::indexing::Slice;
      using at::indexing::None;
      expect(at::equal(even, x.index({Slice(), Slice(0, None, 2)})), "split even");
      expect(at::equal(odd, x.index({Slice(), Slice(1, None, 2)})), "split odd");
      expect(at::equal(interleave(even, odd), x), "interleave inverts split");
    }
  }
  at::Tensor nc = at::randn({2, 8, 4, 4}).index({at::indexing::Slice(),
                                                  at::indexing::Slice(0, at::indexing::None, 2)});
  auto [e2, o2] = split(nc);
  expect(at::equal(interleave(e2, o2), nc), "non-contiguous input");
  bool threw = false;
  try {
    split(at::zeros({1, 3, 2, 2}));
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "odd channel count is rejected");
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
