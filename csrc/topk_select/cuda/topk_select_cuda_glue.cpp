// CUDA registration of the top-K ops: plans the grid, allocates the workspace, launches the one
// kernel of topk_select_cuda.cu. Compiled only into CUDA builds.
#ifdef RTDETR_FAST_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>

#include "topk_select/cuda/topk_select_cuda.h"
#include "topk_select/topk_select.h"

namespace rtdetr_fast {
namespace topk {

namespace {

int dtype_code(at::ScalarType t) {
  return t == at::kFloat ? kDTypeFloat32 : t == at::kHalf ? kDTypeFloat16 : kDTypeBFloat16;
}

// CTAs per image: enough to give every SM two CTAs when B is small, at most kMaxChunk anchors
// each (shared memory), and never chunks so small that merging G*K candidates costs more
// than the chunks
void plan(Params& p, int64_t B, int64_t N) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  int64_t g = std::max<int64_t>(1, (2 * sms) / std::max<int64_t>(B, 1));
  g = std::min<int64_t>(g, std::max<int64_t>(1, N / std::max<int64_t>(4 * p.K, 1024)));
  g = std::max<int64_t>(g, (N + kMaxChunk - 1) / kMaxChunk);
  p.chunk = static_cast<int>((N + g - 1) / g);
  p.G = static_cast<int>((N + p.chunk - 1) / p.chunk);
}

void run(Params& p, const at::Tensor& logits, int64_t B, int64_t N) {
  plan(p, B, N);
  at::Tensor workspace, counters;
  if (p.G > 1) {
    workspace = at::empty({B * p.G * p.K}, logits.options().dtype(at::kLong));
    counters = at::zeros({B}, logits.options().dtype(at::kInt));
    p.workspace = reinterpret_cast<unsigned long long*>(workspace.data_ptr<int64_t>());
    p.counters = reinterpret_cast<unsigned int*>(counters.data_ptr<int>());
  }
  const cudaError_t err = launch_topk(p, dtype_code(logits.scalar_type()), B,
                                      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "topk kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> topk_select_indices_cuda(const at::Tensor& logits, int64_t k) {
  check_select(logits, k);
  TORCH_CHECK(k <= kMaxK, "the CUDA kernel selects at most K=", kMaxK, ", got ", k);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), N = logits.size(1);
  auto scores = at::empty({B, k}, logits.options());
  auto idx = at::empty({B, k}, logits.options().dtype(at::kLong));
  Params p{};
  p.logits = logits.data_ptr();
  p.N = N;
  p.C = logits.size(2);
  p.K = static_cast<int>(k);
  p.scores = scores.data_ptr();
  p.indices = idx.data_ptr<int64_t>();
  run(p, logits, B, N);
  return {scores, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_detections_cuda(
    const at::Tensor& scores, const at::Tensor& boxes, const at::Tensor& image_sizes, int64_t k) {
  check_detections(scores, boxes, image_sizes, k);
  TORCH_CHECK(k <= kMaxK, "the CUDA kernel selects at most K=", kMaxK, ", got ", k);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t B = scores.size(0), Q = scores.size(1), C = scores.size(2);
  auto out_s = at::empty({B, k}, scores.options());
  auto labels = at::empty({B, k}, scores.options().dtype(at::kLong));
  auto xyxy = at::empty({B, k, 4}, boxes.options());
  Params p{};
  p.logits = scores.data_ptr();
  p.N = Q * C;
  p.C = 1;
  p.K = static_cast<int>(k);
  p.scores = out_s.data_ptr();
  p.boxes = boxes.data_ptr();
  p.box_dtype = dtype_code(boxes.scalar_type());
  p.sizes = image_sizes.data_ptr<int64_t>();
  p.labels = labels.data_ptr<int64_t>();
  p.xyxy = xyxy.data_ptr();
  p.C_det = C;
  p.Q_det = Q;
  run(p, scores, B, Q * C);
  return {out_s, labels, xyxy};
}

}  // namespace

TORCH_LIBRARY_IMPL(rtdetr_fast, CUDA, m) {
  m.impl("topk_select_indices", &topk_select_indices_cuda);
  m.impl("topk_detections", &topk_detections_cuda);
}

}  // namespace topk
}  // namespace rtdetr_fast
#endif  // RTDETR_FAST_WITH_CUDA
