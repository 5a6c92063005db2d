// Function multiversioning for the CPU hot loops: an AVX-512 (x86-64-v4) and an AVX2/FMA
// (x86-64-v3) version next to the generic one, chosen once at run time (GCC on x86-64 Linux;
// elsewhere the generic one alone). The kernels' vectors stay 32 bytes in every version
// (the 1x1 products' wide tiles excepted: gemm.h); what the x86-64-v4 version adds is 32 vector
// registers instead of 16, which the register tiles of the depthwise kernels (k = 7 above all)
// need: docs/performance.md.
//
// Two forms. FASTSHIFT_MULTIVERSION: GCC's target_clones, all versions in one translation
// unit with a load-time resolver (block_kernels.inc). The 1x1 products, whose many register
// tile shapes take most of the build (about 75 s per version and dtype at -O3), are compiled
// instead one translation unit per level and dtype (gemm_kernels.inc, gemm_<dtype>_<level>.cpp)
// with FASTSHIFT_TARGET_V4 / _V3 / _BASE, and picked by isa_level(), so a parallel build
// compiles them side by side. Both forms flatten the version's callees into it, so each is
// compiled whole for its level.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTSHIFT_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#define FASTSHIFT_ISA_LEVELS 1
#define FASTSHIFT_TARGET_V4 __attribute__((target("arch=x86-64-v4"), flatten))
#define FASTSHIFT_TARGET_V3 __attribute__((target("arch=x86-64-v3"), flatten))
#define FASTSHIFT_TARGET_BASE __attribute__((flatten))
#else
#define FASTSHIFT_MULTIVERSION
#define FASTSHIFT_ISA_LEVELS 0
#define FASTSHIFT_TARGET_V4
#define FASTSHIFT_TARGET_V3
#define FASTSHIFT_TARGET_BASE
#endif

namespace fastshift {
namespace cpu_block {

// The instruction-set level the running CPU supports, the way target_clones' resolver picks:
// 4 (x86-64-v4), 3 (x86-64-v3) or 0 (generic; always 0 without FASTSHIFT_ISA_LEVELS).
inline int isa_level() {
#if FASTSHIFT_ISA_LEVELS
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return 4;
    if (__builtin_cpu_supports("x86-64-v3")) return 3;
    return 0;
  }();
  return level;
#else
  return 0;
#endif
}

}  // namespace cpu_block
}  // namespace fastshift
