// Function multiversioning for the CPU hot loops: an AVX-512 (x86-64-v4) and an AVX2/FMA
// (x86-64-v3) version next to the generic one, chosen once at run time (GCC on x86-64 Linux;
// elsewhere the generic one alone). The x86-64-v4 version has 32 vector registers instead of
// 16, which the register tiles of the depthwise kernels (k = 7 above all) need, and its
// depthwise / BatchNorm / map loops run on 64-byte vectors (32 bytes in the other versions:
// block_kernels.inc), as do the 1x1 products' wide tiles (gemm.h): docs/performance.md.
//
// Two forms. FASTSHIFT_MULTIVERSION: GCC's target_clones, all versions in one translation
// unit with a load-time resolver (the channel shuffles, shuffle_cpu.cpp). FASTSHIFT_TARGET_V4 /
// _V3 / _BASE: one function per level, picked by isa_level(): the block kernels
// (block_kernels.inc, where each level's version also has its own vector width) and the 1x1
// products, whose many register tile shapes take most of the build (about 75 s per version and
// dtype at -O3) and are compiled one translation unit per level and dtype (gemm_kernels.inc,
// gemm_<dtype>_<level>.cpp), so a parallel build compiles them side by side. Every form
// flattens the version's callees into it, so each is compiled whole for its level.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>

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

// The instruction-set level of the versions that run: 4 (x86-64-v4), 3 (x86-64-v3) or 0
// (generic; always 0 without FASTSHIFT_ISA_LEVELS): the highest the running CPU supports (the
// test target_clones' resolver makes), capped by FASTSHIFT_CPU_ISA=x86-64-v3 or generic, so
// that tests can run every version on one machine (fastshift.ops checks the value at import).
// Read once per process.
inline int isa_level() {
#if FASTSHIFT_ISA_LEVELS
  static const int level = [] {
    __builtin_cpu_init();
    int supported = 0;
    if (__builtin_cpu_supports("x86-64-v4")) supported = 4;
    else if (__builtin_cpu_supports("x86-64-v3")) supported = 3;
    const char* cap = std::getenv("FASTSHIFT_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "x86-64-v3") == 0) return std::min(supported, 3);
    if (cap != nullptr && std::strcmp(cap, "generic") == 0) return 0;
    return supported;
  }();
  return level;
#else
  return 0;
#endif
}

}  // namespace cpu_block
}  // namespace fastshift
