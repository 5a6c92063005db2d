// CPU bodies of the channel shuffle ops (channel_split, channel_interleave, shuffle_cat,
// shuffle_cat_pair and their backwards), spread over at::parallel_for. Every op is a channel
// gather described as runs (below); tensors that are pixel rows take a vectorised per-pixel
// fast path, other channels-last-like tensors a per-pixel strided copy, planar ones
// whole-plane copies.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "../op_signatures.h"
#include "../shuffle_checks.h"
#include "multiversion.h"
#include "shuffle_kernels.h"

namespace fastshift {
namespace {

// A run copies `len` channels: dst channel d0 + i * ds <- src channel s0 + i * ss (steps 1 or
// 2), at every pixel.
struct Run {
  int dst, src;  // tensor indices
  int64_t d0, ds, s0, ss, len;
};

// Per-pixel copy of one run between unit-channel-stride pixels; the steps are compile-time
// so the loop vectorises (a stride-2 side becomes a deinterleave / interleave).
template <typename T, int DS, int SS>
inline void copy_run(T* __restrict__ d, const T* __restrict__ s, int64_t len) {
  for (int64_t i = 0; i < len; ++i) d[i * DS] = s[i * SS];
}

template <typename T>
inline void copy_run_any(T* d, int64_t dstride, const T* s, int64_t sstride, int64_t len) {
  for (int64_t i = 0; i < len; ++i) d[i * dstride] = s[i * sstride];
}

// Base pointers and strides of the tensors of a gather (all [N, *, H, W]).
template <typename T>
struct Views {
  std::vector<T*> ptr;
  std::vector<std::array<int64_t, 4>> st;
  explicit Views(const std::vector<at::Tensor>& t) {
    for (const at::Tensor& x : t) {
      ptr.push_back(x.data_ptr<T>());
      st.push_back({x.stride(0), x.stride(1), x.stride(2), x.stride(3)});
    }
  }
};

// Channels-last-like tensors (any pixel strides): every run at every pixel.
template <typename T>
void gather_pixels(const std::vector<at::Tensor>& t, const std::vector<Run>& runs) {
  const int64_t N = t[0].size(0), H = t[0].size(2), W = t[0].size(3);
  const Views<T> v(t);
  at::parallel_for(0, N * H * W, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
    std::vector<T*> px(t.size());
    for (int64_t p = begin; p < end; ++p) {
      const int64_t w = p % W, h = (p / W) % H, n = p / (W * H);
      for (size_t k = 0; k < px.size(); ++k)
        px[k] = v.ptr[k] + n * v.st[k][0] + h * v.st[k][2] + w * v.st[k][3];
      for (const Run& r : runs) {
        const int64_t dcs = v.st[r.dst][1], scs = v.st[r.src][1];
        T* d = px[r.dst] + r.d0 * dcs;
        const T* s = px[r.src] + r.s0 * scs;
        if (dcs == 1 && scs == 1 && r.ds == 1 && r.ss == 2) {
          copy_run<T, 1, 2>(d, s, r.len);
        } else if (dcs == 1 && scs == 1 && r.ds == 2 && r.ss == 1) {
          copy_run<T, 2, 1>(d, s, r.len);
        } else {
          copy_run_any<T>(d, r.ds * dcs, s, r.ss * scs, r.len);
        }
      }
    }
  });
}

// Planar tensors: every run copies whole H x W planes (memcpy when both are dense planes).
template <typename T>
void gather_planes(const std::vector<at::Tensor>& t, const std::vector<Run>& runs) {
  const int64_t N = t[0].size(0), H = t[0].size(2), W = t[0].size(3);
  const Views<T> v(t);
  std::vector<std::pair<const Run*, int64_t>> items;  // (run, channel within the run)
  for (const Run& r : runs)
    for (int64_t i = 0; i < r.len; ++i) items.emplace_back(&r, i);
  const int64_t count = static_cast<int64_t>(items.size());
  at::parallel_for(0, N * count, /*grain_size=*/8, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / count;
      const Run& r = *items[q % count].first;
      const int64_t i = items[q % count].second;
      const auto& ds = v.st[r.dst];
      const auto& ss = v.st[r.src];
      T* d = v.ptr[r.dst] + n * ds[0] + (r.d0 + i * r.ds) * ds[1];
      const T* s = v.ptr[r.src] + n * ss[0] + (r.s0 + i * r.ss) * ss[1];
      if (ds[3] == 1 && ss[3] == 1 && ds[2] == W && ss[2] == W) {
        std::memcpy(d, s, H * W * sizeof(T));
        continue;
      }
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) d[h * ds[2] + w * ds[3]] = s[h * ss[2] + w * ss[3]];
    }
  });
}

