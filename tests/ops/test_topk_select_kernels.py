"""Top-K kernels against the reference: same set, same order (ties, -inf, NaN), same gradients.

The Triton kernels run in Triton's interpreter on CPU tensors; the native op runs wherever the
extension has a kernel for the device (the CUDA cases skip without a GPU).
"""
import os
import sys

import pytest
import torch

# triton decides at its own import whether its library functions (tl.sort, tl.topk) are
# interpreted, so without a GPU it must first be imported with TRITON_INTERPRET=1. Done here, at
# collection, before rtdetr_fast is imported (an op package may import triton), and the variable
# is restored at once so that other modules' `auto` backends are unchanged.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    _old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except Exception:  # triton missing or broken: the interpreter tests skip below
        pass
    finally:
        if _old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _old

from rtdetr_fast import ops  # noqa: E402
from rtdetr_fast.ops import _backend  # noqa: E402
from rtdetr_fast.ops.topk_select.reference import (  # noqa: E402
    topk_detections_reference, topk_select_reference)

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def interpret():
    """TRITON_INTERPRET=1 for this module only: triton reads it when a kernel is decorated, and
    our kernels are decorated on first use, so setting it before the first launch is enough.
    Restored afterwards so that `auto` does not pick the interpreter in other modules."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        tl = pytest.importorskip("triton.language")
        if type(tl.standard.sort_impl).__name__ != "InterpretedFunction":
            pytest.skip("triton was imported without TRITON_INTERPRET=1 before this module")
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _devices_backends():
    out = []
    if not torch.cuda.is_available():  # with a GPU triton is not interpreted: it runs on CUDA
        out.append(pytest.param(("cpu", "triton"), id="triton-interp",
                                marks=pytest.mark.triton_interpreter))
    else:
        out += [pytest.param(("cuda", "triton"), id="triton-cuda", marks=pytest.mark.cuda),
                pytest.param(("cuda", "native"), id="native-cuda", marks=pytest.mark.cuda)]
    if _backend.extension_has("topk_select_indices", "cpu"):
        out.append(pytest.param(("cpu", "native"), id="native-cpu"))
    return out


@pytest.fixture(params=_devices_backends())
def impl(request):
    device, name = request.param
    if device == "cpu" and name == "triton":
        request.getfixturevalue("interpret")
    if name == "native" and not _backend.extension_has("topk_select_indices", device):
        pytest.skip(f"extension has no {device} kernel")
    return device, name


def _select(impl, logits, k, tensors=()):
    device, name = impl
    with ops.backend(name):
        return ops.topk_select(logits.to(device), k, [t.to(device) for t in tensors])


def _check_select(impl, logits, k, tensors=()):
    got_s, got_i, got_t = _select(impl, logits, k, tensors)
    want_s, want_i, want_t = topk_select_reference(logits, k, list(tensors))
    assert got_i.dtype == torch.int64 and got_s.dtype == logits.dtype
    assert torch.equal(got_i.cpu(), want_i)
    # equal_nan: NaN rows are selected when fewer than K real scores exist
    torch.testing.assert_close(got_s.cpu(), want_s, rtol=0, atol=0, equal_nan=True)
    for g, w in zip(got_t, want_t):
        assert torch.equal(g.cpu(), w)
    return got_i.cpu()


@pytest.mark.parametrize("B,N,C,K", [
    (2, 50, 7, 10),      # small
    (1, 8, 3, 8),        # K = N
    (2, 700, 5, 700),    # K = N, N < 1024
    (3, 900, 4, 300),    # N < 1024
    (1, 2500, 3, 17),    # several blocks, odd K
    (2, 1, 2, 1),        # one anchor
])
def test_select_matches_reference(impl, B, N, C, K):
    g = torch.Generator().manual_seed(B * 1000 + N + K)
    logits = torch.randn(B, N, C, generator=g)
    feats = torch.randn(B, N, 6, generator=g)
    boxes = torch.rand(B, N, 4, generator=g)
    _check_select(impl, logits, K, [feats, boxes])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_select_dtypes(impl, dtype):
    g = torch.Generator().manual_seed(1)
    # few distinct values in half precision: many ties across blocks
    logits = (torch.randn(2, 2100, 5, generator=g) * 3).to(dtype)
    _check_select(impl, logits, 300, [torch.randn(2, 2100, 3, generator=g).to(dtype)])


def test_ties_across_blocks_take_lower_indices(impl):
    # integer scores 0..3: every rank boundary falls inside a run of equal scores
    g = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 4, (2, 3000, 3), generator=g).float()
    _check_select(impl, logits, 300, [])
    idx = _check_select(impl, torch.ones(2, 2049, 2), 300)
    assert idx.tolist() == [list(range(300))] * 2


def test_all_equal_scores(impl):
    idx = _check_select(impl, torch.full((1, 100, 3), -2.5), 100)
    assert idx.tolist() == [list(range(100))]


def test_minus_inf_nan_and_signed_zero(impl):
    s = torch.tensor([[NAN, 1.0, -INF, NAN, 2.0, -INF, 0.0, -0.0, INF]])
    idx = _check_select(impl, s[..., None], 9)
    assert idx.tolist() == [[8, 4, 1, 6, 7, 2, 5, 0, 3]]


def test_nan_rows_and_rows_of_minus_inf(impl):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1100, 4, generator=g)
    logits[0, ::3, 1] = NAN              # a NaN anywhere in an anchor makes its score NaN
    logits[1, ::2] = -INF
    logits[1, 1::4] = NAN
    _check_select(impl, logits, 1100, [])
    _check_select(impl, logits, 300, [])
    _check_select(impl, torch.full((1, 40, 2), NAN), 40)
    _check_select(impl, torch.full((1, 40, 2), -INF), 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: torch fallback
def test_gradients_match_reference(impl, dtype):
    device, _ = impl
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 60, 5, generator=g, dtype=dtype)
    logits[0, 10, :2] = 9.0              # a tied maximum within an anchor shares the gradient
    feats = torch.randn(2, 60, 7, generator=g, dtype=dtype)
    w_s = torch.randn(2, 20, generator=g, dtype=dtype)
    w_f = torch.randn(2, 20, 7, generator=g, dtype=dtype)

    def run(fn):
        lg = logits.to(device).requires_grad_()
        ft = feats.to(device).requires_grad_()
        s, idx, (f,) = fn(lg, 20, [ft])
        assert not idx.requires_grad
        ((s * w_s.to(device)).sum() + (f * w_f.to(device)).sum()).backward()
        return lg.grad.cpu(), ft.grad.cpu()

    def kernel(lg, k, ts):
        with ops.backend(impl[1]):
            return ops.topk_select(lg, k, ts)

    for got, want in zip(run(kernel), run(topk_select_reference)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Q,C,K", [(2, 300, 80, 300), (2, 100, 20, 300), (1, 5, 3, 15),
                                     (3, 40, 7, 33)])
def test_detections_match_reference(impl, dtype, B, Q, C, K):
    device, name = impl
    if (device, name) == ("cpu", "triton") and Q * C > 5000:
        pytest.skip("full-size post-processing takes minutes in the interpreter; runs on CUDA")
    g = torch.Generator().manual_seed(Q + C)
    # large logits saturate the sigmoid: equal scores from unequal logits must tie by index
    logits = (torch.randn(B, Q, C, generator=g) * 12).to(dtype)
    boxes = torch.rand(B, Q, 4, generator=g).to(dtype)
    sizes = torch.tensor([[480, 640], [1333, 800], [7, 9]])[:B]
    with ops.backend(name):
        s, lab, xyxy = ops.topk_detections(logits.to(device), boxes.to(device),
                                           sizes.to(device), K)
    ws, wl, wx = topk_detections_reference(logits, boxes, sizes, K)
    assert torch.equal(s.cpu(), ws) and torch.equal(lab.cpu(), wl)
    assert xyxy.dtype == wx.dtype
    # bfloat16 pixel boxes: a few ulps (one ulp is 8 px at 1333) from where the intermediate
    # roundings fall (seen in the Triton interpreter); scores and labels above are exact
    tol = dict(rtol=0.025, atol=0.0) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(xyxy.cpu(), wx, **tol)


def test_select_compiles_without_graph_breaks(impl):
    device, name = impl
    logits = torch.randn(2, 300, 6, device=device)
    feats = torch.randn(2, 300, 8, device=device)
    # the backend's function, picked outside the compiled region: dynamo cannot trace the
    # ContextVar that ops.backend(...) sets (a limitation of _backend.select, not of the op)
    with ops.backend(name):
        select = _backend.select("topk_select", device)

    def f(lg, ft):
        s, i, (g,) = select(lg, 50, [ft])
        return s * 2, i, g + 1

    eager = f(logits, feats)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(logits, feats)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_opcheck(impl):
    device, name = impl
    if name == "triton":
        select = torch.ops.rtdetr_fast.topk_select_indices_triton
        dets = torch.ops.rtdetr_fast.topk_detections_triton
    else:
        select = torch.ops.rtdetr_fast.topk_select_indices
        dets = torch.ops.rtdetr_fast.topk_detections
    ops.available_backends(device)  # registers the native op's fake and autograd
    logits = torch.randn(2, 40, 3, device=device, requires_grad=True)
    torch.library.opcheck(select, (logits, 12))
    scores = torch.rand(2, 10, 4, device=device)
    boxes = torch.rand(2, 10, 4, device=device)
    sizes = torch.tensor([[100, 200], [30, 40]], device=device)
    torch.library.opcheck(dets, (scores, boxes, sizes, 9))


def test_k_checked_with_clear_error(impl):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, N=5\]"):
        _select(impl, torch.randn(1, 5, 2), 6)


def test_postprocessor_uses_the_op(impl):
    from rtdetr_fast.model.postprocess import PostProcessor

    device, name = impl
    g = torch.Generator().manual_seed(5)
    out = {"pred_logits": torch.randn(2, 30, 5, generator=g).to(device),
           "pred_boxes": torch.rand(2, 30, 4, generator=g).to(device)}
    sizes = torch.tensor([[480, 640], [64, 32]])
    with ops.backend(name):
        got = PostProcessor(num_top_queries=20)(out, sizes)
    want_s, want_l, want_b = topk_detections_reference(
        out["pred_logits"].cpu(), out["pred_boxes"].cpu(), sizes, 20)
    for b, det in enumerate(got):
        assert torch.equal(det["scores"].cpu(), want_s[b])
        assert torch.equal(det["labels"].cpu(), want_l[b])
        torch.testing.assert_close(det["boxes"].cpu(), want_b[b])


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["native", "triton"])
def test_cuda_graph_capture(name):
    if not _backend.extension_has("topk_select_indices", "cuda") and name == "native":
        pytest.skip("extension has no CUDA kernel")
    logits = torch.randn(4, 8400, 80, device="cuda", dtype=torch.float16)
    with ops.backend(name):
        want = ops.topk_select(logits, 300)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            ops.topk_select(logits, 300)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = ops.topk_select(logits, 300)
    graph.replay()
    graph.replay()  # the kernel must leave its workspace reusable
    torch.cuda.synchronize()
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.cuda
@pytest.mark.parametrize("B,N", [(1, 8400), (8, 8400), (1, 33600), (32, 33600)])
def test_cuda_full_size(B, N):
    if not _backend.extension_has("topk_select_indices", "cuda"):
        pytest.skip("extension has no CUDA kernel")
    g = torch.Generator().manual_seed(N + B)
    logits = torch.randn(B, N, 80, generator=g).half()
    logits[:, ::7] = logits[:, 3:4]     # exact ties in the selected range
    want_s, want_i, _ = topk_select_reference(logits, 300)
    for name in ("native", "triton"):
        with ops.backend(name):
            s, i, _ = ops.topk_select(logits.cuda(), 300)
        assert torch.equal(i.cpu(), want_i) and torch.equal(s.cpu(), want_s), name
