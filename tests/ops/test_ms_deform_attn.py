"""Multi-scale deformable attention: native (CPU, CUDA) and Triton backends against the
grid_sample reference."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from rtdetr_fast import ops
from rtdetr_fast.ops import _backend
from rtdetr_fast.ops.ms_deform_attn import native
from rtdetr_fast.ops.ms_deform_attn.reference import ms_deform_attn_reference

from conftest import run_baseline_child

HAS_NATIVE_CPU = _backend.extension_has("ms_deform_attn", "cpu")
HAS_CUDA = torch.cuda.is_available()
HAS_NATIVE_CUDA = HAS_CUDA and _backend.extension_has("ms_deform_attn", "cuda")
HAS_TRITON = importlib.util.find_spec("triton") is not None and _backend.triton_available()

needs_native = pytest.mark.skipif(not HAS_NATIVE_CPU, reason="rtdetr_fast._C not built")
needs_native_cuda = pytest.mark.skipif(not HAS_NATIVE_CUDA, reason="no CUDA or no CUDA build")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")

# (B, Q, H, D, level shapes, P): odd D, Q=1, 1x1 / 1xN / Nx1 / non-square levels
SHAPES = [
    pytest.param(2, 7, 3, 30, [(6, 5), (3, 4), (1, 1)], 4, id="D30-1x1"),
    pytest.param(1, 1, 2, 33, [(1, 9), (7, 1)], 3, id="D33-Q1-1xN"),
    pytest.param(3, 5, 1, 8, [(4, 6)], 2, id="L1-nonsquare"),
    pytest.param(2, 4, 2, 32, [(8, 8), (4, 4), (2, 2), (1, 1)], 4, id="D32-L4"),
]


def make_inputs(B, Q, H, D, shapes, P, dtype=torch.float64, device="cpu", lo=-0.2, hi=1.2,
                seed=0):
    """Locations drawn in [lo, hi], so some fall outside [0, 1] and sample zeros."""
    g = torch.Generator().manual_seed(seed)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    value = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Q, H, L, P, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    attn = torch.rand(B, Q, H, L, P, generator=g, dtype=torch.float64)
    ss = torch.tensor(shapes, dtype=torch.long, device=device)
    lsi = torch.tensor(starts, dtype=torch.long, device=device)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(value), ss, lsi, cast(loc), cast(attn)


def run(backend, value, ss, lsi, loc, attn, grad_out=None, **kw):
    """Output and (when grad_out is given) gradients of value, locations and weights."""
    value, loc, attn = (t.detach().clone().requires_grad_(grad_out is not None)
                        for t in (value, loc, attn))
    with ops.backend(backend):
        out = ops.ms_deform_attn(value, ss, lsi, loc, attn, **kw)
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, (value, loc, attn), grad_out)
    return out.detach(), grads


def backward_twice_deterministic(inputs, grad_out, backend="native"):
    """The gradients of two identical backward runs with deterministic algorithms on."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return (run(backend, *inputs, grad_out=grad_out)[1],
                run(backend, *inputs, grad_out=grad_out)[1])
    finally:
        torch.use_deterministic_algorithms(prev)


def assert_tied(out, ref64, ref_same, atol, what=""):
    """|out - ref64| <= 2 * |torch in the same dtype - ref64| + atol (house rule 5)."""
    out, ref64, ref_same = out.double().cpu(), ref64.double().cpu(), ref_same.double().cpu()
    err = (out - ref64).abs()
    bound = 2 * (ref_same - ref64).abs() + atol
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{what}: error exceeds the tolerance by {worst:.3g} " \
                       f"(max err {err.max().item():.3g})"


