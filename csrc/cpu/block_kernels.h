// The inner loops of the CPU block bodies (block_cpu.cpp): channel-block helpers, the
// depthwise / BatchNorm / map kernels as templates, and the multiversioned entry points k_*
// (one overload per dtype) that the bodies call. The entry points are defined in
// block_kernels_f32.cpp and block_kernels_f64.cpp (both through block_kernels.inc): each
// kernel is compiled three times there (multiversion.h), which is most of the extension's
// build time, so one translation unit per dtype lets the two compile in parallel with the
// op bodies.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "gemm.h"

namespace fastshift {
namespace cpu_block {

// Fixed row chunks: per group, min(rows, max(1, 64 / groups)) chunks of consecutive rows.
struct RowChunks {
  int64_t groups, rows_per_group, per_group;
  int64_t count() const { return groups * per_group; }
  int64_t group(int64_t i) const { return i / per_group; }
  int64_t begin(int64_t i) const {
    return group(i) * rows_per_group + (i % per_group) * rows_per_group / per_group;
  }
  int64_t end(int64_t i) const {
    return group(i) * rows_per_group + (i % per_group + 1) * rows_per_group / per_group;
  }
};

// 1 / sqrt(var + eps) of n values (computed in double) into out (the op bodies' BatchNorm
// scales: block_cpu.cpp, stem_cpu.cpp).
template <typename T>
void rstd_into(const T* var, int64_t n, double eps, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(1.0 / std::sqrt(double(var[i]) + eps));
}

template <typename T>
std::vector<T> rstd_of(const T* var, int64_t n, double eps) {
  std::vector<T> out(n);
  rstd_into(var, n, eps, out.data());
  return out;
}

inline RowChunks make_chunks(int64_t rows, int64_t groups) {
  const int64_t n = rows / groups;
  const int64_t per = std::max<int64_t>(1, std::min<int64_t>(n, std::max<int64_t>(1, 64 / groups)));
  return {groups, n, per};
}

// Tasks [0, n) in contiguous ranges over the threads, balanced while they run: with two
// threads (the development machine's count) one claims ranges from the front and the other
// from the back, each claim a quarter of what is left (at least one task), until they meet,
// so a thread that is slowed (a larger share of uneven tasks, a slower core or cache, a late
// start) takes fewer tasks (against at::parallel_for's static halves: -1.2 % per K = 25
// batched training step, the sequential step unchanged). Other thread counts: the static
// split. f(b, e, state) runs for each claimed range, state = init() made once per thread.
// Which thread runs a task never changes what the task computes.
template <typename Init, typename F>
void parallel_ranges(int64_t n, const Init& init, const F& f) {
  if (n <= 0) return;
  if (n == 1 || n >= (int64_t(1) << 31) || at::get_num_threads() != 2 ||
      at::in_parallel_region()) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      auto state = init();
      f(b, e, state);
    });
    return;
  }
  std::atomic<uint64_t> range{uint64_t(n)};  // unclaimed [front, back): front << 32 | back
  at::parallel_for(0, 2, 1, [&](int64_t r0, int64_t r1) {
    auto state = init();
    for (int64_t role = r0; role < r1; ++role) {  // 0: from the front, 1: from the back
      uint64_t cur = range.load();
      while (true) {
        const int64_t front = int64_t(cur >> 32), back = int64_t(cur & 0xffffffffu);
        if (front >= back) break;
        const int64_t take = std::max<int64_t>(1, (back - front) / 4);
        const uint64_t next = role == 0 ? (uint64_t(front + take) << 32) | uint64_t(back)
                                        : (uint64_t(front) << 32) | uint64_t(back - take);
        if (!range.compare_exchange_weak(cur, next)) continue;
        if (role == 0) f(front, front + take, state);
        else f(back - take, back, state);
        cur = range.load();
      }
    }
  });
}

template <typename F>
void for_chunks(const RowChunks& ch, const F& f) {
  parallel_ranges(ch.count(), [] { return 0; }, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) f(i);
  });
}

// Uninitialised scratch of n elements (every kernel writes its scratch before reading it).
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// for_chunks with `n` elements of scratch per task, f(i, scratch): one allocation per thread,
// not one per chunk.
template <typename T, typename F>
void for_chunks_scratch(const RowChunks& ch, int64_t n, const F& f) {
  parallel_ranges(ch.count(), [&] { return scratch<T>(n); },
                  [&](int64_t b, int64_t e, const std::unique_ptr<T[]>& buf) {
                    for (int64_t i = b; i < e; ++i) f(i, buf.get());
                  });
}

// A block of channels: NV values of type V (a vector of T, or T itself).
template <typename V, int NV>
struct Block {
  using type = V;
  static constexpr int count = NV;
};

// W-byte GCC/Clang vector of T. The kernels below take W as a template parameter; the entry
// points (block_kernels.inc) instantiate them with W = 64 in the x86-64-v4 version (one AVX-512
// register) and W = 32 in the others (one AVX register in x86-64-v3, two SSE registers in the
// generic one).
template <typename T, int W>
using VecOf = gemm::Vec<T, W>;

