// CPU bodies of the channel shuffle ops (channel_split, channel_interleave, shuffle_cat and its
// backward): plane or pixel copies spread over at::parallel_for.
//
// With x contiguous [B, C, H, W], channel 2c + p of image b is the plane starting at
// ((b * C) + 2c + p) * H * W; it goes to plane (b * C/2 + c) of output p (p = 0 even, 1 odd).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <vector>

#include "../shuffle_checks.h"
#include "multiversion.h"

namespace fastshift {
namespace {

// Copies plane pairs: for every (b, c) of the half tensors, plane 2c + p of the full tensor
// <-> plane c of half tensor p. to_halves selects the direction.
template <bool to_halves>
void copy_planes(char* full, char* even, char* odd, int64_t batch, int64_t half_channels,
                 int64_t plane_bytes) {
  const int64_t rows = batch * half_channels;
  at::parallel_for(0, rows, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      char* f = full + 2 * r * plane_bytes;  // rows are (b, c); 2r = b*C + 2c
      char* e = even + r * plane_bytes;
      char* o = odd + r * plane_bytes;
      if (to_halves) {
        std::memcpy(e, f, plane_bytes);
        std::memcpy(o, f + plane_bytes, plane_bytes);
      } else {
        std::memcpy(f, e, plane_bytes);
        std::memcpy(f + plane_bytes, o, plane_bytes);
      }
    }
  });
}

// Channels-last layout: per pixel, channel 2c + p of the full tensor <-> channel c of half p.
// Any strides are read (the halves may be views, e.g. slices of a concatenated gradient).
template <typename T, bool to_halves>
void shuffle_pixels(T* full, at::IntArrayRef fs, T* even, at::IntArrayRef es, T* odd,
                    at::IntArrayRef os, int64_t N, int64_t half_channels, int64_t H, int64_t W) {
  at::parallel_for(0, N * H * W, /*grain_size=*/64, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t w = p % W, h = (p / W) % H, n = p / (W * H);
      T* f = full + n * fs[0] + h * fs[2] + w * fs[3];
      T* e = even + n * es[0] + h * es[2] + w * es[3];
      T* o = odd + n * os[0] + h * os[2] + w * os[3];
      for (int64_t c = 0; c < half_channels; ++c) {
        if (to_halves) {
          e[c * es[1]] = f[2 * c * fs[1]];
          o[c * os[1]] = f[(2 * c + 1) * fs[1]];
        } else {
          f[2 * c * fs[1]] = e[c * es[1]];
          f[(2 * c + 1) * fs[1]] = o[c * os[1]];
        }
      }
    }
  });
}

template <bool to_halves>
void shuffle_rows_last(const at::Tensor& full, const at::Tensor& even, const at::Tensor& odd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, full.scalar_type(), "channel_shuffle",
                                  [&] {
    shuffle_pixels<scalar_t, to_halves>(full.data_ptr<scalar_t>(), full.strides(),
                                        even.data_ptr<scalar_t>(), even.strides(),
                                        odd.data_ptr<scalar_t>(), odd.strides(), even.size(0),
                                        even.size(1), even.size(2), even.size(3));
  });
}

// Defined below with the shuffle_cat kernels: the pixel-rows fast path of every shuffle op.
bool shuffle_rows(const at::Tensor& s0, const at::Tensor& s1, const at::Tensor& d0,
                  const at::Tensor& d1, bool deinterleave);

std::tuple<at::Tensor, at::Tensor> channel_split_cpu(const at::Tensor& x_in) {
  check_channel_split(x_in);
  if (rows_last_layout(x_in)) {
    const auto cl = at::MemoryFormat::ChannelsLast;
    const auto opts = x_in.options().memory_format(cl);
    const std::vector<int64_t> sizes{x_in.size(0), x_in.size(1) / 2, x_in.size(2), x_in.size(3)};
    at::Tensor even = at::empty(sizes, opts), odd = at::empty(sizes, opts);
    if (x_in.numel() > 0 && !shuffle_rows(x_in, x_in.narrow(1, 0, 0), even, odd, true))
      shuffle_rows_last<true>(x_in, even, odd);
    return {even, odd};
  }
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor even = at::empty({B, C / 2, H, W}, x.options());
  at::Tensor odd = at::empty({B, C / 2, H, W}, x.options());
  if (x.numel() == 0) return {even, odd};
  copy_planes<true>(static_cast<char*>(x.data_ptr()), static_cast<char*>(even.data_ptr()),
                    static_cast<char*>(odd.data_ptr()), B, C / 2, H * W * x.element_size());
  return {even, odd};
}

