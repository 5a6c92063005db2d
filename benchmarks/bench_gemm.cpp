// The 1x1 layers' matrix products of the CPU bodies (csrc/cpu/gemm.h) against MKL's sgemm (the
// one inside libtorch_cpu, what at::mm calls), side by side in one process, float32, at the
// SPOS shapes of `bench_ops.py --scale cpu` (M pixel rows x C channels -> O channels):
//   forward          z [M, O] = x [M, C] w^T
//   weight gradient  dw [O, C] = dz [M, O]^T x [M, C]
// (the input gradient dx = dz w is the forward's product with other sizes). One thread: the
// kernels themselves, without block_cpu.cpp's split over threads (run MKL with
// OMP_NUM_THREADS=1, as bench_gemm.py does). Prints one JSON object; every product is checked
// against MKL's first. Built and run by bench_gemm.py.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../csrc/cpu/gemm.h"

extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*,
                       const float*, const float*, const int*, const float*, const int*,
                       const float*, float*, const int*);

namespace {

using fastshift::gemm::Store;

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten)) void
product(const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb, float* c,
        int64_t ldc, int64_t M, int64_t K, int64_t N, bool accumulate) {
  fastshift::gemm::multiply<float>(a, ars, aks, b, ldb, c, ldc, M, K, N, accumulate, Store{});
}

// dw [O, C] = dz [M, O]^T x [M, C], summed over the rows in blocks of 128 (as block_cpu.cpp
// does within each of its tasks)
void weight_grad(const float* dz, const float* x, float* dw, int64_t M, int64_t O, int64_t C) {
  for (int64_t m0 = 0; m0 < M; m0 += 128)
    product(dz + m0 * O, 1, O, x + m0 * C, C, dw, C, O, std::min<int64_t>(128, M - m0), C, m0 > 0);
}

template <typename F>
double median_ms(const F& f, int repeats) {
  for (int i = 0; i < 3; ++i) f();
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                    .count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, double(std::fabs(a[i] - b[i])));
    m = std::max(m, double(std::fabs(b[i])));
  }
  return d / (m > 0 ? m : 1);
}

}  // namespace

int main() {
  // (M, C, O): batch 64 at 64x64 input, the four stages' 1x1 layers (16x16 .. 2x2 maps) and
  // the first stage's 16-channel layer at 32x32; then batch 128 (validation) for two stages;
  // then the last 1x1 layer (conv_last, 640 -> 1024 at 2x2) at batch 64 and 128
  const int shapes[][3] = {{16384, 32, 32}, {4096, 80, 80},   {1024, 160, 160}, {256, 320, 320},
                           {65536, 16, 16}, {32768, 32, 32}, {8192, 80, 80},
                           {256, 640, 1024}, {512, 640, 1024}};
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  const float one = 1, zero = 0;
  std::printf("{\"benchmark\": \"bench_gemm\", \"threads\": 1, \"rows\": [");
  bool first = true;
  for (const auto& s : shapes) {
    const int M = s[0], C = s[1], O = s[2];
    std::vector<float> x(size_t(M) * C), w(size_t(O) * C), wt(size_t(C) * O), dz(size_t(M) * O);
    for (auto* v : {&x, &w, &dz})
      for (auto& e : *v) e = uni(gen);
    for (int o = 0; o < O; ++o)
      for (int c = 0; c < C; ++c) wt[size_t(c) * O + o] = w[size_t(o) * C + c];
    std::vector<float> z_mkl(size_t(M) * O), z_own(z_mkl.size()), dw_mkl(size_t(O) * C),
        dw_own(dw_mkl.size());
    // row-major z = x w^T is column-major z^T = w x^T: sgemm('T', 'N', O, M, C, w, x)
    auto mkl_fwd = [&] {
      sgemm_("T", "N", &O, &M, &C, &one, w.data(), &C, x.data(), &C, &zero, z_mkl.data(), &O);
    };
    // row-major dw = dz^T x is column-major dw^T = x^T dz: sgemm('N', 'T', C, O, M, x, dz)
    auto mkl_wgrad = [&] {
      sgemm_("N", "T", &C, &O, &M, &one, x.data(), &C, dz.data(), &O, &zero, dw_mkl.data(), &C);
    };
    auto own_fwd = [&] { product(x.data(), C, 1, wt.data(), O, z_own.data(), O, M, C, O, false); };
    auto own_wgrad = [&] { weight_grad(dz.data(), x.data(), dw_own.data(), M, O, C); };
    mkl_fwd();
    own_fwd();
    mkl_wgrad();
    own_wgrad();
    const double err_fwd = max_rel_diff(z_own, z_mkl), err_wgrad = max_rel_diff(dw_own, dw_mkl);
    if (err_fwd > 1e-5 || err_wgrad > 1e-5) {
      std::fprintf(stderr, "mismatch at M=%d C=%d O=%d: %g %g\n", M, C, O, err_fwd, err_wgrad);
      return 1;
    }
    // alternate the two, three rounds, and keep each one's best median
    double t[4] = {1e30, 1e30, 1e30, 1e30};
    for (int round = 0; round < 3; ++round) {
      t[0] = std::min(t[0], median_ms(mkl_fwd, 25));
      t[1] = std::min(t[1], median_ms(own_fwd, 25));
      t[2] = std::min(t[2], median_ms(mkl_wgrad, 25));
      t[3] = std::min(t[3], median_ms(own_wgrad, 25));
    }
    const double gflop = 2e-6 * M * C * O;  // per product, in GFLOP per ms
    std::printf("%s\n {\"M\": %d, \"C\": %d, \"O\": %d, "
                "\"forward_ms\": {\"mkl\": %.4f, \"fastshift\": %.4f}, "
                "\"weight_grad_ms\": {\"mkl\": %.4f, \"fastshift\": %.4f}, "
                "\"forward_gflops\": {\"mkl\": %.1f, \"fastshift\": %.1f}, "
                "\"weight_grad_gflops\": {\"mkl\": %.1f, \"fastshift\": %.1f}, "
                "\"max_rel_diff\": {\"forward\": %.2e, \"weight_grad\": %.2e}}",
                first ? "" : ",", M, C, O, t[0], t[1], t[2], t[3], gflop / t[0], gflop / t[1],
                gflop / t[2], gflop / t[3], err_fwd, err_wgrad);
    first = false;
  }
  std::printf("\n]}\n");
  return 0;
}