def compiled_equals_eager(layer, inputs):
    """torch.compile(fullgraph=True) of ``layer`` with the native backend equals eager, output
    and gradients of every input; returns the compiled run's gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with ops.backend("native"):
        ins = [t.clone().requires_grad_() for t in inputs]
        got = compiled(*ins)
        got_grads = torch.autograd.grad(got, ins)
        ins = [t.clone().requires_grad_() for t in inputs]
        want = layer(*ins)
        want_grads = torch.autograd.grad(want, ins)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    return got_grads


# ---------------------------------------------------------------- native CPU, float64 / float32

@needs_native
@pytest.mark.parametrize("B,Q,H,D,shapes,P", SHAPES)
def test_native_cpu_matches_reference_float64(B, Q, H, D, shapes, P):
    inputs = make_inputs(B, Q, H, D, shapes, P)
    grad_out = torch.randn(B, Q, H * D, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1))
    out, grads = run("native", *inputs, grad_out=grad_out)
    ref, ref_grads = run("reference", *inputs, grad_out=grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), grads,
                          ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


@needs_native
@pytest.mark.parametrize("B,Q,H,D,shapes,P", SHAPES)
def test_native_cpu_float32_within_torch_error(B, Q, H, D, shapes, P):
    inputs64 = make_inputs(B, Q, H, D, shapes, P)
    inputs32 = tuple(t.float() if t.is_floating_point() else t for t in inputs64)
    grad_out = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(1))
    out, grads = run("native", *inputs32, grad_out=grad_out)
    ref32, ref32_grads = run("reference", *inputs32, grad_out=grad_out)
    ref64, ref64_grads = run("reference", *inputs64, grad_out=grad_out.double())
    assert out.dtype == torch.float32
    assert_tied(out, ref64, ref32, 1e-5, "output")
    for name, g, r32, r64 in zip(("value", "locations", "weights"), grads, ref32_grads,
                                 ref64_grads):
        assert_tied(g, r64, r32, 1e-4, f"grad of {name}")


@needs_native
def test_native_cpu_gradcheck():
    value, ss, lsi, loc, attn = make_inputs(1, 2, 2, 3, [(3, 2), (1, 1)], 2, lo=0.05, hi=0.95)
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))

    def f(v, lc, a):
        with ops.backend("native"):
            return ops.ms_deform_attn(v, ss, lsi, lc, a)

    # locations away from cell edges: the bilinear sample is not differentiable across them
    assert torch.autograd.gradcheck(f, (value, loc, attn), eps=1e-6, atol=1e-5)


@needs_native
def test_locations_on_and_outside_the_border():
    value, ss, lsi, _, attn = make_inputs(1, 1, 1, 5, [(3, 4), (2, 2)], 8)
    edges = torch.tensor([0.0, 1.0, -0.5, 1.5, -1e-9, 1 + 1e-9, 0.125, 0.875],
                         dtype=torch.float64)
    x, y = torch.meshgrid(edges, edges[torch.randperm(8, generator=torch.Generator()
                                                             .manual_seed(0))], indexing="ij")
    loc = torch.stack([x[:, :1].reshape(8).repeat(2, 1), y[:1, :].reshape(8).repeat(2, 1)],
                      -1).reshape(1, 1, 1, 2, 8, 2)
    grad_out = torch.randn(1, 1, 5, dtype=torch.float64)
    out, grads = run("native", value, ss, lsi, loc, attn, grad_out=grad_out)
    ref, ref_grads = run("reference", value, ss, lsi, loc, attn, grad_out=grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def _check_far_edge(backend, device="cpu"):
    """x = 1 + 0.5/W puts the sample point exactly on ix = W, which floors to a corner one past
    the level's last column (or, for y, past its last row: into the next level). grid_sample
    gives zero there; reading that corner would return the next row's or level's values, and
    the backward would write there."""
    shapes = [(4, 4), (2, 2)]
    value, ss, lsi, _, attn = make_inputs(1, 3, 1, 6, shapes, 1, device=device)
    loc = torch.tensor([[1 + 0.5 / 4, 0.3], [0.3, 1 + 0.5 / 4], [1 + 0.5 / 4, 1 + 0.5 / 4]],
                       dtype=torch.float64)
    # level 0 gets the edge points, level 1 an ordinary one
    loc = torch.stack([loc, torch.full_like(loc, 0.4)], 1).reshape(1, 3, 1, 2, 1, 2).to(device)
    grad_out = torch.randn(1, 3, 6, dtype=torch.float64).to(device)
    out, grads = run(backend, value, ss, lsi, loc, attn, grad_out=grad_out)
    ref, ref_grads = run("reference", value, ss, lsi, loc, attn, grad_out=grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-12, atol=1e-12)


@needs_native
def test_location_exactly_half_a_cell_past_the_far_edge():
    _check_far_edge("native")


@needs_native
def test_far_and_non_finite_locations_sample_zeros():
    value, ss, lsi, loc, attn = make_inputs(1, 2, 1, 4, [(3, 3)], 3)
    loc[..., 0] = torch.tensor([1e30, -1e30, float("inf")], dtype=torch.float64)
    loc[:, 1, ..., 0] = float("nan")
    with ops.backend("native"):
        out = ops.ms_deform_attn(value, ss, lsi, loc, attn)
    assert torch.equal(out, torch.zeros_like(out))


@needs_native
@pytest.mark.parametrize("B,Q", [(0, 5), (2, 0)])
def test_empty_batch_or_queries(B, Q):
    value, ss, lsi, loc, attn = make_inputs(B, Q, 2, 4, [(2, 3)], 2)
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
    with ops.backend("native"):
        out = ops.ms_deform_attn(value, ss, lsi, loc, attn)
    assert out.shape == (B, Q, 8)
    out.sum().backward()
    assert value.grad.shape == value.shape and not value.grad.any()


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native)])
def test_points_per_level(backend):
    """RT-DETRv2's form: level l owns num_points_list[l] consecutive points."""
    B, Q, H, D, shapes, counts = 2, 3, 2, 6, [(5, 4), (2, 3), (1, 1)], [4, 1, 2]
    value, ss, lsi, _, _ = make_inputs(B, Q, H, D, shapes, 1)
    g = torch.Generator().manual_seed(3)
    N = sum(counts)
    loc = (torch.rand(B, Q, H, N, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2)
    attn = torch.rand(B, Q, H, N, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, Q, H * D, generator=g, dtype=torch.float64)
    out, grads = run(backend, value, ss, lsi, loc, attn, grad_out=grad_out,
                     num_points_list=counts)
    # the same thing as the sum over levels of single-level calls
    expect = 0
    v = value.detach().clone().requires_grad_()
    lc = loc.detach().clone().requires_grad_()
    a = attn.detach().clone().requires_grad_()
    begin = 0
    for lvl, (p, (h, w)) in enumerate(zip(counts, shapes)):
        s0 = int(lsi[lvl])
        expect = expect + ms_deform_attn_reference(
            v[:, s0:s0 + h * w], torch.tensor([[h, w]]), torch.tensor([0]),
            lc[:, :, :, None, begin:begin + p], a[:, :, :, None, begin:begin + p])
        begin += p
    expect_grads = torch.autograd.grad(expect, (v, lc, a), grad_out)
    torch.testing.assert_close(out, expect.detach(), rtol=1e-12, atol=1e-12)
    for gr, e in zip(grads, expect_grads):
        torch.testing.assert_close(gr, e, rtol=1e-10, atol=1e-10)


@needs_native
def test_opcheck_native_cpu():
    native._ensure_registered()
    value, ss, lsi, loc, attn = make_inputs(2, 3, 2, 5, [(3, 4), (1, 1)], 2, dtype=torch.float32)
    B, Q, H, L, P, _ = loc.shape
    ss, lsi = native.flat_levels(ss, lsi)
    args = (value.requires_grad_(), ss, lsi, loc.reshape(B, Q, H, L * P, 2).requires_grad_(),
            attn.reshape(B, Q, H, L * P).requires_grad_(), [P] * L)
    torch.library.opcheck(torch.ops.rtdetr_fast.ms_deform_attn.default, args)
    grad = torch.randn(B, Q, H * value.shape[-1])
    torch.library.opcheck(torch.ops.rtdetr_fast.ms_deform_attn_backward.default,
                          (grad,) + tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                          for a in args) + (False,))


