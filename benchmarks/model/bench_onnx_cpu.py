"""ONNX Runtime (CPU) against torch eager, whole detector with post-processing: 640x640, batch 1.

Every runner computes the exported graph's contract, images [1,3,640,640] in [0,1] and
orig_target_sizes [1,2] -> labels, boxes (pixels), scores:
  eager-eval    RTDETR in eval mode + its post-processor (native kernels), what `predict` runs
  eager-deploy  the same after model.deploy() (RepConv and batch norms folded)
  ort           the exported file (deformable attention as GridSample), onnxruntime CPU
  ort-gather    the file exported with grid_sample=False (no GridSample node)
The files are exported once per preset (torchscript exporter, opset 17) into a temporary folder.

Run: python -m pytest benchmarks/model/bench_onnx_cpu.py --benchmark-columns=min,median,mean
(or NAME=onnx-cpu SELECT=onnx bash scripts/cpu_bench.sh for a results file with its log).
"""
import pytest
import torch

from rtdetr_fast import RTDETR

ort = pytest.importorskip("onnxruntime")
export = pytest.importorskip("rtdetr_fast.export")

SIZE = (640, 640)
RUNNERS = ["eager-eval", "eager-deploy", "ort", "ort-gather"]


@pytest.fixture(scope="module", params=["rtdetr_r18vd", "rtdetr_r50vd"])
def setup(request, tmp_path_factory):
    torch.manual_seed(0)
    model = RTDETR.from_name(request.param).eval()
    folder = tmp_path_factory.mktemp(request.param)
    sessions = {}
    for name, grid in (("ort", True), ("ort-gather", False)):
        path = folder / f"{name}.onnx"
        export.export_onnx(model, path, size=SIZE, grid_sample=grid, verify=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    deployed = RTDETR.from_name(request.param).eval()
    deployed.load_state_dict(model.state_dict())
    deployed.deploy()
    return request.param, {"eager-eval": model, "eager-deploy": deployed}, sessions


@pytest.mark.parametrize("runner", RUNNERS)
def test_onnx_vs_eager_cpu(benchmark, setup, runner):
    preset, models, sessions = setup
    images, sizes = export.example_inputs(SIZE, 1)
    benchmark.extra_info.update(preset=preset, runner=runner, shape="1x3x640x640",
                                dtype="float32", threads=torch.get_num_threads(),
                                torch=torch.__version__, onnxruntime=ort.__version__)
    if runner.startswith("ort"):
        sess = sessions[runner]

        def run():
            return export.run_onnx(sess, images, sizes)
    else:
        model = models[runner]
        hw = sizes.flip(-1)  # the post-processor takes (H, W), the graph (w, h)

        def run():
            with torch.inference_mode():
                det = model.postprocessor(model(images), hw)[0]
            return det["labels"], det["boxes"], det["scores"]

    labels, boxes, scores = benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    assert boxes.shape[-2:] == (300, 4) and labels.shape[-1] == 300
    assert torch.isfinite(scores).all()
