"""Top-K query selection and detection post-processing against the eager chain.

``eager`` is what the official decoder runs: amax over classes, torch.topk, then an index
repeat and gather per tensor (logits, boxes, features); post-processing is sigmoid, topk over
queries x classes, label/query arithmetic and a box gather. Backends run through
``ops.topk_select`` / ``ops.topk_detections``. Target on a GPU (benchmark, not test): >= 3x the
eager chain at every B. GPU cases skip without CUDA; a small CPU case runs everywhere.

RTDETR_FAST_BENCH_QUICK=1 (the GPU suite's quick mode): B in {8, 32}, N=8400, 10 rounds.
Run: python -m pytest benchmarks/ops/bench_topk_select.py --benchmark-columns=min,median
"""
import os

import pytest
import torch

from rtdetr_fast import ops

K, C, D = 300, 80, 256


def _eager_select(logits, boxes, feats):
    _, idx = torch.topk(logits.amax(-1), K, dim=1)
    out = [t.gather(1, idx.unsqueeze(-1).repeat(1, 1, t.shape[-1])) for t in (logits, boxes, feats)]
    return idx, out


def _eager_detections(logits, boxes, sizes):
    scores, index = torch.topk(torch.sigmoid(logits).flatten(1), K, dim=-1)
    labels = index % logits.shape[-1]
    q = index // logits.shape[-1]
    b = boxes.gather(1, q.unsqueeze(-1).repeat(1, 1, 4))
    cx, cy, w, h = b.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    return scores, labels, xyxy * sizes.flip(1).repeat(1, 2).unsqueeze(1)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _impls(device):
    return ["eager"] + [b for b in ops.available_backends(device, "topk_select")]


QUICK = os.environ.get("RTDETR_FAST_BENCH_QUICK") == "1"
GPU_ROUNDS = 10 if QUICK else 20
GPU_B = (8, 32) if QUICK else (1, 8, 32)


def _rand(fn, shape, g, device):
    # made on the device: a B=32 batch made on the host and copied takes longer than the runs
    return fn(*shape, generator=g, device=device)


CASES = ([pytest.param("cpu", 1, 8400, id="cpu-B1-N8400")]
         + [pytest.param("cuda", B, N, id=f"cuda-B{B}-N{N}",
                         marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device"))
            for B in GPU_B for N in ((8400,) if QUICK else (8400, 33600))])


@pytest.mark.parametrize("device,B,N", CASES)
@pytest.mark.parametrize("impl", ["eager", "native", "triton", "reference"])
def test_select(benchmark, device, B, N, impl):
    if impl != "eager" and impl not in ops.available_backends(device, "topk_select"):
        pytest.skip(f"{impl} not available on {device}")
    g = torch.Generator(device=device).manual_seed(0)
    logits = _rand(torch.randn, (B, N, C), g, device)
    boxes = _rand(torch.rand, (B, N, 4), g, device)
    feats = _rand(torch.randn, (B, N, D), g, device)

    def run():
        if impl == "eager":
            _eager_select(logits, boxes, feats)
        else:
            with ops.backend(impl):
                ops.topk_select(logits, K, [logits, boxes, feats])
        _sync(device)

    benchmark.extra_info.update(op="topk_select", device=device, B=B, N=N, C=C, K=K, impl=impl,
                                dtype="float32", torch=torch.__version__)
    benchmark.pedantic(run, rounds=GPU_ROUNDS if device == "cuda" else 5, warmup_rounds=2)


DET_CASES = ([pytest.param("cpu", 1, id="cpu-B1")]
             + [pytest.param("cuda", B, id=f"cuda-B{B}",
                             marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                      reason="needs a CUDA device"))
                for B in GPU_B])


@pytest.mark.parametrize("device,B", DET_CASES)
@pytest.mark.parametrize("impl", ["eager", "native", "triton", "reference"])
def test_detections(benchmark, device, B, impl):
    if impl != "eager" and impl not in ops.available_backends(device, "topk_detections"):
        pytest.skip(f"{impl} not available on {device}")
    g = torch.Generator(device=device).manual_seed(0)
    logits = _rand(torch.randn, (B, 300, C), g, device)
    boxes = _rand(torch.rand, (B, 300, 4), g, device)
    sizes = torch.tensor([[640, 640]] * B, device=device)

    def run():
        if impl == "eager":
            _eager_detections(logits, boxes, sizes)
        else:
            with ops.backend(impl):
                ops.topk_detections(logits, boxes, sizes, K)
        _sync(device)

    benchmark.extra_info.update(op="topk_detections", device=device, B=B, Q=300, C=C, K=K,
                                impl=impl, dtype="float32", torch=torch.__version__)
    benchmark.pedantic(run, rounds=GPU_ROUNDS if device == "cuda" else 5, warmup_rounds=2)