// Unaligned vector (or scalar) loads and stores, as the products use them.
using gemm::load;
using gemm::store;

// Calls f(Block<V, NV>{}, c0) over the channels: blocks of two W-byte vectors, then one, then
// (W > 32) one 32-byte vector, then single channels, so every inner loop has a compile-time
// trip count and keeps its accumulators in registers, and a channel count that is a multiple
// of 32 bytes' worth (8 floats) runs without scalar steps at any W.
template <typename T, int W, typename F>
inline void for_channel_blocks(int64_t C, const F& f) {
  using V = typename VecOf<T, W>::type;
  constexpr int L = sizeof(V) / sizeof(T);
  int64_t c = 0;
  for (; c + 2 * L <= C; c += 2 * L) f(Block<V, 2>{}, c);
  for (; c + L <= C; c += L) f(Block<V, 1>{}, c);
  if constexpr (W > 32) {
    using H = typename VecOf<T, 32>::type;
    constexpr int LH = sizeof(H) / sizeof(T);
    for (; c + LH <= C; c += LH) f(Block<H, 1>{}, c);
  }
  for (; c < C; ++c) f(Block<T, 1>{}, c);
}

template <typename V, typename T>
inline T lane(const V& v, int l) {
  if constexpr (std::is_same_v<V, T>) {
    return v;
  } else {
    return v[l];
  }
}

// Calls f(V{}, i, c) for every vector V of channels of every pixel of a [pixels, C] array:
// i is the index of its first element, c its first channel (the blocks of for_channel_blocks
// one vector at a time), so elementwise passes vectorize whatever aliasing the compiler assumes.
template <typename T, int W, typename F>
inline void for_pixel_vectors(int64_t pixels, int64_t C, const F& f) {
  for (int64_t p = 0; p < pixels; ++p)
    for_channel_blocks<T, W>(C, [&](auto blk, int64_t c0) {
      using V = typename decltype(blk)::type;
      constexpr int NV = decltype(blk)::count;
      constexpr int L = sizeof(V) / sizeof(T);
      for (int v = 0; v < NV; ++v) f(V{}, p * C + c0 + v * L, c0 + v * L);
    });
}

// for_pixel_vectors with one array read at pixel stride ps (>= C): f(V{}, i, j, c), i the index
// in the dense arrays, j in the strided one.
template <typename T, int W, typename F>
inline void for_pixel_vectors_strided(int64_t pixels, int64_t C, int64_t ps, const F& f) {
  for (int64_t p = 0; p < pixels; ++p)
    for_channel_blocks<T, W>(C, [&](auto blk, int64_t c0) {
      using V = typename decltype(blk)::type;
      constexpr int NV = decltype(blk)::count;
      constexpr int L = sizeof(V) / sizeof(T);
      for (int v = 0; v < NV; ++v) f(V{}, p * C + c0 + v * L, p * ps + c0 + v * L, c0 + v * L);
    });
}

// A lazily normalised input (conv_bn_chain_cpu): the values a layer reads are
// h = act((s - shift) * scale) per channel (shift / scale: the [C] values of the rows' group;
// act = ReLU when relu, NaN kept as torch.relu does), computed while the input is copied into
// a kernel's scratch, so the normalised tensor is never written. shift == nullptr: h = s.
template <typename T>
struct InputMap {
  const T* shift = nullptr;
  const T* scale = nullptr;
  bool relu = false;
};

// dst[p, c] = h(src[p, c]) for `pixels` pixels of C channels (the map above); src at pixel
// stride src_ps (0: C), dst dense.
template <typename T, int W>
inline void map_pixels(const T* src, T* dst, int64_t pixels, int64_t C, const InputMap<T>& m,
                       int64_t src_ps = 0) {
  const int64_t ps = src_ps ? src_ps : C;
  if (m.shift == nullptr) {
    if (ps == C) {
      std::copy(src, src + pixels * C, dst);
    } else {
      for (int64_t p = 0; p < pixels; ++p) std::copy(src + p * ps, src + p * ps + C, dst + p * C);
    }
    return;
  }
  auto run = [&](auto relu) {
    for_pixel_vectors_strided<T, W>(pixels, C, ps, [&](auto tag, int64_t i, int64_t j, int64_t c) {
      using V = decltype(tag);
      const V h = (load<V>(src + j) - load<V>(m.shift + c)) * load<V>(m.scale + c);
      if constexpr (decltype(relu)::value) store(dst + i, h < V{} ? V{} : h);
      else store(dst + i, h);
    });
  };
  if (m.relu) run(std::true_type{});
  else run(std::false_type{});
}

struct DwShape {
  int64_t H, W, C, K, S, OH, OW;
  // the input's pixel stride (elements from one pixel to the next; 0: C, dense). A channel
  // range of a channels-last tensor has a larger one; its image stride is then H * W * XS.
  int64_t XS = 0;
  int64_t P() const { return K / 2; }
  int64_t xs() const { return XS ? XS : C; }
};

