"""Multi-scale deformable attention, RT-DETRv2's discrete (nearest-cell) sampling: every backend
against a float64 loop written from the definition (ops.ms_deform_attn's docstring)."""
from __future__ import annotations

import math
import re

import pytest
import torch

from rtdetr_fast import ops

# (B, Q, H, D, level shapes, points per level): odd D, Q=1, a 1x1 level, non-square levels
CASES = [
    pytest.param(2, 7, 3, 30, [(6, 5), (3, 4), (1, 1)], [3, 6, 3], id="D30-1x1-pts363"),
    pytest.param(1, 1, 2, 33, [(1, 9), (7, 1), (2, 3)], [2, 2, 2], id="D33-Q1-1xN-Nx1"),
    pytest.param(3, 5, 1, 8, [(4, 6)], [2], id="L1-nonsquare"),
    pytest.param(2, 4, 2, 32, [(8, 8), (4, 4), (2, 2), (1, 1)], [4, 4, 4, 4], id="D32-L4"),
]


def make_inputs(B, Q, H, D, shapes, counts, dtype=torch.float64, lo=-0.3, hi=1.3, seed=0,
                special=True):
    """Per-level form: locations [B,Q,H,N,2] in [lo, hi] (some outside [0, 1]); with
    ``special``, a few coordinates are NaN, +-inf or huge."""
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    N = sum(counts)
    value = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Q, H, N, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    attn = torch.rand(B, Q, H, N, generator=g, dtype=torch.float64)
    if special:
        flat = loc.view(-1)
        picks = torch.randperm(flat.numel(), generator=g)[:6]
        for i, v in zip(picks.tolist(), [math.nan, math.inf, -math.inf, 1e30, -1e30, math.nan]):
            flat[i] = v
    return value.to(dtype), loc.to(dtype), attn.to(dtype)


def starts_of(shapes):
    out, total = [], 0
    for h, w in shapes:
        out.append(total)
        total += h * w
    return out


def cell(t: float, n: int) -> int:
    """clamp(floor(t*n + 0.5), 0, n-1); NaN -> 0."""
    f = t * n + 0.5
    if math.isnan(f) or f < 0:
        return 0
    if f >= n - 1:
        return n - 1
    return int(math.floor(f))


def loop(value, shapes, counts, loc, attn, grad_out=None):
    """float64 ground truth: output, and with grad_out the value and weight gradients."""
    value, loc, attn = value.double(), loc.double(), attn.double()
    B, S, H, D = value.shape
    Q = loc.shape[1]
    starts = starts_of(shapes)
    out = torch.zeros(B, Q, H, D, dtype=torch.float64)
    gv = torch.zeros_like(value)
    ga = torch.zeros_like(attn)
    g = grad_out.double().view(B, Q, H, D) if grad_out is not None else None
    for b in range(B):
        for q in range(Q):
            for h in range(H):
                j = 0
                for lvl, ((lh, lw), p) in enumerate(zip(shapes, counts)):
                    for _ in range(p):
                        x, y = loc[b, q, h, j].tolist()
                        row = starts[lvl] + cell(y, lh) * lw + cell(x, lw)
                        a = attn[b, q, h, j].item()
                        out[b, q, h] += a * value[b, row, h]
                        if g is not None:
                            gv[b, row, h] += a * g[b, q, h]
                            ga[b, q, h, j] = (g[b, q, h] * value[b, row, h]).sum()
                        j += 1
    return out.view(B, Q, H * D), gv, ga


