// Harness of the multi-scale deformable attention kernels
// (csrc/ms_deform_attn/cuda/ms_deform_attn_cuda.cu) against float64 loops: every dtype and
// every group size G (1..32), vectorised and scalar loads (D % CPT != 0, a misaligned value),
// D above one pass of 32 lanes, uniform and per-level point counts, locations on and past
// the level borders (ix == -1, ix == W exactly, NaN, inf), forward, and backward with float
// atomics (float4 atomics on sm_90) and in deterministic fixed point, with NaN and inf in the
// gradient reaching the same value elements on both paths. Both sampling methods:
// bilinear, and RT-DETRv2's discrete nearest cell (rounding edges x*W + 0.5 integer, clamping
// on non-square levels, non-finite locations; zero location gradient), whose cases also check
// that they tell the official's clamp of x to H_l - 1 from the right one. No torch.
#include <algorithm>

#include "harness.h"
#include "ms_deform_attn/cuda/ms_deform_attn_cuda.h"

namespace cu = rtdetr_fast::msda::cuda;
using harness::alloc;

namespace {

struct Case {
  int dt;
  int64_t D;
  bool per_level;   // differing point counts per level
  bool misaligned;  // value pointer off 16-byte alignment: scalar loads and atomics
  int method;       // 0 bilinear, 1 discrete (the Method codes of ms_deform_attn_math.h)
  bool nonfinite = false;  // NaN / +inf / -inf in grad_output and an attention weight
};

// Discrete sampling's cell along an axis: clamp(floor(t*n + 0.5), 0, hi) with hi = n - 1, or
// hi = H_l - 1 for x as the official clamps it. t is a float32/16-bit value: t*n + 0.5 is
// exact in double, the float32 kernel rounds it twice, which moves the floor only within an
// ulp of an integer (exact edges are on power-of-two sides, where both are exact).
int64_t ref_cell(double t, int64_t n, int64_t hi) {
  const double f = t * static_cast<double>(n) + 0.5;
  if (std::isnan(f) || f < 0) return 0;
  if (f >= static_cast<double>(hi)) return hi;
  return static_cast<int64_t>(std::floor(f));
}

struct Ref {
  std::vector<double> out, out_s, gv, gv_s, gl, gl_s, ga, ga_s;
};

// levels (H_l, W_l): powers of two and not, so that some border locations are exact
const int64_t kShapes[3][2] = {{4, 8}, {3, 5}, {2, 4}};
const int kL = 3;

std::string run_case(const Case& c, const char* name) {
  (void)name;
  const int dt = c.dt;
  const size_t es = harness::dtype_size(dt);
  std::mt19937 rng(99 + static_cast<unsigned>(c.D) * 7 + dt * 3 + c.per_level + 5 * c.method);
  std::uniform_real_distribution<double> u(-0.1, 1.1);
  std::normal_distribution<double> nd(0.0, 1.0);
  cu::Problem p{};
  p.B = 2;
  p.Q = 5;
  p.H = 2;
  p.D = c.D;
  p.L = kL;
  int pts[kL] = {2, 2, 2};
  if (c.per_level) {
    pts[0] = 1;
    pts[1] = 3;
    pts[2] = 2;
  }
  p.point_start[0] = 0;
  for (int l = 0; l < kL; ++l) p.point_start[l + 1] = p.point_start[l] + pts[l];
  for (int l = kL + 1; l <= cu::kMaxLevels; ++l) p.point_start[l] = p.point_start[kL];
  p.N = p.point_start[kL];
  p.uniform_p = c.per_level ? 0 : pts[0];
  p.method = c.method;
  int64_t* shapes = alloc<int64_t>(2 * kL, 0);
  int64_t* starts = alloc<int64_t>(kL, 0);
  int64_t S = 0;
  for (int l = 0; l < kL; ++l) {
    shapes[2 * l] = kShapes[l][0];
    shapes[2 * l + 1] = kShapes[l][1];
    starts[l] = S;
    S += kShapes[l][0] * kShapes[l][1];
  }
  p.S = S;
  for (int l = 0; l < kL; ++l) {
    p.shapes[2 * l] = shapes[2 * l];
    p.shapes[2 * l + 1] = shapes[2 * l + 1];
    p.starts[l] = starts[l];
  }
  const int64_t rows = p.B * p.Q * p.H;
  const size_t nv = static_cast<size_t>(p.B * S * p.H * p.D), nl = static_cast<size_t>(rows * p.N * 2),
               na = static_cast<size_t>(rows * p.N), no = static_cast<size_t>(rows * p.D);
  const size_t off = c.misaligned ? 1 : 0;
  char* value_buf = alloc<char>((nv + off) * es, 0);
  void* value = value_buf + off * es;
  void* loc = alloc<char>(nl * es, 0);
  void* attn = alloc<char>(na * es, 0);
  void* gout = alloc<char>(no * es, 0);
  for (size_t i = 0; i < nv; ++i) harness::store(value, dt, i, nd(rng));
  for (size_t i = 0; i < na; ++i) harness::store(attn, dt, i, nd(rng));
  for (size_t i = 0; i < no; ++i) harness::store(gout, dt, i, nd(rng));
  if (c.nonfinite) {
    // a few elements of grad_output and one weight per batch image: each value element they
    // reach must hold what float addition gives it (NaN, +inf, -inf; +inf meeting -inf is NaN),
    // every other element its finite sum
    harness::store(gout, dt, 1, NAN);
    harness::store(gout, dt, no / 3, INFINITY);
    harness::store(gout, dt, no / 3 + p.D, -INFINITY);
    harness::store(gout, dt, no - 2, -INFINITY);
    harness::store(attn, dt, na / 2 + 1, INFINITY);
  }
  for (size_t i = 0; i < nl / 2; ++i) {
    const int j = static_cast<int>(i % p.N);
    int l = 0;
    while (l + 1 < kL && p.point_start[l + 1] <= j) ++l;
    const double W = static_cast<double>(kShapes[l][1]), H = static_cast<double>(kShapes[l][0]);
    double x = u(rng), y = u(rng);
    // borders: ix = -1, ix = W, exact cell edges, outside, NaN, inf. Only on the levels whose
    // sides are powers of two, where x * W is exact in float32 as in float64: elsewhere a
    // location one float32 rounding away from a cell edge has a one-sided gradient.
    const bool exact = ((kShapes[l][0] & (kShapes[l][0] - 1)) | (kShapes[l][1] & (kShapes[l][1] - 1))) == 0;
    // discrete mode: two more cases, a rounding edge (x*W + 0.5 = k + 1) and y = -inf
    switch (exact ? rng() % (c.method ? 14 : 12) : 11) {
      case 0: x = -0.5 / W; break;
      case 1: x = (W + 0.5) / W; break;
      case 2: y = (H + 0.5) / H; break;
      case 3: y = -0.5 / H; break;
      case 4: x = 0.0; y = 1.0; break;
      case 5: x = 1.5; break;
      case 6: x = NAN; break;
      case 7: y = INFINITY; break;
      case 12: x = (static_cast<double>(rng() % kShapes[l][1]) + 0.5) / W; break;
      case 13: y = -INFINITY; break;
      default: break;
    }
    harness::store(loc, dt, 2 * i, x);
    harness::store(loc, dt, 2 * i + 1, y);
  }

  // float64 reference from the dtype-rounded inputs
  Ref r;
  r.out.assign(no, 0);
  r.out_s.assign(no, 0);
  r.gv.assign(nv, 0);
  r.gv_s.assign(nv, 0);
  r.gl.assign(nl, 0);
  r.gl_s.assign(nl, 0);
  r.ga.assign(na, 0);
  r.ga_s.assign(na, 0);
  std::vector<double> out_official(no, 0);  // discrete with the official's x clamp to H_l - 1
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t h = row % p.H, b = row / (p.Q * p.H);
    for (int j = 0; j < p.N; ++j) {
      int l = 0;
      while (l + 1 < kL && p.point_start[l + 1] <= j) ++l;
      const int64_t Hl = kShapes[l][0], Wl = kShapes[l][1];
      const size_t pj = static_cast<size_t>(row * p.N + j);
      const double x = harness::load(loc, dt, 2 * pj), y = harness::load(loc, dt, 2 * pj + 1);
      const double a = harness::load(attn, dt, pj);
      if (c.method == 1) {
        const int64_t cy = ref_cell(y, Hl, Hl - 1);
        const int64_t srow = starts[l] + cy * Wl + ref_cell(x, Wl, Wl - 1);
        const int64_t orow = starts[l] + cy * Wl + ref_cell(x, Wl, Hl - 1);
        double dot = 0, dabs = 0;
        for (int64_t d = 0; d < p.D; ++d) {
          const size_t vi = static_cast<size_t>(((b * S + srow) * p.H + h) * p.D + d);
          const size_t wi = static_cast<size_t>(((b * S + orow) * p.H + h) * p.D + d);
          const size_t oi = static_cast<size_t>(row * p.D + d);
          const double v = harness::load(value, dt, vi), g = harness::load(gout, dt, oi);
          r.out[oi] += a * v;
          r.out_s[oi] += std::fabs(a * v);
          out_official[oi] += a * harness::load(value, dt, wi);
          r.gv[vi] += a * g;
          r.gv_s[vi] += std::fabs(a * g);
          dot += g * v;
          dabs += std::fabs(g * v);
        }
        r.ga[pj] = dot;
        r.ga_s[pj] = dabs;
        continue;  // the location gradient stays zero
      }
      const double ix = x * Wl - 0.5, iy = y * Hl - 0.5;
      if (!(ix >= -1 && ix <= Wl && iy >= -1 && iy <= Hl)) continue;
      const double fx = std::floor(ix), fy = std::floor(iy), lx = ix - fx, ly = iy - fy;
      const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
      const int64_t cx[4] = {x0, x0 + 1, x0, x0 + 1}, cy[4] = {y0, y0, y0 + 1, y0 + 1};
      const double cw[4] = {(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx};
      double dot[4] = {0, 0, 0, 0}, dabs[4] = {0, 0, 0, 0};
      for (int k = 0; k < 4; ++k) {
        if (cx[k] < 0 || cx[k] >= Wl || cy[k] < 0 || cy[k] >= Hl) continue;
        const int64_t srow = starts[l] + cy[k] * Wl + cx[k];
        for (int64_t d = 0; d < p.D; ++d) {
          const size_t vi = static_cast<size_t>(((b * S + srow) * p.H + h) * p.D + d);
          const size_t oi = static_cast<size_t>(row * p.D + d);
          const double v = harness::load(value, dt, vi), g = harness::load(gout, dt, oi);
          r.out[oi] += a * cw[k] * v;
          r.out_s[oi] += std::fabs(a * cw[k] * v);
          r.gv[vi] += a * cw[k] * g;
          r.gv_s[vi] += std::fabs(a * cw[k] * g);
          dot[k] += g * v;
          dabs[k] += std::fabs(g * v);
        }
      }
      double sabs = 0;
      for (int k = 0; k < 4; ++k) {
        r.ga[pj] += cw[k] * dot[k];
        sabs += dabs[k];
      }
      r.ga_s[pj] = sabs;
      const double d_ix = (1 - ly) * (dot[1] - dot[0]) + ly * (dot[3] - dot[2]);
      const double d_iy = (1 - lx) * (dot[2] - dot[0]) + lx * (dot[3] - dot[1]);
      r.gl[2 * pj] = a * d_ix * Wl;
      r.gl[2 * pj + 1] = a * d_iy * Hl;
      r.gl_s[2 * pj] = std::fabs(a) * Wl * 2 * sabs;
      r.gl_s[2 * pj + 1] = std::fabs(a) * Hl * 2 * sabs;
    }
  }
  for (size_t i = 0; i < no; ++i) r.out_s[i] += std::fabs(r.out[i]);
  for (size_t i = 0; i < nv; ++i) r.gv_s[i] += std::fabs(r.gv[i]);
  for (size_t i = 0; i < nl; ++i) r.gl_s[i] += std::fabs(r.gl[i]);
  for (size_t i = 0; i < na; ++i) r.ga_s[i] += std::fabs(r.ga[i]);
  const double tol = std::max(2 * harness::eps(dt), 2e-6);
  const cu::DType dtype = static_cast<cu::DType>(dt);

  std::string msg;
  {  // forward
    void* out = alloc<char>(no * es);
    harness::check_cuda(cu::forward(dtype, p, value, loc, attn, out, 0), "forward");
    harness::sync("forward");
    msg = harness::compare("forward out", no, r.out, r.out_s, out, dt, tol);
    // the case must be able to fail: the official's clamp of x to H_l - 1 gives other outputs
    if (msg.empty() && c.method == 1 &&
        harness::compare("forward out", no, out_official, r.out_s, out, dt, tol).empty())
      msg = "the discrete case does not tell the official's x clamp to H_l - 1 from the right one";
    harness::release(out);
  }
  for (int det = 0; det < 2 && msg.empty(); ++det) {
    void* gl = alloc<char>(nl * es);
    void* ga = alloc<char>(na * es);
    float* acc = nullptr;
    unsigned long long* fixed = nullptr;
    unsigned* absmax = nullptr;
    void* gv = nullptr;
    if (det) {
      fixed = alloc<unsigned long long>(static_cast<size_t>(cu::fixed_words(static_cast<int64_t>(nv))), 0);
      absmax = alloc<unsigned>(2, 0);
      gv = alloc<char>(nv * es);
    } else {
      acc = alloc<float>(nv, 0);
    }
    harness::check_cuda(cu::backward(dtype, p, gout, value, loc, attn, acc, fixed, absmax, gv,
                                     gl, ga, det != 0, 0),
                        "backward");
    harness::sync("backward");
    const std::string tag = det ? "deterministic " : "atomic ";
    // the float32 accumulator (atomic path) rounds once less than the dtype output
    msg = det ? harness::compare((tag + "grad_value").c_str(), nv, r.gv, r.gv_s, gv, dt, tol)
              : harness::compare((tag + "grad_value").c_str(), nv, r.gv, r.gv_s, acc, 0, 2e-6);
    // the non-finite cases are about grad_value: the location and weight gradients of a
    // non-finite product are NaN or inf by formulas whose forms differ from the loops here
    if (msg.empty() && !c.nonfinite)
      msg = harness::compare((tag + "grad_loc").c_str(), nl, r.gl, r.gl_s, gl, dt, tol);
    if (msg.empty() && !c.nonfinite)
      msg = harness::compare((tag + "grad_attn").c_str(), na, r.ga, r.ga_s, ga, dt, tol);
    if (msg.empty() && c.nonfinite) {
      size_t special = 0, finite = 0;
      for (size_t i = 0; i < nv; ++i) (std::isfinite(r.gv[i]) ? finite : special)++;
      if (special == 0 || finite == 0)
        msg = "the non-finite case reaches no value element, or every one";
    }
    for (void* q : {gl, ga, static_cast<void*>(acc), static_cast<void*>(fixed),
                    static_cast<void*>(absmax), gv})
      if (q) harness::release(q);
  }
  for (void* q : {static_cast<void*>(shapes), static_cast<void*>(starts),
                  static_cast<void*>(value_buf), loc, attn, gout})
    harness::release(q);
  return msg;
}

}  // namespace

