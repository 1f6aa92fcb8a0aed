// Harness of the fused top-K kernel (csrc/topk_select/cuda/topk_select_cuda.cu) against a
// float64 reference: every dtype, one and several CTAs per image (last-CTA merge), K up to
// kMaxK, ties, NaN, +-inf and +-0, query selection and detection mode. No torch.
#include <algorithm>
#include <numeric>

#include "harness.h"
#include "topk_select/cuda/topk_select_cuda.h"

using namespace rtdetr_fast::topk;
using harness::alloc;

namespace {

// the CUDA glue's plan, with the SM count a parameter
void plan(Params& p, int64_t B, int64_t N, int sms) {
  int64_t g = std::max<int64_t>(1, (2 * sms) / std::max<int64_t>(B, 1));
  g = std::min<int64_t>(g, std::max<int64_t>(1, N / std::max<int64_t>(4 * p.K, 1024)));
  g = std::max<int64_t>(g, (N + kMaxChunk - 1) / kMaxChunk);
  p.chunk = static_cast<int>((N + g - 1) / g);
  p.G = static_cast<int>((N + p.chunk - 1) / p.chunk);
}

struct Case {
  const char* name;
  int dt;         // logits / scores dtype
  int64_t B, N, C;  // detection mode: N = Q
  int K;
  int sms;
  int values;     // 0: random normal, 1: a few values with ties, NaN, +-inf, +-0, 2: all equal
  int box_dt;     // -1: query selection
};

double gen(std::mt19937& rng, int kind) {
  if (kind == 2) return 0.25;
  if (kind == 1) {
    static const double pool[] = {-INFINITY, -2.0, -0.0, 0.0, 0.5, 0.5, 1.0, 3.0, INFINITY, NAN};
    return pool[rng() % 10];
  }
  std::normal_distribution<double> nd(0.0, 2.0);
  return nd(rng);
}

std::string run_case(const Case& c) {
  std::mt19937 rng(1234 + c.K);
  const bool det = c.box_dt >= 0;
  const int64_t rows = c.N, cols = c.C;  // [B, rows, cols] input
  const size_t n_in = static_cast<size_t>(c.B * rows * cols);
  void* logits = alloc<char>(n_in * harness::dtype_size(c.dt), 0);
  for (size_t i = 0; i < n_in; ++i) harness::store(logits, c.dt, i, gen(rng, c.values));

  Params p{};
  p.logits = logits;
  p.K = c.K;
  if (det) {
    p.N = rows * cols;
    p.C = 1;
  } else {
    p.N = rows;
    p.C = cols;
  }
  plan(p, c.B, p.N, c.sms);
  unsigned long long* ws = nullptr;
  unsigned* counters = nullptr;
  if (p.G > 1) {
    ws = alloc<unsigned long long>(static_cast<size_t>(c.B * p.G * p.K));
    counters = alloc<unsigned>(static_cast<size_t>(c.B), 0);
    p.workspace = ws;
    p.counters = counters;
  }
  void* scores = alloc<char>(static_cast<size_t>(c.B * c.K) * harness::dtype_size(c.dt));
  int64_t* indices = nullptr;
  void* boxes = nullptr;
  int64_t* sizes = nullptr;
  int64_t* labels = nullptr;
  void* xyxy = nullptr;
  p.scores = scores;
  if (!det) {
    indices = alloc<int64_t>(static_cast<size_t>(c.B * c.K));
    p.indices = indices;
  } else {
    const size_t nb = static_cast<size_t>(c.B * rows * 4);
    boxes = alloc<char>(nb * harness::dtype_size(c.box_dt), 0);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (size_t i = 0; i < nb; ++i) harness::store(boxes, c.box_dt, i, u(rng));
    sizes = alloc<int64_t>(static_cast<size_t>(2 * c.B), 0);
    for (int64_t b = 0; b < c.B; ++b) {
      sizes[2 * b] = 480 + 37 * b;
      sizes[2 * b + 1] = 640 - 11 * b;
    }
    labels = alloc<int64_t>(static_cast<size_t>(c.B * c.K));
    xyxy = alloc<char>(static_cast<size_t>(c.B * c.K * 4) * harness::dtype_size(c.box_dt));
    p.boxes = boxes;
    p.box_dtype = c.box_dt;
    p.sizes = sizes;
    p.labels = labels;
    p.xyxy = xyxy;
    p.C_det = cols;
    p.Q_det = rows;
  }
  harness::check_cuda(launch_topk(p, c.dt, c.B, 0), "launch_topk");
  harness::sync("topk kernel");

  std::string msg;
  for (int64_t b = 0; b < c.B && msg.empty(); ++b) {
    // reference: per-anchor max (NaN propagates, then ranks lowest; -0 is +0), stable order
    std::vector<double> m(static_cast<size_t>(p.N));
    for (int64_t i = 0; i < p.N; ++i) {
      double v = -INFINITY;
      bool nan = false;
      for (int64_t j = 0; j < p.C; ++j) {
        const double x = harness::load(logits, c.dt, static_cast<size_t>((b * p.N + i) * p.C + j));
        if (std::isnan(x)) nan = true;
        else v = std::max(v, x);
      }
      m[static_cast<size_t>(i)] = nan ? NAN : (v == 0.0 ? 0.0 : v);
    }
    std::vector<int64_t> order(static_cast<size_t>(p.N));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
      const double a = m[static_cast<size_t>(x)], d = m[static_cast<size_t>(y)];
      if (std::isnan(a)) return false;
      if (std::isnan(d)) return true;
      return a > d;
    });
    for (int j = 0; j < c.K && msg.empty(); ++j) {
      const int64_t want = order[static_cast<size_t>(j)];
      const size_t o = static_cast<size_t>(b * c.K + j);
      const double ws_ = m[static_cast<size_t>(want)];
      const double gs = harness::load(scores, c.dt, o);
      const bool score_ok = std::isnan(ws_) ? std::isnan(gs) : (gs == ws_ && !std::signbit(gs) == !std::signbit(ws_ == 0 ? 0.0 : ws_));
      char buf[256];
      if (!score_ok) {
        snprintf(buf, sizeof buf, "image %lld rank %d: score %.9g, expected %.9g", (long long)b, j,
                 gs, ws_);
        msg = buf;
        break;
      }
      if (!det) {
        if (indices[o] != want) {
          snprintf(buf, sizeof buf, "image %lld rank %d: index %lld, expected %lld", (long long)b,
                   j, (long long)indices[o], (long long)want);
          msg = buf;
        }
        continue;
      }
      const int64_t q = want / cols, label = want % cols;
      if (labels[o] != label) {
        snprintf(buf, sizeof buf, "image %lld rank %d: label %lld, expected %lld", (long long)b, j,
                 (long long)labels[o], (long long)label);
        msg = buf;
        break;
      }
      const size_t bi = static_cast<size_t>((b * rows + q) * 4);
      const double cx = harness::load(boxes, c.box_dt, bi), cy = harness::load(boxes, c.box_dt, bi + 1);
      const double hw = 0.5 * harness::load(boxes, c.box_dt, bi + 2);
      const double hh = 0.5 * harness::load(boxes, c.box_dt, bi + 3);
      const double H = static_cast<double>(sizes[2 * b]), W = static_cast<double>(sizes[2 * b + 1]);
      const double want_box[4] = {(cx - hw) * W, (cy - hh) * H, (cx + hw) * W, (cy + hh) * H};
      const double scale[4] = {(cx + hw) * W, (cy + hh) * H, (cx + hw) * W, (cy + hh) * H};
      for (int k = 0; k < 4; ++k) {
        const double g = harness::load(xyxy, c.box_dt, 4 * o + k);
        if (!(std::fabs(g - want_box[k]) <= 4 * harness::eps(c.box_dt) * scale[k] + 1e-4)) {
          snprintf(buf, sizeof buf, "image %lld rank %d: box[%d] %.9g, expected %.9g",
                   (long long)b, j, k, g, want_box[k]);
          msg = buf;
          break;
        }
      }
    }
  }
  if (msg.empty() && counters)
    for (int64_t b = 0; b < c.B; ++b)
      if (counters[b] != 0) msg = "the CTA counter of an image was not reset to zero";
  for (void* q : {logits, scores, static_cast<void*>(indices), boxes, static_cast<void*>(sizes),
                  static_cast<void*>(labels), xyxy, static_cast<void*>(ws),
                  static_cast<void*>(counters)})
    if (q) harness::release(q);
  char head[64];
  snprintf(head, sizeof head, "(G=%d) ", p.G);
  return msg.empty() ? msg : head + msg;
}

}  // namespace