at::Tensor channel_interleave_cpu(const at::Tensor& even_in, const at::Tensor& odd_in) {
  check_channel_interleave(even_in, odd_in);
  if (rows_last_layout(even_in)) {
    at::Tensor out = at::empty({even_in.size(0), 2 * even_in.size(1), even_in.size(2),
                                even_in.size(3)},
                               even_in.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (out.numel() > 0 && !shuffle_rows(even_in, odd_in, out, out.narrow(1, 0, 0), false))
      shuffle_rows_last<false>(out, even_in, odd_in);
    return out;
  }
  const at::Tensor even = even_in.contiguous();
  const at::Tensor odd = odd_in.contiguous();
  const int64_t B = even.size(0), Ch = even.size(1), H = even.size(2), W = even.size(3);
  at::Tensor out = at::empty({B, 2 * Ch, H, W}, even.options());
  if (out.numel() == 0) return out;
  copy_planes<false>(static_cast<char*>(out.data_ptr()), static_cast<char*>(even.data_ptr()),
                     static_cast<char*>(odd.data_ptr()), B, Ch, H * W * even.element_size());
  return out;
}

// ---------------------------------------------------------------------------------------------
// shuffle_cat / shuffle_cat_backward: channel gathers described as runs. A run copies `len`
// channels: dst channel d0 + i * ds <- src channel s0 + i * ss (steps 1 or 2), at every pixel.
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
    const int64_t in_a = Ca > parity ? (Ca - parity + 1) / 2 : 0;  // count of such c < Ca
    const int64_t total = half;                                       // C even: half per parity
    const int64_t out0 = parity * half;
    if (in_a > 0) runs.push_back({0, 1, out0, 1, parity, 2, in_a});
    if (total - in_a > 0) {
      const int64_t c0 = parity + 2 * in_a;  // first t channel from b
      runs.push_back({0, 2, out0 + in_a, 1, c0 - Ca, 2, total - in_a});
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

at::Tensor new_like_layout(const at::Tensor& like, int64_t C, bool pixels) {
  const std::vector<int64_t> sizes{like.size(0), C, like.size(2), like.size(3)};
  return at::empty(sizes, like.options().memory_format(
                              pixels ? at::MemoryFormat::ChannelsLast
                                     : at::MemoryFormat::Contiguous));
}

at::Tensor shuffle_cat_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_shuffle_cat(a, b);
  const int64_t Ca = a.size(1), C = a.size(1) + b.size(1);
  const bool pixels = shuffle_cat_rows_last(a, b);
  at::Tensor out = new_like_layout(a, C, pixels);
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
  at::Tensor ga = new_like_layout(grad, split, pixels);
  at::Tensor gb = new_like_layout(grad, C - split, pixels);
  if (grad.numel() == 0) return {ga, gb};
  const int64_t h = C / 2;
  if (!(pixels && shuffle_rows(grad.narrow(1, 0, h), grad.narrow(1, h, h), ga, gb, false)))
    gather_channels({grad, ga, gb}, shuffle_runs(split, C, true), pixels);
  return {ga, gb};
}

int64_t cuda_version() {
#ifdef FASTSHIFT_WITH_CUDA
  return FASTSHIFT_CUDA_VERSION;
#else
  return 0;
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(fastshift, CPU, m) {
  m.impl("channel_split", &channel_split_cpu);
  m.impl("channel_interleave", &channel_interleave_cpu);
  m.impl("shuffle_cat", &shuffle_cat_cpu);
  m.impl("shuffle_cat_backward", &shuffle_cat_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastshift, CompositeExplicitAutograd, m) {
  m.impl("cuda_version", &cuda_version);
}

}  // namespace fastshift
