// rtdetr_fast::winograd_conv3x3: act(conv3x3(x, w, stride 1, padding 1) + bias) on the CPU as
// Winograd F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
// interpolation points 0, +-1, +-2, infinity).
//
// Each 4x4 output tile is A^T [ (G w G^T) . (B^T d B) ] A, d the 6x6 input tile around it: the
// 36 elementwise products over the channels are 36 independent GEMMs,
//   M[e] (C_out x T) = U[e] (C_out x C_in) @ V[e] (C_in x T),  e = 0..35, T = the tiles,
// 36 multiplies per 16 outputs instead of 144. The transformed weight U = G w G^T
// ([36, C_out, C_in], e = 6*row + column) is made once by the Python side
// (rtdetr_fast/ops/rep_conv/winograd.py, in float64), not per call.
//
// Layouts: x [N, C_in, H, W] contiguous (NCHW), float32 or float64; the result the same.
// The transforms are this file's; the GEMMs are too in float32 where the CPU has AVX-512
// (winograd_gemm_avx512.inc), else at::bmm (MKL/oneDNN).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/codes.h"

namespace rtdetr_fast {
namespace rep_conv {
int activation_code(c10::string_view activation);  // rep_conv/rep_conv.cpp
}  // namespace rep_conv

namespace winograd {

namespace {

namespace baseline {
#include "rep_conv/cpu/winograd_cpu_kernels.inc"
}  // namespace baseline

#ifdef RTDETR_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "rep_conv/cpu/winograd_cpu_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#include <immintrin.h>
namespace avx512 {
#include "rep_conv/cpu/winograd_cpu_kernels.inc"
#include "rep_conv/cpu/winograd_gemm_avx512.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

// Tile rows per block of the fused schedule (float32, AVX-512), or 0 for the unfused one. Fused
// where a block's products ([36, C + K, Tb] floats, Tb >= 16 tiles) fit in about 1.5 MB of L2,
// U is small enough (<= 2.5 MB) to be read again for every block, and there are 4+ blocks to
// share among the threads. In the r18 detector that is the 64- and 128-channel layers at
// 160x160 and 80x80, where it is the faster schedule in the compiled model
// (benchmarks/ops/bench_rep_conv.py);
// the wider layers and smaller maps run unfused. RTDETR_WINO_FUSED=0 turns it off (the tests
// compare both schedules).
int64_t fused_rows_per_block(int64_t C, int64_t K, int64_t nth, int64_t ntw, int64_t N) {
  const char* env = std::getenv("RTDETR_WINO_FUSED");
  if (env && env[0] == '0') return 0;
  const int64_t budget = 3 << 19, u_max = 5 << 19;  // bytes
  if (36 * C * K * 4 > u_max) return 0;
  int64_t rpb = std::max<int64_t>(1, (64 + ntw - 1) / ntw);
  while (rpb > 1 && 36 * (C + K) * rpb * ntw * 4 > budget) --rpb;
  if (rpb * ntw < 16 || N * ((nth + rpb - 1) / rpb) < 4) return 0;
  return rpb;
}

// M[e] = U[e] @ V[e], e = 0..35
at::Tensor gemms(const at::Tensor& U, const at::Tensor& V) {
#ifdef RTDETR_CPU_AVX2
  if (U.scalar_type() == at::kFloat && use_avx512()) {
    const int64_t K = U.size(1), C = U.size(2), T = V.size(2);
    at::Tensor M = at::empty({36, K, T}, V.options());
    avx512::wino_gemm(U.data_ptr<float>(), V.data_ptr<float>(), M.data_ptr<float>(), K, C, T);
    return M;
  }
#endif
  return at::bmm(U, V);
}

template <typename T>
void input_transform(const T* x, T* V, int64_t N, int64_t C, int64_t H, int64_t W, int64_t nth,
                     int64_t ntw) {
#ifdef RTDETR_CPU_AVX2
  if (use_avx2()) return avx2::input_transform(x, V, N, C, H, W, nth, ntw);
#endif
  baseline::input_transform(x, V, N, C, H, W, nth, ntw);
}

template <typename T>
void output_transform(const T* Mt, const T* bias, T* y, int64_t N, int64_t K, int64_t H,
                      int64_t W, int64_t nth, int64_t ntw, int act) {
#ifdef RTDETR_CPU_AVX2
  if (use_avx2()) return avx2::output_transform(Mt, bias, y, N, K, H, W, nth, ntw, act);
#endif
  baseline::output_transform(Mt, bias, y, N, K, H, W, nth, ntw, act);
}

}  // namespace

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias,
                                c10::string_view activation) {
  const int act = rep_conv::activation_code(activation);
  RTDETR_CHECK_DIM(x, 4, "[N, C_in, H, W]");
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == 36 && weight.size(2) == x.size(1),
              "weight must be the Winograd F(4x4,3x3) transform [36, C_out, C_in] with C_in=",
              x.size(1), ", got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "rtdetr_fast::winograd_conv3x3 runs float32 or float64, got ", x.scalar_type());
  RTDETR_CHECK_DTYPE(weight, x);
  RTDETR_CHECK_CONTIGUOUS(x);
  RTDETR_CHECK_CONTIGUOUS(weight);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(1), "bias must be [C_out] = [",
                weight.size(1), "], got ", b.sizes());
    RTDETR_CHECK_DTYPE(b, x);
    RTDETR_CHECK_CONTIGUOUS(b);
  }
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = weight.size(1);
  at::Tensor y = at::empty({N, K, H, W}, x.options());
  if (y.numel() == 0) return y;
  const int64_t nth = (H + 3) / 4, ntw = (W + 3) / 4, tiles = N * nth * ntw;
#ifdef RTDETR_CPU_AVX2
  if (x.scalar_type() == at::kFloat && use_avx512()) {
    const int64_t rpb = fused_rows_per_block(C, K, nth, ntw, N);
    if (rpb > 0) {
      avx512::wino_fused(x.data_ptr<float>(), weight.data_ptr<float>(),
                         bias.has_value() ? bias->data_ptr<float>() : nullptr,
                         y.data_ptr<float>(), N, C, H, W, K, nth, ntw, act, rpb);
      return y;
    }
  }
#endif
  at::Tensor V = at::empty({36, C, tiles}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv3x3_cpu", [&] {
    input_transform<scalar_t>(x.data_ptr<scalar_t>(), V.data_ptr<scalar_t>(), N, C, H, W, nth,
                              ntw);
    at::Tensor M = gemms(weight, V);  // [36, K, tiles]
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    output_transform<scalar_t>(M.data_ptr<scalar_t>(), b, y.data_ptr<scalar_t>(), N, K, H, W,
                               nth, ntw, act);
  });
  return y;
}

}  // namespace winograd
}  // namespace rtdetr_fast

TORCH_LIBRARY_IMPL(rtdetr_fast, CPU, m) {
  m.impl("winograd_conv3x3", &rtdetr_fast::winograd::winograd_conv3x3_cpu);
}