// Padded image geometry: every kernel reads a zero-bordered copy of its input image, so the
// inner loops carry no bounds checks.
inline int64_t padded_h(const DwShape& s) { return s.H + 2 * s.P(); }
inline int64_t padded_w(const DwShape& s) { return s.W + 2 * s.P(); }

// dst [PH, PW, C] := zeros with the image src [rows, cols, C] at offset (top, left): each
// element written once (the border zeroed, the interior copied), not zero-filled first.
// With a map, the interior is h(src) (InputMap).
template <typename T, int W>
inline void embed_image(const T* src, int64_t rows, int64_t cols, T* dst, int64_t PH,
                        int64_t PW, int64_t top, int64_t left, int64_t C,
                        const InputMap<T>& map = {}, int64_t src_ps = 0) {
  const int64_t ps = src_ps ? src_ps : C;  // the source's pixel stride
  std::fill(dst, dst + top * PW * C, T(0));
  for (int64_t h = 0; h < rows; ++h) {
    T* row = dst + (top + h) * PW * C;
    std::fill(row, row + left * C, T(0));
    map_pixels<T, W>(src + h * cols * ps, row + left * C, cols, C, map, ps);
    std::fill(row + (left + cols) * C, row + PW * C, T(0));
  }
  std::fill(dst + (top + rows) * PW * C, dst + PH * PW * C, T(0));
}

// pad [(H + 2P), (W + 2P), C] := zeros with the image h(x) [H, W, C] (pixel stride s.xs())
// at offset (P, P).
template <typename T, int W>
inline void pad_image(const T* x, T* pad, const DwShape& s, const InputMap<T>& map = {}) {
  embed_image<T, W>(x, s.H, s.W, pad, padded_h(s), padded_w(s), s.P(), s.P(), s.C, map, s.XS);
}

// pad := zeros with dz [OH, OW, C] scattered to (P + o*S) rows and columns: the transposed
// conv dx = sum_t dz[(i + P - t) / S] w[t] then is a stride-1 valid conv of pad with the
// flipped kernel. Used for S != 2 (for S = 2 three of four products would meet zeros; that
// case runs polyphase, dw_input_grad_s2).
template <typename T, int W>
inline void upsample_image(const T* dz, T* pad, const DwShape& s) {
  const int64_t P = s.P(), PW = padded_w(s), C = s.C;
  if (s.S == 1) {
    embed_image<T, W>(dz, s.OH, s.OW, pad, padded_h(s), PW, P, P, C);
    return;
  }
  std::fill(pad, pad + padded_h(s) * PW * C, T(0));
  for (int64_t oh = 0; oh < s.OH; ++oh)
    for (int64_t ow = 0; ow < s.OW; ++ow)
      std::copy(dz + (oh * s.OW + ow) * C, dz + (oh * s.OW + ow + 1) * C,
                pad + ((P + oh * s.S) * PW + P + ow * s.S) * C);
}

// The depthwise kernels' store of NV accumulator vectors of channels c0.. at op: with
// shift/scale given, (acc - shift) * scale (the BatchNorm of eval, or of a normalised output),
// else acc as it is.
template <typename V, int NV, typename T>
inline void store_dw_out(T* op, const V (&acc)[NV], int64_t c0, const T* shift, const T* scale) {
  constexpr int L = sizeof(V) / sizeof(T);
  for (int v = 0; v < NV; ++v) {
    if (shift != nullptr) {
      const int64_t c = c0 + v * L;
      store(op + v * L, (acc[v] - load<V>(shift + c)) * load<V>(scale + c));
    } else {
      store(op + v * L, acc[v]);
    }
  }
}

// Stride 1, KW taps known at compile time: N outputs of one channel vector of a row at
// pad_row (the first input pixel of the tile's row, channel c), the input row's N + KW - 1
// vectors loaded once per kernel row and used by every tap (output t's tap kw is output
// t + 1's tap kw - 1), so a kernel row costs N + KW - 1 input loads for N * KW products
// (valid_dwconv's general tile: one input load per product). The same sums in the same order.
template <typename V, typename T, int N, int KW>
inline void dw_row_tile_s1(const T* pad_row, int64_t row_stride, int64_t C, const T* wt,
                           int64_t KH, V (&acc)[N]) {
  for (int t = 0; t < N; ++t) acc[t] = V{};
  for (int64_t kh = 0; kh < KH; ++kh) {
    const T* row = pad_row + kh * row_stride;
    const T* wr = wt + kh * KW * C;
    V xin[N + KW - 1];
    for (int j = 0; j < N + KW - 1; ++j) xin[j] = load<V>(row + j * C);
    for (int kw = 0; kw < KW; ++kw) {
      const V wv = load<V>(wr + kw * C);
      for (int t = 0; t < N; ++t) acc[t] += xin[t + kw] * wv;
    }
  }
}

