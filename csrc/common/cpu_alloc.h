// Large zero-filled CPU outputs (a gradient the size of its input) without a page fault per
// 4 KiB page.
//
// A gradient of the deformable-attention value at training batch sizes is tens of MB. The
// default CPU allocator maps such a block fresh from the kernel on every call and frees it
// afterwards, so zero-filling it costs one page fault per 4 KiB page, more than the kernel's own
// work. Here the block is 2 MiB-aligned and advised for transparent huge pages (one fault per
// 2 MiB where the kernel allows it; `madvise` mode is the common default), and the zero fill is
// split over the intra-op threads, so the pages are first touched in parallel. Where the advice
// is refused the result is still a correct zero tensor, only as slow as before.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rtdetr_fast {

constexpr size_t kHugePage = size_t(2) << 20;

inline at::Tensor zeros_cpu_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                       options.dtype().itemsize();
  // small tensors come from the caching paths of the default allocator; this pays off only
  // where page faults dominate
  if (bytes < 4 * kHugePage) return at::zeros(sizes, options);
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* p = std::aligned_alloc(kHugePage, rounded);
  if (p == nullptr) return at::zeros(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  (void)madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure leaves 4 KiB pages
#endif
  char* base = static_cast<char*>(p);
  at::parallel_for(0, static_cast<int64_t>(rounded / kHugePage), 1, [&](int64_t b, int64_t e) {
    std::memset(base + b * kHugePage, 0, static_cast<size_t>(e - b) * kHugePage);
  });
  return at::from_blob(p, sizes, [](void* q) { std::free(q); }, options);
}

}  // namespace rtdetr_fast
