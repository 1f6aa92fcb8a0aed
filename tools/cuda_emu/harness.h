// Shared by the kernel harnesses: managed buffers pre-filled with NaN bytes, float64
// comparisons, case bookkeeping. Builds with g++ under the CPU emulator (cuda_emu.h is
// force-included) and with nvcc for a GPU (compute-sanitizer runs in scripts/gpu_suite.sh).
// No torch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace harness {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    exit(4);
  }
}

// managed memory filled with 0xFF bytes: NaN in every float type, -1 in integers, so an
// output element the kernel forgets to write is seen
template <typename T>
T* alloc(size_t n, int fill = 0xff) {
  void* p = nullptr;
  check_cuda(cudaMallocManaged(&p, n * sizeof(T) + (n == 0), cudaMemAttachGlobal),
             "cudaMallocManaged");
  memset(p, fill, n * sizeof(T));
  return static_cast<T*>(p);
}
inline void release(void* p) { cudaFree(p); }
inline void sync(const char* what) {
  check_cuda(cudaGetLastError(), what);
  check_cuda(cudaDeviceSynchronize(), what);
}

// dtype codes 0 float32, 1 float16, 2 bfloat16
inline const char* dtype_name(int dt) { return dt == 0 ? "f32" : dt == 1 ? "f16" : "bf16"; }
inline size_t dtype_size(int dt) { return dt == 0 ? 4 : 2; }
inline double load(const void* p, int dt, size_t i) {
  if (dt == 0) return static_cast<const float*>(p)[i];
  if (dt == 1) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
inline void store(void* p, int dt, size_t i, double v) {
  if (dt == 0) static_cast<float*>(p)[i] = static_cast<float>(v);
  else if (dt == 1) static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v));
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v));
}
// relative precision of a dtype's rounding
inline double eps(int dt) { return dt == 0 ? 1.2e-7 : dt == 1 ? 9.8e-4 : 7.9e-3; }

struct Cases {
  int passed = 0, failed = 0;
  std::string schedule = "gpu";
  // one line per case; msg empty when it passed
  void report(const std::string& name, const std::string& msg) {
    if (msg.empty()) {
      ++passed;
      printf("PASS %s [%s]\n", name.c_str(), schedule.c_str());
    } else {
      ++failed;
      printf("FAIL %s [%s]: %s\n", name.c_str(), schedule.c_str(), msg.c_str());
    }
    fflush(stdout);
  }
  int finish() {
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
  }
};

// argv: [schedule] [case filter]; the schedule only matters under the emulator
inline Cases start(int argc, char** argv, std::string* filter) {
  Cases c;
#if defined(RTDETR_CUDA_EMU)
  c.schedule = argc > 1 ? argv[1] : "rr";
  ::cuda_emu::set_schedule(c.schedule.c_str());
#endif
  *filter = argc > 2 ? argv[2] : "";
  return c;
}

// |got - want| <= tol * scale + abs_tol, NaN only where NaN is expected; returns a message
// for the first mismatch
inline std::string compare(const char* what, size_t n, const std::vector<double>& want,
                           const std::vector<double>& scale, const void* got, int dt,
                           double tol, double abs_tol = 1e-6) {
  for (size_t i = 0; i < n; ++i) {
    const double g = load(got, dt, i), w = want[i];
    bool ok;
    if (std::isnan(w)) ok = std::isnan(g);
    else if (std::isinf(w)) ok = g == w;
    else ok = std::isfinite(g) && std::fabs(g - w) <= tol * scale[i] + abs_tol;
    if (!ok) {
      char buf[256];
      snprintf(buf, sizeof buf, "%s[%zu] = %.9g, expected %.9g (tolerance %.3g)", what, i, g, w,
               tol * scale[i] + abs_tol);
      return buf;
    }
  }
  return "";
}

}  // namespace harness