// out[o, c] = sum_{kh,kw} pad[o_h*S + kh, o_w*S + kw, c] * wt[kh, kw, c] over an out_h x out_w
// map and a KH x KW kernel; with shift/scale given, stores (sum - shift) * scale. Output pixel
// (o_h, o_w) is at out + o_h * out_rs + o_w * out_cs (elements; dense: out_w * C and C).
// Register tiles of TW output pixels x B channels keep TW * B / lanes independent accumulator
// chains.
template <typename T, int W>
inline void valid_dwconv(const T* pad, int64_t PW, const T* wt, int64_t KH, int64_t KW,
                         int64_t S, T* out, int64_t out_h, int64_t out_w, int64_t out_rs,
                         int64_t out_cs, int64_t C, const T* shift, const T* scale) {
  constexpr int TW = 4;
  for_channel_blocks<T, W>(C, [&](auto blk, int64_t c0) {
    using V = typename decltype(blk)::type;
    constexpr int NV = decltype(blk)::count;
    constexpr int L = sizeof(V) / sizeof(T);
    auto tile = [&](auto tw, int64_t oh, int64_t ow) {
      constexpr int N = decltype(tw)::value;
      V acc[N][NV];
      for (int t = 0; t < N; ++t)
        for (int v = 0; v < NV; ++v) acc[t][v] = V{};
      for (int64_t kh = 0; kh < KH; ++kh) {
        const T* row = pad + ((oh * S + kh) * PW + ow * S) * C + c0;
        const T* wr = wt + kh * KW * C + c0;
        for (int64_t kw = 0; kw < KW; ++kw) {
          V wv[NV];
          for (int v = 0; v < NV; ++v) wv[v] = load<V>(wr + kw * C + v * L);
          for (int t = 0; t < N; ++t) {
            const T* xp = row + (t * S + kw) * C;
            for (int v = 0; v < NV; ++v) acc[t][v] += load<V>(xp + v * L) * wv[v];
          }
        }
      }
      for (int t = 0; t < N; ++t)
        store_dw_out(out + oh * out_rs + (ow + t) * out_cs + c0, acc[t], c0, shift, scale);
    };
    // stride 1 with 5 or 7 taps a row: wide tiles one channel vector at a time
    // (dw_row_tile_s1; N = 8 outputs with 64-byte registers, 4 with 32-byte ones), then the
    // general tiles for the pixels left. With 3 taps the general tiles are faster (193 against
    // 278 us on a 128 x 32 x 16 x 16 eval layer), with 5 and 7 about 20 % slower.
    auto rows_s1 = [&](auto kwc, auto nc, int64_t oh) -> int64_t {
      constexpr int KWc = decltype(kwc)::value, N = decltype(nc)::value;
      int64_t ow = 0;
      // single channels keep the general tiles: the compiler contracts the wide tile's
      // scalar sums differently there (their last bit differed with 7 taps)
      if constexpr (std::is_same_v<V, T>) return ow;
      for (; ow + N <= out_w; ow += N)
        for (int v = 0; v < NV; ++v) {
          const int64_t c = c0 + v * L;
          V acc[N];
          dw_row_tile_s1<V, T, N, KWc>(pad + (oh * PW + ow) * C + c, PW * C, C, wt + c, KH, acc);
          for (int t = 0; t < N; ++t) {
            const V one[1] = {acc[t]};
            store_dw_out(out + oh * out_rs + (ow + t) * out_cs + c, one, c, shift, scale);
          }
        }
      return ow;
    };
    constexpr int NS = W >= 64 ? 8 : 4;
    for (int64_t oh = 0; oh < out_h; ++oh) {
      int64_t ow = 0;
      if (S == 1 && KW == 5)
        ow = rows_s1(std::integral_constant<int, 5>{}, std::integral_constant<int, NS>{}, oh);
      else if (S == 1 && KW == 7)
        ow = rows_s1(std::integral_constant<int, 7>{}, std::integral_constant<int, NS>{}, oh);
      for (; ow + TW <= out_w; ow += TW) tile(std::integral_constant<int, TW>{}, oh, ow);
      for (; ow < out_w; ++ow) tile(std::integral_constant<int, 1>{}, oh, ow);
    }
  });
}

