"""GPU latency of the whole detector at 640x640: eager float32 (eval mode, what the official
model computes), deploy float16 (everything folded, channels_last) and compiled float16 with
CUDA graphs (``rtdetr_fast.compile(model, dtype=torch.float16)``; compiled and captured in the
warm-up). Inputs are made on the GPU. B in {8, 32}; the compiled mode runs B=8 only (each batch
size is its own compilation, a minute of the GPU suite's budget).

Run: python -m pytest benchmarks/model/bench_rtdetr_cuda.py --benchmark-columns=min,median
"""
import pytest
import torch

from rtdetr_fast import RTDETR

PRESETS = ["rtdetr_r18vd", "rtdetr_r50vd"]
CASES = [(mode, B) for mode in ("eager_fp32", "deploy_fp16") for B in (8, 32)] + \
        [("compiled_fp16_cuda_graphs", 8)]


@pytest.fixture(scope="module", params=PRESETS)
def preset(request):
    return request.param


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode,B", CASES, ids=[f"{m}-B{b}" for m, b in CASES])
def test_rtdetr_cuda_latency(benchmark, preset, mode, B):
    torch.manual_seed(0)
    model = RTDETR.from_name(preset).eval().cuda()
    x = torch.rand(B, 3, 640, 640, device="cuda")
    if mode == "deploy_fp16":
        model.deploy()
        model = model.half()
        x = x.half()
    elif mode == "compiled_fp16_cuda_graphs":
        import rtdetr_fast

        torch._dynamo.reset()
        model = rtdetr_fast.compile(model, dtype=torch.float16)
        assert model.cuda_graphs

    def run():
        with torch.inference_mode():
            out = model(x)
        torch.cuda.synchronize()
        return out

    for _ in range(3):  # compilation, CUDA-graph recording, first replay
        run()
    out = benchmark.pedantic(run, rounds=10, warmup_rounds=1, iterations=1)
    assert out["pred_boxes"].shape == (B, 300, 4)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, no timing
        return
    ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(
        preset=preset, mode=mode, B=B, impl=mode, shape=f"{B}x3x640x640", ms_per_call=round(ms, 3),
        images_per_s=round(B / ms * 1e3, 1), gpu=torch.cuda.get_device_name(0),
        torch=torch.__version__, cuda=torch.version.cuda)
