// CPU kernels of rtdetr_fast::ms_deform_attn (float32, float64).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "common/cpu_alloc.h"
#include "common/cpu_isa.h"
#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/ms_deform_attn_math.h"

namespace rtdetr_fast {
namespace msda {
namespace {

namespace baseline {
#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels.inc"
}  // namespace baseline

#ifdef RTDETR_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

template <typename T>
void forward_kernel(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                    const T* attn, T* out, const Dims& d) {
#ifdef RTDETR_CPU_AVX2
  if (use_avx2()) return avx2::forward_kernel(value, shapes, starts, loc, attn, out, d);
#endif
  baseline::forward_kernel(value, shapes, starts, loc, attn, out, d);
}

template <typename T>
void backward_kernel(const T* grad_out, const T* value, const int64_t* shapes,
                     const int64_t* starts, const T* loc, const T* attn, T* grad_value,
                     T* grad_loc, T* grad_attn, const Dims& d) {
#ifdef RTDETR_CPU_AVX2
  if (use_avx2())
    return avx2::backward_kernel(grad_out, value, shapes, starts, loc, attn, grad_value,
                                 grad_loc, grad_attn, d);
#endif
  baseline::backward_kernel(grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc,
                            grad_attn, d);
}

}  // namespace

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, c10::IntArrayRef spatial_shapes,
                              c10::IntArrayRef level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights, c10::IntArrayRef num_points,
                              c10::string_view method) {
  const Dims d = check_args(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, num_points, nullptr, method);
  check_levels(spatial_shapes, level_start_index, d.S);
  at::Tensor out = at::empty({d.B, d.Q, d.H * d.D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu", [&] {
    forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), spatial_shapes.data(),
                             level_start_index.data(),
                             sampling_locations.data_ptr<scalar_t>(),
                             attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, c10::IntArrayRef spatial_shapes,
    c10::IntArrayRef level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, c10::IntArrayRef num_points, bool deterministic,
    c10::string_view method) {
  // the CPU backward is deterministic whatever `deterministic` says
  (void)deterministic;
  const Dims d = check_args(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, num_points, &grad_output, method);
  check_levels(spatial_shapes, level_start_index, d.S);
  // tens of MB at training batch sizes: huge pages, zeroed in parallel (common/cpu_alloc.h)
  at::Tensor grad_value = zeros_cpu_large(value.sizes(), value.options());
  at::Tensor grad_loc = at::zeros_like(sampling_locations);
  at::Tensor grad_attn = at::zeros_like(attention_weights);
  if (grad_output.numel() == 0 || value.numel() == 0)
    return {grad_value, grad_loc, grad_attn};
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                              spatial_shapes.data(), level_start_index.data(),
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
