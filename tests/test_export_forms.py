"""The ops' export switch and the model's shape-driven tables, which every exporter traces
through the model's own forward: under the switch each op runs its export form, and the
position embedding and anchors follow the traced size instead of the size traced at."""
import pytest
import torch

from rtdetr_fast import RTDETR, ops
from rtdetr_fast.model.position import generate_anchors, sincos_position_embedding
from rtdetr_fast.ops._export import export_forms
from rtdetr_fast.ops.ms_deform_attn.export import (deform_attn_discrete, deform_attn_gather,
                                                   deform_attn_grid_sample)

SHAPES, COUNTS = [(4, 6), (3, 2), (1, 5)], [2, 3, 1]


def msda_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Q, H, D = 2, 5, 2, 3
    S, N = sum(h * w for h, w in SHAPES), sum(COUNTS)
    starts = [0, 24, 30]
    value = torch.randn(B, S, H, D, generator=g)
    loc = torch.rand(B, Q, H, N, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(B, Q, H, N, generator=g)
    return value, starts, loc, weights


@pytest.mark.parametrize("method, grid_sample, form", [
    ("default", True, deform_attn_grid_sample),
    ("default", False, deform_attn_gather),
    ("discrete", True, deform_attn_discrete),
    ("discrete", False, deform_attn_discrete),
])
def test_ms_deform_attn_takes_its_export_form_under_the_switch(method, grid_sample, form):
    value, starts, loc, weights = msda_inputs()
    with export_forms(grid_sample=grid_sample):
        ours = ops.ms_deform_attn(value, SHAPES, starts, loc, weights, num_points_list=COUNTS,
                                  method=method)
    assert torch.equal(ours, form(value, SHAPES, loc, weights, num_points_list=COUNTS))
    # the kernels outside the switch compute the same function
    ref = ops.ms_deform_attn(value, SHAPES, starts, loc, weights, num_points_list=COUNTS,
                             method=method)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_the_forms_differ_where_they_should():
    """Bilinear and discrete sampling give different results on these inputs, so the test
    above tells the forms apart."""
    value, _, loc, weights = msda_inputs()
    a = deform_attn_gather(value, SHAPES, loc, weights, num_points_list=COUNTS)
    b = deform_attn_discrete(value, SHAPES, loc, weights, num_points_list=COUNTS)
    assert (a - b).abs().max() > 1e-2


def test_topk_ops_take_torch_topk_under_the_switch(monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 40, 3, generator=g)
    rows = torch.randn(2, 40, 4, generator=g)
    boxes = torch.rand(2, 40, 4, generator=g)
    sizes = torch.tensor([[480, 640], [100, 200]])
    calls = []
    real_topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **k: calls.append(1) or real_topk(*a, **k))
    with export_forms():
        scores, idx, (picked,) = ops.topk_select(logits, 7, [rows])
        det = ops.topk_detections(logits, boxes, sizes, 9)
    assert len(calls) == 2
    monkeypatch.undo()
    ref_scores, ref_idx, (ref_picked,) = ops.topk_select(logits, 7, [rows])
    assert torch.equal(idx, ref_idx) and torch.equal(scores, ref_scores)
    assert torch.equal(picked, ref_picked)
    for ours, ref in zip(det, ops.topk_detections(logits, boxes, sizes, 9)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_the_switch_is_off_outside_the_block():
    from rtdetr_fast.ops import _export

    with export_forms(grid_sample=False) as forms:
        assert _export.current is forms and not forms.grid_sample
        assert ops._backend.current() == "reference"
    assert _export.current is None


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return RTDETR.from_name("rtdetr_r18vd", num_classes=3, hidden_dim=32, dim_feedforward=64,
                            num_queries=10, num_denoising=0, num_decoder_layers=1).eval()


def test_traced_tables_follow_the_input_size(tiny):
    """The position embedding and the anchors traced at one feature size give the tables of
    another size: the size stays a graph value (nothing baked in by the trace)."""
    def tables(x):
        h, w = x.shape[-2:]
        pos = tiny.encoder.position_embedding(w, h, x.device, x.dtype)
        anchors, valid = tiny.decoder.anchors_for([(h, w), (h // 2, w // 2)], x.device)
        return pos, anchors, valid

    with torch.no_grad():
        traced = torch.jit.trace(tables, torch.zeros(1, 1, 4, 6), check_trace=False)
        for h, w in [(4, 6), (6, 2), (8, 10)]:
            ours = traced(torch.zeros(1, 1, h, w))
            ref = (sincos_position_embedding(w, h, 32, tiny.encoder.pe_temperature),
                   *generate_anchors([(h, w), (h // 2, w // 2)], tiny.decoder.eps))
            for a, b in zip(ours, ref):
                assert torch.equal(a, b.to(a.dtype)), (h, w)
    # a trace never fills the caches
    assert (6, 2) not in [k[0] for k in tiny.encoder._pos_cache.keys()]


def test_eager_tables_are_cached_and_equal_the_shared_functions(tiny):
    pe = tiny.encoder.position_embedding(5, 3, "cpu", torch.float32)
    assert pe is tiny.encoder.position_embedding(5, 3, "cpu", torch.float32)
    assert torch.equal(pe, sincos_position_embedding(5, 3, 32, tiny.encoder.pe_temperature))
    anchors, valid = tiny.decoder.anchors_for([(4, 4), (2, 2)], "cpu")
    ref_anchors, ref_valid = generate_anchors([(4, 4), (2, 2)], tiny.decoder.eps)
    assert torch.equal(anchors, ref_anchors) and torch.equal(valid, ref_valid.float())
