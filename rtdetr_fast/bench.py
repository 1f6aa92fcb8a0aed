"""``rtdetr-fast bench``: wall-clock of the model and of each op on every available backend.

A quick look, not a benchmark suite: the pytest-benchmark files under benchmarks/ are the
measurements to report."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch

from . import RTDETR, ops


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after one warm-up."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _op_cases(device: torch.device, batch: int) -> Dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    B, Q, H, D, L, P = batch, 300, 8, 32, 3, 4
    shapes = torch.tensor([[80, 80], [40, 40], [20, 20]], device=device)
    starts = torch.tensor([0, 6400, 8000], device=device)
    value = torch.rand(B, 8400, H, D, generator=g).to(device)
    loc = torch.rand(B, Q, H, L, P, 2, generator=g).to(device)
    w = torch.rand(B, Q, H, L, P, generator=g).to(device)
    logits = torch.randn(B, 8400, 80, generator=g).to(device)
    boxes = torch.rand(B, 8400, 4, generator=g).to(device)
    q_logits = torch.randn(B, 300, 80, generator=g).to(device)
    q_boxes = torch.rand(B, 300, 4, generator=g).to(device)
    sizes = torch.tensor([[640, 640]] * B, device=device)
    x = torch.randn(B, 128, 40, 40, generator=g).to(device)
    weight = torch.randn(128, 128, 3, 3, generator=g).to(device)
    bias = torch.randn(128, generator=g).to(device)
    return {
        "ms_deform_attn S=8400 Q=300": lambda: ops.ms_deform_attn(value, shapes, starts, loc, w),
        "topk_select N=8400 C=80 K=300": lambda: ops.topk_select(logits, 300, [boxes]),
        "topk_detections Q=300 C=80": lambda: ops.topk_detections(q_logits, q_boxes, sizes, 300),
        "rep_conv 128ch 40x40": lambda: ops.rep_conv(x, weight, bias, "silu"),
    }


def run_bench(preset: str = "rtdetr_r18vd", size: int = 640, batch: int = 1,
              device: str = "cpu", repeats: int = 5, set_overrides=None) -> List[tuple]:
    dev = torch.device(device)
    rows = []
    with torch.inference_mode():
        for name, case in _op_cases(dev, batch).items():
            op = name.split()[0]
            # Triton on CPU is its interpreter, far too slow to time
            for be in [b for b in ops.available_backends(dev, op)
                       if not (b == "triton" and dev.type == "cpu")]:
                with ops.backend(be):
                    rows.append((name, be, _time(case, dev, repeats)))
        model = RTDETR.from_name(preset, **(set_overrides or {})).to(dev).eval()
        x = torch.rand(batch, 3, size, size, device=dev)
        rows.append((f"{preset} {size}x{size} B={batch}", "auto, eval",
                     _time(lambda: model(x), dev, repeats)))
        model.deploy()
        rows.append((f"{preset} {size}x{size} B={batch}", "auto, deploy",
                     _time(lambda: model(x), dev, repeats)))
    width = max(len(r[0]) for r in rows)
    print(f"device {dev}, torch {torch.__version__}, batch {batch}, float32, median of {repeats}")
    print(f"{'what':<{width}}  {'backend':<14}{'ms':>10}")
    for name, be, ms in rows:
        print(f"{name:<{width}}  {be:<14}{ms:>10.2f}")
    return rows
