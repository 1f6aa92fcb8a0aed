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
//
// A freed block is kept for the next call (LargeBlockCache) instead of going back to the
// kernel: under THP defrag "madvise" (also a common default) a fresh huge-page fault compacts
// memory synchronously, which on a machine whose memory is fragmented can cost several times the
// backward's own work in system time. A reused block is only zeroed again: no faults at all.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rtdetr_fast {

constexpr size_t kHugePage = size_t(2) << 20;

// Freed large blocks kept for reuse, newest last; bounded in count and bytes, the oldest
// returned to the system first. Process-wide and never destroyed: tensors freed during
// interpreter shutdown still return their blocks here.
class LargeBlockCache {
 public:
  static constexpr size_t kMaxBlocks = 4;
  static constexpr size_t kMaxBytes = size_t(1) << 30;

  static LargeBlockCache& instance() {
    static LargeBlockCache* cache = new LargeBlockCache();
    return *cache;
  }

  // A kept block of at least `bytes` and at most twice that (a small request does not pin a
  // large block), the most recently freed first; nullptr when none fits.
  void* take(size_t bytes, size_t* got) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = blocks_.size(); i-- > 0;) {
      const size_t size = blocks_[i].second;
      if (size >= bytes && size <= 2 * bytes) {
        void* p = blocks_[i].first;
        *got = size;
        held_ -= size;
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(i));
        return p;
      }
    }
    return nullptr;
  }

  void give(void* p, size_t bytes) {
    std::vector<void*> release;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_.emplace_back(p, bytes);
      held_ += bytes;
      while (blocks_.size() > kMaxBlocks || held_ > kMaxBytes) {
        release.push_back(blocks_.front().first);
        held_ -= blocks_.front().second;
        blocks_.erase(blocks_.begin());
      }
    }
    for (void* q : release) std::free(q);
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;
  size_t held_ = 0;
};

inline at::Tensor zeros_cpu_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                       options.dtype().itemsize();
  // small tensors come from the caching paths of the default allocator; this pays off only
  // where page faults dominate
  if (bytes < 4 * kHugePage) return at::zeros(sizes, options);
  size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* p = LargeBlockCache::instance().take(rounded, &rounded);
  if (p == nullptr) {
    p = std::aligned_alloc(kHugePage, rounded);
    if (p == nullptr) return at::zeros(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure leaves 4 KiB pages
#endif
  }
  char* base = static_cast<char*>(p);
  const int64_t pages = static_cast<int64_t>((bytes + kHugePage - 1) / kHugePage);
  at::parallel_for(0, pages, 1, [&](int64_t b, int64_t e) {
    const size_t end = std::min(bytes, static_cast<size_t>(e) * kHugePage);
    std::memset(base + b * kHugePage, 0, end - static_cast<size_t>(b) * kHugePage);
  });
  return at::from_blob(
      p, sizes, [rounded](void* q) { LargeBlockCache::instance().give(q, rounded); }, options);
}

}  // namespace rtdetr_fast
