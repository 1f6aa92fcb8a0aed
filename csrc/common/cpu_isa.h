// Run-time choice between the two builds of a CPU kernel: baseline x86-64, and AVX2+FMA (a copy
// compiled under `#pragma GCC target("avx2,fma")` where RTDETR_CPU_AVX2 is defined), so that a
// wheel built on any machine runs everywhere and uses the wider vectors where they exist.
#pragma once
#include <cstdlib>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RTDETR_CPU_AVX2 1
#endif

namespace rtdetr_fast {

// Whether the environment variable `name` is set to a value starting with '1'.
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == '1';
}

// Whether to run the AVX2+FMA copies: the CPU has both, and RTDETR_FAST_NO_AVX2=1 (the tests
// run both builds) is not set.
inline bool use_avx2() {
#ifdef RTDETR_CPU_AVX2
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          !env_flag("RTDETR_FAST_NO_AVX2");
  return yes;
#else
  return false;
#endif
}

// Whether to run the AVX-512 kernels (the Winograd GEMMs): the CPU has AVX-512F, the AVX2 copies
// run (use_avx2()), and RTDETR_FAST_NO_AVX512=1 (the tests run without them too) is not set.
inline bool use_avx512() {
#ifdef RTDETR_CPU_AVX2
  static const bool yes = use_avx2() && __builtin_cpu_supports("avx512f") &&
                          !env_flag("RTDETR_FAST_NO_AVX512");
  return yes;
#else
  return false;
#endif
}

}  // namespace rtdetr_fast
