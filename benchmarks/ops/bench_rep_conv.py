"""Folded RepConv (3x3 conv + bias + SiLU) at the CCFF shapes, float16 channels_last.

Implementations: ``native`` (CUDA mma.sync kernel, fused epilogue), ``triton`` (implicit GEMM,
fused epilogue), ``cudnn_bias_then_silu`` (F.conv2d with bias, then a separate F.silu: what the
fused epilogue replaces), ``training_form`` (the un-folded RepVggBlock in eval mode: 3x3 conv-BN +
1x1 conv-BN + add + SiLU). Targets (benchmark, not test): fused >= 1.1x cuDNN + SiLU, >= 2.5x the
training form. Each case records ms per call, TFLOP/s (2*B*H*W*C_out*9*C_in flops) and that as a
fraction of the measured float16 matrix ceiling (a large torch.matmul on the same GPU).

GPU cases skip without CUDA. The CPU cases put the reference (torch's convolution + SiLU) beside
the native CPU kernel (Winograd F(4x4, 3x3)) at the detector's layer sizes, float32 NCHW.

RTDETR_FAST_BENCH_QUICK=1 (the GPU suite's quick mode): C=256 at 80x80 and 20x20, B in {8, 32},
5 rounds on the GPU; one CPU shape.
Run: python -m pytest benchmarks/ops/bench_rep_conv.py --benchmark-columns=min,median
"""
import os

import pytest
import torch
import torch.nn.functional as F

from rtdetr_fast import ops
from rtdetr_fast.model.encoder import RepVggBlock

REPS = 20  # launches per timed call, so one host synchronisation is amortised
QUICK = os.environ.get("RTDETR_FAST_BENCH_QUICK") == "1"
CHANNELS = [256] if QUICK else [256, 384]  # 384: R101's CCFF
MAPS = [80, 20] if QUICK else [80, 40, 20]
BATCHES = [8, 32] if QUICK else [1, 8, 32]
IMPLS = ["native", "triton", "cudnn_bias_then_silu", "training_form"]


def _flops(B, C_in, C_out, H, W):
    return 2.0 * B * H * W * C_out * 9 * C_in


@pytest.fixture(scope="session")
def matrix_ceiling_tflops():
    """The measured float16 dense-matmul rate: the ceiling TFLOP/s are reported against."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2.0 * n ** 3 * 20 / (start.elapsed_time(end) * 1e-3) / 1e12


def _case(impl, B, C, HW, device, dtype):
    torch.manual_seed(0)
    block = RepVggBlock(C, C, act="silu").to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for branch in (block.conv1, block.conv2):
            branch.norm.running_var.uniform_(0.5, 2.0)
            branch.norm.running_mean.uniform_(-0.5, 0.5)
    block = block.to(memory_format=torch.channels_last)
    x = torch.randn(B, C, HW, HW, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    if impl == "training_form":
        return lambda: block(x)
    block.fold()
    w, b = block.conv.weight, block.conv.bias
    if impl == "cudnn_bias_then_silu":
        return lambda: F.silu(F.conv2d(x, w, b, padding=1))
    if impl == "reference":
        return lambda: ops.rep_conv(x, w, b, "silu")

    def run():
        with ops.backend(impl):
            return ops.rep_conv(x, w, b, "silu")
    return run


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("HW", MAPS)
@pytest.mark.parametrize("C", CHANNELS)
def test_rep_conv_gpu(benchmark, matrix_ceiling_tflops, impl, C, HW, B):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if impl not in ("cudnn_bias_then_silu", "training_form") and \
            impl not in ops.available_backends("cuda", "rep_conv"):
        pytest.skip(f"backend {impl} is not available")
    fn = _case(impl, B, C, HW, "cuda", torch.float16)

    def timed():
        with torch.inference_mode():
            for _ in range(REPS):
                fn()
        torch.cuda.synchronize()

    timed()  # autotuning and first-call compilation stay out of the timing
    benchmark.pedantic(timed, rounds=5 if QUICK else 10, warmup_rounds=1 if QUICK else 2,
                       iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, no timing
        return
    ms = benchmark.stats.stats.median / REPS * 1e3
    tflops = _flops(B, C, C, HW, HW) / (ms * 1e-3) / 1e12
    benchmark.extra_info.update(
        impl=impl, shape=f"B={B} C_in=C_out={C} {HW}x{HW}", dtype="float16 channels_last",
        ms_per_call=round(ms, 4), tflops=round(tflops, 1),
        matrix_ceiling_tflops=round(matrix_ceiling_tflops, 1),
        fraction_of_ceiling=round(tflops / matrix_ceiling_tflops, 3),
        gpu=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda,
        triton=_triton_version())


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


CPU_SHAPES = ([(64, 160)] if QUICK else
              [(32, 320), (64, 160), (128, 80), (256, 40), (512, 20)])  # stem, backbone, CCFF


@pytest.mark.parametrize("impl", ["reference", "native"])
@pytest.mark.parametrize("C,HW", CPU_SHAPES, ids=[f"C{c}-{hw}x{hw}" for c, hw in CPU_SHAPES])
def test_rep_conv_cpu(benchmark, impl, C, HW):
    """CPU, float32 NCHW, batch 1: the reference (torch's oneDNN convolution, then SiLU) against
    the native CPU kernel (Winograd F(4x4, 3x3); layers narrower than its min_channels run the
    reference there too, which the extra info records)."""
    from rtdetr_fast.ops.rep_conv import winograd

    if impl not in ops.available_backends("cpu", "rep_conv"):
        pytest.skip(f"backend {impl} is not available")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, C, HW, HW, generator=g)
    w = torch.randn(C, C, 3, 3, generator=g) / (3 * C ** 0.5)
    b = torch.randn(C, generator=g)

    def run():
        with torch.inference_mode(), ops.backend(impl):
            return ops.rep_conv(x, w, b, "silu")

    out = benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    assert out.shape == (1, C, HW, HW)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, no timing
        return
    ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(
        impl=impl, kernel="winograd" if impl == "native" and C >= winograd.min_channels(x.dtype)
        else "torch conv", shape=f"B=1 C_in=C_out={C} {HW}x{HW}", dtype="float32",
        device="cpu", ms_per_call=round(ms, 3),
        direct_gflops=round(_flops(1, C, C, HW, HW) / (ms * 1e-3) / 1e9, 1),
        threads=torch.get_num_threads(), torch=torch.__version__)
