// CUDA registration of rtdetr_fast::rep_conv: checks, allocation, stream, launch.
// The kernels (rep_conv_cuda.cu) see raw pointers and a cudaStream_t only.
#ifdef RTDETR_FAST_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "rep_conv/cuda/rep_conv_cuda.h"

namespace rtdetr_fast {
namespace rep_conv {

// rep_conv.cpp
int activation_code(c10::string_view activation);
void check_args(const at::Tensor& x, const at::Tensor& weight,
                const c10::optional<at::Tensor>& bias);

namespace {

at::Tensor rep_conv_cuda(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  check_args(x, weight, bias);
  const int act = activation_code(activation);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t C_out = weight.size(0);
  at::Tensor y = at::empty({B, C_out, H, W},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  if (C_in == 0) {
    // an empty K: the convolution is zero and the output is act(bias)
    at::Tensor b = bias.has_value() ? bias->view({1, C_out, 1, 1}).expand_as(y)
                                    : at::zeros_like(y);
    if (act == kRelu) return y.copy_(at::relu(b));
    if (act == kSilu) return y.copy_(at::silu(b));
    return y.copy_(b);
  }
  const int dtype = x.scalar_type() == at::kHalf ? kDTypeFloat16 : kDTypeBFloat16;
  const void* bptr = bias.has_value() ? bias->data_ptr() : nullptr;
  C10_CUDA_CHECK(rep_conv_forward_cuda(x.data_ptr(), weight.data_ptr(), bptr, y.data_ptr(),
                                       dtype, static_cast<int>(B), static_cast<int>(C_in),
                                       static_cast<int>(H), static_cast<int>(W),
                                       static_cast<int>(C_out), act,
                                       c10::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace
}  // namespace rep_conv
}  // namespace rtdetr_fast

TORCH_LIBRARY_IMPL(rtdetr_fast, CUDA, m) {
  m.impl("rep_conv", &rtdetr_fast::rep_conv::rep_conv_cuda);
}
#endif  // RTDETR_FAST_WITH_CUDA
