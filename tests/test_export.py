"""Export: one ONNX file against the PyTorch eager model at several batch sizes and image sizes,
in both deformable-attention forms; the graph contract; torch.export; bad requests.

The models are narrowed rtdetr_r18vd (hidden width 64, 30 queries) with trained-looking batch
norms, so each export takes seconds; the RT-DETRv2 tests narrow rtdetrv2_r18vd the same way,
with the v2 decoder options (per-level point counts, offset scale, discrete sampling,
class-agnostic query selection). Tests that run ONNX Runtime skip when it is not installed
(``pip install ".[export]"``; the test extra installs it).
"""
import io
import contextlib
import warnings

import pytest
import torch

from rtdetr_fast import RTDETR
from rtdetr_fast.cli import main
from rtdetr_fast.export import (DeployModel, ExportError, check_opset, check_size, export_onnx,
                                export_program, example_inputs)
from rtdetr_fast.model.encoder import RepVggBlock

from conftest import randomize_batch_norms

SMALL = dict(num_classes=5, hidden_dim=64, dim_feedforward=128, num_queries=30,
             num_denoising=10, num_top_queries=50, eval_spatial_size=(128, 128))
TINY_CLI = ["--preset", "rtdetr_r18vd", "--num-classes", "5", "--set", "hidden_dim=64",
            "dim_feedforward=128", "num_queries=30", "num_top_queries=50"]
# traced at one size and batch, run at others: nothing may be baked in
TRACE_SIZE, TRACE_BATCH = (160, 128), 2
RUNS = [(1, (640, 640)), (3, (640, 640)), (1, (480, 800)), (3, (480, 800))]


def trained_looking(model):
    """Batch-norm statistics and box heads as a trained model has them (the box heads' last
    layers start at zero, which would make every box its reference point)."""
    randomize_batch_norms(model)
    g = torch.Generator().manual_seed(1)
    dec = model.decoder
    with torch.no_grad():
        for mlp in [dec.enc_bbox_head, *dec.dec_bbox_head]:
            w = mlp.layers[-1].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return trained_looking(RTDETR.from_name("rtdetr_r18vd", **SMALL).eval())


def eager_detections(model, images, wh):
    """The PyTorch model and its post-processor (image sizes as (H, W)): labels, boxes, scores."""
    with torch.no_grad():
        dets = model.postprocess(model(images), wh.flip(-1))
    return tuple(torch.stack([d[k] for d in dets]) for k in ("labels", "boxes", "scores"))


def assert_same_detections(ours, ref, top=20):
    labels, boxes, scores = ours
    rlabels, rboxes, rscores = ref
    assert labels.dtype == torch.int64 and labels.shape == rlabels.shape
    assert boxes.shape == rboxes.shape and scores.shape == rscores.shape
    torch.testing.assert_close(scores, rscores, atol=1e-4, rtol=0)
    # each of the top detections is one of the reference's: same label, score within 1e-4, box
    # within 0.05 px (detections whose scores differ by float noise may trade places)
    for b in range(labels.shape[0]):
        for i in range(top):
            match = (rlabels[b] == labels[b, i]) & ((rscores[b] - scores[b, i]).abs() <= 1e-4)
            assert match.any(), f"image {b} rank {i}: no detection of label {labels[b, i]}"
            err = (rboxes[b][match] - boxes[b, i]).abs().amax(-1).min()
            assert err <= 0.05, f"image {b} rank {i}: box off by {float(err):.3f} px"