// Fast path: tensors that are pixel rows (channel stride 1, every pixel at a multiple of one
// pixel stride P >= C: channels-last tensors and channel ranges of them), walked pixel by pixel
// over [begin, end). tmp holds one pixel of t (C values) when s0 / d0 has an odd count.
//   deinterleave: t = [s0 (n0) | s1 (n1)] -> d0[j] = t[2j], d1[j] = t[2j + 1]
//   interleave:   t[2j] = s0[j], t[2j + 1] = s1[j] -> d0 = t[:n0], d1 = t[n0:]
// Pairs (t[2j], t[2j + 1]) <-> (e[j], o[j]) for j < n.
template <typename T>
inline void split_pairs(const T* __restrict__ t, T* __restrict__ e, T* __restrict__ o,
                        int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    e[j] = t[2 * j];
    o[j] = t[2 * j + 1];
  }
}

template <typename T>
inline void join_pairs(const T* __restrict__ e, const T* __restrict__ o, T* __restrict__ t,
                       int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    t[2 * j] = e[j];
    t[2 * j + 1] = o[j];
  }
}

// With n0 even the pairs never straddle s0 and s1 (each side is split on its own); an odd n0
// goes through tmp.
template <typename T>
inline void deinterleave_rows(const T* s0, int64_t ss0, int64_t n0, const T* s1, int64_t ss1,
                              int64_t n1, T* d0, int64_t ds0, T* d1, int64_t ds1, int64_t begin,
                              int64_t end, T* tmp) {
  const int64_t h = (n0 + n1) / 2, h0 = n0 / 2;
  for (int64_t p = begin; p < end; ++p) {
    T* e = d0 + p * ds0;
    T* o = d1 + p * ds1;
    if (n0 % 2 == 0) {
      split_pairs(s0 + p * ss0, e, o, h0);
      split_pairs(s1 + p * ss1, e + h0, o + h0, h - h0);
    } else {
      std::memcpy(tmp, s0 + p * ss0, n0 * sizeof(T));
      std::memcpy(tmp + n0, s1 + p * ss1, n1 * sizeof(T));
      split_pairs(tmp, e, o, h);
    }
  }
}

template <typename T>
inline void interleave_rows(const T* s0, int64_t ss0, const T* s1, int64_t ss1, T* d0,
                            int64_t ds0, int64_t n0, T* d1, int64_t ds1, int64_t n1,
                            int64_t begin, int64_t end, T* tmp) {
  const int64_t h = (n0 + n1) / 2, h0 = n0 / 2;
  for (int64_t p = begin; p < end; ++p) {
    const T* e = s0 + p * ss0;
    const T* o = s1 + p * ss1;
    if (n0 % 2 == 0) {
      join_pairs(e, o, d0 + p * ds0, h0);
      join_pairs(e + h0, o + h0, d1 + p * ds1, h - h0);
    } else {
      join_pairs(e, o, tmp, h);
      std::memcpy(d0 + p * ds0, tmp, n0 * sizeof(T));
      std::memcpy(d1 + p * ds1, tmp + n0, n1 * sizeof(T));
    }
  }
}

}  // namespace

// The per-pixel kernels with external linkage: conv_bn_chain_eval (block_cpu.cpp) writes its
// output split-ready through k_deinterleave (declared in shuffle_kernels.h).
#define FASTSHIFT_SHUFFLE_KERNELS(T)                                                           \
  FASTSHIFT_MULTIVERSION void k_deinterleave(const T* s0, int64_t ss0, int64_t n0, const T* s1, \
                                             int64_t ss1, int64_t n1, T* d0, int64_t ds0,       \
                                             T* d1, int64_t ds1, int64_t b, int64_t e, T* tmp) { \
    deinterleave_rows<T>(s0, ss0, n0, s1, ss1, n1, d0, ds0, d1, ds1, b, e, tmp);               \
  }                                                                                            \
  FASTSHIFT_MULTIVERSION void k_interleave(const T* s0, int64_t ss0, const T* s1, int64_t ss1,  \
                                           T* d0, int64_t ds0, int64_t n0, T* d1, int64_t ds1,  \
                                           int64_t n1, int64_t b, int64_t e, T* tmp) {          \
    interleave_rows<T>(s0, ss0, s1, ss1, d0, ds0, n0, d1, ds1, n1, b, e, tmp);                 \
  }