@needs_native
def test_torch_compile_fullgraph():
    value, ss, lsi, loc, attn = make_inputs(2, 4, 2, 8, [(4, 4), (2, 2)], 2, dtype=torch.float32)
    ss, lsi = ss.tolist(), lsi.tolist()  # host ints: a tensor table is a host read per call

    def layer(v, lc, a):
        return (ops.ms_deform_attn(v, ss, lsi, lc.sigmoid(), a.softmax(-1)) * 2).sum()

    compiled_equals_eager(layer, (value, loc, attn))


@needs_native
def test_autocast_promotes_mixed_dtypes():
    value, ss, lsi, loc, attn = make_inputs(1, 3, 2, 4, [(3, 3)], 2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), ops.backend("native"):
        out = ops.ms_deform_attn(value.bfloat16(), ss, lsi, loc, attn)
    assert out.dtype == torch.float32
    ref = ms_deform_attn_reference(value.bfloat16().float(), ss, lsi, loc, attn)
    torch.testing.assert_close(out, ref)


@needs_native
def test_cpu_backward_deterministic():
    inputs = make_inputs(2, 64, 4, 16, [(8, 8), (4, 4)], 4, dtype=torch.float32, lo=0.3, hi=0.4)
    grad_out = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(0))
    first, second = backward_twice_deterministic(inputs, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("B,H", [(1, 8), (2, 6), (3, 5)])
def test_cpu_results_do_not_depend_on_thread_count(B, H):
    # the CPU backward splits heads into per-task groups by batch size and thread count (all H
    # heads per task at B >= threads, fewer when B is small; H=5 has no divisor between 1 and
    # 5): every split must give the same bits, as every value row sums its terms in the same
    # order. The forward's row order is checked alongside.
    inputs = make_inputs(B, 9, H, 8, [(6, 7), (3, 3)], 3, dtype=torch.float32, lo=-0.1, hi=1.1)
    g = torch.randn(B, 9, H * 8, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 4, 16):
            torch.set_num_threads(threads)
            results.append(run("native", *inputs, grad_out=g))
    finally:
        torch.set_num_threads(before)
    out0, grads0 = results[0]
    for out, grads in results[1:]:
        assert torch.equal(out, out0)
        for a, b in zip(grads, grads0):
            assert torch.equal(a, b)
    _, ref = run("reference", *inputs, grad_out=g)
    for a, b in zip(grads0, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_native
def test_cpu_backward_large_value_gradient():
    # a value gradient of 8 MiB and more takes the huge-page, parallel-zeroed allocation
    # (csrc/common/cpu_alloc.h): untouched rows must be exact zeros, touched ones as the reference
    inputs = make_inputs(2, 40, 8, 32, [(64, 64), (32, 32), (16, 16)], 4, dtype=torch.float32)
    assert inputs[0].numel() * 4 >= 8 << 20
    g = torch.randn(2, 40, 8 * 32, generator=torch.Generator().manual_seed(1))
    _, grads = run("native", *inputs, grad_out=g)
    _, ref = run("reference", *inputs, grad_out=g)
    _, ref64 = run("reference", *(t.double() if t.is_floating_point() else t for t in inputs),
                   grad_out=g.double())
    gv = grads[0]
    assert gv.is_contiguous() and gv.shape == inputs[0].shape
    untouched = ref64[0] == 0
    assert untouched.float().mean() > 0.5
    assert torch.equal(gv[untouched], torch.zeros_like(gv[untouched]))
    # location gradients carry a factor W_l (64 here): a looser absolute floor
    for ours, same, exact, what, atol in zip(grads, ref, ref64, ("value", "locations", "weights"),
                                             (1e-5, 1e-3, 1e-4)):
        assert_tied(ours, exact, same, atol, what)
    gv.add_(1.0)  # an ordinary, writable tensor
    del gv, grads


@needs_native
def test_cpu_backward_large_value_gradient_block_reused():
    # a freed large value gradient's block is kept and handed to the next call of its size
    # (csrc/common/cpu_alloc.h), zeroed again: the second gradient must not see the first
    inputs = make_inputs(2, 40, 8, 32, [(64, 64), (32, 32), (16, 16)], 4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    g1, g2 = (torch.randn(2, 40, 8 * 32, generator=gen) for _ in range(2))
    _, first = run("native", *inputs, grad_out=g1)
    block = first[0].data_ptr()
    first[0].fill_(float("nan"))
    del first
    _, second = run("native", *inputs, grad_out=g2)
    assert second[0].data_ptr() == block
    _, ref = run("reference", *inputs, grad_out=g2)
    _, ref64 = run("reference", *(t.double() if t.is_floating_point() else t for t in inputs),
                   grad_out=g2.double())
    untouched = ref64[0] == 0
    assert torch.equal(second[0][untouched], torch.zeros_like(second[0][untouched]))
    assert_tied(second[0], ref64[0], ref[0], 1e-5, "value")


# ------------------------------------------------------------------------------ bad input

def _bad_cases():
    good = make_inputs(2, 3, 2, 4, [(3, 4), (2, 2)], 2, dtype=torch.float32)
    value, ss, lsi, loc, attn = good
    yield "rank", (value[0], ss, lsi, loc, attn), "value must be [B, S, H, D]"
    yield "loc-B", (value, ss, lsi, loc[:1], attn), "sampling_locations must be"
    yield "loc-H", (value, ss, lsi, loc[:, :, :1], attn), "sampling_locations must be"
    yield "attn-P", (value, ss, lsi, loc, attn[..., :1]), "attention_weights must be"
    yield "L", (value, ss[:1], lsi[:1], loc, attn), "spatial_shapes must be [L, 2]"
    yield "sum", (value[:, :-1], ss, lsi, loc, attn), "sum of H_l*W_l"
    yield "starts", (value, ss, torch.tensor([0, 11]), loc, attn), "level_start_index must be"
    yield "dtype", (value, ss, lsi, loc.double(), attn), "sampling_locations dtype"


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_input_names_the_argument(backend, case):
    _, args, message = case
    with ops.backend(backend), pytest.raises((ValueError, TypeError), match=re.escape(message)):
        ops.ms_deform_attn(*args)


@needs_native
def test_op_boundary_checks_without_the_python_layer():
    value, ss, lsi, loc, attn = make_inputs(2, 3, 2, 4, [(3, 4), (2, 2)], 2, dtype=torch.float32)
    flat_loc, flat_attn = loc.reshape(2, 3, 2, 4, 2), attn.reshape(2, 3, 2, 4)
    ss, lsi = native.flat_levels(ss, lsi)  # the op takes int[]: (H_0, W_0, H_1, W_1), starts
    op = torch.ops.rtdetr_fast.ms_deform_attn
    with pytest.raises(RuntimeError, match=r"sampling_locations must be \[B, Q, H, N, 2\]"):
        op(value, ss, lsi, flat_loc[:, :, :1], flat_attn, [2, 2])
    with pytest.raises(RuntimeError, match="sum of H_l\\*W_l"):
        op(value[:, :-1].contiguous(), ss, lsi, flat_loc, flat_attn, [2, 2])
    with pytest.raises(RuntimeError, match="level_start_index must be the running sum"):
        op(value, ss, [0, 3], flat_loc, flat_attn, [2, 2])
    with pytest.raises(RuntimeError, match="spatial_shapes must be 2L = 4 ints"):
        op(value, ss[:3], lsi, flat_loc, flat_attn, [2, 2])
    with pytest.raises(RuntimeError, match="spatial_shapes entries must be positive"):
        op(value, [3, 4, 0, 4], lsi, flat_loc, flat_attn, [2, 2])
    with pytest.raises(RuntimeError, match=r"sampling_locations must be .* N=5"):
        op(value, ss, lsi, flat_loc, flat_attn, [2, 3])
    with pytest.raises(RuntimeError, match="attention_weights dtype"):
        op(value, ss, lsi, flat_loc, flat_attn.double(), [2, 2])


# --------------------------------------------------------------- Triton (interpreter on CPU)

# triton.jit reads TRITON_INTERPRET when a function is defined, triton's own library functions
# included, so the interpreter cannot be switched on once triton is imported: the CPU Triton
# tests run in a child pytest whose environment has TRITON_INTERPRET=1 from the start. The
# discrete-mode file's Triton tests (which use triton_device from here) run in the same child.
_INTERPRETER_CHILD = os.environ.get("RTDETR_FAST_TRITON_CHILD") == "1"
_DISCRETE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "test_ms_deform_attn_discrete.py")


@needs_triton
@pytest.mark.triton_interpreter
@pytest.mark.skipif(_INTERPRETER_CHILD, reason="this is the child")
def test_triton_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", RTDETR_FAST_TRITON_CHILD="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         os.path.abspath(__file__), _DISCRETE_FILE, "-k", "triton and cpu"],
        env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail


@pytest.fixture(params=[pytest.param("cpu", marks=pytest.mark.triton_interpreter),
                        pytest.param("cuda", marks=pytest.mark.cuda)])
def triton_device(request, monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton not importable")
    if request.param == "cpu" and not _INTERPRETER_CHILD:
        pytest.skip("runs in the interpreter child (test_triton_in_interpreter)")
    if request.param == "cuda":
        if _INTERPRETER_CHILD:
            pytest.skip("the interpreter child runs CPU tensors only")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


@pytest.mark.parametrize("B,Q,H,D,shapes,P", SHAPES[:3])
def test_triton_matches_reference_float64(triton_device, B, Q, H, D, shapes, P):
    inputs = make_inputs(B, Q, H, D, shapes, P, device=triton_device)
    grad_out = torch.randn(B, Q, H * D, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1)).to(triton_device)
    out, grads = run("triton", *inputs, grad_out=grad_out)
    ref, ref_grads = run("reference", *inputs, grad_out=grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_triton_gradcheck(triton_device):
    value, ss, lsi, loc, attn = make_inputs(1, 2, 2, 3, [(3, 2), (1, 1)], 2, lo=0.05, hi=0.95,
                                            device=triton_device)
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))

    def f(v, lc, a):
        with ops.backend("triton"):
            return ops.ms_deform_attn(v, ss, lsi, lc, a)

    assert torch.autograd.gradcheck(f, (value, loc, attn), eps=1e-6, atol=1e-5)


