#!/usr/bin/env python
"""Build an FP16 TensorRT engine from the exported ONNX and compare its detections with PyTorch.

    python scripts/trt_build.py --checkpoint best.pth --engine model.engine
    python scripts/trt_build.py --onnx model.onnx --checkpoint best.pth --size 640 640

TensorRT 10 API. ONE optimisation profile covers batch --min-batch..--max-batch (1-32 by
default) for BOTH inputs, ``images`` [B,3,H,W] and ``orig_target_sizes`` [B,2] (the official
script pins the second to batch 1, which breaks batched engines); H and W are fixed at --size.
LayerNormalization layers are kept in FP32 (TensorRT warns that an FP16 layer norm after
attention can overflow). The engine is then run at several batch sizes and compared with the
PyTorch model on the GPU (float32 eager): top scores, labels and boxes.

Without --onnx the model (from --checkpoint, else a random --preset) is exported first with
``rtdetr_fast.export.export_onnx``. Needs a CUDA GPU, the ``tensorrt`` package (10.x) and a CUDA
build of torch. The script imports tensorrt only when it runs, so it can be imported (and its
--help read) anywhere; without tensorrt it exits with status 2 and one line on stderr.

Status: written against the TensorRT 10 Python API but NOT yet run: the machine it was
written on has no GPU and no TensorRT. ``scripts/gpu_suite.sh`` runs it where tensorrt imports.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

EXIT_USAGE = 2


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--onnx", help="an ONNX file written by `rtdetr-fast export` (default: "
                                  "export the model first)")
    p.add_argument("--checkpoint", help="weights of the model to export and compare with")
    p.add_argument("--preset", default="rtdetr_r18vd", help="preset without --checkpoint")
    p.add_argument("--engine", default="model.engine", help="the serialized engine to write")
    p.add_argument("--size", nargs=2, type=int, default=[640, 640], metavar=("H", "W"))
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--fp32", action="store_true", help="build without FP16")
    p.add_argument("--no-grid-sample", action="store_true",
                   help="export the deformable attention as gathers (no GridSample)")
    p.add_argument("--workspace-gib", type=float, default=4.0)
    p.add_argument("--compare-batches", nargs="*", type=int, default=None,
                   help="batches to compare at (default: min, opt and max batch)")
    p.add_argument("--top", type=int, default=10, help="top detections compared per image")
    return p.parse_args(argv)


def load_model(args):
    from rtdetr_fast import RTDETR

    if args.checkpoint:
        return RTDETR.from_pretrained(args.checkpoint).eval()
    return RTDETR.from_name(args.preset).eval()


def build_engine(trt, onnx_path: str, args) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                 int(args.workspace_gib * (1 << 30)))
    if not args.fp32:
        if not builder.platform_has_fast_fp16:
            print("trt_build: this GPU has no fast FP16; building anyway", file=sys.stderr)
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        kept = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                kept += 1
        print(f"trt_build: FP16 with {kept} normalization layers kept in FP32")
    H, W = args.size
    b0, b1, b2 = args.min_batch, args.opt_batch, args.max_batch
    profile = builder.create_optimization_profile()
    # the same batch range for BOTH inputs: one engine serves every batch in it
    profile.set_shape("images", (b0, 3, H, W), (b1, 3, H, W), (b2, 3, H, W))
    profile.set_shape("orig_target_sizes", (b0, 2), (b1, 2), (b2, 2))
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    print(f"trt_build: engine built in {time.perf_counter() - start:.0f} s "
          f"(batch {b0}-{b2}, opt {b1}, {H}x{W}, {'fp32' if args.fp32 else 'fp16'})")
    return bytes(serialized)


class EngineRunner:
    """Runs a deserialized engine on torch CUDA tensors (execute_async_v3)."""

    def __init__(self, trt, serialized: bytes):
        import torch

        self.torch = torch
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(serialized)
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {trt.float32: torch.float32, trt.float16: torch.float16,
                       trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}

    def __call__(self, images, orig_target_sizes) -> Dict[str, "torch.Tensor"]:
        torch, trt = self.torch, self.trt
        inputs = {"images": images.contiguous(),
                  "orig_target_sizes": orig_target_sizes.contiguous()}
        for name, t in inputs.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.names:
            if self.engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = self.dtypes[self.engine.get_tensor_dtype(name)]
            outputs[name] = torch.empty(shape, dtype=dtype, device=images.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return outputs


def compare(engine_out, torch_out, top: int) -> Dict[str, float]:
    """Top-``top`` detections of the engine against PyTorch: each engine detection matched to
    a PyTorch detection of the same label with the closest score."""
    labels, boxes, scores = (engine_out[k].float() for k in ("labels", "boxes", "scores"))
    rlabels, rboxes, rscores = (t.float() for t in torch_out)
    score_diff = (scores[:, :top] - rscores[:, :top]).abs().max().item()
    box_err, matched, total = 0.0, 0, 0
    for b in range(labels.shape[0]):
        for i in range(top):
            total += 1
            same = rlabels[b] == labels[b, i]
            if not same.any():
                continue
            j = int(((rscores[b] - scores[b, i]).abs() + (~same) * 1e9).argmin())
            if abs(float(rscores[b, j] - scores[b, i])) <= 0.02:
                matched += 1
                box_err = max(box_err, float((rboxes[b, j] - boxes[b, i]).abs().max()))
    return {"max_top_score_diff": score_diff, "matched": matched / max(total, 1),
            "max_box_diff_px": box_err}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        import tensorrt as trt
    except ImportError:
        print("trt_build: error: the tensorrt package (TensorRT 10) is not installed",
              file=sys.stderr)
        return EXIT_USAGE
    import torch

    if not torch.cuda.is_available():
        print("trt_build: error: no CUDA device visible to torch", file=sys.stderr)
        return EXIT_USAGE
    if not trt.__version__.startswith("10."):
        print(f"trt_build: warning: written for TensorRT 10, found {trt.__version__}",
              file=sys.stderr)
    if not 1 <= args.min_batch <= args.opt_batch <= args.max_batch:
        print("trt_build: error: need 1 <= --min-batch <= --opt-batch <= --max-batch",
              file=sys.stderr)
        return EXIT_USAGE
    from rtdetr_fast.export import DeployModel, check_size, example_inputs, export_onnx

    size = check_size(tuple(args.size))
    model = load_model(args)
    onnx_path = args.onnx
    if onnx_path is None:
        onnx_path = os.path.splitext(args.engine)[0] + ".onnx"
        summary = export_onnx(model, onnx_path, size=size, batch=1,
                              grid_sample=not args.no_grid_sample, verify=False)
        print(f"trt_build: exported {onnx_path} (opset {summary['opset']})")
    serialized = build_engine(trt, onnx_path, args)
    with open(args.engine, "wb") as f:
        f.write(serialized)
    print(f"trt_build: wrote {args.engine} ({len(serialized) / 2**20:.1f} MiB)")

    runner = EngineRunner(trt, serialized)
    deploy = DeployModel(model, grid_sample=not args.no_grid_sample).cuda()
    batches = args.compare_batches or sorted({args.min_batch, args.opt_batch, args.max_batch})
    ok = True
    for batch in batches:
        torch.manual_seed(batch)
        images, sizes = example_inputs(size, batch, device="cuda")
        with torch.no_grad():
            ref = deploy(images, sizes)
        out = runner(images, sizes)
        res = compare(out, ref, args.top)
        good = res["matched"] >= 0.9 and res["max_top_score_diff"] <= 0.02
        ok &= good
        print(f"trt_build: batch {batch}: top-{args.top} score diff "
              f"{res['max_top_score_diff']:.2e}, matched {100 * res['matched']:.0f}%, box diff "
              f"{res['max_box_diff_px']:.2f} px -> {'ok' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