FASTSHIFT_SHUFFLE_KERNELS(float)
FASTSHIFT_SHUFFLE_KERNELS(double)
FASTSHIFT_SHUFFLE_KERNELS(c10::Half)
FASTSHIFT_SHUFFLE_KERNELS(c10::BFloat16)
#undef FASTSHIFT_SHUFFLE_KERNELS

namespace {

// The pixel stride P of a pixel-rows tensor (see above), 0 when it has no channels (never
// read), -1 when it is not pixel rows.
int64_t pixel_stride(const at::Tensor& t) {
  if (t.size(1) == 0) return 0;
  const int64_t P = t.stride(3);
  const bool rows = t.stride(1) == 1 && P >= t.size(1) && t.stride(2) == t.size(3) * P &&
                    t.stride(0) == t.size(2) * t.stride(2);
  return rows ? P : -1;
}

// The fast path for (s0, s1) -> (d0, d1) when all four are pixel rows; false otherwise.
bool shuffle_rows(const at::Tensor& s0, const at::Tensor& s1, const at::Tensor& d0,
                  const at::Tensor& d1, bool deinterleave) {
  const int64_t ps[4] = {pixel_stride(s0), pixel_stride(s1), pixel_stride(d0), pixel_stride(d1)};
  for (int64_t p : ps)
    if (p < 0) return false;
  const int64_t pixels = s0.size(0) * s0.size(2) * s0.size(3);
  const int64_t C = deinterleave ? s0.size(1) + s1.size(1) : d0.size(1) + d1.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s0.scalar_type(), "shuffle_rows",
                                  [&] {
    using T = scalar_t;
    at::parallel_for(0, pixels, /*grain_size=*/64, [&](int64_t begin, int64_t end) {
      std::vector<T> tmp(C);
      if (deinterleave) {
        k_deinterleave(s0.const_data_ptr<T>(), ps[0], s0.size(1), s1.const_data_ptr<T>(), ps[1],
                       s1.size(1), d0.data_ptr<T>(), ps[2], d1.data_ptr<T>(), ps[3], begin, end,
                       tmp.data());
      } else {
        k_interleave(s0.const_data_ptr<T>(), ps[0], s1.const_data_ptr<T>(), ps[1],
                     d0.data_ptr<T>(), ps[2], d0.size(1), d1.data_ptr<T>(), ps[3], d1.size(1),
                     begin, end, tmp.data());
      }
    });
  });
  return true;
}

void gather_channels(const std::vector<at::Tensor>& t, const std::vector<Run>& runs,
                     bool pixels) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t[0].scalar_type(), "shuffle_cat",
                                  [&] {
    if (pixels) {
      gather_pixels<scalar_t>(t, runs);
    } else {
      gather_planes<scalar_t>(t, runs);
    }
  });
}

// The runs of shuffle_cat: t = cat(a, b) (Ca + Cb = C), out[j] = t[2j] for j < C/2 and
// out[C/2 + j] = t[2j + 1]. Tensors: 0 out, 1 a, 2 b. With swap the same runs read the other
// way give the backward (dst and src exchanged: a[c] <- out[shuffled_position(c)]).
std::vector<Run> shuffle_runs(int64_t Ca, int64_t C, bool backward) {
  std::vector<Run> runs;
  const int64_t half = C / 2;
  for (int64_t parity = 0; parity < 2; ++parity) {
    // t channels parity, parity + 2, ...: those below Ca come from a, the rest from b
    // (C even: `half` channels of each parity)
    const int64_t in_a = Ca > parity ? (Ca - parity + 1) / 2 : 0;  // count of such c < Ca
    const int64_t out0 = parity * half;
    if (in_a > 0) runs.push_back({0, 1, out0, 1, parity, 2, in_a});
    if (half - in_a > 0) {
      const int64_t c0 = parity + 2 * in_a;  // first t channel from b
      runs.push_back({0, 2, out0 + in_a, 1, c0 - Ca, 2, half - in_a});
    }
  }
  if (backward)
    for (Run& r : runs) {
      std::swap(r.dst, r.src);
      std::swap(r.d0, r.s0);
      std::swap(r.ds, r.ss);
    }
  return runs;
}

at::Tensor shuffle_cat_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_shuffle_cat(a, b);
  const int64_t Ca = a.size(1), C = a.size(1) + b.size(1);
  const bool pixels = shuffle_cat_rows_last(a, b);
  at::Tensor out = empty_in_layout(a, C, pixels);
  if (out.numel() == 0) return out;
  const int64_t h = C / 2;
  if (!(pixels && shuffle_rows(a, b, out.narrow(1, 0, h), out.narrow(1, h, h), true)))
    gather_channels({out, a, b}, shuffle_runs(Ca, C, false), pixels);
  return out;
}

