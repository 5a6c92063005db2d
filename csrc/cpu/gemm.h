// Register-tiled matrix products for the 1x1 layers of the CPU bodies (block_cpu.cpp).
//
// The 1x1 convs of the SPOS blocks are thin products: up to tens of thousands of pixel rows
// times 16-320 channels. A BLAS sgemm spends a large share of such a product packing its
// operands and zeroing its output first (MKL's sgemm measured 51-100 GFLOP/s on one core of
// the development machine for these shapes, this kernel 65-114: benchmarks/bench_gemm.py).
// Here the rows of A are read in place and broadcast, the rows of B are read as vectors, and
// each output tile
// stays in registers for the whole reduction over k:
//
//   C[r, n] (+)= sum_k A[r, k] * B[k, n],   A element (r, k) at a[r * ars + k * aks],
//                                          B row k at b + k * ldb, C row r at c + r * ldc.
//
// The strides of A cover both uses: the products of the forward and of the input gradient
// (A row-major: ars = K, aks = 1) and the weight gradient dW = dZ^T X (A = dZ read transposed:
// ars = 1, aks = ld of dZ). Every output element is one sum over k in increasing order; the
// compiler contracts its steps into FMAs, which it may do differently in different tile shapes
// and epilogues, so a result depends on the shapes (and the epilogue), never on the threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "multiversion.h"