def test_triton_points_per_level_and_outside(triton_device):
    B, Q, H, D, shapes, counts = 1, 3, 2, 5, [(4, 3), (1, 1)], [3, 1]
    value, ss, lsi, _, _ = make_inputs(B, Q, H, D, shapes, 1, device=triton_device)
    g = torch.Generator().manual_seed(5)
    loc = (torch.rand(B, Q, H, 4, 2, generator=g, dtype=torch.float64) * 3 - 1)
    loc[0, 0, 0, 0] = torch.tensor([1e30, 0.5])
    attn = torch.rand(B, Q, H, 4, generator=g, dtype=torch.float64)
    loc, attn = loc.to(triton_device), attn.to(triton_device)
    grad_out = torch.randn(B, Q, H * D, dtype=torch.float64).to(triton_device)
    out, grads = run("triton", value, ss, lsi, loc, attn, grad_out=grad_out,
                     num_points_list=counts)
    ref, ref_grads = run("reference", value, ss, lsi, loc, attn, grad_out=grad_out,
                         num_points_list=counts)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for gr, r in zip(grads, ref_grads):
        torch.testing.assert_close(gr, r, rtol=1e-10, atol=1e-10)


def test_triton_backward_refuses_deterministic_mode(triton_device):
    inputs = make_inputs(1, 2, 1, 4, [(2, 2)], 1, device=triton_device)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            run("triton", *inputs, grad_out=torch.ones(1, 2, 4, dtype=torch.float64,
                                                        device=triton_device))
    finally:
        torch.use_deterministic_algorithms(prev)


