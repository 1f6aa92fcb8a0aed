// Schemas of rtdetr_fast::topk_select_indices and rtdetr_fast::topk_detections and their
// boundary checks, shared by the kernels: cpu/topk_select_cpu.cpp and
// cuda/topk_select_cuda_glue.cpp register them.
//
// Order (every backend): score descending, equal scores by the lower index, NaN below every
// real score (-inf included). Both ops rank through the same 64-bit key as the CUDA kernel:
// (order key of the float score) << 32 | ~index; larger key first.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <climits>

#include "common/checks.h"
#include "topk_select/topk_select.h"

namespace rtdetr_fast {
namespace topk {

void check_select(const at::Tensor& logits, int64_t k) {
  RTDETR_CHECK_DIM(logits, 3, "[B, N, C]");
  const int64_t N = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= N, "k must be in [1, N=", N, "], got ", k);
  TORCH_CHECK(N < INT_MAX && logits.size(2) >= 1, "N must be below 2^31 and C >= 1, got ",
              logits.sizes());
  const auto t = logits.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "logits must be float32, float16 or bfloat16, got ", t);
  RTDETR_CHECK_CONTIGUOUS(logits);
}

void check_detections(const at::Tensor& scores, const at::Tensor& boxes,
                      const at::Tensor& image_sizes, int64_t k) {
  RTDETR_CHECK_DIM(scores, 3, "[B, Q, C]");
  const int64_t B = scores.size(0), Q = scores.size(1), C = scores.size(2);
  TORCH_CHECK(boxes.sizes() == c10::IntArrayRef({B, Q, 4}), "boxes must be [B, Q, 4] = [", B,
              ", ", Q, ", 4], got ", boxes.sizes());
  TORCH_CHECK(image_sizes.sizes() == c10::IntArrayRef({B, 2}), "image_sizes must be [B, 2] = [",
              B, ", 2] as (H, W), got ", image_sizes.sizes());
  TORCH_CHECK(k >= 1 && k <= Q * C, "k must be in [1, Q*C=", Q * C, "], got ", k);
  TORCH_CHECK(Q * C < INT_MAX, "Q*C must be below 2^31, got ", Q * C);
  for (const at::Tensor* t : {&scores, &boxes}) {
    const auto s = t->scalar_type();
    TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16,
                "scores and boxes must be float32, float16 or bfloat16, got ", s);
  }
  TORCH_CHECK(image_sizes.scalar_type() == at::kLong, "image_sizes must be int64, got ",
              image_sizes.scalar_type());
  RTDETR_CHECK_DEVICE(boxes, scores);
  RTDETR_CHECK_DEVICE(image_sizes, scores);
  RTDETR_CHECK_CONTIGUOUS(scores);
  RTDETR_CHECK_CONTIGUOUS(boxes);
  RTDETR_CHECK_CONTIGUOUS(image_sizes);
}

}  // namespace topk
}  // namespace rtdetr_fast

TORCH_LIBRARY_FRAGMENT(rtdetr_fast, m) {
  m.def("topk_select_indices(Tensor logits, int k) -> (Tensor scores, Tensor indices)");
  m.def(
      "topk_detections(Tensor scores, Tensor boxes, Tensor image_sizes, int k) -> "
      "(Tensor scores, Tensor labels, Tensor boxes)");
}
