// CUDA registration of rtdetr_fast::ms_deform_attn: torch tensors -> raw pointers and the
// current stream. Compiled only in CUDA builds (setup.py defines RTDETR_FAST_WITH_CUDA).
#ifdef RTDETR_FAST_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "ms_deform_attn/cuda/ms_deform_attn_cuda.h"
#include "ms_deform_attn/ms_deform_attn.h"

namespace rtdetr_fast {
namespace msda {
namespace {

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "ms_deform_attn on CUDA supports float32, float16 and bfloat16 value, "
                  "got ", t);
  }
}

cuda::Problem to_problem(const Dims& d, c10::IntArrayRef spatial_shapes,
                         c10::IntArrayRef level_start_index) {
  // the level table travels in the kernel's parameters: nothing to copy to the device
  TORCH_CHECK(d.L <= cuda::kMaxLevels, "ms_deform_attn on CUDA takes at most ",
              cuda::kMaxLevels, " levels, got L=", d.L);
  cuda::Problem p{};
  p.B = d.B;
  p.S = d.S;
  p.H = d.H;
  p.D = d.D;
  p.Q = d.Q;
  p.L = d.L;
  p.N = d.N;
  p.uniform_p = d.uniform_p;
  p.method = d.method;
  for (int l = 0; l <= cuda::kMaxLevels; ++l)
    p.point_start[l] = l <= d.L ? d.point_start[l] : d.point_start[d.L];
  for (int64_t l = 0; l < d.L; ++l) {
    p.shapes[2 * l] = spatial_shapes[2 * l];
    p.shapes[2 * l + 1] = spatial_shapes[2 * l + 1];
    p.starts[l] = level_start_index[l];
  }
  return p;
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, c10::IntArrayRef spatial_shapes,
                               c10::IntArrayRef level_start_index,
                               const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights, c10::IntArrayRef num_points,
                               c10::string_view method) {
  const Dims d = check_args(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, num_points, nullptr, method);
  check_levels(spatial_shapes, level_start_index, d.S);
  const cuda::DType dtype = to_dtype(value.scalar_type());
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty({d.B, d.Q, d.H * d.D}, value.options());
  if (out.numel() == 0) return out;
  const cuda::Problem p = to_problem(d, spatial_shapes, level_start_index);
  const cudaError_t err = cuda::forward(dtype, p, value.data_ptr(), sampling_locations.data_ptr(),
                                        attention_weights.data_ptr(), out.data_ptr(),
                                        c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "ms_deform_attn CUDA forward failed: ",
              cudaGetErrorString(err));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, c10::IntArrayRef spatial_shapes,
    c10::IntArrayRef level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, c10::IntArrayRef num_points, bool deterministic,
    c10::string_view method) {
  const Dims d = check_args(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, num_points, &grad_output, method);
  check_levels(spatial_shapes, level_start_index, d.S);
  const cuda::DType dtype = to_dtype(value.scalar_type());
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor grad_loc = at::zeros_like(sampling_locations);
  at::Tensor grad_attn = at::zeros_like(attention_weights);
  if (grad_output.numel() == 0 || value.numel() == 0)
    return {at::zeros_like(value), grad_loc, grad_attn};
  const cuda::Problem p = to_problem(d, spatial_shapes, level_start_index);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor grad_value, acc, fixed, absmax;
  if (deterministic) {
    grad_value = at::empty_like(value);
    fixed = at::zeros({cuda::fixed_words(value.numel())}, value.options().dtype(at::kLong));
    absmax = at::zeros({2}, value.options().dtype(at::kInt));
  } else if (value.scalar_type() == at::kFloat) {
    grad_value = at::zeros_like(value);
    acc = grad_value;
  } else {
    // float atomics into a float32 buffer: half/bfloat16 atomics would round every addition
    acc = at::zeros(value.sizes(), value.options().dtype(at::kFloat));
  }
  const cudaError_t err = cuda::backward(
      dtype, p, grad_output.data_ptr(), value.data_ptr(), sampling_locations.data_ptr(),
      attention_weights.data_ptr(), acc.defined() ? acc.data_ptr<float>() : nullptr,
      fixed.defined() ? reinterpret_cast<unsigned long long*>(fixed.data_ptr<int64_t>()) : nullptr,
      absmax.defined() ? reinterpret_cast<unsigned int*>(absmax.data_ptr<int32_t>()) : nullptr,
      grad_value.defined() ? grad_value.data_ptr() : nullptr, grad_loc.data_ptr(),
      grad_attn.data_ptr(), deterministic, stream);
  TORCH_CHECK(err == cudaSuccess, "ms_deform_attn CUDA backward failed: ",
              cudaGetErrorString(err));
  if (!grad_value.defined()) grad_value = acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace msda
}  // namespace rtdetr_fast

TORCH_LIBRARY_IMPL(rtdetr_fast, CUDA, m) {
  m.impl("ms_deform_attn", &rtdetr_fast::msda::ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &rtdetr_fast::msda::ms_deform_attn_backward_cuda);
}
#endif  // RTDETR_FAST_WITH_CUDA
