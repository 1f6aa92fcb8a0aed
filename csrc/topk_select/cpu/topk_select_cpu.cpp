// The CPU kernel of rtdetr_fast::topk_select_indices and rtdetr_fast::topk_detections (schemas
// and checks: ../topk_select.cpp), ranking through the CUDA kernel's 64-bit key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "topk_select/topk_select.h"

namespace rtdetr_fast {
namespace topk {

namespace {

// The CUDA kernel's key, on the host (see topk_select_cuda.cu for the why of each case)
inline uint32_t max_key(float x) {
  if (std::isnan(x)) return 0xFFFFFFFFu;
  uint32_t bits = 0;
  if (x != 0.0f) std::memcpy(&bits, &x, 4);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
inline float key_to_float(uint32_t ok) {
  if (ok == 0u) return std::nanf("");
  const uint32_t bits = (ok & 0x80000000u) ? (ok ^ 0x80000000u) : ~ok;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

// the top k keys of rows [B, N, C] (max over C), sorted, into out [B, k]
template <typename T>
void select_keys(const T* x, int64_t B, int64_t N, int64_t C, int64_t k, uint64_t* out) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> keys(N);
    for (int64_t b = b0; b < b1; ++b) {
      const T* row = x + b * N * C;
      for (int64_t n = 0; n < N; ++n) {
        uint32_t m = 0;
        for (int64_t c = 0; c < C; ++c) m = std::max(m, max_key(static_cast<float>(row[n * C + c])));
        const uint32_t ok = m == 0xFFFFFFFFu ? 0u : m;
        keys[n] = (static_cast<uint64_t>(ok) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(n));
      }
      std::partial_sort(keys.begin(), keys.begin() + k, keys.end(), std::greater<uint64_t>());
      std::copy(keys.begin(), keys.begin() + k, out + b * k);
    }
  });
}

at::Tensor keys_cpu(const at::Tensor& logits_in, int64_t k) {
  // torch's vectorised amax first (it propagates NaN, as the key order wants): the per-element
  // key loop over N*C was several times slower than the whole eager chain
  const at::Tensor logits =
      logits_in.size(2) > 1 ? logits_in.amax(-1, /*keepdim=*/true).contiguous() : logits_in;
  const int64_t B = logits.size(0), N = logits.size(1), C = logits.size(2);
  auto keys = at::empty({B, k}, logits.options().dtype(at::kLong));
  auto* out = reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>());
  switch (logits.scalar_type()) {
    case at::kFloat: select_keys(logits.data_ptr<float>(), B, N, C, k, out); break;
    case at::kHalf: select_keys(logits.data_ptr<at::Half>(), B, N, C, k, out); break;
    default: select_keys(logits.data_ptr<at::BFloat16>(), B, N, C, k, out); break;
  }
  return keys;
}

std::tuple<at::Tensor, at::Tensor> decode_cpu(const at::Tensor& keys, at::ScalarType dtype) {
  auto k64 = keys.flatten();
  const auto* kp = reinterpret_cast<const uint64_t*>(k64.data_ptr<int64_t>());
  auto scores = at::empty({k64.numel()}, keys.options().dtype(at::kFloat));
  auto idx = at::empty({k64.numel()}, keys.options());
  float* s = scores.data_ptr<float>();
  int64_t* ix = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < k64.numel(); ++i) {
    s[i] = key_to_float(static_cast<uint32_t>(kp[i] >> 32));
    ix[i] = static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(kp[i]));
  }
  // exact: every score came from a value of this dtype
  return {scores.view(keys.sizes()).to(dtype), idx.view(keys.sizes())};
}

std::tuple<at::Tensor, at::Tensor> topk_select_indices_cpu(const at::Tensor& logits, int64_t k) {
  check_select(logits, k);
  return decode_cpu(keys_cpu(logits, k), logits.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_detections_cpu(const at::Tensor& scores,
                                                                   const at::Tensor& boxes,
                                                                   const at::Tensor& image_sizes,
                                                                   int64_t k) {
  check_detections(scores, boxes, image_sizes, k);
  const int64_t B = scores.size(0), Q = scores.size(1), C = scores.size(2);
  auto [top, flat] = decode_cpu(keys_cpu(scores.view({B, Q * C, 1}), k), scores.scalar_type());
  auto labels = flat.remainder(C);
  auto b = boxes.gather(1, flat.div(C, "floor").unsqueeze(-1).expand({B, k, 4}));
  // the reference's torch arithmetic, op by op, so the rounding in the boxes dtype matches
  auto cx = b.select(-1, 0), cy = b.select(-1, 1), w = b.select(-1, 2), h = b.select(-1, 3);
  auto xyxy = at::stack({cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h}, -1);
  auto hw = image_sizes.to(xyxy.scalar_type());
  auto scale = at::stack({hw.select(1, 1), hw.select(1, 0), hw.select(1, 1), hw.select(1, 0)}, -1)
                   .unsqueeze(1);
  return {top, labels, xyxy * scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(rtdetr_fast, CPU, m) {
  m.impl("topk_select_indices", &topk_select_indices_cpu);
  m.impl("topk_detections", &topk_detections_cpu);
}

}  // namespace topk
}  // namespace rtdetr_fast
