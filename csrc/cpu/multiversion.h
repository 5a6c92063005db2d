// Function multiversioning for the CPU hot loops: an AVX2/FMA (x86-64-v3) clone next to the
// generic one, chosen once at load time (GCC on x86-64 Linux; elsewhere a plain function).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTSHIFT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#else
#define FASTSHIFT_MULTIVERSION
#endif