int main(int argc, char** argv) {
  std::string filter;
  harness::Cases cases = harness::start(argc, argv, &filter);
  std::vector<Case> all;
  for (int dt = 0; dt < 3; ++dt) {
    const int64_t cpt = dt == 0 ? 4 : 8;
    // G = 1, 2, 4, 8, 16, 32 (D = G * CPT), then two passes of 32 lanes
    for (int method = 0; method < 2; ++method) {
      for (int64_t g = 1; g <= 32; g *= 2)
        if (method == 0 || g == 1 || g == 4 || g == 32)
          all.push_back({dt, g * cpt, g == 4, false, method});
      all.push_back({dt, 40 * cpt, false, false, method});
      all.push_back({dt, 3 * cpt - 2, true, false, method});  // scalar loads, G = 4
      all.push_back({dt, 2 * cpt, false, true, method});      // misaligned value
      all.push_back({dt, 2 * cpt, false, false, method, true});  // NaN / inf gradients
    }
  }
  for (const Case& c : all) {
    const int64_t cpt = c.dt == 0 ? 4 : 8;
    int g = 1;
    while (g < (c.D + cpt - 1) / cpt && g < 32) g *= 2;
    char name[128];
    snprintf(name, sizeof name, "msda/%s_D%lld_G%d%s%s%s%s", harness::dtype_name(c.dt),
             static_cast<long long>(c.D), g, c.per_level ? "_per_level" : "",
             c.misaligned ? "_misaligned" : "", c.method ? "_discrete" : "",
             c.nonfinite ? "_nonfinite" : "");
    if (!filter.empty() && std::string(name).find(filter) == std::string::npos) continue;
    cases.report(name, run_case(c, name));
  }
  return cases.finish();
}
