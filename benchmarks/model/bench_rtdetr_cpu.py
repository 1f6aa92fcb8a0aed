"""CPU latency of the whole detector: 640x640, batch 1: eval mode (what the official model
computes), deploy mode (everything folded) and compiled (``rtdetr_fast.compile``: deploy, then
inductor with freezing; compiled in the warm-up round).

Run: python -m pytest benchmarks/model/bench_rtdetr_cpu.py --benchmark-columns=min,median,mean
"""
import pytest
import torch

from rtdetr_fast import RTDETR


@pytest.fixture(scope="module", params=["rtdetr_r18vd", "rtdetr_r50vd"])
def preset(request):
    return request.param


@pytest.mark.parametrize("mode", ["eval", "deploy", "compiled"])
def test_rtdetr_cpu_latency(benchmark, preset, mode):
    torch.manual_seed(0)
    model = RTDETR.from_name(preset).eval()
    if mode == "deploy":
        model.deploy()
    x = torch.rand(1, 3, 640, 640)
    if mode == "compiled":
        import rtdetr_fast

        model = rtdetr_fast.compile(model)
    benchmark.extra_info.update(preset=preset, mode=mode, shape="1x3x640x640", dtype="float32",
                                threads=torch.get_num_threads(), torch=torch.__version__)

    def run():
        with torch.inference_mode():
            return model(x)

    out = benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    assert out["pred_boxes"].shape == (1, 300, 4)