# ----------------------------------------------------------------------------------- CUDA

CUDA_DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.float16, 2e-3, 2e-2),
               (torch.bfloat16, 1.5e-2, 1e-1)]
CUDA_BACKENDS = [pytest.param("native", marks=needs_native_cuda),
                 pytest.param("triton", marks=[needs_triton, pytest.mark.skipif(
                     not HAS_CUDA, reason="no CUDA")])]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype,atol,gatol", CUDA_DTYPES, ids=lambda x: str(x))
@pytest.mark.parametrize("B,Q,H,D,shapes,P", SHAPES + [
    pytest.param(2, 300, 8, 32, [(80, 80), (40, 40), (20, 20)], 4, id="rtdetr-640")])
def test_cuda_within_torch_error(backend, dtype, atol, gatol, B, Q, H, D, shapes, P,
                                 monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs64 = make_inputs(B, Q, H, D, shapes, P, device="cuda")
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs64)
    grad64 = torch.randn(B, Q, H * D, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1)).cuda()
    out, grads = run(backend, *inputs, grad_out=grad64.to(dtype))
    ref, ref_grads = run("reference", *inputs, grad_out=grad64.to(dtype))
    ref64, ref64_grads = run("reference", *inputs64, grad_out=grad64)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_tied(out, ref64, ref, atol, "output")
    for name, g, r, r64 in zip(("value", "locations", "weights"), grads, ref_grads, ref64_grads):
        # location gradients scale with W_l: the tolerance does too
        scale = max(max(s) for s in shapes) if name == "locations" else 1
        assert_tied(g, r64, r, gatol * scale, f"grad of {name}")


