"""Deformable attention with value_proj after the sampling (deploy() on the CPU): the same
function as projecting every memory token first, and the mass term it needs (the op's output
for a value of ones) computed exactly."""
from __future__ import annotations

import copy

import pytest
import torch

from rtdetr_fast import RTDETR, ops
from rtdetr_fast.model.decoder import MSDeformableAttention, sampled_mass

SHAPES = [(7, 9), (4, 5), (2, 3)]
STARTS = [0, 63, 83]
S = 89


def _locations(shape, dtype):
    """Uniform over [-0.3, 1.3] plus the edge cases: the outer cell edges 0 and 1, centres of
    the first and last cells, just past the range test, NaN and +-inf."""
    loc = torch.rand(*shape, dtype=dtype) * 1.6 - 0.3
    flat = loc.view(-1)
    special = torch.tensor([0.0, 1.0, 0.5 / 9, 1 - 0.5 / 9, -0.5 / 9, 1 + 0.5 / 9, -0.06, 1.06,
                            float("nan"), float("inf"), -float("inf")], dtype=dtype)
    idx = torch.randperm(flat.numel())[:4 * special.numel()]
    flat[idx] = special.repeat(4)
    return loc


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("per_level", [False, True], ids=["LxP", "num_points_list"])
def test_sampled_mass_is_the_op_on_ones(method, per_level):
    torch.manual_seed(0)
    B, Q, H = 2, 13, 3
    points = [2, 3, 1]
    if per_level:
        loc = _locations((B, Q, H, sum(points), 2), torch.float64)
        w = torch.rand(B, Q, H, sum(points), dtype=torch.float64)
        kw = {"num_points_list": points}
    else:
        loc = _locations((B, Q, H, 3, 2, 2), torch.float64)
        w = torch.rand(B, Q, H, 3, 2, dtype=torch.float64)
        kw = {}
    ones = torch.ones(B, S, H, 1, dtype=torch.float64)
    want = ops.ms_deform_attn(ones, SHAPES, STARTS, loc, w, method=method, **kw)
    got = sampled_mass(SHAPES, loc, w, kw.get("num_points_list"), method)
    assert got.shape == (B, Q, H)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the edge cases are there and decide something: some samples weigh less than their
    # attention weight (partly or wholly outside), and none weighs more
    if method == "default":
        full = w.flatten(3).sum(-1)
        assert (got < full - 1e-6).any() and (got <= full + 1e-12).all()


def _attention(version, method, points):
    torch.manual_seed(1)
    attn = MSDeformableAttention(embed_dim=24, num_heads=3, num_levels=3, num_points=points,
                                 version=version, method=method).double().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)  # nonzero biases, offsets that reach outside the image
    return attn


@pytest.mark.parametrize("version,method,points", [
    ("v1", "default", 2), ("v2", "default", [2, 3, 1]), ("v2", "discrete", [2, 3, 1])])
def test_project_after_sampling_is_the_same_function(version, method, points):
    attn = _attention(version, method, points)
    late = copy.deepcopy(attn)
    late.project_after_sampling = True
    B, Q = 2, 11
    query = torch.randn(B, Q, 24, dtype=torch.float64)
    ref = torch.cat([torch.rand(B, Q, 1, 2), torch.rand(B, Q, 1, 2) * 0.8 + 0.1], -1).double()
    memory = torch.randn(B, S, 24, dtype=torch.float64)
    with torch.no_grad():
        want = attn(query, ref, memory, SHAPES, STARTS)
        got = late(query, ref, memory, SHAPES, STARTS)
        got32 = late.float()(query.float(), ref.float(), memory.float(), SHAPES, STARTS)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got32, want.float(), rtol=1e-5, atol=1e-5)


def test_project_after_sampling_applies_in_eval_mode_only():
    attn = _attention("v1", "default", 2)
    late = copy.deepcopy(attn)
    late.project_after_sampling = True
    attn.train()
    late.train()
    calls = []
    late.value_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    query = torch.randn(1, 5, 24, dtype=torch.float64)
    ref = torch.rand(1, 5, 1, 4, dtype=torch.float64)
    memory = torch.randn(1, S, 24, dtype=torch.float64)
    assert torch.equal(late(query, ref, memory, SHAPES, STARTS),
                       attn(query, ref, memory, SHAPES, STARTS))
    assert calls == [(1, S, 24)]  # training projects every memory token, as the official
    late.eval()
    calls.clear()
    late(query, ref, memory, SHAPES, STARTS)
    assert calls == []  # eval with the flag reads value_proj's weights, never calls it


def test_deploy_sets_it_on_the_cpu_and_export_keeps_the_projection_first():
    from rtdetr_fast.export import DeployModel

    model = RTDETR.from_name("rtdetr_r18vd", num_classes=3, hidden_dim=32, dim_feedforward=64,
                             num_queries=10, num_denoising=0, num_decoder_layers=2).eval()
    layers = [m for m in model.modules() if isinstance(m, MSDeformableAttention)]
    assert len(layers) == 2 and not any(m.project_after_sampling for m in layers)
    exported = DeployModel(model)
    assert not any(m.project_after_sampling for m in exported.modules()
                   if isinstance(m, MSDeformableAttention))
    assert not exported.model.backbone.winograd_stem  # no extension op in the exported stem
    model.deploy()
    assert all(m.project_after_sampling for m in layers)
