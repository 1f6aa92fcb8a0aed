// Launcher of the fused top-K kernel (topk_select_cuda.cu): the one definition of its
// parameters and limits, shared by the CUDA glue and the kernel. Raw pointers and
// cudaStream_t only: no torch header.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/codes.h"

namespace rtdetr_fast {
namespace topk {

constexpr int kThreads = 512;
constexpr int kMaxChunk = limits::kTopkMaxChunk;  // anchors per CTA (order keys in shared)
constexpr int kMaxK = limits::kTopkMaxK;          // selected keys sorted in shared memory

struct Params {
  const void* logits;  // [B, N, C]
  int64_t N, C;
  int K, G, chunk;
  unsigned long long* workspace;  // [B, G, K]
  unsigned int* counters;         // [B], zero before the first launch; left zero
  void* scores;                   // [B, K], logits dtype
  int64_t* indices;               // [B, K] (null for detections)
  // detection epilogue (boxes == null for query selection)
  const void* boxes;  // [B, Q, 4] cxcywh
  int box_dtype;  // DTypeCode
  const int64_t* sizes;  // [B, 2] (H, W)
  int64_t* labels;       // [B, K]
  void* xyxy;            // [B, K, 4], boxes dtype
  int64_t C_det, Q_det;
};

// dtype: a DTypeCode. G CTAs per image, each over `chunk` anchors.
cudaError_t launch_topk(const Params& p, int dtype, int64_t B, cudaStream_t stream);

}  // namespace topk
}  // namespace rtdetr_fast