@pytest.mark.cuda
@needs_native_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_deterministic_backward_bit_identical(dtype):
    # many queries on a small map: every value element takes thousands of atomics
    inputs = make_inputs(2, 500, 8, 32, [(8, 8), (4, 4), (2, 2)], 4, dtype=dtype, device="cuda")
    grad_out = torch.randn(2, 500, 256, device="cuda").to(dtype)
    first, second = backward_twice_deterministic(inputs, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # and the deterministic sum is as accurate as the atomic one
    fast = run("native", *inputs, grad_out=grad_out)[1]
    ref64 = run("reference", *(t.double() if t.is_floating_point() else t for t in inputs),
                grad_out=grad_out.double())[1]
    err_det = (first[0].double() - ref64[0]).abs().max()
    err_fast = (fast[0].double() - ref64[0]).abs().max()
    assert err_det <= 2 * err_fast + 1e-6


@pytest.mark.cuda
@needs_native_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_deterministic_backward_nan_and_inf_where_the_reference_has_them(dtype):
    """A non-finite grad_output element or attention weight makes NaN or inf of exactly the value
    elements it reaches, as the atomic path and the reference do; the rest keep their sums."""
    inputs = make_inputs(2, 40, 4, 16, [(8, 8), (4, 4), (2, 2)], 4, dtype=dtype, device="cuda")
    value, ss, lsi, loc, attn = inputs
    grad_out = torch.randn(2, 40, 64, device="cuda").to(dtype)
    grad_out[0, 3, 5] = float("nan")
    grad_out[1, 7, 2] = float("inf")
    grad_out[1, 9, 2] = float("-inf")
    attn = attn.clone()
    attn[0, 11, 1, 0, 2] = float("inf")
    inputs = (value, ss, lsi, loc, attn)
    det = backward_twice_deterministic(inputs, grad_out)[0][0]
    fast = run("native", *inputs, grad_out=grad_out)[1][0]
    ref = run("reference", *inputs, grad_out=grad_out)[1][0]
    assert torch.isfinite(ref).any() and not torch.isfinite(ref).all()
    for got in (det, fast):
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(torch.isposinf(got), torch.isposinf(ref))
        assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    tol = 2e-3 if dtype == torch.float16 else 1e-4
    assert torch.allclose(det[finite].float(), ref[finite].float(), atol=tol, rtol=tol)


@pytest.mark.cuda
@needs_native_cuda
def test_cuda_opcheck_and_graph_capture():
    native._ensure_registered()
    value, ss, lsi, loc, attn = make_inputs(2, 3, 2, 8, [(3, 4), (1, 1)], 2, dtype=torch.float32,
                                            device="cuda")
    B, Q, H, L, P, _ = loc.shape
    flat = (value, *native.flat_levels(ss, lsi), loc.reshape(B, Q, H, L * P, 2),
            attn.reshape(B, Q, H, L * P))
    torch.library.opcheck(torch.ops.rtdetr_fast.ms_deform_attn.default, flat + ([P] * L,))
    with ops.backend("native"):
        eager = ops.ms_deform_attn(value, ss, lsi, loc, attn)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ops.ms_deform_attn(value, ss, lsi, loc, attn)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = ops.ms_deform_attn(value, ss, lsi, loc, attn)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)


