// rtdetr_fast::max_pool_3x3_s2: F.max_pool2d(x, kernel_size=3, stride=2, padding=1) on the CPU for
// NCHW float32/float64, the ResNet stem's pool after deploy() runs the stem's convolutions as
// Winograd kernels (NCHW). torch's NCHW max pool is many times slower than its channels_last
// one (benchmarks/model/bench_rtdetr_cpu.py); this one reads each input row at most twice.
//
// Per output row: the elementwise max of input rows 2i-1, 2i, 2i+1 (those inside the image),
// then along the row out[j] = max(r[2j-1], r[2j], r[2j+1]) from the row's even and odd phases,
// so that both loops run over contiguous arrays and vectorise. Padding never wins (it is
// -inf); NaN propagates, as in torch (any NaN in the window gives NaN).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/checks.h"

namespace rtdetr_fast {
namespace max_pool {
namespace {

template <typename T>
inline T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

template <typename T>
void max_pool_3x3_s2_kernel(const T* x, T* y, int64_t planes, int64_t H, int64_t W, int64_t Ho,
                          int64_t Wo) {
  const T ninf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    // r: the vertical max of one output row's input rows; even[j] = r[2j], odd[j + 1] =
    // r[2j + 1] (odd[0] and the entries past the row are -inf)
    std::vector<T> r(W), even(Wo), odd(Wo + 1, ninf);
    for (int64_t p = begin; p < end; ++p) {
      const T* xp = x + p * H * W;
      T* yp = y + p * Ho * Wo;
      for (int64_t i = 0; i < Ho; ++i) {
        const T* __restrict__ r1 = xp + (2 * i) * W;
        T* __restrict__ rr = r.data();
        std::copy(r1, r1 + W, rr);
        if (2 * i - 1 >= 0) {
          const T* __restrict__ r0 = xp + (2 * i - 1) * W;
          #pragma GCC ivdep
          for (int64_t q = 0; q < W; ++q) rr[q] = nan_max(r0[q], rr[q]);
        }
        if (2 * i + 1 < H) {
          const T* __restrict__ r2 = xp + (2 * i + 1) * W;
          #pragma GCC ivdep
          for (int64_t q = 0; q < W; ++q) rr[q] = nan_max(r2[q], rr[q]);
        }
        T* __restrict__ ev = even.data();
        T* __restrict__ od = odd.data();
        const int64_t n_odd = W / 2;  // columns 2j + 1 inside the row
        #pragma GCC ivdep
        for (int64_t j = 0; j < Wo; ++j) ev[j] = rr[2 * j];
        #pragma GCC ivdep
        for (int64_t j = 0; j < n_odd; ++j) od[j + 1] = rr[2 * j + 1];
        T* __restrict__ out = yp + i * Wo;
        #pragma GCC ivdep
        for (int64_t j = 0; j < Wo; ++j) out[j] = nan_max(nan_max(od[j], ev[j]), od[j + 1]);
      }
    }
  });
}

at::Tensor max_pool_3x3_s2_cpu(const at::Tensor& x) {
  RTDETR_CHECK_DIM(x, 4, "[N, C, H, W]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "rtdetr_fast::max_pool_3x3_s2 runs float32 or float64, got ", x.scalar_type());
  RTDETR_CHECK_CONTIGUOUS(x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H >= 1 && W >= 1, "x must have a nonempty map, got ", x.sizes());
  const int64_t Ho = (H - 1) / 2 + 1, Wo = (W - 1) / 2 + 1;
  at::Tensor y = at::empty({N, C, Ho, Wo}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool_3x3_s2_cpu", [&] {
    max_pool_3x3_s2_kernel<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N * C, H, W,
                                   Ho, Wo);
  });
  return y;
}

}  // namespace
}  // namespace max_pool
}  // namespace rtdetr_fast

TORCH_LIBRARY_IMPL(rtdetr_fast, CPU, m) {
  m.impl("max_pool_3x3_s2", &rtdetr_fast::max_pool::max_pool_3x3_s2_cpu);
}