std::tuple<at::Tensor, at::Tensor> shuffle_cat_backward_cpu(const at::Tensor& grad,
                                                            int64_t split) {
  check_shuffle_cat_backward(grad, split);
  const int64_t C = grad.size(1);
  const bool pixels = rows_last_layout(grad);
  at::Tensor ga = empty_in_layout(grad, split, pixels);
  at::Tensor gb = empty_in_layout(grad, C - split, pixels);
  if (grad.numel() == 0) return {ga, gb};
  const int64_t h = C / 2;
  if (!(pixels && shuffle_rows(grad.narrow(1, 0, h), grad.narrow(1, h, h), ga, gb, false)))
    gather_channels({grad, ga, gb}, shuffle_runs(split, C, true), pixels);
  return {ga, gb};
}

// shuffle_runs with shuffle_cat's output as its two halves. Tensors: 0 lo, 1 hi, 2 a, 3 b (in
// both directions). A run never straddles the halves (each takes channels of one parity).
std::vector<Run> pair_runs(int64_t Ca, int64_t C, bool backward) {
  std::vector<Run> runs = shuffle_runs(Ca, C, false);
  for (Run& r : runs) {
    r.dst = r.d0 >= C / 2 ? 1 : 0;
    r.d0 -= r.dst * (C / 2);
    r.src += 1;
    if (backward) {
      std::swap(r.dst, r.src);
      std::swap(r.d0, r.s0);
      std::swap(r.ds, r.ss);
    }
  }
  return runs;
}

std::tuple<at::Tensor, at::Tensor> shuffle_cat_pair_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_shuffle_cat(a, b);
  const int64_t C = a.size(1) + b.size(1), h = C / 2;
  const bool pixels = shuffle_cat_rows_last(a, b);
  at::Tensor lo = empty_in_layout(a, h, pixels), hi = empty_in_layout(a, h, pixels);
  if (lo.numel() == 0) return {lo, hi};
  if (!(pixels && shuffle_rows(a, b, lo, hi, true)))
    gather_channels({lo, hi, a, b}, pair_runs(a.size(1), C, false), pixels);
  return {lo, hi};
}

std::tuple<at::Tensor, at::Tensor> shuffle_cat_pair_backward_cpu(const at::Tensor& grad_lo,
                                                                 const at::Tensor& grad_hi,
                                                                 int64_t split) {
  check_shuffle_cat_pair_backward(grad_lo, grad_hi, split);
  const int64_t C = 2 * grad_lo.size(1);
  const bool pixels = rows_last_layout(grad_lo);
  at::Tensor ga = empty_in_layout(grad_lo, split, pixels);
  at::Tensor gb = empty_in_layout(grad_lo, C - split, pixels);
  if (grad_lo.numel() == 0) return {ga, gb};
  if (!(pixels && rows_last_layout(grad_hi) && shuffle_rows(grad_lo, grad_hi, ga, gb, false)))
    gather_channels({grad_lo, grad_hi, ga, gb}, pair_runs(split, C, true), pixels);
  return {ga, gb};
}

// The pair on other devices: channel_split / shuffle_cat_backward of a concatenation (their
// device bodies; one copy more than the CPU body, which the fused blocks use).
std::tuple<at::Tensor, at::Tensor> shuffle_cat_pair_composite(const at::Tensor& a,
                                                              const at::Tensor& b) {
  check_shuffle_cat(a, b);
  static const auto op =
      op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>("channel_split");
  at::Tensor t = at::cat({a, b}, 1);
  if (shuffle_cat_rows_last(a, b)) t = t.contiguous(at::MemoryFormat::ChannelsLast);
  return op.call(t);
}

std::tuple<at::Tensor, at::Tensor> shuffle_cat_pair_backward_composite(
    const at::Tensor& grad_lo, const at::Tensor& grad_hi, int64_t split) {
  check_shuffle_cat_pair_backward(grad_lo, grad_hi, split);
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>(
      "shuffle_cat_backward");
  at::Tensor g = at::cat({grad_lo, grad_hi}, 1);
  if (rows_last_layout(grad_lo)) g = g.contiguous(at::MemoryFormat::ChannelsLast);
  return op.call(g, split);
}

