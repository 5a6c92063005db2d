// Function multiversioning for the CPU hot loops: an AVX-512 (x86-64-v4) and an AVX2/FMA
// (x86-64-v3) clone next to the generic one, chosen once at load time (GCC on x86-64 Linux;
// elsewhere a plain function). The kernels' vectors stay 32 bytes in every clone; what the
// x86-64-v4 clone adds is 32 vector registers instead of 16, which the register tiles of the
// depthwise kernels (k = 7 above all) need: README, "Performance".
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTSHIFT_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define FASTSHIFT_MULTIVERSION
#endif
