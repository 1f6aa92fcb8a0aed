// Launcher of the folded RepConv forward kernel (rep_conv_cuda.cu). Raw pointers and
// cudaStream_t only: no torch header.
#pragma once
#include <cuda_runtime.h>

#include "common/codes.h"

namespace rtdetr_fast {
namespace rep_conv {

constexpr int kIdentity = kActIdentity;
constexpr int kRelu = kActRelu;
constexpr int kSilu = kActSilu;

// y = act(conv3x3(x, w, stride 1, pad 1) + bias), NHWC x and y, w [C_out][3][3][C_in].
// dtype: kDTypeFloat16 or kDTypeBFloat16; act: an ActCode. bias may be null. C_in % 8 == 0, 16-byte aligned pointers.
cudaError_t rep_conv_forward_cuda(const void* x, const void* w, const void* bias, void* y,
                                  int dtype, int B, int C_in, int H, int W, int C_out, int act,
                                  cudaStream_t stream);

}  // namespace rep_conv
}  // namespace rtdetr_fast
