"""Multi-scale deformable attention at RT-DETR decoder shapes (640x640: S=8400 over levels
80x80, 40x40, 20x20; H=8, D=32, L=3, P=4), forward and forward+backward, every backend.

CPU runs use B in {1, 8} (B=8, Q=300 is the speed-up target); GPU runs B in {1, 8, 32} and
report achieved GB/s against the bytes that must move (extra_info). The method benchmark puts
RT-DETRv2's discrete sampling beside the bilinear default (forward, Q=300).
RTDETR_FAST_BENCH_QUICK=1 (the GPU suite's quick mode): B in {8, 32} on the GPU (B=1 on the
CPU), Q=300, 10 rounds on the GPU."""
from __future__ import annotations

import os

import pytest
import torch

from rtdetr_fast import ops
from rtdetr_fast.ops import _backend

SHAPES = [(80, 80), (40, 40), (20, 20)]
H, D, L, P = 8, 32, 3, 4
S = sum(h * w for h, w in SHAPES)
HAS_CUDA = torch.cuda.is_available()
QUICK = os.environ.get("RTDETR_FAST_BENCH_QUICK") == "1"
GPU_ROUNDS = 10 if QUICK else 50


def _backends(device):
    return [b for b in ("reference", "native", "triton")
            if b in ops.available_backends(device, "ms_deform_attn")]


def _inputs(B, Q, dtype, device):
    # made on the device (a B=32 batch made on the host and copied takes longer than the runs)
    g = torch.Generator(device=device).manual_seed(0)
    value = torch.randn(B, S, H, D, generator=g, device=device).to(dtype)
    loc = torch.rand(B, Q, H, L, P, 2, generator=g, device=device).to(dtype)
    attn = torch.rand(B, Q, H, L, P, generator=g, device=device).softmax(-1).to(dtype)
    # the level table as host ints, as the model passes it (a tensor is read on the host per call)
    return value, list(SHAPES), [0, 6400, 8000], loc, attn


def _bytes_forward(B, Q, elem):
    # the floor: value read once, locations and weights read, output written
    return elem * (B * S * H * D + B * Q * H * L * P * 3 + B * Q * H * D)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


CASES = ([("cpu", B, Q, torch.float32) for B in ((1,) if QUICK else (1, 8))
          for Q in ((300,) if QUICK else (300, 500))] +
         [("cuda", B, Q, dt) for B in ((8, 32) if QUICK else (1, 8, 32))
          for Q in ((300,) if QUICK else (300, 500))
          for dt in (torch.float32, torch.float16, torch.bfloat16)])


def _params(keep=lambda device, B, Q, dtype: True):
    for device, B, Q, dtype in CASES:
        if not keep(device, B, Q, dtype):
            continue
        marks = [pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")] if device == "cuda" else []
        for backend in ("reference", "native", "triton"):
            yield pytest.param(device, B, Q, dtype, backend, marks=marks,
                               id=f"{device}-B{B}-Q{Q}-{str(dtype)[6:]}-{backend}")


@pytest.mark.parametrize("device,B,Q,dtype,backend", list(_params()))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_ms_deform_attn(benchmark, device, B, Q, dtype, backend, mode):
    if backend not in _backends(device):
        pytest.skip(f"{backend} not available on {device}")
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("CPU kernels are float32/float64")
    value, ss, starts, loc, attn = _inputs(B, Q, dtype, device)
    if mode == "fwd+bwd":
        value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
        grad = torch.randn(B, Q, H * D, device=device, dtype=dtype)

    def step():
        with ops.backend(backend):
            out = ops.ms_deform_attn(value, ss, starts, loc, attn)
            if mode == "fwd+bwd":
                torch.autograd.grad(out, (value, loc, attn), grad)
        _sync(device)

    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        step()  # warm-up: Triton compilation, lazy registration
        rounds = 3 if device == "cpu" else GPU_ROUNDS
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    elem = torch.finfo(dtype).bits // 8
    moved = _bytes_forward(B, Q, elem)
    if mode == "fwd+bwd":
        # backward reads grad_output, value, locations, weights; writes grad_value (float32
        # accumulation) and the location and weight gradients
        moved += elem * (B * Q * H * D + B * S * H * D) + 4 * B * S * H * D + \
            elem * B * Q * H * L * P * 3
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, no timing
        return
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__, cuda=torch.version.cuda, dtype=str(dtype), B=B, Q=Q, S=S, H=H,
        D=D, L=L, P=P, mode=mode, backend=backend, bytes=moved, gb_per_s=moved / mean / 1e9,
        threads=torch.get_num_threads())


def _method_params():
    # Q=300 only, and float32 only on the CPU
    return _params(lambda device, B, Q, dtype:
                   Q == 300 and (device != "cpu" or dtype == torch.float32))


@pytest.mark.parametrize("device,B,Q,dtype,backend", list(_method_params()))
@pytest.mark.parametrize("method", ["default", "discrete"])
def test_ms_deform_attn_method_forward(benchmark, device, B, Q, dtype, backend, method):
    """RT-DETRv2's sampling methods side by side, forward only: bilinear ("default", four
    value rows per point) against discrete (one row per point)."""
    if backend not in _backends(device):
        pytest.skip(f"{backend} not available on {device}")
    value, ss, starts, loc, attn = _inputs(B, Q, dtype, device)
    shapes = ss

    def step():
        with ops.backend(backend):
            ops.ms_deform_attn(value, shapes, starts, loc, attn, method=method)
        _sync(device)

    with torch.no_grad():
        step()  # warm-up: Triton compilation, lazy registration
        benchmark.pedantic(step, rounds=3 if device == "cpu" else GPU_ROUNDS, iterations=1,
                           warmup_rounds=1)
    elem = torch.finfo(dtype).bits // 8
    moved = _bytes_forward(B, Q, elem)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, no timing
        return
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__, cuda=torch.version.cuda, dtype=str(dtype), B=B, Q=Q, S=S, H=H,
        D=D, L=L, P=P, mode="fwd", method=method, backend=backend, bytes=moved,
        gb_per_s=moved / mean / 1e9, threads=torch.get_num_threads())
