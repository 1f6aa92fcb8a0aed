// The boundary checks of the top-K ops (topk_select.cpp), shared by their CPU and CUDA kernels.
// Kernels then assume contiguous, supported input.
#pragma once
#include <ATen/core/Tensor.h>

namespace rtdetr_fast {
namespace topk {

void check_select(const at::Tensor& logits, int64_t k);
void check_detections(const at::Tensor& scores, const at::Tensor& boxes,
                      const at::Tensor& image_sizes, int64_t k);

}  // namespace topk
}  // namespace rtdetr_fast
