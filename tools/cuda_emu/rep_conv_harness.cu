// Harness of the folded RepConv tensor-core kernel (csrc/rep_conv/cuda/rep_conv_cuda.cu)
// against a float64 convolution: float16 and bfloat16, each activation, with and without
// bias (all 12 instantiations), ragged C_in (a partial K tile), odd C_out (scalar stores),
// C_out past one N tile, M past one M tile. No torch.
#include "harness.h"
#include "rep_conv/cuda/rep_conv_cuda.h"

using namespace rtdetr_fast::rep_conv;
using harness::alloc;

namespace {

struct Case {
  int dt;  // kDTypeFloat16 or kDTypeBFloat16 (the harness's codes too)
  int act;
  bool bias;
  int B, H, W, C_in, C_out;
};

std::string run_case(const Case& c) {
  const int hdt = c.dt;
  std::mt19937 rng(77 + c.C_in * 3 + c.C_out + c.act * 5 + c.bias);
  std::normal_distribution<double> nd(0.0, 1.0);
  const size_t nx = static_cast<size_t>(c.B) * c.H * c.W * c.C_in;
  const size_t nw = static_cast<size_t>(c.C_out) * 9 * c.C_in;
  const size_t ny = static_cast<size_t>(c.B) * c.H * c.W * c.C_out;
  void* x = alloc<char>(nx * 2, 0);
  void* w = alloc<char>(nw * 2, 0);
  void* bias = c.bias ? alloc<char>(static_cast<size_t>(c.C_out) * 2, 0) : nullptr;
  void* y = alloc<char>(ny * 2);
  for (size_t i = 0; i < nx; ++i) harness::store(x, hdt, i, nd(rng));
  for (size_t i = 0; i < nw; ++i) harness::store(w, hdt, i, nd(rng) * 0.2);
  if (bias)
    for (int i = 0; i < c.C_out; ++i) harness::store(bias, hdt, i, nd(rng));
  harness::check_cuda(rep_conv_forward_cuda(x, w, bias, y, c.dt, c.B, c.C_in, c.H, c.W, c.C_out,
                                            c.act, 0),
                      "rep_conv_forward_cuda");
  harness::sync("rep_conv kernel");

  std::vector<double> xd(nx), wd(nw), want(ny), scale(ny);
  for (size_t i = 0; i < nx; ++i) xd[i] = harness::load(x, hdt, i);
  for (size_t i = 0; i < nw; ++i) wd[i] = harness::load(w, hdt, i);
  for (int b = 0; b < c.B; ++b)
    for (int oh = 0; oh < c.H; ++oh)
      for (int ow = 0; ow < c.W; ++ow)
        for (int n = 0; n < c.C_out; ++n) {
          double s = bias ? harness::load(bias, hdt, n) : 0.0, a = std::fabs(s);
          for (int kh = 0; kh < 3; ++kh)
            for (int kw = 0; kw < 3; ++kw) {
              const int ih = oh + kh - 1, iw = ow + kw - 1;
              if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) continue;
              for (int ci = 0; ci < c.C_in; ++ci) {
                const double t = xd[((static_cast<size_t>(b) * c.H + ih) * c.W + iw) * c.C_in + ci] *
                                 wd[(static_cast<size_t>(n) * 9 + kh * 3 + kw) * c.C_in + ci];
                s += t;
                a += std::fabs(t);
              }
            }
          if (c.act == kRelu) s = s > 0 ? s : 0;
          if (c.act == kSilu) s = s / (1.0 + std::exp(-s));
          const size_t o = ((static_cast<size_t>(b) * c.H + oh) * c.W + ow) * c.C_out + n;
          want[o] = s;
          scale[o] = std::fabs(s) + a * 1e-4;
        }
  std::string msg = harness::compare("y", ny, want, scale, y, hdt, 2 * harness::eps(hdt), 1e-4);
  for (void* p : {x, w, bias, y})
    if (p) harness::release(p);
  return msg;
}

}  // namespace

int main(int argc, char** argv) {
  std::string filter;
  harness::Cases cases = harness::start(argc, argv, &filter);
  // (C_in, C_out): ragged K tile + odd C_out over two N tiles; paired stores over two N tiles;
  // one K tile and a tiny C_out
  const int shapes[3][2] = {{40, 131}, {64, 130}, {8, 3}};
  int k = 0;
  for (int dt = rtdetr_fast::kDTypeFloat16; dt <= rtdetr_fast::kDTypeBFloat16; ++dt)
    for (int act = 0; act < 3; ++act)
      for (int bias = 0; bias < 2; ++bias, ++k) {
        const int* s = shapes[k % 3];
        // M = 2*9*10 = 180: two M tiles, the second partial
        const Case c{dt, act, bias != 0, 2, 9, 10, s[0], s[1]};
        char name[128];
        snprintf(name, sizeof name, "rep_conv/%s_%s_%s_cin%d_cout%d", harness::dtype_name(dt),
                 act == kIdentity ? "identity" : act == kRelu ? "relu" : "silu",
                 bias ? "bias" : "nobias", s[0], s[1]);
        if (!filter.empty() && std::string(name).find(filter) == std::string::npos) continue;
        cases.report(name, run_case(c));
      }
  return cases.finish();
}