// dw[kh, kw0 + u, c] += sum_o pad[o_h*S + kh, o_w*S + kw0 + u, c] * dz[o, c] for u < NT taps
// at once (NT independent accumulators share each dz load).
template <typename T, int W, int NT>
inline void dw_weight_taps(const T* pad, const T* dz, T* dw, const DwShape& s, int64_t kw0) {
  const int64_t PW = padded_w(s), C = s.C, S = s.S;
  for_channel_blocks<T, W>(C, [&](auto blk, int64_t c0) {
    using V = typename decltype(blk)::type;
    constexpr int NV = decltype(blk)::count;
    constexpr int L = sizeof(V) / sizeof(T);
    for (int64_t kh = 0; kh < s.K; ++kh) {
      V acc[NT][NV];
      for (int u = 0; u < NT; ++u)
        for (int v = 0; v < NV; ++v) acc[u][v] = V{};
      for (int64_t oh = 0; oh < s.OH; ++oh) {
        const T* row = pad + ((oh * S + kh) * PW + kw0) * C + c0;
        const T* gr = dz + oh * s.OW * C + c0;
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          V gv[NV];
          for (int v = 0; v < NV; ++v) gv[v] = load<V>(gr + ow * C + v * L);
          const T* xp = row + ow * S * C;
          for (int u = 0; u < NT; ++u)
            for (int v = 0; v < NV; ++v) acc[u][v] += load<V>(xp + u * C + v * L) * gv[v];
        }
      }
      for (int u = 0; u < NT; ++u) {
        T* op = dw + (kh * s.K + kw0 + u) * C + c0;
        for (int v = 0; v < NV; ++v) store(op + v * L, load<V>(op + v * L) + acc[u][v]);
      }
    }
  });
}

// Taps of a K-tap kernel (padding K / 2, stride S) that meet an input pixel of one dimension
// of `size` pixels at output o: [first, end).
struct TapRange {
  int64_t first, end;
};

inline TapRange live_taps(int64_t o, int64_t size, int64_t K, int64_t S) {
  const int64_t start = o * S - K / 2;  // input position of tap 0
  return {std::max<int64_t>(0, -start), std::min<int64_t>(K, size - start)};
}

// Whether a depthwise conv of shape s pays to skip the zero border (direct_dwconv): the taps
// that meet the image are at most half of those the padded form runs (on the small maps of
// the late stages: 4x4 with 5x5 or 7x7 kernels, 2x2 with any).
inline bool dw_direct_pays(const DwShape& s) {
  auto live = [&](int64_t size, int64_t out) {
    int64_t n = 0;
    for (int64_t o = 0; o < out; ++o) {
      const TapRange r = live_taps(o, size, s.K, s.S);
      n += std::max<int64_t>(0, r.end - r.first);
    }
    return n;
  };
  return 2 * live(s.H, s.OH) * live(s.W, s.OW) <= s.OH * s.K * s.OW * s.K;
}

// out[o, c] = sum over the taps t inside the image of x[o*S - P + t, c] * wt[t, c], x a dense
// [H, W, C] image; with shift/scale, stores (sum - shift) * scale. The taps are taken in the
// padded form's order (rows, then columns) and the border taps it adds multiply zeros into
// the sums, which leaves them unchanged: the same values as valid_dwconv on the padded image,
// bit for bit, for a third of the multiply-adds on a 4x4 map with a 7x7 kernel.
template <typename T, int W>
inline void direct_dwconv(const T* x, const T* wt, T* out, const DwShape& s, const T* shift,
                          const T* scale) {
  const int64_t C = s.C, K = s.K, S = s.S, P = s.P();
  for_channel_blocks<T, W>(C, [&](auto blk, int64_t c0) {
    using V = typename decltype(blk)::type;
    constexpr int NV = decltype(blk)::count;
    constexpr int L = sizeof(V) / sizeof(T);
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      const TapRange th = live_taps(oh, s.H, K, S);
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        const TapRange tw = live_taps(ow, s.W, K, S);
        V acc[NV];
        for (int v = 0; v < NV; ++v) acc[v] = V{};
        for (int64_t kh = th.first; kh < th.end; ++kh) {
          const T* xr = x + ((oh * S - P + kh) * s.W + ow * S - P + tw.first) * C + c0;
          const T* wr = wt + (kh * K + tw.first) * C + c0;
          for (int64_t kw = 0; kw < tw.end - tw.first; ++kw)
            for (int v = 0; v < NV; ++v)
              acc[v] += load<V>(xr + kw * C + v * L) * load<V>(wr + kw * C + v * L);
        }
        store_dw_out(out + (oh * s.OW + ow) * C + c0, acc, c0, shift, scale);
      }
    }
  });
}

// One image: z = depthwise conv of h(x) (padding P, stride S; `map`: InputMap); with
// shift/scale given, stores (z - shift) * scale. `pad` is scratch of padded_h * padded_w * C:
// the zero-bordered copy of h(x), or where dw_direct_pays the dense one (none when x is
// dense and unmapped).
template <typename T, int W>
inline void dw_forward_image(const T* x, const T* wt, T* z, const DwShape& s, const T* shift,
                             const T* scale, T* pad, const InputMap<T>& map) {
  if (dw_direct_pays(s)) {
    const T* src = x;
    if (map.shift != nullptr || s.xs() != s.C) {
      map_pixels<T, W>(x, pad, s.H * s.W, s.C, map, s.xs());
      src = pad;
    }
    direct_dwconv<T, W>(src, wt, z, s, shift, scale);
    return;
  }
  pad_image<T, W>(x, pad, s, map);
  valid_dwconv<T, W>(pad, padded_w(s), wt, s.K, s.K, s.S, z, s.OH, s.OW, s.OW * s.C, s.C, s.C,
                     shift, scale);
}

