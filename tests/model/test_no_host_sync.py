"""The inference forward reads no tensor data on the host: the level table travels as Python
ints, anchors and position embeddings come from caches made on the device. Checked on the CPU
under FakeTensorMode (a host read of a fake tensor raises) and torch.compile(fullgraph=True)
(a host read is a graph break); on CUDA with the sync debug mode set to error and a whole-model
CUDA graph."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

from rtdetr_fast import RTDETR, ops
from rtdetr_fast.model.shapes import ShapeCache, feature_size

from conftest import randomize_batch_norms

TINY = dict(hidden_dim=32, dim_feedforward=64, num_queries=20, num_denoising=0,
            num_decoder_layers=2)


def tiny_model(**kw) -> RTDETR:
    torch.manual_seed(0)
    model = RTDETR.from_name("rtdetr_r18vd", num_classes=5, **{**TINY, **kw}).eval()
    randomize_batch_norms(model)
    return model


def test_eval_forward_under_fake_tensor_mode():
    model = tiny_model()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.rand(2, 3, 96, 128)
        with torch.no_grad():
            out = model(x)
        assert is_fake(out["pred_logits"])
    assert tuple(out["pred_logits"].shape) == (2, 20, 5)
    assert tuple(out["pred_boxes"].shape) == (2, 20, 4)
    # nothing fake was kept for later real forwards
    for cache in (model.decoder._anchor_cache, model.encoder._pos_cache):
        assert len(cache) == 0


def test_host_read_under_fake_mode_is_caught():
    """The check above can fail: the op's tensor form reads the host, and that raises."""
    value = torch.rand(1, 5, 1, 4)
    loc, attn = torch.rand(1, 2, 1, 1, 1, 2), torch.rand(1, 2, 1, 1, 1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        ss = torch.tensor([[1, 5]])
        with pytest.raises(Exception):
            ops.ms_deform_attn(value, ss, torch.tensor([0]), loc, attn)
        out = ops.ms_deform_attn(value, [(1, 5)], [0], loc, attn)
    assert tuple(out.shape) == (1, 2, 4)


def test_compile_fullgraph_equals_eager():
    model = tiny_model()
    x = torch.rand(1, 3, 96, 96)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = model(x)
        got = compiled(x)
        got_other_size = compiled(torch.rand(1, 3, 128, 96))
    torch.testing.assert_close(got["pred_logits"], want["pred_logits"])
    torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"])
    assert tuple(got_other_size["pred_boxes"].shape) == (1, 20, 4)


def test_int_and_tensor_level_tables_agree():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    value = torch.randn(2, 26, 2, 8, generator=g, dtype=torch.float64)
    loc = torch.rand(2, 3, 2, 2, 2, 2, generator=g, dtype=torch.float64)
    attn = torch.rand(2, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    want = ops.ms_deform_attn(value, torch.tensor(shapes), torch.tensor([0, 20]), loc, attn)
    for starts in ([0, 20], None):
        got = ops.ms_deform_attn(value, shapes, starts, loc, attn)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="level_start_index must be"):
        ops.ms_deform_attn(value, shapes, [0, 21], loc, attn)
    with pytest.raises(ValueError, match=r"spatial_shapes must be \[L, 2\]"):
        ops.ms_deform_attn(value, [(4, 5)], [0], loc, attn)


def test_shape_cache_is_a_bounded_lru_that_keeps_pinned_shapes():
    made = []

    def make(tag):
        return lambda: made.append(tag) or torch.zeros(1)

    cache = ShapeCache(maxsize=3, pinned=[(8, 8)])
    cache.get((8, 8), "cpu", torch.float32, make("pin"))
    for s in range(10):
        cache.get((s, s), "cpu", torch.float32, make(s))
        assert len(cache) <= 3
    assert ((8, 8), torch.device("cpu"), torch.float32) in cache.keys()
    n = len(made)
    cache.get((8, 8), "cpu", torch.float32, make("again"))
    cache.get((9, 9), "cpu", torch.float32, make("again"))  # most recent: still there
    assert len(made) == n
    cache.get((8, 8), "cpu", torch.float64, make("other dtype"))
    assert made[-1] == "other dtype"


def test_model_caches_pin_the_eval_size_and_stay_bounded():
    model = tiny_model(eval_spatial_size=(96, 96))
    assert feature_size((96, 96), 32) == (3, 3) and feature_size((100, 70), 8) == (13, 9)
    with torch.no_grad():
        model(torch.rand(1, 3, 96, 96))
        anchors = model.decoder._anchor_cache.keys()
        pos = model.encoder._pos_cache.keys()
        for k in range(12):
            model(torch.rand(1, 3, 96 + 32 * (k + 1), 96))
    assert len(model.decoder._anchor_cache) <= 8 and len(model.encoder._pos_cache) <= 8
    assert set(anchors) <= set(model.decoder._anchor_cache.keys())
    assert set(pos) <= set(model.encoder._pos_cache.keys())
    # and a hit is the same tensor: no work per forward
    a = model.decoder.anchors_for([(12, 12), (6, 6), (3, 3)], "cpu")
    b = model.decoder.anchors_for([(12, 12), (6, 6), (3, 3)], "cpu")
    assert a[0] is b[0]


def test_cached_anchors_and_embeddings_equal_the_uncached_ones():
    model = tiny_model()
    shapes = [(12, 10), (6, 5), (3, 3)]
    anchors, valid = model.decoder.generate_anchors(shapes)
    a, v = model.decoder.anchors_for(shapes, "cpu")
    assert torch.equal(a, anchors) and torch.equal(v, valid.float())
    a64, _ = model.decoder.anchors_for(shapes, "cpu", torch.float64)
    assert torch.equal(a64, anchors.double())
    from rtdetr_fast.model.encoder import sincos_position_embedding
    pe = model.encoder.position_embedding(5, 3, "cpu", torch.float64)
    assert torch.equal(pe, sincos_position_embedding(5, 3, 32, 10000.0).double())


# ---------------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_forward_without_sync_and_in_a_cuda_graph(dtype):
    model = tiny_model().cuda().to(dtype)
    x = torch.rand(2, 3, 128, 128, device="cuda", dtype=dtype)
    with torch.no_grad():
        eager = model(x)  # fills the caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        torch.testing.assert_close(again["pred_boxes"], eager["pred_boxes"])
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(static_x)
        static_x.copy_(torch.rand_like(x))
        graph.replay()
        torch.cuda.synchronize()
        want = model(static_x)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(captured["pred_logits"], want["pred_logits"], **tol)
    torch.testing.assert_close(captured["pred_boxes"], want["pred_boxes"], **tol)