// ---- shuffle_regroup: shuffle_cat_pair of row blocks gathered from several sources -------
//
// The batched engine's hand-over between two layers: the sources are one layer's unit outputs
// (a_i, b_i), one per choice group, each a stack of row blocks (one per prefix); destination h
// (one per group of the next layer) gets (lo_h, hi_h) = shuffle_cat_pair of the concatenation
// of its runs' blocks. One copy, straight into the next layer's inputs; the backward adds a
// block's gradients over the destinations that took it (in destination order) and interleaves
// the sum into the block's (grad_a, grad_b).

std::vector<std::vector<RegroupRun>> check_shuffle_regroup(at::TensorList a, at::TensorList b,
                                                           at::IntArrayRef routes,
                                                           int64_t batch) {
  const char* op = "shuffle_regroup";
  TORCH_CHECK(!a.empty() && a.size() == b.size(), op, ": a and b must be two non-empty lists of "
              "the same length, got ", a.size(), " and ", b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    check_shuffle_cat(a[i], b[i]);
    TORCH_CHECK(a[i].size(1) == a[0].size(1) && b[i].size(1) == b[0].size(1) &&
                    a[i].size(2) == a[0].size(2) && a[i].size(3) == a[0].size(3) &&
                    a[i].scalar_type() == a[0].scalar_type() && a[i].device() == a[0].device(),
                op, ": source ", i, " (", a[i].sizes(), ", ", b[i].sizes(), ") differs from "
                "source 0 (", a[0].sizes(), ", ", b[0].sizes(), ") in channels, spatial size, "
                "dtype or device");
  }
  std::vector<int64_t> rows;
  for (const at::Tensor& t : a) rows.push_back(t.size(0));
  return parse_regroup_routes(op, routes, regroup_blocks(op, rows, batch));
}

// The pair of every destination, composed (any device; the CPU body's fallback for tensors
// that are not pixel rows).
std::vector<at::Tensor> shuffle_regroup_composite(at::TensorList a, at::TensorList b,
                                                  at::IntArrayRef routes, int64_t batch) {
  const auto dest = check_shuffle_regroup(a, b, routes, batch);
  static const auto pair = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&)>("shuffle_cat_pair");
  const bool rows_last = shuffle_cat_rows_last(a[0], b[0]);
  const auto fmt = rows_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  std::vector<at::Tensor> out;
  for (const auto& runs : dest) {
    std::vector<at::Tensor> pa, pb;
    for (const RegroupRun& r : runs) {
      pa.push_back(a[r.src].narrow(0, r.b0 * batch, (r.b1 - r.b0) * batch));
      pb.push_back(b[r.src].narrow(0, r.b0 * batch, (r.b1 - r.b0) * batch));
    }
    if (runs.empty()) {  // no rows: the layout of source 0's slices
      pa.push_back(a[0].narrow(0, 0, 0));
      pb.push_back(b[0].narrow(0, 0, 0));
    }
    auto joined = [&](const std::vector<at::Tensor>& p) {
      if (p.size() == 1) return p[0];
      at::Tensor t = at::cat(p, 0);
      return rows_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
    };
    auto [lo, hi] = pair.call(joined(pa), joined(pb));
    // the layout of source 0 also where the pair's bodies pick another (e.g. no rows)
    out.push_back(lo.contiguous(fmt));
    out.push_back(hi.contiguous(fmt));
  }
  return out;
}

// One contiguous range of pixels copied by a task: `count` pixels of a source from pixel
// `src0`, to a destination from pixel `dst0`.
struct PixelTask {
  int64_t src, dst, src0, dst0, count;
};

// Runs fn(task, begin, end) over sub-ranges of the tasks' pixels, spread over threads.
template <typename F>
void for_task_pixels(const std::vector<PixelTask>& tasks, F fn) {
  std::vector<int64_t> start(tasks.size() + 1, 0);
  for (size_t t = 0; t < tasks.size(); ++t) start[t + 1] = start[t] + tasks[t].count;
  at::parallel_for(0, start.back(), /*grain_size=*/256, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t p = begin; p < end; ++t) {
      const int64_t stop = std::min(end, start[t + 1]);
      if (stop > p) fn(tasks[t], p - start[t], stop - start[t]);
      p = std::max(p, stop);
    }
  });
}

