"""Multi-scale deformable attention, RT-DETRv2's discrete (nearest-cell) sampling: every backend
against a float64 loop written from the definition (ops.ms_deform_attn's docstring)."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

from rtdetr_fast import ops
from rtdetr_fast.ops import _backend
from rtdetr_fast.ops.ms_deform_attn import native
# the Triton tests run in the interpreter child of test_ms_deform_attn.py (one way to run it)
from test_ms_deform_attn import (HAS_CUDA, assert_tied, compiled_equals_eager,  # noqa: F401
                                 triton_device)

HAS_NATIVE_CPU = _backend.extension_has("ms_deform_attn", "cpu")
HAS_NATIVE_CUDA = HAS_CUDA and _backend.extension_has("ms_deform_attn", "cuda")
needs_native = pytest.mark.skipif(not HAS_NATIVE_CPU, reason="rtdetr_fast._C not built")

# (B, Q, H, D, level shapes, points per level): odd D, Q=1, a 1x1 level, non-square levels
CASES = [
    pytest.param(2, 7, 3, 30, [(6, 5), (3, 4), (1, 1)], [3, 6, 3], id="D30-1x1-pts363"),
    pytest.param(1, 1, 2, 33, [(1, 9), (7, 1), (2, 3)], [2, 2, 2], id="D33-Q1-1xN-Nx1"),
    pytest.param(3, 5, 1, 8, [(4, 6)], [2], id="L1-nonsquare"),
    pytest.param(2, 4, 2, 32, [(8, 8), (4, 4), (2, 2), (1, 1)], [4, 4, 4, 4], id="D32-L4"),
]


def make_inputs(B, Q, H, D, shapes, counts, dtype=torch.float64, lo=-0.3, hi=1.3, seed=0,
                special=True, device="cpu"):
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
    return tuple(t.to(device=device, dtype=dtype) for t in (value, loc, attn))


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
    value, loc, attn = value.double().cpu(), loc.double().cpu(), attn.double().cpu()
    B, S, H, D = value.shape
    Q = loc.shape[1]
    starts = starts_of(shapes)
    out = torch.zeros(B, Q, H, D, dtype=torch.float64)
    gv = torch.zeros_like(value)
    ga = torch.zeros_like(attn)
    g = grad_out.double().cpu().view(B, Q, H, D) if grad_out is not None else None
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


def check_against_loop(backend, B, Q, H, D, shapes, counts, dtype, padded=False,
                       device="cpu", **kw):
    """Output and gradients against the float64 loop on the same (dtype-rounded) inputs:
    float64 to rounding; other dtypes within twice the reference's own error in that dtype
    (house rule 5)."""
    value, loc, attn = make_inputs(B, Q, H, D, shapes, counts, dtype=dtype, device=device,
                                   **kw)
    grad_out = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(1)).to(
        device=device, dtype=dtype)
    out, (gv, gl, ga) = run(backend, value, shapes, counts, loc, attn, grad_out, padded)
    want, want_gv, want_ga = loop(value, shapes, counts, loc, attn, grad_out)
    assert out.dtype == dtype and gv.dtype == dtype and ga.dtype == dtype
    assert out.device == value.device
    if dtype == torch.float64:
        tol = dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.cpu(), want, **tol)
        torch.testing.assert_close(gv.cpu(), want_gv, **tol, msg="grad of value")
        torch.testing.assert_close(ga.cpu(), want_ga, **tol, msg="grad of attention_weights")
    else:
        ref, (ref_gv, _, ref_ga) = run("reference", value, shapes, counts, loc, attn, grad_out,
                                       padded)
        atol = 1e-5 if dtype == torch.float32 else 2e-2
        assert_tied(out, want, ref, atol, "output")
        assert_tied(gv, want_gv, ref_gv, atol, "grad of value")
        assert_tied(ga, want_ga, ref_ga, atol * 10, "grad of attention_weights")
    assert gl.shape == loc.shape and gl.dtype == dtype
    assert torch.equal(gl, torch.zeros_like(gl)), "grad of sampling_locations must be zero"


BACKENDS = ["reference", pytest.param("native", marks=needs_native)]


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


EDGE_XS = [0.0, 1.0, 0.5 / 8, 1.5 / 8, 7.5 / 8, -0.3, 1.7, math.nan, math.inf, -math.inf]
EDGE_YS = [0.25, 0.75, 1.0, 0.0, 0.5, math.nan, -math.inf, math.inf, 2.0, -2.0]


def check_edges(backend, device="cpu"):
    """Locations on the rounding edges (x*W + 0.5 an integer: powers-of-two sides make them
    exact), outside [0, 1], non-finite; non-square levels, where the official's clamp of x
    to H-1 would read the wrong cell."""
    shapes, counts = [(2, 8), (4, 2)], [10, 10]
    loc = torch.tensor([[x, y] for x, y in zip(EDGE_XS, EDGE_YS)] * 2, dtype=torch.float64)
    loc = loc.view(1, 1, 1, 20, 2)
    value = torch.randn(1, 24, 1, 3, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    attn = torch.rand(1, 1, 1, 20, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(1, 1, 3, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(2))
    value, loc, attn, grad_out = (t.to(device) for t in (value, loc, attn, grad_out))
    out, (gv, gl, ga) = run(backend, value, shapes, counts, loc, attn, grad_out)
    want, want_gv, want_ga = loop(value, shapes, counts, loc, attn, grad_out)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gv.cpu(), want_gv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga.cpu(), want_ga, rtol=1e-12, atol=1e-12)
    assert not gl.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_discrete_cell_edges_and_clamping(backend):
    check_edges(backend)


def test_the_loop_rule_itself():
    """Spot checks of the float64 loop's rule on the 2x8 level: x = 1.5/8 -> 1.5 + 0.5 = 2 ->
    column 2; x = 7.5/8 -> 8 -> clamped to column 7 (the official's clamp to H-1 = 1 would give
    1); NaN -> 0, +inf -> last, -inf -> 0."""
    assert [cell(x, 8) for x in EDGE_XS] == [0, 7, 1, 2, 7, 0, 7, 0, 7, 0]
    assert [cell(y, 2) for y in EDGE_YS] == [1, 1, 1, 0, 1, 0, 0, 1, 1, 0]


def check_gradcheck(backend, device="cpu"):
    """float64 gradcheck of value, weights and locations (piecewise constant in the locations:
    away from the rounding edges their numerical derivative is zero, as the analytic one)."""
    shapes, counts = [(3, 2), (1, 1)], [2, 1]
    value, loc, attn = make_inputs(1, 2, 2, 3, shapes, counts, special=False)
    # cell centres plus a fifth of a cell: eps never crosses an edge
    loc = (torch.floor(loc * 6) + 0.7) / 6
    value, loc, attn = (t.to(device).requires_grad_() for t in (value, loc, attn))
    starts = starts_of(shapes)

    def f(v, lc, a):
        with ops.backend(backend):
            return ops.ms_deform_attn(v, shapes, starts, lc, a, num_points_list=counts,
                                      method="discrete")

    assert torch.autograd.gradcheck(f, (value, loc, attn), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_discrete_gradcheck(backend):
    check_gradcheck(backend)


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


def test_every_backend_has_the_discrete_kernel():
    """No backend falls back to the reference for the mode (ops.ms_deform_attn would warn)."""
    for name, (fn, _) in _backend._REGISTRY["ms_deform_attn"].items():
        assert "discrete" in getattr(fn, "methods", ()), name


# ------------------------------------------------------------------- native: the op itself

@needs_native
def test_native_discrete_opcheck():
    native._ensure_registered()
    value, loc, attn = make_inputs(2, 3, 2, 5, [(3, 4), (1, 1)], [3, 1], dtype=torch.float32)
    args = (value.requires_grad_(), [3, 4, 1, 1], [0, 12], loc.requires_grad_(),
            attn.requires_grad_(), [3, 1])
    torch.library.opcheck(torch.ops.rtdetr_fast.ms_deform_attn.default, args + ("discrete",))
    grad = torch.randn(2, 3, 10)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    for det in (False, True):
        torch.library.opcheck(torch.ops.rtdetr_fast.ms_deform_attn_backward.default,
                              (grad,) + plain + (det, "discrete"))


@needs_native
def test_native_op_method_argument():
    """The schema's method: keyword or positional, "default" when left out; a wrong name is
    refused at the op boundary in the glossary's words."""
    native._ensure_registered()
    value, loc, attn = make_inputs(1, 2, 1, 4, [(2, 3)], [2], special=False)
    op = torch.ops.rtdetr_fast.ms_deform_attn
    args = (value, [2, 3], [0], loc, attn, [2])
    assert torch.equal(op(*args), op(*args, "default"))
    assert torch.equal(op(*args, method="discrete"), op(*args, "discrete"))
    with ops.backend("reference"):
        want = ops.ms_deform_attn(value, [(2, 3)], [0], loc, attn, num_points_list=[2],
                                  method="discrete")
    torch.testing.assert_close(op(*args, "discrete"), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match=re.escape(
            "method must be one of ('default', 'discrete'), got 'nearest'")):
        op(*args, "nearest")
    with pytest.raises(RuntimeError, match="method must be one of"):
        torch.ops.rtdetr_fast.ms_deform_attn_backward(
            torch.zeros(1, 2, 4, dtype=torch.float64), *args, False, "bilinear")


