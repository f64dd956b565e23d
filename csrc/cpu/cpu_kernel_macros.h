// Compiler attributes shared by the CPU kernels (cpu/*_cpu.cpp).
#pragma once

// Hot functions are compiled for AVX-512, AVX2 and baseline and picked at load time, so the
// binary stays portable (GCC on x86-64 Linux; elsewhere the compiler's default target).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define UF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define UF_CLONES
#endif

#if defined(_MSC_VER)
#define UF_INLINE __forceinline
#define UF_RESTRICT __restrict
#else
#define UF_INLINE inline __attribute__((always_inline))
#define UF_RESTRICT __restrict__
#endif

#if defined(_OPENMP)
#define UF_SIMD _Pragma("omp simd")
#else
#define UF_SIMD
#endif