std::vector<at::Tensor> shuffle_regroup_cpu(at::TensorList a, at::TensorList b,
                                            at::IntArrayRef routes, int64_t batch) {
  const auto dest = check_shuffle_regroup(a, b, routes, batch);
  bool rows = shuffle_cat_rows_last(a[0], b[0]);
  for (size_t i = 0; rows && i < a.size(); ++i)
    rows = pixel_stride(a[i]) >= 0 && pixel_stride(b[i]) >= 0;
  if (!rows) return shuffle_regroup_composite(a, b, routes, batch);
  const int64_t Ca = a[0].size(1), Cb = b[0].size(1), h = (Ca + Cb) / 2;
  const int64_t HW = a[0].size(2) * a[0].size(3), block = batch * HW;  // pixels per block
  std::vector<at::Tensor> out;
  std::vector<PixelTask> tasks;
  for (size_t d = 0; d < dest.size(); ++d) {
    int64_t blocks = 0;
    for (const RegroupRun& r : dest[d]) {
      tasks.push_back({r.src, int64_t(d), r.b0 * block, blocks * block, (r.b1 - r.b0) * block});
      blocks += r.b1 - r.b0;
    }
    for (int k = 0; k < 2; ++k)
      out.push_back(at::empty({blocks * batch, h, a[0].size(2), a[0].size(3)},
                              a[0].options().memory_format(at::MemoryFormat::ChannelsLast)));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[0].scalar_type(),
                                  "shuffle_regroup", [&] {
    using T = scalar_t;
    for_task_pixels(tasks, [&](const PixelTask& t, int64_t p0, int64_t p1) {
      const int64_t pa = pixel_stride(a[t.src]), pb = pixel_stride(b[t.src]);
      std::vector<T> tmp(Ca % 2 ? 2 * h : 0);
      k_deinterleave(a[t.src].const_data_ptr<T>() + t.src0 * pa, pa, Ca,
                     b[t.src].const_data_ptr<T>() + t.src0 * pb, pb, Cb,
                     out[2 * t.dst].data_ptr<T>() + t.dst0 * h, h,
                     out[2 * t.dst + 1].data_ptr<T>() + t.dst0 * h, h, p0, p1, tmp.data());
    });
  });
  return out;
}

std::vector<std::vector<RegroupRun>> check_shuffle_regroup_backward(at::TensorList grads,
                                                                    at::IntArrayRef routes,
                                                                    int64_t batch,
                                                                    at::IntArrayRef rows,
                                                                    int64_t split) {
  const char* op = "shuffle_regroup_backward";
  TORCH_CHECK(!rows.empty(), op, ": rows must name at least one source");
  const auto dest = parse_regroup_routes(op, routes, regroup_blocks(op, rows, batch));
  TORCH_CHECK(!dest.empty() && grads.size() == 2 * dest.size(), op, ": grads must hold "
              "(grad_lo, grad_hi) of each of the routes' ", dest.size(), " destinations, got ",
              grads.size(), " tensors");
  const at::Tensor& g0 = grads[0];
  for (size_t k = 0; k < grads.size(); ++k) {
    TORCH_CHECK(grads[k].dim() == 4 && grads[k].size(1) == g0.size(1) &&
                    grads[k].size(2) == g0.size(2) && grads[k].size(3) == g0.size(3) &&
                    grads[k].scalar_type() == g0.scalar_type() &&
                    grads[k].device() == g0.device(),
                op, ": grads[", k, "] ", grads[k].sizes(), " differs from grads[0] ",
                g0.sizes(), " in rank, channels, spatial size, dtype or device");
    int64_t taken = 0;
    for (const RegroupRun& r : dest[k / 2]) taken += r.b1 - r.b0;
    TORCH_CHECK(grads[k].size(0) == taken * batch, op, ": grads[", k, "] has ",
                grads[k].size(0), " rows, its destination's runs take ", taken * batch);
  }
  TORCH_CHECK(split >= 0 && split <= 2 * g0.size(1), op, ": split must be in [0, ",
              2 * g0.size(1), "], got ", split);
  return dest;
}

// Per source block, the (destination, first pixel there) of every run that took it, in
// destination order.
std::vector<std::vector<std::vector<std::pair<int64_t, int64_t>>>> block_takers(
    const std::vector<std::vector<RegroupRun>>& dest, at::IntArrayRef rows, int64_t batch,
    int64_t block) {
  std::vector<std::vector<std::vector<std::pair<int64_t, int64_t>>>> takers(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) takers[i].resize(rows[i] / batch);
  for (size_t d = 0; d < dest.size(); ++d) {
    int64_t at_block = 0;
    for (const RegroupRun& r : dest[d])
      for (int64_t j = r.b0; j < r.b1; ++j) takers[r.src][j].push_back({d, block * at_block++});
  }
  return takers;
}