@needs_native
def test_native_discrete_backward_deterministic():
    """Many queries on a small map: every value row takes many additions."""
    value, loc, attn = make_inputs(2, 64, 4, 16, [(4, 4), (2, 2)], [4, 4], dtype=torch.float32)
    grad_out = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(0))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run("native", value, [(4, 4), (2, 2)], [4, 4], loc, attn, grad_out)[1]
        second = run("native", value, [(4, 4), (2, 2)], [4, 4], loc, attn, grad_out)[1]
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_native
def test_native_discrete_compile_fullgraph():
    value, loc, attn = make_inputs(2, 4, 2, 8, [(4, 4), (2, 3)], [2, 2], dtype=torch.float32,
                                   special=False)
    shapes, starts = [(4, 4), (2, 3)], [0, 16]

    def layer(v, lc, a):
        out = ops.ms_deform_attn(v, shapes, starts, lc.sigmoid(), a.softmax(-1),
                                 num_points_list=[2, 2], method="discrete")
        return (out * 2).sum()

    got_grads = compiled_equals_eager(layer, (value, loc, attn))
    assert not got_grads[1].any()


@needs_native
@pytest.mark.parametrize("B,Q", [(0, 5), (2, 0)])
def test_native_discrete_empty_batch_or_queries(B, Q):
    value, loc, attn = make_inputs(B, Q, 2, 4, [(2, 3)], [2], special=False)
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
    with ops.backend("native"):
        out = ops.ms_deform_attn(value, [(2, 3)], [0], loc, attn, num_points_list=[2],
                                 method="discrete")
    assert out.shape == (B, Q, 8)
    out.sum().backward()
    assert value.grad.shape == value.shape and not value.grad.any()