// Stride 2, polyphase: the input pixels of one parity (rh, rw) receive only the taps of one
// parity, so dx restricted to that phase is a stride-1 valid conv of dz (zero-bordered) with
// that sub-kernel, taps reversed. Per dimension, for phase r: tap parity tau = (r + P) % 2,
// M = (K - tau + 1) / 2 taps (t = 2m + tau), dx[2a + r] = sum_m' sub[m'] dz[a + off + m'] with
// sub[m'] = w[2 (M - 1 - m') + tau] and off = (r + P - tau) / 2 - M + 1. This does the K*K/4
// products per input pixel that meet real dz values, where the upsampled stride-1 form does
// K*K (three of four on zeros).
struct Phase {
  int64_t count = 0, tau = 0, taps = 0, off = 0;  // positions a, tap parity, taps M, dz offset
};

// Taps of parity tau in one dimension of a K-tap kernel: tau, tau + 2, ...
inline int64_t parity_taps(int64_t K, int64_t tau) { return (K - tau + 1) / 2; }

inline Phase phase_of(int64_t size, int64_t K, int64_t r) {
  const int64_t P = K / 2;
  Phase ph;
  ph.count = (size - r + 1) / 2;
  ph.tau = (r + P) % 2;
  ph.taps = parity_taps(K, ph.tau);
  ph.off = (r + P - ph.tau) / 2 - ph.taps + 1;
  return ph;
}

// The zero border dz needs on each side of one dimension (over both phases).
struct Border {
  int64_t lo = 0, hi = 0;
};

inline Border s2_border(int64_t size, int64_t out, int64_t K) {
  Border b;
  for (int64_t r = 0; r < 2; ++r) {
    const Phase ph = phase_of(size, K, r);
    if (ph.count == 0) continue;
    b.lo = std::max(b.lo, -ph.off);
    b.hi = std::max(b.hi, ph.count - 1 + ph.off + std::max<int64_t>(ph.taps, 1) - 1 - (out - 1));
  }
  return b;
}

// Scratch elements the input gradient needs per image (either form).
inline int64_t input_grad_scratch(const DwShape& s) {
  if (s.S != 2) return padded_h(s) * padded_w(s) * s.C;
  const Border bh = s2_border(s.H, s.OH, s.K), bw = s2_border(s.W, s.OW, s.K);
  return (s.OH + bh.lo + bh.hi) * (s.OW + bw.lo + bw.hi) * s.C;
}

// wsub: for tap parities (tau_h, tau_w), sub-kernel [M_h, M_w, C] at wsub + offset(tau_h,
// tau_w), built from w [C, K, K] by input_grad_taps (below).
template <typename T, int W>
inline void dw_input_grad_s2(const T* dz, const T* wsub, T* dx, const DwShape& s, T* pad) {
  const Border bh = s2_border(s.H, s.OH, s.K), bw = s2_border(s.W, s.OW, s.K);
  const int64_t C = s.C, PW = s.OW + bw.lo + bw.hi, PH = s.OH + bh.lo + bh.hi;
  embed_image<T, W>(dz, s.OH, s.OW, pad, PH, PW, bh.lo, bw.lo, C);
  for (int64_t rh = 0; rh < 2; ++rh) {
    const Phase ph = phase_of(s.H, s.K, rh);
    if (ph.count == 0) continue;
    for (int64_t rw = 0; rw < 2; ++rw) {
      const Phase pw = phase_of(s.W, s.K, rw);
      if (pw.count == 0) continue;
      // sub-kernels in the order (0,0), (0,1), (1,0), (1,1) of (tau_h, tau_w)
      int64_t offset = 0;
      for (int64_t i = 0; i < ph.tau * 2 + pw.tau; ++i)
        offset += parity_taps(s.K, i / 2) * parity_taps(s.K, i % 2) * C;
      valid_dwconv<T, W>(pad + ((ph.off + bh.lo) * PW + pw.off + bw.lo) * C, PW, wsub + offset,
                         ph.taps, pw.taps, 1, dx + (rh * s.W + rw) * C, ph.count, pw.count,
                         2 * s.W * C, 2 * C, C, nullptr, nullptr);
    }
  }
}

// One image: dx = transposed depthwise conv of dz. Stride 1 (or any stride but 2): `w` is wt
// with the taps reversed, dz is upsampled into `pad` and convolved at stride 1. Stride 2: `w`
// holds the four reversed sub-kernels (dw_input_grad_s2).
template <typename T, int W>
inline void dw_input_grad_image(const T* dz, const T* w, T* dx, const DwShape& s, T* pad) {
  if (s.S == 2) {
    dw_input_grad_s2<T, W>(dz, w, dx, s, pad);
    return;
  }
  if (s.S == 1) {  // a stride-1 conv of dz with the reversed taps, on dz's own geometry
    const DwShape t{s.OH, s.OW, s.C, s.K, 1, s.H, s.W};
    if (dw_direct_pays(t)) {
      direct_dwconv<T, W>(dz, w, dx, t, nullptr, nullptr);
      return;
    }
  }
  upsample_image<T, W>(dz, pad, s);
  valid_dwconv<T, W>(pad, padded_w(s), w, s.K, s.K, 1, dx, s.H, s.W, s.W * s.C, s.C, s.C,
                     nullptr, nullptr);
}