std::vector<at::Tensor> shuffle_regroup_backward_composite(at::TensorList grads,
                                                           at::IntArrayRef routes,
                                                           int64_t batch, at::IntArrayRef rows,
                                                           int64_t split) {
  const auto dest = check_shuffle_regroup_backward(grads, routes, batch, rows, split);
  static const auto pair_backward = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, int64_t)>("shuffle_cat_pair_backward");
  const at::Tensor& g0 = grads[0];
  const int64_t C = 2 * g0.size(1);
  const bool rows_last = rows_last_layout(g0);
  std::vector<at::Tensor> out;
  for (int64_t r : rows) {
    const auto opt = g0.options().memory_format(rows_last ? at::MemoryFormat::ChannelsLast
                                                          : at::MemoryFormat::Contiguous);
    // at::zeros drops the options' memory format: empty in the layout, then zeroed
    out.push_back(at::empty({r, split, g0.size(2), g0.size(3)}, opt).zero_());
    out.push_back(at::empty({r, C - split, g0.size(2), g0.size(3)}, opt).zero_());
  }
  for (size_t d = 0; d < dest.size(); ++d) {
    int64_t row = 0;
    for (const RegroupRun& r : dest[d]) {
      const int64_t n = (r.b1 - r.b0) * batch;
      auto [ga, gb] = pair_backward.call(grads[2 * d].narrow(0, row, n),
                                         grads[2 * d + 1].narrow(0, row, n), split);
      out[2 * r.src].narrow(0, r.b0 * batch, n).add_(ga);
      out[2 * r.src + 1].narrow(0, r.b0 * batch, n).add_(gb);
      row += n;
    }
  }
  return out;
}

std::vector<at::Tensor> shuffle_regroup_backward_cpu(at::TensorList grads,
                                                     at::IntArrayRef routes, int64_t batch,
                                                     at::IntArrayRef rows, int64_t split) {
  const auto dest = check_shuffle_regroup_backward(grads, routes, batch, rows, split);
  std::vector<int64_t> ps;  // the gradients' pixel strides (channel ranges of wider tensors)
  for (const at::Tensor& g : grads) ps.push_back(pixel_stride(g));
  if (*std::min_element(ps.begin(), ps.end()) < 0)
    return shuffle_regroup_backward_composite(grads, routes, batch, rows, split);
  const int64_t h = grads[0].size(1), C = 2 * h, H = grads[0].size(2), W = grads[0].size(3);
  const int64_t block = batch * H * W;
  const auto takers = block_takers(dest, rows, batch, block);
  std::vector<at::Tensor> out;
  std::vector<PixelTask> tasks;  // one per source block; dst: the block's index
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto opt = grads[0].options().memory_format(at::MemoryFormat::ChannelsLast);
    out.push_back(at::empty({rows[i], split, H, W}, opt));
    out.push_back(at::empty({rows[i], C - split, H, W}, opt));
    for (int64_t j = 0; j < rows[i] / batch; ++j)
      tasks.push_back({int64_t(i), j, j * block, 0, block});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(),
                                  "shuffle_regroup_backward", [&] {
    using T = scalar_t;
    constexpr int64_t kSpan = 64;  // pixels summed at a time where several runs took a block
    for_task_pixels(tasks, [&](const PixelTask& t, int64_t p0, int64_t p1) {
      const auto& by = takers[t.src][t.dst];
      T* ga = out[2 * t.src].data_ptr<T>() + t.src0 * split;
      T* gb = out[2 * t.src + 1].data_ptr<T>() + t.src0 * (C - split);
      if (by.empty()) {
        std::fill(ga + p0 * split, ga + p1 * split, T(0));
        std::fill(gb + p0 * (C - split), gb + p1 * (C - split), T(0));
        return;
      }
      std::vector<T> tmp(C);
      if (by.size() == 1) {
        const auto [d, off] = by[0];
        const int64_t pl = ps[2 * d], ph = ps[2 * d + 1];
        k_interleave(grads[2 * d].const_data_ptr<T>() + off * pl, pl,
                     grads[2 * d + 1].const_data_ptr<T>() + off * ph, ph, ga, split, split, gb,
                     C - split, C - split, p0, p1, tmp.data());
        return;
      }
      // the runs' gradients added in destination order, kSpan pixels at a time
      std::vector<T> lo(kSpan * h), hi(kSpan * h);
      for (int64_t q0 = p0; q0 < p1; q0 += kSpan) {
        const int64_t n = std::min(kSpan, p1 - q0);
        for (size_t k = 0; k < by.size(); ++k) {
          const auto [d, off] = by[k];
          const int64_t pl = ps[2 * d], ph = ps[2 * d + 1];
          const T* gl = grads[2 * d].const_data_ptr<T>() + (off + q0) * pl;
          const T* gh = grads[2 * d + 1].const_data_ptr<T>() + (off + q0) * ph;
          for (int64_t p = 0; p < n; ++p) {
            T* l = lo.data() + p * h;
            T* u = hi.data() + p * h;
            if (k == 0) {
              std::copy(gl + p * pl, gl + p * pl + h, l);
              std::copy(gh + p * ph, gh + p * ph + h, u);
            } else {
              for (int64_t c = 0; c < h; ++c) {
                l[c] += gl[p * pl + c];
                u[c] += gh[p * ph + c];
              }
            }
          }
        }
        k_interleave(lo.data(), h, hi.data(), h, ga + q0 * split, split, split,
                     gb + q0 * (C - split), C - split, C - split, 0, n, tmp.data());
      }
    });
  });
  return out;
}