# --------------------------------------------------------- Triton (interpreter child on CPU)

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,Q,H,D,shapes,counts", CASES[:3])
def test_triton_discrete_matches_float64_loop(triton_device, dtype, B, Q, H, D, shapes,
                                              counts):
    check_against_loop("triton", B, Q, H, D, shapes, counts, dtype, device=triton_device)


def test_triton_discrete_padded_form(triton_device):
    check_against_loop("triton", 2, 3, 2, 6, [(5, 3), (2, 4)], [2, 2], torch.float64,
                       padded=True, device=triton_device)


def test_triton_discrete_edges(triton_device):
    check_edges("triton", triton_device)


def test_triton_discrete_gradcheck(triton_device):
    check_gradcheck("triton", triton_device)


# ----------------------------------------------------------------------------------- CUDA

CUDA_BACKENDS = [pytest.param("native", marks=pytest.mark.skipif(
                     not HAS_NATIVE_CUDA, reason="no CUDA or no CUDA build")),
                 pytest.param("triton", marks=pytest.mark.skipif(
                     not HAS_CUDA, reason="no CUDA"))]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("B,Q,H,D,shapes,counts", CASES + [
    pytest.param(2, 300, 8, 32, [(80, 80), (40, 40), (20, 20)], [4, 4, 4], id="rtdetr-640")])
def test_cuda_discrete_within_torch_error(backend, dtype, B, Q, H, D, shapes, counts,
                                          monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if backend == "triton" and not _backend.triton_available():
        pytest.skip("triton not importable")
    check_against_loop(backend, B, Q, H, D, shapes, counts, dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_discrete_edges(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if backend == "triton" and not _backend.triton_available():
        pytest.skip("triton not importable")
    check_edges(backend, "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_NATIVE_CUDA, reason="no CUDA or no CUDA build")
def test_cuda_discrete_deterministic_backward_bit_identical():
    value, loc, attn = make_inputs(2, 500, 8, 32, [(8, 8), (4, 4), (2, 2)], [4, 4, 4],
                                   dtype=torch.float32, device="cuda")
    grad_out = torch.randn(2, 500, 256, device="cuda")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        shapes, counts = [(8, 8), (4, 4), (2, 2)], [4, 4, 4]
        first = run("native", value, shapes, counts, loc, attn, grad_out)[1]
        second = run("native", value, shapes, counts, loc, attn, grad_out)[1]
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_NATIVE_CUDA or os.environ.get("RTDETR_FAST_TRITON_CHILD") == "1",
                    reason="no CUDA or no CUDA build")
def test_cuda_discrete_opcheck():
    native._ensure_registered()
    value, loc, attn = make_inputs(2, 3, 2, 8, [(3, 4), (1, 1)], [3, 1], dtype=torch.float32,
                                   device="cuda")
    torch.library.opcheck(torch.ops.rtdetr_fast.ms_deform_attn.default,
                          (value, [3, 4, 1, 1], [0, 12], loc, attn, [3, 1], "discrete"))