def run(backend, value, shapes, counts, loc, attn, grad_out=None, padded=False):
    """ops.ms_deform_attn(method='discrete') on ``backend``: output and (with grad_out) the
    gradients of value, locations and weights. ``padded`` passes the [B,Q,H,L,P,2] form
    (every level must have the same count)."""
    value, loc, attn = (t.detach().clone().requires_grad_(grad_out is not None)
                        for t in (value, loc, attn))
    starts = starts_of(shapes)
    with ops.backend(backend):
        if padded:
            B, Q, H, N, _ = loc.shape
            L = len(shapes)
            out = ops.ms_deform_attn(value, shapes, starts, loc.view(B, Q, H, L, N // L, 2),
                                     attn.view(B, Q, H, L, N // L), method="discrete")
        else:
            out = ops.ms_deform_attn(value, shapes, starts, loc, attn, num_points_list=counts,
                                     method="discrete")
    if grad_out is None:
        return out.detach(), None
    return out.detach(), torch.autograd.grad(out, (value, loc, attn), grad_out)


def check_against_loop(backend, B, Q, H, D, shapes, counts, dtype, padded=False, **kw):
    value, loc, attn = make_inputs(B, Q, H, D, shapes, counts, dtype=dtype, **kw)
    grad_out = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, (gv, gl, ga) = run(backend, value, shapes, counts, loc, attn, grad_out, padded)
    want, want_gv, want_ga = loop(value, shapes, counts, loc, attn, grad_out)
    assert out.dtype == dtype and gv.dtype == dtype and ga.dtype == dtype
    # float64: equal to rounding; float32: a sum of L*P products per element, in float32
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(gv.double(), want_gv, **tol, msg="grad of value")
    torch.testing.assert_close(ga.double(), want_ga, **tol, msg="grad of attention_weights")
    assert gl.shape == loc.shape and gl.dtype == dtype
    assert torch.equal(gl, torch.zeros_like(gl)), "grad of sampling_locations must be zero"


BACKENDS = ["reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,Q,H,D,shapes,counts", CASES)
def test_discrete_matches_float64_loop(backend, dtype, B, Q, H, D, shapes, counts):
    check_against_loop(backend, B, Q, H, D, shapes, counts, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_discrete_padded_form_equals_per_level_form(backend):
    """[B,Q,H,L,P,2] with P points on every level is the per-level form with (P,) * L."""
    check_against_loop(backend, 2, 3, 2, 6, [(5, 3), (2, 4)], [2, 2], torch.float64,
                       padded=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_discrete_cell_edges_and_clamping(backend):
    """Locations on the rounding edges (x*W + 0.5 an integer: powers-of-two sides make them
    exact), outside [0, 1], non-finite; a non-square level, where the official's clamp of x
    to H-1 would read the wrong cell."""
    shapes, counts = [(2, 8), (4, 2)], [10, 10]
    xs = [0.0, 1.0, 0.5 / 8, 1.5 / 8, 7.5 / 8, -0.3, 1.7, math.nan, math.inf, -math.inf]
    ys = [0.25, 0.75, 1.0, 0.0, 0.5, math.nan, -math.inf, math.inf, 2.0, -2.0]
    loc = torch.tensor([[x, y] for x, y in zip(xs, ys)] * 2, dtype=torch.float64)
    loc = loc.view(1, 1, 1, 20, 2)
    value = torch.randn(1, 24, 1, 3, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    attn = torch.rand(1, 1, 1, 20, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(1, 1, 3, dtype=torch.float64)
    out, (gv, gl, ga) = run(backend, value, shapes, counts, loc, attn, grad_out)
    want, want_gv, want_ga = loop(value, shapes, counts, loc, attn, grad_out)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gv, want_gv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, want_ga, rtol=1e-12, atol=1e-12)
    assert not gl.any()
    # spot checks of the rule itself on the 2x8 level: x = 1.5/8 -> 1.5 + 0.5 = 2 -> column 2;
    # x = 7.5/8 -> 8 -> clamped to column 7 (the official's clamp to H-1 = 1 would give 1)
    assert [cell(x, 8) for x in xs] == [0, 7, 1, 2, 7, 0, 7, 0, 7, 0]
    assert [cell(y, 2) for y in ys] == [1, 1, 1, 0, 1, 0, 0, 1, 1, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_discrete_gradcheck(backend):
    """float64 gradcheck of value, weights and locations (piecewise constant in the locations:
    away from the rounding edges their numerical derivative is zero, as the analytic one)."""
    shapes, counts = [(3, 2), (1, 1)], [2, 1]
    value, loc, attn = make_inputs(1, 2, 2, 3, shapes, counts, special=False)
    # cell centres plus a fifth of a cell: eps never crosses an edge
    loc = (torch.floor(loc * 6) + 0.7) / 6
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
    starts = starts_of(shapes)

    def f(v, lc, a):
        with ops.backend(backend):
            return ops.ms_deform_attn(v, shapes, starts, lc, a, num_points_list=counts,
                                      method="discrete")

    assert torch.autograd.gradcheck(f, (value, loc, attn), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_discrete_differs_from_bilinear(backend):
    """The mode reaches the backend: the two methods give different outputs."""
    value, loc, attn = make_inputs(1, 3, 2, 4, [(5, 3)], [3], special=False)
    with ops.backend(backend):
        bil = ops.ms_deform_attn(value, [(5, 3)], [0], loc, attn, num_points_list=[3])
        dis = ops.ms_deform_attn(value, [(5, 3)], [0], loc, attn, num_points_list=[3],
                                 method="discrete")
        default = ops.ms_deform_attn(value, [(5, 3)], [0], loc, attn, num_points_list=[3],
                                     method="default")
    assert torch.equal(bil, default)
    assert (bil - dis).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["nearest", "Discrete", "", None, 1])
def test_unknown_method_is_a_one_line_error(method):
    value, loc, attn = make_inputs(1, 2, 1, 4, [(2, 2)], [1], special=False)
    with pytest.raises(ValueError, match=re.escape("method must be one of ('default', "
                                                   "'discrete'), got ")) as info:
        ops.ms_deform_attn(value, [(2, 2)], [0], loc, attn, num_points_list=[1], method=method)
    assert "\n" not in str(info.value)