// channel_split: (even, odd) <- x channels (0, 2, ...) and (1, 3, ...). Tensors: 0 x,
// 1 even, 2 odd.
std::tuple<at::Tensor, at::Tensor> channel_split_cpu(const at::Tensor& x) {
  check_channel_split(x);
  const int64_t h = x.size(1) / 2;
  const bool pixels = rows_last_layout(x);
  at::Tensor even = empty_in_layout(x, h, pixels), odd = empty_in_layout(x, h, pixels);
  if (x.numel() == 0) return {even, odd};
  if (!(pixels && shuffle_rows(x, x.narrow(1, 0, 0), even, odd, true)))
    gather_channels({x, even, odd}, {{1, 0, 0, 1, 0, 2, h}, {2, 0, 0, 1, 1, 2, h}}, pixels);
  return {even, odd};
}

// channel_interleave: out channels (0, 2, ...) <- even, (1, 3, ...) <- odd. Tensors: 0 out,
// 1 even, 2 odd.
at::Tensor channel_interleave_cpu(const at::Tensor& even, const at::Tensor& odd) {
  check_channel_interleave(even, odd);
  const int64_t h = even.size(1);
  const bool pixels = rows_last_layout(even);
  at::Tensor out = empty_in_layout(even, 2 * h, pixels);
  if (out.numel() == 0) return out;
  if (!(pixels && shuffle_rows(even, odd, out, out.narrow(1, 0, 0), false)))
    gather_channels({out, even, odd}, {{0, 1, 0, 2, 0, 1, h}, {0, 2, 1, 2, 0, 1, h}}, pixels);
  return out;
}

int64_t cuda_version() {
#ifdef FASTSHIFT_WITH_CUDA
  return FASTSHIFT_CUDA_VERSION;
#else
  return 0;
#endif
}

// FASTSHIFT_CUDA_ARCHS: "90" or "80,1086" from setup.py (TORCH_CUDA_ARCH_LIST); builds that
// do not set it (the CMake build for the ctests) report no architectures, so `auto` does not
// pick their CUDA bodies.
#ifndef FASTSHIFT_CUDA_ARCHS
#define FASTSHIFT_CUDA_ARCHS 0
#endif

std::vector<int64_t> cuda_archs() {
#ifdef FASTSHIFT_WITH_CUDA
  std::vector<int64_t> codes{FASTSHIFT_CUDA_ARCHS};
  codes.erase(std::remove(codes.begin(), codes.end(), 0), codes.end());
  return codes;
#else
  return {};
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(fastshift, CPU, m) {
  m.impl("channel_split", &channel_split_cpu);
  m.impl("channel_interleave", &channel_interleave_cpu);
  m.impl("shuffle_cat", &shuffle_cat_cpu);
  m.impl("shuffle_cat_backward", &shuffle_cat_backward_cpu);
  m.impl("shuffle_cat_pair", &shuffle_cat_pair_cpu);
  m.impl("shuffle_cat_pair_backward", &shuffle_cat_pair_backward_cpu);
  m.impl("shuffle_regroup", &shuffle_regroup_cpu);
  m.impl("shuffle_regroup_backward", &shuffle_regroup_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastshift, CompositeExplicitAutograd, m) {
  m.impl("shuffle_cat_pair", &shuffle_cat_pair_composite);
  m.impl("shuffle_cat_pair_backward", &shuffle_cat_pair_backward_composite);
  m.impl("shuffle_regroup", &shuffle_regroup_composite);
  m.impl("shuffle_regroup_backward", &shuffle_regroup_backward_composite);
  m.impl("cuda_version", &cuda_version);
  m.impl("cuda_archs", &cuda_archs);
}

}  // namespace fastshift
