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
// The transforms are this file's; the GEMMs are at::bmm (MKL/oneDNN).
//
// Two schedules, the same arithmetic:
// - "unfused": the input transform of the whole batch into V [36, C_in, tiles], one at::bmm
//   (threaded over e by the BLAS), the output transform from M [36, C_out, tiles]. For layers
//   with few tiles (small images, wide channels), where U is the largest array.
// - "fused": strips of R tile rows, one per task; a thread transforms its strip's input into its
//   own buffer, multiplies it (one single-threaded batched GEMM) and transforms the result, so
//   the strip's V and M stay in the core's caches. Each strip reads all of U, so this is for
//   layers with many tiles (large images), where V and M are the largest arrays.
// "auto" (the default) picks fused when there are at least as many strips as threads and the
// strip buffers stay under 32 MiB; the environment variable RTDETR_FAST_WINOGRAD_SCHEDULE
// (fused / unfused) overrides it, for benchmarks.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
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
#include "winograd/winograd_cpu_kernels.inc"
}  // namespace baseline

#ifdef RTDETR_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "winograd/winograd_cpu_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

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

template <typename T, typename Gemm>
void fused_strip(const T* x, const T* bias, T* y, int64_t n, int64_t C, int64_t K, int64_t H,
                 int64_t W, int64_t nth, int64_t ntw, int64_t th0, int64_t R, int act, T* Vb,
                 T* Mb, T* scratch, const Gemm& gemm) {
#ifdef RTDETR_CPU_AVX2
  if (use_avx2())
    return avx2::fused_strip(x, bias, y, n, C, K, H, W, nth, ntw, th0, R, act, Vb, Mb, scratch,
                             gemm);
#endif
  baseline::fused_strip(x, bias, y, n, C, K, H, W, nth, ntw, th0, R, act, Vb, Mb, scratch, gemm);
}

// A thread's strip buffers, kept between calls (grown, never shrunk): a fresh multi-megabyte
// block per call would page-fault its way in every time.
template <typename T>
T* strip_buffer(int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n) {
    buf.clear();
    buf.shrink_to_fit();
    buf.resize(n);
  }
  return buf.data();
}

// Tile rows per strip for the fused schedule: the fewest tile rows on the busiest thread,
// then strips of about kTargetTiles tiles (wide enough GEMMs, small enough buffers).
// Returns 0 where the fused schedule does not apply (fewer strips than threads).
int64_t strip_rows(int64_t N, int64_t nth, int64_t ntw, int64_t threads) {
  constexpr int64_t kMinTiles = 32, kTargetTiles = 80;
  int64_t best = 0, best_load = 0, best_gap = 0;
  for (int64_t R = 1; R <= nth; ++R) {
    if (R * ntw < kMinTiles && R < nth) continue;
    const int64_t strips = N * ((nth + R - 1) / R);
    if (strips < threads) continue;
    const int64_t load = (strips + threads - 1) / threads * R;  // tile rows, busiest thread
    const int64_t gap = std::abs(R * ntw - kTargetTiles);
    if (best == 0 || load < best_load || (load == best_load && gap < best_gap)) {
      best = R;
      best_load = load;
      best_gap = gap;
    }
  }
  return best;
}

}  // namespace

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias,
                                c10::string_view activation, c10::string_view method) {
  const int act = rep_conv::activation_code(activation);
  TORCH_CHECK(method == "auto" || method == "fused" || method == "unfused",
              "rtdetr_fast::winograd_conv3x3: method must be 'auto', 'fused' or 'unfused', got '",
              method, "'");
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
  // RTDETR_FAST_WINOGRAD_SCHEDULE=fused|unfused overrides "auto" (read on every call, so that a
  // benchmark can switch one compiled model between the schedules)
  if (method == "auto") {
    const char* env = std::getenv("RTDETR_FAST_WINOGRAD_SCHEDULE");
    if (env != nullptr && env[0] != '\0') {
      const c10::string_view forced(env);
      TORCH_CHECK(forced == "auto" || forced == "fused" || forced == "unfused",
                  "RTDETR_FAST_WINOGRAD_SCHEDULE must be 'auto', 'fused' or 'unfused', got '",
                  forced, "'");
      method = forced;
    }
  }
  const int64_t threads = at::get_num_threads();
  int64_t R = method == "unfused" ? 0 : strip_rows(N, nth, ntw, threads);
  // each thread keeps its strip buffers (36 (C_in + C_out) R ntw elements) after the call:
  // "auto" leaves layers that would need more than 32 MiB a thread to the unfused schedule
  if (method == "auto" && 36 * (C + K) * R * ntw * x.element_size() > (int64_t{32} << 20))
    R = 0;
  if (method == "fused" && R == 0) R = std::min<int64_t>(nth, (32 + ntw - 1) / ntw);
  if (R > 0) {
    const int64_t strips_per_image = (nth + R - 1) / R, Tb = R * ntw;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv3x3_cpu", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
      scalar_t* yp = y.data_ptr<scalar_t>();
      const at::TensorOptions opt = x.options();
      at::parallel_for(0, N * strips_per_image, 1, [&](int64_t begin, int64_t end) {
        const int64_t v_size = 36 * C * Tb, m_size = 36 * K * Tb;
        const int64_t s_size = std::max(6 * 4 * (ntw + 1) * 2 + 4 * (ntw + 1), 14 * 4 * ntw);
        scalar_t* buf = strip_buffer<scalar_t>(v_size + m_size + s_size);
        scalar_t* Vb = buf;
        scalar_t* Mb = buf + v_size;
        auto gemm = [&](scalar_t* v, scalar_t* m, int64_t cols) {
          at::Tensor Vt = at::from_blob(v, {36, C, cols}, {C * Tb, Tb, 1}, opt);
          if (cols == Tb) {
            at::Tensor Mt = at::from_blob(m, {36, K, Tb}, opt);
            at::bmm_out(Mt, weight, Vt);
          } else {  // the short last strip: a dense result, then into the strided buffer
            at::from_blob(m, {36, K, cols}, {K * Tb, Tb, 1}, opt).copy_(at::bmm(weight, Vt));
          }
        };
        for (int64_t i = begin; i < end; ++i) {
          const int64_t n = i / strips_per_image, th0 = (i % strips_per_image) * R;
          fused_strip<scalar_t>(xp, b, yp, n, C, K, H, W, nth, ntw, th0, R, act, Vb, Mb,
                                Mb + m_size, gemm);
        }
      });
    });
    return y;
  }
  at::Tensor V = at::empty({36, C, tiles}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv3x3_cpu", [&] {
    input_transform<scalar_t>(x.data_ptr<scalar_t>(), V.data_ptr<scalar_t>(), N, C, H, W, nth,
                              ntw);
    at::Tensor M = at::bmm(weight, V);  // [36, K, tiles]
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    output_transform<scalar_t>(M.data_ptr<scalar_t>(), b, y.data_ptr<scalar_t>(), N, K, H, W,
                               nth, ntw, act);
  });
  return y;
}

}  // namespace winograd
}  // namespace rtdetr_fast

TORCH_LIBRARY_FRAGMENT(rtdetr_fast, m) {
  m.def(
      "winograd_conv3x3(Tensor x, Tensor weight, Tensor? bias, str activation, "
      "str method=\"auto\") -> Tensor");
}

TORCH_LIBRARY_IMPL(rtdetr_fast, CPU, m) {
  m.impl("winograd_conv3x3", &rtdetr_fast::winograd::winograd_conv3x3_cpu);
}