// One image: dw[t, c] += sum_o h(x)[o*S - P + t, c] * dz[o, c] (`map`: InputMap).
template <typename T, int W>
inline void dw_weight_grad_image(const T* x, const T* dz, T* dw, const DwShape& s, T* pad,
                                 const InputMap<T>& map) {
  pad_image<T, W>(x, pad, s, map);
  switch (s.K) {
    case 1: dw_weight_taps<T, W, 1>(pad, dz, dw, s, 0); break;
    case 3: dw_weight_taps<T, W, 3>(pad, dz, dw, s, 0); break;
    case 5: dw_weight_taps<T, W, 5>(pad, dz, dw, s, 0); break;
    case 7: dw_weight_taps<T, W, 7>(pad, dz, dw, s, 0); break;
    default:
      for (int64_t kw = 0; kw < s.K; ++kw) dw_weight_taps<T, W, 1>(pad, dz, dw, s, kw);
  }
}

// Per-channel sums over the rows of [pixels, C] arrays, added to s1 and s2 (double):
//   Mode 0 (moments):              s1 += a,   s2 += a * a
//   Mode 1 (BN backward):          s1 += a,   s2 += a * b        (a = dy, b = xhat)
//   Mode 2 (ReLU + BN backward):   s1 += a',  s2 += a' * b,  a' = b > 0 ? a : 0
// With Mapped (modes 1 and 2), b is read through `map` (xhat = (b - shift) * scale, the stored
// tensor being the layer's raw output). `lda`: a's pixel stride (0: C; b is dense).
// Spans of 64 rows are summed in registers (type T), then flushed to the double sums.
template <typename T, int W, int Mode, bool Mapped = false>
inline void channel_sums(const T* a, const T* b, int64_t pixels, int64_t C, double* s1,
                         double* s2, const InputMap<T>& map = {}, int64_t lda = 0) {
  const int64_t pa = lda ? lda : C;
  constexpr int64_t kSpan = 64;
  for_channel_blocks<T, W>(C, [&](auto blk, int64_t c0) {
    using V = typename decltype(blk)::type;
    constexpr int NV = decltype(blk)::count;
    constexpr int L = sizeof(V) / sizeof(T);
    for (int64_t p0 = 0; p0 < pixels; p0 += kSpan) {
      const int64_t p1 = std::min(pixels, p0 + kSpan);
      V acc1[NV], acc2[NV];
      for (int v = 0; v < NV; ++v) acc1[v] = acc2[v] = V{};
      for (int64_t p = p0; p < p1; ++p) {
        for (int v = 0; v < NV; ++v) {
          const V av = load<V>(a + p * pa + c0 + v * L);
          if constexpr (Mode == 0) {
            acc1[v] += av;
            acc2[v] += av * av;
          } else {
            V bv = load<V>(b + p * C + c0 + v * L);
            if constexpr (Mapped)
              bv = (bv - load<V>(map.shift + c0 + v * L)) * load<V>(map.scale + c0 + v * L);
            const V u = Mode == 2 ? (bv > V{} ? av : V{}) : av;
            acc1[v] += u;
            acc2[v] += u * bv;
          }
        }
      }
      for (int v = 0; v < NV; ++v)
        for (int l = 0; l < L; ++l) {
          s1[c0 + v * L + l] += static_cast<double>(lane<V, T>(acc1[v], l));
          s2[c0 + v * L + l] += static_cast<double>(lane<V, T>(acc2[v], l));
        }
    }
  });
}

// dz = rstd * (dy' - a - xhat * b) (training) or rstd * dy' (eval: a = b = null); for eval
// with ReLU, `xhat` is the output y (same sign as xhat where it matters).
// With Mapped, `xhat` is the raw output, read through `map` (as in channel_sums). `ldy`: dy's
// pixel stride (xhat and dz are dense).
template <typename T, int W, bool relu, bool train, bool Mapped>
inline void bn_input_grad_loop(const T* dy, const T* xhat, int64_t pixels, int64_t C,
                               const T* rstd, const T* a, const T* b, T* dz,
                               const InputMap<T>& map, int64_t ldy) {
  for_pixel_vectors_strided<T, W>(pixels, C, ldy, [&](auto tag, int64_t i, int64_t j, int64_t c) {
    using V = decltype(tag);
    V g = load<V>(dy + j);
    if constexpr (relu || train) {
      V x = load<V>(xhat + i);
      if constexpr (Mapped) x = (x - load<V>(map.shift + c)) * load<V>(map.scale + c);
      if constexpr (relu) g = x > V{} ? g : V{};
      if constexpr (train) g = g - load<V>(a + c) - x * load<V>(b + c);
    }
    store(dz + i, load<V>(rstd + c) * g);
  });
}