namespace fastshift {
namespace gemm {

// GCC/Clang vector of `Bytes` bytes of T (a register of that width where the clone has one).
template <typename T, int Bytes>
struct Vec {
  typedef T type __attribute__((vector_size(Bytes)));
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// What a tile does with its sums (`n`: the tile's first column, for per-column arrays).
// Store: writes them. Moments: writes them and adds each column's sum and sum of squares over
// the tile's rows to sum[n] and sq[n] (double; the tile's rows added in T first), so the
// BatchNorm statistics of a 1x1 layer's output cost no pass of their own.
struct Store {
  template <typename V, typename T, int RB, int NV>
  void operator()(V (&acc)[RB][NV], T* c, int64_t ldc, int64_t) const {
    constexpr int L = sizeof(V) / sizeof(T);
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < NV; ++v) store(c + r * ldc + v * L, acc[r][v]);
  }
};

struct Moments {
  double* sum;
  double* sq;
  template <typename V, typename T, int RB, int NV>
  void operator()(V (&acc)[RB][NV], T* c, int64_t ldc, int64_t n) const {
    Store{}(acc, c, ldc, n);
    constexpr int L = sizeof(V) / sizeof(T);
    for (int v = 0; v < NV; ++v) {
      V s = acc[0][v], q = acc[0][v] * acc[0][v];
      for (int r = 1; r < RB; ++r) {
        s += acc[r][v];
        q += acc[r][v] * acc[r][v];
      }
      if constexpr (L == 1) {
        sum[n + v] += double(s);
        sq[n + v] += double(q);
      } else {
        using D = typename Vec<double, L * sizeof(double)>::type;
        double* ps = sum + n + v * L;
        double* pq = sq + n + v * L;
        store<D>(ps, load<D>(ps) + __builtin_convertvector(s, D));
        store<D>(pq, load<D>(pq) + __builtin_convertvector(q, D));
      }
    }
  }
};

// One RB x (NV * lanes of V) tile of C over k in [0, K), columns from n; V may be T itself
// (a column tail).
template <typename V, typename T, int RB, int NV, bool Accumulate, typename E>
inline void tile(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c,
                 int64_t ldc, int64_t K, int64_t n, const E& epilogue) {
  constexpr int L = sizeof(V) / sizeof(T);
  V acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = Accumulate ? load<V>(c + r * ldc + v * L) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load<V>(b + k * ldb + v * L);
    for (int r = 0; r < RB; ++r) {
      const V av = V{} + a[r * ars + k * aks];  // broadcast
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  epilogue(acc, c, ldc, n);
}

// Columns [n, n + NV * lanes of V) of rows [0, M) of C: tiles of RB rows, then one tile of the
// rows left; V may be T itself (a single column).
template <typename V, typename T, int RB, int NV, bool Accumulate, typename E>
inline void column_panel(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c,
                         int64_t ldc, int64_t M, int64_t K, int64_t n, const E& e) {
  int64_t r = 0;
  for (; r + RB <= M; r += RB)
    tile<V, T, RB, NV, Accumulate>(a + r * ars, ars, aks, b + n, ldb, c + r * ldc + n, ldc, K, n,
                                   e);
  if constexpr (RB > 1) {
    if (M - r > 0)  // 1 <= rows left < RB: the tile of that height
      [&]<int... I>(std::integer_sequence<int, I...>) {
        ((M - r == I + 1 ? tile<V, T, I + 1, NV, Accumulate>(a + r * ars, ars, aks, b + n, ldb,
                                                            c + r * ldc + n, ldc, K, n, e)
                         : void()),
         ...);
      }(std::make_integer_sequence<int, RB - 1>{});
  }
}

// Rows [0, M) of C (M at most kBlockRows, below), all N columns, one column panel after the
// other: panels of NVmax vectors, then one narrower panel, then single columns. Each panel of
// B (K x NVmax vectors) is read by every row tile of the block while it is in cache, so B need
// not fit in cache as a whole (the network's last 1x1 layer has a 2.6 MB weight); the block's
// rows of A (at most kBlockRows x K) are read once per panel and stay in cache.
template <typename V, typename T, int RB, int NVmax, bool Accumulate, typename E>
inline void row_block(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c,
                      int64_t ldc, int64_t M, int64_t K, int64_t N, const E& e) {
  constexpr int L = sizeof(V) / sizeof(T);
  int64_t n = 0;
  for (; n + NVmax * L <= N; n += NVmax * L)
    column_panel<V, T, RB, NVmax, Accumulate>(a, ars, aks, b, ldb, c, ldc, M, K, n, e);
  if constexpr (NVmax > 1) {
    const int64_t left = (N - n) / L;  // at most NVmax - 1 vectors remain
    if constexpr (NVmax > 3) {
      if (left == 3) column_panel<V, T, RB, 3, Accumulate>(a, ars, aks, b, ldb, c, ldc, M, K, n, e);
    }
    if constexpr (NVmax > 2) {
      if (left == 2) column_panel<V, T, RB, 2, Accumulate>(a, ars, aks, b, ldb, c, ldc, M, K, n, e);
    }
    if (left == 1) column_panel<V, T, RB, 1, Accumulate>(a, ars, aks, b, ldb, c, ldc, M, K, n, e);
    n += left * L;
  }
  for (; n < N; ++n) column_panel<T, T, RB, 1, Accumulate>(a, ars, aks, b, ldb, c, ldc, M, K, n, e);
}

// Rows of C per register tile (both tilings); callers align their row splits to it.
constexpr int kTileRows = 6;

// Rows of C per row block (a multiple of kTileRows).
constexpr int64_t kBlockRows = 16 * kTileRows;

// All of C: row blocks of kBlockRows rows in turn. Every output element is the same sum in
// any blocking (the tile shape of a column and of the last rows depend on N and M only), and
// the Moments epilogue meets the tiles of a column in row order.
template <typename V, typename T, int RB, int NVmax, bool Accumulate, typename E>
inline void product(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c,
                    int64_t ldc, int64_t M, int64_t K, int64_t N, const E& e) {
  for (int64_t r = 0; r < M; r += kBlockRows)
    row_block<V, T, RB, NVmax, Accumulate>(a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc,
                                           std::min(kBlockRows, M - r), K, N, e);
}

// Whether to use the tiles sized for 32 vector registers of 64 bytes (AVX-512, the x86-64-v4
// version: multiversion.h): 6 x 4 vectors of 64 bytes; otherwise 6 x 2 of 32 bytes (16 AVX2
// registers). In both the accumulators, the B row and the broadcast A value stay in registers.
// FASTSHIFT_CPU_GEMM=narrow forces the narrow tiles (tests run both on an AVX-512 machine).
inline bool wide_registers() {
  static const bool wide = [] {
    const char* force = std::getenv("FASTSHIFT_CPU_GEMM");
    return cpu_block::isa_level() >= 4 && !(force && std::strcmp(force, "narrow") == 0);
  }();
  return wide;
}

// The integer vector type __builtin_shuffle takes as the mask of a vector V of T.
template <typename T, int Bytes>
struct MaskVec;
template <int Bytes>
struct MaskVec<float, Bytes> {
  typedef int32_t type __attribute__((vector_size(Bytes)));
};
template <int Bytes>
struct MaskVec<double, Bytes> {
  typedef int64_t type __attribute__((vector_size(Bytes)));
};

// One stage of the in-register transpose of an L x L block held as L vectors v[0..L): for
// every element (r, c) whose row and column differ in bit S, swap it with (r ^ S, c ^ S). After
// the stages of every bit (any order) element (r, c) sits at (c, r).
template <typename V, typename M, int L, int S, int... I>
inline void transpose_stage(V* v, std::integer_sequence<int, I...>) {
  for (int r = 0; r < L; ++r) {
    if (r & S) continue;
    const V a = v[r], b = v[r + S];
    v[r] = __builtin_shuffle(a, b, M{((I & S) ? L + I - S : I)...});
    v[r + S] = __builtin_shuffle(a, b, M{((I & S) ? L + I : I + S)...});
  }
}

// dst [cols, rows] = src [rows, cols]^T (both dense) for rows [r0, r1) of src: blocks of
// L x L elements (L = the lanes of a 32-byte vector) loaded as L row vectors, transposed in
// registers (log2 L shuffle stages) and stored as L row vectors of dst; the rows and columns
// past the last whole block element by element. (An element-wise loop writes with a stride of
// `rows` elements: 0.7 ns per element measured, milliseconds per forward over a network's
// 1x1 weights.)
template <typename T>
inline void transpose_rows(const T* src, int64_t rows, int64_t cols, T* dst, int64_t r0,
                           int64_t r1) {
  using V = typename Vec<T, 32>::type;
  using M = typename MaskVec<T, 32>::type;
  constexpr int L = 32 / sizeof(T);
  const int64_t i_end = r0 + (r1 - r0) / L * L, j_end = cols / L * L;
  for (int64_t i = r0; i < i_end; i += L) {
    for (int64_t j = 0; j < j_end; j += L) {
      V v[L];
      for (int r = 0; r < L; ++r) v[r] = load<V>(src + (i + r) * cols + j);
      [&]<int... I>(std::integer_sequence<int, I...> seq) {
        transpose_stage<V, M, L, 1>(v, seq);
        transpose_stage<V, M, L, 2>(v, seq);
        if constexpr (L > 4) transpose_stage<V, M, L, 4>(v, seq);
      }(std::make_integer_sequence<int, L>{});
      for (int c = 0; c < L; ++c) store(dst + (j + c) * rows + i, v[c]);
    }
    for (int64_t j = j_end; j < cols; ++j)
      for (int64_t r = i; r < i + L; ++r) dst[j * rows + r] = src[r * cols + j];
  }
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t r = i_end; r < r1; ++r) dst[j * rows + r] = src[r * cols + j];
}

// C (+)= A B over the given strides (see the top of this file), each tile's sums handed to
// `e` (Store, Moments); no threads here.
template <typename T, typename E = Store>
inline void multiply(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c,
                     int64_t ldc, int64_t M, int64_t K, int64_t N, bool accumulate,
                     const E& e = {}) {
  if (wide_registers()) {
    using V = typename Vec<T, 64>::type;
    if (accumulate) product<V, T, kTileRows, 4, true>(a, ars, aks, b, ldb, c, ldc, M, K, N, e);
    else product<V, T, kTileRows, 4, false>(a, ars, aks, b, ldb, c, ldc, M, K, N, e);
  } else {
    using V = typename Vec<T, 32>::type;
    if (accumulate) product<V, T, kTileRows, 2, true>(a, ars, aks, b, ldb, c, ldc, M, K, N, e);
    else product<V, T, kTileRows, 2, false>(a, ars, aks, b, ldb, c, ldc, M, K, N, e);
  }
}

}  // namespace gemm
}  // namespace fastshift
