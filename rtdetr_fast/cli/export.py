"""The ``rtdetr-fast export`` verb: its arguments and what it runs (see :mod:`rtdetr_fast.export`).

Every argument is checked before the model is built, and a bad one is a one-line error (the
command line turns :class:`~rtdetr_fast.export.ExportError`, a ValueError, into one line on
stderr and exit status 2).
"""
from __future__ import annotations

import os
import time

from ..config import list_presets
from . import _model
from ._checks import (DEFAULT_PRESET, check_checkpoint_path, check_int, check_output_file,
                      check_overrides)


def add_parser(sub):
    s = sub.add_parser("export", help="write an ONNX file (dynamic batch and image size)")
    s.add_argument("--checkpoint", help="weights to export (as for predict); without it a "
                                        "randomly initialised --preset")
    s.add_argument("--preset", default=None, choices=list_presets(),
                   help=f"model preset (default: {DEFAULT_PRESET}, or the checkpoint's)")
    s.add_argument("--num-classes", type=int, default=None,
                   help="class count of a model without checkpoint (default: 80)")
    s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model config overrides, e.g. num_top_queries=100")
    # checked by the command, not by argparse, so that a bad value is a one-line error
    s.add_argument("--format", default="onnx", help="output format: onnx")
    s.add_argument("--output", default="model.onnx", help="the file to write")
    s.add_argument("--opset", type=int, default=17, help="ONNX opset, 16-20")
    s.add_argument("--size", nargs=2, type=int, dest="export_size", metavar=("H", "W"),
                   help="example input for tracing and the check, multiples of 32 (default: "
                        "the model's eval size); the file serves every multiple of 32")
    s.add_argument("--batch", type=int, default=1,
                   help="example batch for tracing and the check; the file serves every batch")
    s.add_argument("--no-grid-sample", action="store_true",
                   help="deformable attention as gathers: no GridSample node in the graph "
                        "(a discrete-sampling RT-DETRv2 model is gathers either way)")
    s.add_argument("--exporter", default="torchscript",
                   help="torchscript (opsets 16-20, seconds) or dynamo (opsets 18-20, minutes)")
    s.add_argument("--no-verify", action="store_true",
                   help="skip the onnxruntime check against PyTorch after writing")
    s.set_defaults(device="cpu")
    return s


def check(args) -> None:
    check_overrides(args)
    check_int(args, "num_classes", 1)
    check_checkpoint_path(args.checkpoint)
    check_output_file(args.output, "--output")


def run(args) -> int:
    from ..export import (check_batch, check_exporter, check_format, check_opset, check_size,
                          export_onnx)

    check_format(args.format)
    check_opset(args.opset)
    check_exporter(args.exporter)
    check_batch(args.batch)
    size = check_size(tuple(args.export_size)) if args.export_size else None
    if args.exporter == "dynamo":
        from ..export import DYNAMO_MIN_OPSET, ExportError

        if args.opset < DYNAMO_MIN_OPSET:
            raise ExportError(f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or newer, "
                              f"got --opset {args.opset}")
    model = _model.build_model(args).eval()
    if size is None:
        size = check_size(tuple(model.config.eval_spatial_size))
    start = time.perf_counter()
    summary = export_onnx(model, args.output, opset=args.opset, size=size, batch=args.batch,
                          grid_sample=not args.no_grid_sample, exporter=args.exporter,
                          verify=not args.no_verify)
    form = summary["deform_attn"]
    if "GridSample" not in form:
        form += " (no GridSample)"
    print(f"wrote {summary['path']} ({os.path.getsize(summary['path']) / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - start:.1f} s: opset {summary['opset']}, "
          f"{summary['exporter']} exporter, deformable attention as {form}; dynamic batch and "
          f"H, W (multiples of 32)")
    if "max_score_diff" in summary:
        print(f"onnxruntime vs PyTorch at batch {args.batch}, {size[0]}x{size[1]}: max score "
              f"diff {summary['max_score_diff']:.2e}, max box diff "
              f"{summary['max_box_diff_px']:.2e} px, same labels "
              f"{100 * summary['label_agreement']:.1f}%")
    elif not args.no_verify:
        print('not checked: onnxruntime is not installed (pip install "rtdetr_fast[export]")')
    return 0