@pytest.mark.cuda
@needs_native_cuda
def test_cuda_compile_fullgraph_inductor_and_autocast():
    value, ss, lsi, loc, attn = make_inputs(2, 16, 8, 32, [(8, 8), (4, 4)], 4,
                                            dtype=torch.float32, device="cuda")
    ss, lsi = ss.tolist(), lsi.tolist()
    w = torch.randn(256, 256, device="cuda")

    def layer(v, lc, a):
        v = (v.flatten(2) @ w[:v.shape[2] * v.shape[3], :v.shape[2] * v.shape[3]]).view_as(v)
        return ops.ms_deform_attn(v, ss, lsi, lc.sigmoid(), a.softmax(-1)).float().sum()

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    with ops.backend("native"), torch.autocast("cuda", dtype=torch.float16):
        got = compiled(value, loc, attn)
        want = layer(value, loc, attn)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)


@pytest.mark.cuda
@needs_native_cuda
def test_cuda_device_mix_is_an_error():
    value, ss, lsi, loc, attn = make_inputs(1, 2, 1, 4, [(2, 2)], 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="sampling_locations is on cpu"):
        ops.ms_deform_attn(value.cuda(), ss.cuda(), lsi.cuda(), loc, attn.cuda())


def test_triton_far_edge(triton_device):
    _check_far_edge("triton", triton_device)


@needs_native
@pytest.mark.skipif(os.environ.get("RTDETR_FAST_NO_AVX2") == "1", reason="this is the child")
def test_native_cpu_baseline_kernels():
    """The CPU kernels exist twice (baseline x86-64 and AVX2+FMA, chosen at run time): the
    native tests run again in a child process forced onto the baseline build."""
    run_baseline_child(os.path.abspath(__file__), _DISCRETE_FILE,
                       "-k", "native and not triton and not cuda and not baseline")

