// CPU kernels of rtdetr_fast::ms_deform_attn (float32, float64).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/ms_deform_attn_math.h"

namespace rtdetr_fast {
namespace msda {
namespace {

// __restrict__ lets the compiler vectorise over D without runtime alias checks
template <typename T>
inline void axpy(T* __restrict__ y, const T* __restrict__ x, T a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// The dot product keeps 8 independent partial sums (summed in a fixed order) so that it and the
// axpy vectorise together; a single running sum would serialise on float rounding.
template <typename T>
inline T dot_and_axpy(const T* __restrict__ g, const T* __restrict__ v, T* __restrict__ gv, T a,
                      int64_t n) {
  constexpr int W = 8;
  T part[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    for (int k = 0; k < W; ++k) {
      part[k] += g[i + k] * v[i + k];
      gv[i + k] += a * g[i + k];
    }
  }
  T acc = T(0);
  for (; i < n; ++i) {
    acc += g[i] * v[i];
    gv[i] += a * g[i];
  }
  for (int k = 0; k < W; ++k) acc += part[k];
  return acc;
}

template <typename T>
void forward_kernel(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                    const T* attn, T* out, const Dims& d) {
  const int64_t rows = d.B * d.Q * d.H;
  const int64_t D = d.D, H = d.H, N = d.N;
  // Iterated as (b, h, q), q fastest: consecutive queries of one head gather from the same
  // [S, D] slice of value (1 MB at S=8400, D=32), which stays in cache, whereas all H heads of
  // a query span the whole image's value.
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t q = r % d.Q, h = (r / d.Q) % H, b = r / (d.Q * H);
      const int64_t row = (b * d.Q + q) * H + h;
      T* o = out + row * D;
      std::fill(o, o + D, T(0));
      const T* vb = value + (b * d.S * H + h) * D;
      for (int64_t l = 0; l < d.L; ++l) {
        const int64_t lh = shapes[2 * l], lw = shapes[2 * l + 1], ls = starts[l];
        for (int j = d.point_start[l]; j < d.point_start[l + 1]; ++j) {
          Corners<T> c;
          const int64_t pj = row * N + j;
          if (!bilinear_corners<T>(loc[2 * pj], loc[2 * pj + 1], lh, lw, ls, d.S, c)) continue;
          const T a = attn[pj];
          for (int k = 0; k < 4; ++k) {
            if (c.row[k] < 0) continue;
            const T wk = a * c.w[k];
            axpy(o, vb + static_cast<int64_t>(c.row[k]) * H * D, wk, D);
          }
        }
      }
    }
  });
}

// Each task owns one (b, h): it alone writes grad_value[b, :, h, :], looping over q in order,
// so the result is deterministic by construction and needs no atomics.
template <typename T>
void backward_kernel(const T* grad_out, const T* value, const int64_t* shapes,
                     const int64_t* starts, const T* loc, const T* attn, T* grad_value,
                     T* grad_loc, T* grad_attn, const Dims& d) {
  const int64_t D = d.D, H = d.H, N = d.N, Q = d.Q;
  at::parallel_for(0, d.B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* vb = value + (b * d.S * H + h) * D;
      T* gvb = grad_value + (b * d.S * H + h) * D;
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t row = (b * Q + q) * H + h;
        const T* g = grad_out + row * D;
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t lh = shapes[2 * l], lw = shapes[2 * l + 1], ls = starts[l];
          for (int j = d.point_start[l]; j < d.point_start[l + 1]; ++j) {
            const int64_t pj = row * N + j;
            Corners<T> c;
            if (!bilinear_corners<T>(loc[2 * pj], loc[2 * pj + 1], lh, lw, ls, d.S, c)) {
              grad_attn[pj] = T(0);
              grad_loc[2 * pj] = T(0);
              grad_loc[2 * pj + 1] = T(0);
              continue;
            }
            const T a = attn[pj];
            T dot[4] = {T(0), T(0), T(0), T(0)};
            for (int k = 0; k < 4; ++k) {
              if (c.row[k] < 0) continue;
              const int64_t off = static_cast<int64_t>(c.row[k]) * H * D;
              dot[k] = dot_and_axpy(g, vb + off, gvb + off, a * c.w[k], D);
            }
            bilinear_backward<T>(c, dot, a, lh, lw, &grad_attn[pj], &grad_loc[2 * pj],
                                 &grad_loc[2 * pj + 1]);
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights, c10::IntArrayRef num_points) {
  const Dims d = check_args(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, num_points, nullptr);
  check_levels_on_host(spatial_shapes, level_start_index, d.S);
  at::Tensor out = at::empty({d.B, d.Q, d.H * d.D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu", [&] {
    forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                             level_start_index.data_ptr<int64_t>(),
                             sampling_locations.data_ptr<scalar_t>(),
                             attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, c10::IntArrayRef num_points, bool deterministic) {
  // the CPU backward is deterministic whatever `deterministic` says
  (void)deterministic;
  const Dims d = check_args(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, num_points, &grad_output);
  check_levels_on_host(spatial_shapes, level_start_index, d.S);
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::zeros_like(sampling_locations);
  at::Tensor grad_attn = at::zeros_like(attention_weights);
  if (grad_output.numel() == 0 || value.numel() == 0)
    return {grad_value, grad_loc, grad_attn};
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                              spatial_shapes.data_ptr<int64_t>(),
                              level_start_index.data_ptr<int64_t>(),
                              sampling_locations.data_ptr<scalar_t>(),
                              attention_weights.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
                              grad_attn.data_ptr<scalar_t>(), d);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace msda
}  // namespace rtdetr_fast

TORCH_LIBRARY_IMPL(rtdetr_fast, CPU, m) {
  m.impl("ms_deform_attn", &rtdetr_fast::msda::ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &rtdetr_fast::msda::ms_deform_attn_backward_cpu);
}