int main(int argc, char** argv) {
  std::string filter;
  harness::Cases cases = harness::start(argc, argv, &filter);
  const Case all[] = {
      {"select_f32_one_cta", 0, 2, 300, 80, 100, 64, 0, -1},
      {"select_f16_ties_nan_inf_zero", 1, 2, 5000, 3, 300, 8, 1, -1},
      {"select_bf16_kmax_merge", 2, 1, 10000, 2, kMaxK, 4, 0, -1},
      {"select_f32_kmax_one_cta", 0, 1, 3000, 2, kMaxK, 64, 1, -1},
      {"select_f32_k_equals_n", 0, 1, 700, 4, 700, 64, 0, -1},
      {"select_f32_all_equal_merge", 0, 1, 4500, 1, 1000, 8, 2, -1},
      {"select_f16_k1_merge", 1, 3, 9000, 2, 1, 8, 0, -1},
      {"detect_f32_boxes_f32_merge", 0, 2, 300, 80, 300, 8, 0, 0},
      {"detect_f16_boxes_bf16_merge", 1, 2, 300, 20, 100, 8, 1, 2},
      {"detect_bf16_boxes_f16_one_cta", 2, 1, 100, 10, 100, 64, 0, 1},
  };
  for (const Case& c : all) {
    if (!filter.empty() && std::string(c.name).find(filter) == std::string::npos) continue;
    cases.report(std::string("topk/") + c.name, run_case(c));
  }
  return cases.finish();
}