@pytest.fixture(scope="module")
def onnx_files(small, tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx")
    files = {}
    for form, grid_sample in (("grid_sample", True), ("gather", False)):
        path = out / f"{form}.onnx"
        summary = export_onnx(small, path, size=TRACE_SIZE, batch=TRACE_BATCH,
                              grid_sample=grid_sample)
        # the built-in check ran at the trace size
        assert summary["max_score_diff"] < 1e-4 and summary["label_agreement"] > 0.9
        files[form] = path
    return files


@pytest.mark.parametrize("form", ["grid_sample", "gather"])
def test_one_onnx_file_equals_eager_at_every_batch_and_size(small, onnx_files, form):
    import onnxruntime as ort

    from rtdetr_fast.export import run_onnx

    sess = ort.InferenceSession(str(onnx_files[form]), providers=["CPUExecutionProvider"])
    for batch, size in RUNS:
        images, wh = example_inputs(size, batch)
        assert_same_detections(run_onnx(sess, images, wh), eager_detections(small, images, wh))


def test_graph_contract_and_forms(onnx_files):
    import onnx

    elem = onnx.TensorProto
    for form, path in onnx_files.items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        ops = {n.op_type for n in model.graph.node}
        assert ("GridSample" in ops) == (form == "grid_sample"), form
        assert "TopK" in ops
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
        assert not [o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")]
        ins = {i.name: i.type.tensor_type for i in model.graph.input}
        outs = {o.name: o.type.tensor_type for o in model.graph.output}
        assert list(ins) == ["images", "orig_target_sizes"]
        assert list(outs) == ["labels", "boxes", "scores"]
        assert ins["images"].elem_type == elem.FLOAT
        assert ins["orig_target_sizes"].elem_type == elem.INT64
        assert outs["labels"].elem_type == elem.INT64
        assert outs["boxes"].elem_type == elem.FLOAT and outs["scores"].elem_type == elem.FLOAT
        dims = ins["images"].shape.dim
        assert len(dims) == 4 and dims[1].dim_value == 3
        # batch, H and W are symbolic, not the traced values
        assert all(dims[i].dim_param and not dims[i].dim_value for i in (0, 2, 3))
        assert ins["orig_target_sizes"].shape.dim[0].dim_param
        assert len(outs["boxes"].shape.dim) == 3 and outs["boxes"].shape.dim[2].dim_value == 4


def test_orig_target_sizes_are_w_h(small, onnx_files):
    from rtdetr_fast.export import run_onnx

    images, _ = example_inputs((128, 128), 1)
    labels, boxes, scores = run_onnx(onnx_files["gather"], images, torch.tensor([[1000, 10]]))
    ref = eager_detections(small, images, torch.tensor([[1000, 10]]))
    torch.testing.assert_close(boxes[:, :10], ref[1][:, :10], atol=0.05, rtol=0)
    assert boxes[..., 0::2].max() > 100 and boxes[..., 1::2].max() <= 10 + 1e-3


@pytest.mark.parametrize("opset", [16, 20])
def test_other_opsets(small, tmp_path, opset):
    pytest.importorskip("onnxruntime")
    import onnx

    path = tmp_path / "m.onnx"
    summary = export_onnx(small, path, opset=opset, size=(128, 128), batch=1)
    assert summary["max_score_diff"] < 1e-4 and summary["label_agreement"] > 0.9
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    # traced at batch 1 (the command's default), run at batch 3 and another size
    from rtdetr_fast.export import run_onnx

    images, wh = example_inputs((256, 192), 3)
    assert_same_detections(run_onnx(path, images, wh), eager_detections(small, images, wh))


def test_deploy_model_equals_eager_and_leaves_the_model_alone(tmp_path):
    torch.manual_seed(0)
    model = trained_looking(RTDETR.from_name("rtdetr_r18vd", **SMALL))  # training mode
    with pytest.warns(UserWarning, match="training mode; exporting its eval mode"):
        deploy = DeployModel(model)
    assert model.training and not model.deployed
    assert deploy.model.deployed and not deploy.training
    deploy.train()  # the deploy module stays in eval mode
    assert not any(m.training for m in deploy.modules())
    model.eval()
    for batch, size in [(2, (128, 160)), (1, (256, 256))]:
        images, wh = example_inputs(size, batch)
        with torch.no_grad():
            ours = deploy(images, wh)
        assert_same_detections(ours, eager_detections(model, images, wh))
    assert not any(isinstance(m, RepVggBlock) and not m.deployed for m in deploy.modules())


def test_torch_export_dynamic_batch_and_size(small):
    program = export_program(small, size=(128, 128), batch=2, grid_sample=False)
    run = program.module()
    for batch, size in [(1, (128, 128)), (3, (192, 96))]:
        images, wh = example_inputs(size, batch)
        with torch.no_grad():
            assert_same_detections(run(images, wh), eager_detections(small, images, wh))
    # plain aten ops only: no op of this package's extension in the program
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "rtdetr_fast" in t]


# ------------------------------------------------------------------------------ RT-DETRv2
# narrowed rtdetrv2_r18vd models with the v2 decoder options; traced at TRACE_SIZE, batch
# TRACE_BATCH and run at other batches and at a size other than the traced one
V2_MODELS = {
    "points_363": {"decoder.num_points": (3, 6, 3)},
    "discrete_agnostic": {"decoder.cross_attn_method": "discrete",
                          "decoder.query_select_method": "agnostic"},
}
V2_RUNS = [(1, (160, 128)), (3, (160, 128)), (1, (128, 192)), (3, (128, 192))]


def v2_model(**options):
    """A narrowed v2 model, trained-looking, with query-dependent sampling offsets and
    attention weights (a new model's offsets are its biases only)."""
    torch.manual_seed(0)
    model = trained_looking(RTDETR.from_name("rtdetrv2_r18vd", **SMALL, **options).eval())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.decoder.decoder.layers:
            for lin in (layer.cross_attn.sampling_offsets, layer.cross_attn.attention_weights):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def v2_models():
    return {name: v2_model(**options) for name, options in V2_MODELS.items()}


@pytest.fixture(scope="module")
def v2_onnx_files(v2_models, tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx_v2")
    files = {}
    for name, model in v2_models.items():
        path = out / f"{name}.onnx"
        # the 363 file in the GridSample form; the discrete model's sampling is gathers in
        # either form, asked for GridSample here to show it
        summary = export_onnx(model, path, size=TRACE_SIZE, batch=TRACE_BATCH, grid_sample=True)
        assert summary["max_score_diff"] < 1e-4 and summary["label_agreement"] > 0.9
        files[name] = (path, summary)
    return files


def test_v2_models_have_the_options(v2_models):
    attn = v2_models["points_363"].decoder.decoder.layers[0].cross_attn
    assert attn.num_points_list == [3, 6, 3] and not attn._v1_math
    dec = v2_models["discrete_agnostic"].decoder
    assert dec.decoder.layers[0].cross_attn.method == "discrete"
    assert dec.enc_score_head.out_features == 1  # one class-agnostic score per anchor


@pytest.mark.parametrize("name", list(V2_MODELS))
def test_v2_onnx_file_equals_eager_at_every_batch_and_size(v2_models, v2_onnx_files, name):
    import onnxruntime as ort

    from rtdetr_fast.export import run_onnx

    model = v2_models[name]
    sess = ort.InferenceSession(str(v2_onnx_files[name][0]), providers=["CPUExecutionProvider"])
    for batch, size in V2_RUNS:
        images, wh = example_inputs(size, batch)
        assert_same_detections(run_onnx(sess, images, wh), eager_detections(model, images, wh))


def test_v2_onnx_forms(v2_onnx_files):
    import onnx

    for name, (path, summary) in v2_onnx_files.items():
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        discrete = name == "discrete_agnostic"
        # discrete sampling is a gather even though the GridSample form was asked for
        assert ("GridSample" in ops) == (not discrete), name
        assert "TopK" in ops and "Gather" in ops
        assert summary["deform_attn"] == ("discrete gathers" if discrete else "GridSample")


def test_v2_discrete_sampling_changes_the_detections(v2_models):
    """The tests above would see a discrete model exported with bilinear sampling: on the same
    weights the bilinear model's detections differ by more than the tolerance."""
    model = v2_models["discrete_agnostic"]
    bilinear = RTDETR.from_name("rtdetrv2_r18vd", **SMALL,
                                **{"decoder.query_select_method": "agnostic"}).eval()
    bilinear.load_state_dict(model.state_dict())
    images, wh = example_inputs((160, 128), 2)
    ours, ref = eager_detections(bilinear, images, wh), eager_detections(model, images, wh)
    assert (ours[2] - ref[2]).abs().max() > 1e-3


@pytest.mark.parametrize("options", [
    {},
    {"decoder.num_points": (3, 6, 3)},
    {"decoder.num_points": (2, 2, 2), "decoder.offset_scale": 0.3},
    {"decoder.offset_scale": 0.75},
    {"decoder.cross_attn_method": "discrete"},
    {"decoder.cross_attn_method": "discrete", "decoder.num_points": (3, 6, 3)},
    {"decoder.query_select_method": "agnostic"},
], ids=["v2", "363", "222_scale0.3", "scale0.75", "discrete", "discrete_363", "agnostic"])
@pytest.mark.parametrize("grid_sample", [True, False], ids=["gs", "gather"])
def test_v2_deploy_model_equals_eager(options, grid_sample):
    """The export module itself (what every exporter traces) for each v2 option, both forms."""
    model = v2_model(**options)
    deploy = DeployModel(model, grid_sample=grid_sample)
    for batch, size in [(2, (128, 160)), (1, (192, 128))]:
        images, wh = example_inputs(size, batch)
        with torch.no_grad():
            ours = deploy(images, wh)
        assert_same_detections(ours, eager_detections(model, images, wh))


def test_v2_discrete_form_equals_the_reference_op():
    """deform_attn_discrete against ops' reference on non-square levels, per-level counts,
    cells on the rounding edges, outside [0, 1] and non-finite locations: equal."""
    from rtdetr_fast.export import deform_attn_discrete
    from rtdetr_fast.ops.ms_deform_attn import ms_deform_attn_reference

    g = torch.Generator().manual_seed(0)
    shapes, counts = [(4, 6), (3, 2), (1, 5)], [2, 3, 1]
    B, Q, H, D = 2, 5, 2, 3
    S, N = sum(h * w for h, w in shapes), sum(counts)
    value = torch.randn(B, S, H, D, generator=g)
    loc = torch.rand(B, Q, H, N, 2, generator=g) * 1.4 - 0.2
    loc[0, 0, 0, 0] = torch.tensor([0.5 / 6, 1.5 / 4])  # x*W + 0.5 and y*H + 0.5 whole
    loc[0, 0, 0, 1] = torch.tensor([float("nan"), float("inf")])
    loc[0, 0, 1, 2] = torch.tensor([-float("inf"), 1.0])
    loc[1, 1, 0, 5] = torch.tensor([1.0, 0.0])
    weights = torch.rand(B, Q, H, N, generator=g)
    starts = [0, 24, 30]
    padded_loc = torch.stack([torch.nn.functional.pad(t, (0, 0, 0, 3 - t.shape[3]))
                              for t in loc.split(counts, 3)], 3)
    padded_w = torch.stack([torch.nn.functional.pad(t, (0, 3 - t.shape[3]))
                            for t in weights.split(counts, 3)], 3)
    ref = ms_deform_attn_reference(value, shapes, starts, padded_loc, padded_w,
                                   method="discrete")
    ours = deform_attn_discrete(value, shapes, loc, weights, num_points_list=counts)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("name", list(V2_MODELS))
def test_v2_torch_export_equals_eager(v2_models, name):
    model = v2_models[name]
    program = export_program(model, size=(128, 128), batch=2, grid_sample=False)
    run = program.module()
    for batch, size in [(1, (160, 128)), (3, (128, 192))]:
        images, wh = example_inputs(size, batch)
        with torch.no_grad():
            assert_same_detections(run(images, wh), eager_detections(model, images, wh))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "rtdetr_fast" in t or "grid_sampler" in t]


@pytest.mark.parametrize("call, match", [
    (lambda m, p: export_onnx(m, p, size=(100, 128)), "not a multiple of 32"),
    (lambda m, p: export_onnx(m, p, size=(640, 650)), "not a multiple of 32"),
    (lambda m, p: export_onnx(m, p, opset=15), "opset 15 is not supported: choose 16-20"),
    (lambda m, p: export_onnx(m, p, opset=21), "opset 21 is not supported"),
    (lambda m, p: export_onnx(m, p, exporter="tracer"), "unknown exporter"),
    (lambda m, p: export_onnx(m, p, exporter="dynamo", opset=17), "opset 18 or newer"),
    (lambda m, p: export_onnx(m, p, batch=0), "batch must be a positive int"),
])
def test_bad_requests_are_one_line_errors(small, tmp_path, call, match):
    with pytest.raises(ExportError, match=match) as info:
        call(small, tmp_path / "m.onnx")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m.onnx").exists()


def test_checks():
    assert check_size(640) == (640, 640) and check_size((480, 800)) == (480, 800)
    assert check_opset(17) == 17
    with pytest.raises(ExportError):
        check_size((0, 32))


@pytest.mark.parametrize("argv, match", [
    (["--size", "100", "128"], "not a multiple of 32"),
    (["--opset", "21"], "opset 21 is not supported"),
    (["--format", "tflite"], "unknown format 'tflite'"),
    (["--exporter", "dynamo", "--opset", "17"], "opset 18 or newer"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, match):
    rc = main(["export", "--output", str(tmp_path / "m.onnx"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and len(err.splitlines()) == 1
    assert err.startswith("rtdetr-fast export: error:")


def test_cli_export_from_a_checkpoint(small, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    small.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "model.onnx"
    rc = main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "onnx",
               "--output", str(out), "--size", "128", "160", "--batch", "2",
               "--no-grid-sample"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "onnxruntime vs PyTorch at batch 2, 128x160" in text
    assert "GridSample" not in {n.op_type for n in onnx.load(str(out)).graph.node}
    from rtdetr_fast.export import run_onnx

    images, wh = example_inputs((256, 224), 2)
    assert_same_detections(run_onnx(out, images, wh), eager_detections(small, images, wh))


# the smallest model that still has every part: for the exporters that take minutes on a CPU
TINY = dict(num_classes=3, hidden_dim=32, dim_feedforward=64, nhead=4, num_queries=20,
            num_denoising=0, num_top_queries=30, num_decoder_layers=1,
            eval_spatial_size=(128, 128))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return trained_looking(RTDETR.from_name("rtdetr_r18vd", **TINY).eval())


@pytest.mark.slow
@pytest.mark.parametrize("grid_sample", [True, False])
def test_dynamo_exporter(tiny, tmp_path, grid_sample):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import onnx

    from rtdetr_fast.export import run_onnx

    path = tmp_path / "m.onnx"
    export_onnx(tiny, path, exporter="dynamo", opset=18, size=(128, 128), batch=2,
                grid_sample=grid_sample, verify=False)
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert ("GridSample" in {n.op_type for n in model.graph.node}) == grid_sample
    assert [i.name for i in model.graph.input] == ["images", "orig_target_sizes"]
    for batch, size in [(1, (128, 128)), (3, (192, 256))]:
        images, wh = example_inputs(size, batch)
        assert_same_detections(run_onnx(path, images, wh), eager_detections(tiny, images, wh))


AOTI_RUNNER = """
import sys, torch
run = torch._inductor.aoti_load_package(sys.argv[1])
inputs = torch.load(sys.argv[2])
torch.save([run(*args) for args in inputs], sys.argv[3])
assert not [m for m in sys.modules if m.startswith("rtdetr_fast")]
"""


@pytest.mark.slow
def test_aoti_package_runs_without_the_package_and_equals_eager(tiny, tmp_path):
    import subprocess
    import sys

    from rtdetr_fast.export import export_aoti

    package = export_aoti(tiny, tmp_path / "m.pt2", size=(128, 128), batch=2,
                          grid_sample=False)
    inputs = [example_inputs((128, 128), 1), example_inputs((192, 96), 3)]
    torch.save(inputs, tmp_path / "in.pt")
    # a fresh interpreter that never imports rtdetr_fast
    subprocess.run([sys.executable, "-c", AOTI_RUNNER, package, str(tmp_path / "in.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=tmp_path)
    outputs = torch.load(tmp_path / "out.pt")
    for (images, wh), out in zip(inputs, outputs):
        assert_same_detections(tuple(out), eager_detections(tiny, images, wh), top=10)


def test_trt_build_script_is_import_safe(capsys):
    """scripts/trt_build.py imports without TensorRT or a GPU; where tensorrt is missing it
    stops with one line and status 2 (the build itself runs only on a GPU machine)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "scripts" / "trt_build.py"
    spec = importlib.util.spec_from_file_location("trt_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.parse_args([])
    assert (args.min_batch, args.max_batch) == (1, 32) and args.size == [640, 640]
    if importlib.util.find_spec("tensorrt") is None:
        assert mod.main([]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "tensorrt" in err
