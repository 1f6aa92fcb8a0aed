"""deploy(): RepConv and every batch norm folded into its conv, outputs unchanged to float64
rounding; memory-format choice."""
from __future__ import annotations

import copy

import pytest
import torch

from rtdetr_fast import RTDETR
from rtdetr_fast.model.norms import FrozenBatchNorm2d

from conftest import randomize_batch_norms

TINY = dict(hidden_dim=32, dim_feedforward=64, num_queries=20, num_denoising=0,
            num_decoder_layers=2)


def norms(model):
    return [m for m in model.modules()
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]


@pytest.mark.parametrize("frozen", [False, True], ids=["bn", "frozen-bn"])
def test_deploy_folds_every_batch_norm_float64(frozen):
    torch.manual_seed(0)
    model = RTDETR.from_name("rtdetr_r18vd", num_classes=5, **TINY,
                             **{"backbone.freeze_norm": frozen}).double().eval()
    randomize_batch_norms(model)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == frozen
    n_before = len(norms(model))
    x = torch.rand(2, 3, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        model.deploy()
        assert norms(model) == []
        sd = model.state_dict()
        after = model(x)
        model.deploy()  # idempotent
        again = model(x)
    assert n_before > 50
    assert sd.keys() == model.state_dict().keys()
    assert not any(".norm." in k for k in sd if k.startswith(("backbone", "encoder")))
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(after[k], before[k], rtol=1e-10, atol=1e-10)
        assert torch.equal(again[k], after[k])


def test_deploy_memory_format():
    torch.manual_seed(0)
    model = RTDETR.from_name("rtdetr_r18vd", num_classes=5, **TINY).eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        want = model(x)
        cl = copy.deepcopy(model).deploy(torch.channels_last)
        auto = copy.deepcopy(model).deploy()  # the CPU default: contiguous
        got_cl, got_auto = cl(x), auto(x)
    w = cl.backbone.conv1.conv1_1.conv.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert auto.backbone.conv1.conv1_1.conv.weight.is_contiguous()
    for got in (got_cl, got_auto):
        torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="memory_format"):
        copy.deepcopy(model).deploy("fast")


def test_deploy_float32_runs_winograd_and_keeps_features():
    """At the detector's real widths the deployed CPU forward runs the Winograd RepConv kernel
    for its wide 3x3 convs (backbone and encoder) and a channels_last stem; the encoder's
    features stay within float32 rounding of eval mode's. (Final detections are not compared
    in float32: with random weights near-tied scores can swap places in the top-K.)"""
    from torch.profiler import profile

    from rtdetr_fast.ops.rep_conv import winograd

    if not winograd.available():
        pytest.skip("rtdetr_fast._C not built")
    torch.manual_seed(0)
    model = RTDETR.from_name("rtdetr_r18vd", num_classes=5).eval()
    randomize_batch_norms(model)
    x = torch.rand(1, 3, 160, 192)
    with torch.no_grad():
        want = model.encoder(model.backbone(x))
        model.deploy()
        assert model.backbone.fast_stem
        # the stem's 32-channel convs take the kernel where its AVX-512 build runs
        stem = model.backbone.winograd_stem
        assert stem == (winograd.min_channels(torch.float32) <= 32)
        with profile() as prof:
            got = model.encoder(model.backbone(x))
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("rtdetr_fast::winograd_conv3x3", 0) >= 15 + 2 * stem
    assert counts.get("rtdetr_fast::max_pool_3x3_s2", 0) == int(stem)
    for g, w in zip(got, want):
        assert g.is_contiguous()
        assert (g - w).abs().max().item() <= 1e-4 * w.abs().max().item()