template <typename T, int W, bool relu>
inline void bn_input_grad(const T* dy, const T* xhat, int64_t pixels, int64_t C, const T* rstd,
                          const T* a, const T* b, T* dz, const InputMap<T>& map,
                          int64_t ldy = 0) {
  auto run = [&](auto train, auto mapped) {
    bn_input_grad_loop<T, W, relu, decltype(train)::value, decltype(mapped)::value>(
        dy, xhat, pixels, C, rstd, a, b, dz, map, ldy ? ldy : C);
  };
  const bool mapped = map.shift != nullptr;
  if (a != nullptr) {
    if (mapped) run(std::true_type{}, std::true_type{});
    else run(std::true_type{}, std::false_type{});
  } else {
    if (mapped) run(std::false_type{}, std::true_type{});
    else run(std::false_type{}, std::false_type{});
  }
}

// In place z := (z - mean) * rstd; with relu also y := max(z, 0) (y may alias z; NaN passes
// through, as torch.relu).
template <typename T, int W, bool relu>
inline void normalize(T* z, T* y, int64_t pixels, int64_t C, const T* mean, const T* rstd) {
  for_pixel_vectors<T, W>(pixels, C, [&](auto tag, int64_t i, int64_t c) {
    using V = decltype(tag);
    const V x = (load<V>(z + i) - load<V>(mean + c)) * load<V>(rstd + c);
    store(z + i, x);
    if constexpr (relu) store(y + i, x < V{} ? V{} : x);
  });
}

// The multiversioned entry points, one overload per dtype (and per epilogue of k_gemm).
// (`map`: the InputMap of a lazily normalised input or raw output; default: none.)
#define FASTSHIFT_KERNEL_DECLS(T)                                                               \
  void k_dw_forward(const T* x, const T* wt, T* z, const DwShape& s, const T* shift,            \
                    const T* scale, T* pad, const InputMap<T>& map = {});                       \
  void k_dw_input_grad(const T* dz, const T* wflip, T* dx, const DwShape& s, T* pad);           \
  void k_dw_weight_grad(const T* x, const T* dz, T* dw, const DwShape& s, T* pad,               \
                        const InputMap<T>& map = {});                                           \
  void k_moments(const T* z, int64_t n, int64_t C, double* sum, double* sq);                    \
  void k_grad_moments(bool relu, const T* dy, const T* xh, int64_t n, int64_t C, double* sg,    \
                      double* sgx, const InputMap<T>& map = {}, int64_t ldy = 0);               \
  void k_bn_input_grad(bool relu, const T* dy, const T* xh, int64_t n, int64_t C,               \
                       const T* rstd, const T* a, const T* b, T* dz,                            \
                       const InputMap<T>& map = {}, int64_t ldy = 0);                           \
  void k_normalize(bool relu, T* z, T* y, int64_t n, int64_t C, const T* mean, const T* rstd);  \
  void k_map(const T* s, T* y, int64_t n, int64_t C, const InputMap<T>& map);                   \
  void k_transpose(const T* src, int64_t rows, int64_t cols, T* dst, int64_t r0, int64_t r1);   \
  void k_gemm(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c, int64_t ldc, \
              int64_t M, int64_t K, int64_t N, bool accumulate, const gemm::Store& e);          \
  void k_gemm(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c, int64_t ldc, \
              int64_t M, int64_t K, int64_t N, bool accumulate, const gemm::Moments& e);

FASTSHIFT_KERNEL_DECLS(float)
FASTSHIFT_KERNEL_DECLS(double)
#undef FASTSHIFT_KERNEL_DECLS

// What k_gemm / k_transpose call: one version per instruction-set level (multiversion.h), each
// in its own translation unit (gemm_kernels.inc).
#define FASTSHIFT_GEMM_DECLS(T, level)                                                          \
  void gemm_##level(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c,       \
                    int64_t ldc, int64_t M, int64_t K, int64_t N, bool accumulate,             \
                    const gemm::Store& e);                                                     \
  void gemm_##level(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c,       \
                    int64_t ldc, int64_t M, int64_t K, int64_t N, bool accumulate,             \
                    const gemm::Moments& e);                                                   \
  void transpose_##level(const T* src, int64_t rows, int64_t cols, T* dst, int64_t r0,        \
                         int64_t r1);
FASTSHIFT_GEMM_DECLS(float, v4)
FASTSHIFT_GEMM_DECLS(float, v3)
FASTSHIFT_GEMM_DECLS(float, base)
FASTSHIFT_GEMM_DECLS(double, v4)
FASTSHIFT_GEMM_DECLS(double, v3)
FASTSHIFT_GEMM_DECLS(double, base)
#undef FASTSHIFT_GEMM_DECLS

}  // namespace cpu_block
}  // namespace fastshift
