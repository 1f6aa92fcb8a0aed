// Launchers of the CUDA kernels of rtdetr_fast::ms_deform_attn. Raw pointers and cudaStream_t
// only: no torch header, so the .cu compiles with nvcc alone (scripts/check_cuda_compile.sh).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace rtdetr_fast {
namespace msda {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The level table (shapes, starts, point prefix sums) is passed by value in the kernel's
// parameters, so L is at most kMaxLevels.
constexpr int kMaxLevels = 16;

struct Problem {
  int64_t B, S, H, D, Q, L, N;  // N: points over all levels
  int uniform_p;                // P when every level has P points, else 0
  int method;                   // Method code of ms_deform_attn_math.h: 0 bilinear, 1 discrete
  int point_start[kMaxLevels + 1];
  int64_t shapes[2 * kMaxLevels];  // (H_l, W_l) of the first L levels
  int64_t starts[kMaxLevels];      // first row of each level in value
};

// out [B, Q, H*D] of `dtype`; every pointer contiguous on the current device.
cudaError_t forward(DType dtype, const Problem& p, const void* value, const void* loc,
                    const void* attn, void* out, cudaStream_t stream);

// Atomic path: grad_value_acc is a zeroed float32 [B, S, H, D] (the output itself for float32).
// Deterministic path (no float atomics): grad_value_fixed is fixed_words(n) zeroed int64 for the
// n = B*S*H*D elements (their fixed-point sums, then the flags of their non-finite
// contributions), absmax two zeroed uint32, and grad_value_out receives the result in `dtype`:
// NaN and inf exactly where the float atomics put them, the other elements deterministic.
inline int64_t fixed_words(int64_t n) { return n + (n + 31) / 32; }

cudaError_t backward(DType dtype, const Problem& p, const void* grad_out, const void* value,
                     const void* loc, const void* attn, float* grad_value_acc,
                     unsigned long long* grad_value_fixed, unsigned int* absmax,
                     void* grad_value_out, void* grad_loc, void* grad_attn, bool deterministic,
                     cudaStream_t stream);

}  // namespace cuda
}  // namespace msda
}  // namespace rtdetr_fast
