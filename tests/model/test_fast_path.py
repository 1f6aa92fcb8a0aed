"""rtdetr_fast.compile: deploy + whole-graph torch.compile; equal to eager within the dtype's
tolerance (CPU: inductor with freezing on a tiny model; CUDA: float16 + CUDA graphs)."""
from __future__ import annotations

import copy

import pytest
import torch

import rtdetr_fast
from rtdetr_fast import RTDETR

from conftest import randomize_batch_norms

TINY = dict(hidden_dim=32, dim_feedforward=64, num_queries=20, num_denoising=0,
            num_decoder_layers=2)


def tiny_model():
    torch.manual_seed(0)
    model = RTDETR.from_name("rtdetr_r18vd", num_classes=5, **TINY).eval()
    randomize_batch_norms(model)
    return model


def test_compile_cpu_inductor_equals_eager():
    model = tiny_model()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        want = model(x)
    torch._dynamo.reset()
    fast = rtdetr_fast.compile(copy.deepcopy(model))
    assert fast.model.deployed and fast.dtype == torch.float32
    got = fast(x)
    got2 = fast(x)
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got2[k], got[k])


def test_cpu_bfloat16_autocast_deployed_and_compiled():
    """The documented CPU bfloat16 path: the deployed convs meet bfloat16 activations under
    autocast (ops.rep_conv casts as autocast does for conv2d; it raised a dtype mismatch
    before). The encoder's features stay within bfloat16 rounding of float32 eval mode, and
    rtdetr_fast.compile(..., dtype=torch.bfloat16) runs the whole forward to finite outputs.
    (Detections are not compared: random weights leave near-ties in the top-K.)"""
    model = tiny_model()
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        want = model.encoder(model.backbone(x))
        deployed = copy.deepcopy(model).deploy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = deployed.encoder(deployed.backbone(x))
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert (g.float() - w).abs().max().item() <= 0.03 * w.abs().max().item()
    torch._dynamo.reset()
    fast = rtdetr_fast.compile(copy.deepcopy(model), dtype=torch.bfloat16)
    out = fast(x)
    assert out["pred_boxes"].shape == (1, 20, 4)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_compile_rejects_float16_on_cpu():
    with pytest.raises(ValueError, match="float16"):
        rtdetr_fast.compile(tiny_model(), dtype=torch.float16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compile_cuda_half_with_cuda_graphs_equals_eager(dtype):
    model = tiny_model().cuda()
    x = torch.rand(2, 3, 128, 128, device="cuda")
    with torch.no_grad():
        want = model(x)
    torch._dynamo.reset()
    fast = rtdetr_fast.compile(copy.deepcopy(model), dtype=dtype)
    assert fast.cuda_graphs
    for _ in range(3):  # warm-up, record, replay
        got = fast(x)
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"], rtol=tol, atol=tol)
    torch.testing.assert_close(got["pred_logits"], want["pred_logits"], rtol=tol, atol=5 * tol)
