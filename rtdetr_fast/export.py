"""Deployment exports: ONNX with dynamic batch and image size, torch.export, AOTInductor.

Every exporter sees the same module, :class:`DeployModel`: the eval-mode detector with RepConv
folded and the post-processing inside, under the graph contract of the official RT-DETR export

    inputs   images             [B, 3, H, W] float32, RGB in [0, 1] (H, W multiples of 32)
             orig_target_sizes  [B, 2] int64, (w, h) of the original images in pixels
    outputs  labels             [B, K] int64
             boxes              [B, K, 4] float32, xyxy in those pixels
             scores             [B, K] float32 (sigmoid), sorted descending

with K = num_top_queries (300 by default). The graph is the model's own forward, traced: the
deployed eval-mode model (RepConv and batch norms folded) and its post-processor, run inside
the ops' export switch (``ops/_export.py``), under which each custom op takes its export form,
plain torch ops that every exporter translates (each written with its op):

- deformable attention (``ops/ms_deform_attn/export.py``): ``F.grid_sample`` per level (ONNX
  GridSample, opset >= 16), or with ``grid_sample=False`` a gather-based bilinear sampler
  (Gather, no GridSample node) for runtimes that lack or mis-compile GridSample. RT-DETRv2's
  options are the eager model's: per-level point counts, ``offset_scale`` and the
  ``num_points_scale`` buffer in the sampling locations, and ``cross_attn_method="discrete"``
  as a nearest-cell gather in both forms (no GridSample node);
- top-K query selection and the detections' top-K (``ops/topk_select/export.py``):
  ``torch.topk`` (ONNX TopK, which orders equal values by the lower index, as the eager ops
  do);
- RepConv: a plain 3x3 conv with bias after :meth:`RTDETR.deploy` folded it.

Everything shape-dependent (anchors, position embeddings, per-level sizes) is computed in the
graph from the input's shape (``model/position.py``: the model computes it there whenever an
exporter traces it), so no size is baked in by tracing: one file serves every batch size and
every image size that is a multiple of 32 (and gives at least ``num_queries`` anchors: 128x128
or larger for 300 queries).
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .ops._export import export_forms
# the deformable-attention export forms, importable from here
from .ops.ms_deform_attn.export import (deform_attn_discrete, deform_attn_gather,  # noqa: F401
                                        deform_attn_grid_sample, form_name)

__all__ = [
    "DeployModel",
    "ExportError",
    "export_onnx",
    "export_program",
    "export_aoti",
    "load_aoti",
    "deform_attn_grid_sample",
    "deform_attn_gather",
    "deform_attn_discrete",
    "DEFAULT_OPSET",
    "OPSETS",
    "EXPORTERS",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
]

DEFAULT_OPSET = 17
OPSETS = tuple(range(16, 21))
EXPORTERS = ("dynamo", "torchscript")
# the TorchScript-based exporter is the default: it writes opsets 16-17 natively and exports in
# seconds; the dynamo exporter's translations start at opset 18 (its conversion down to 17 fails
# on this graph) and it takes minutes on a CPU. Both give the same detections (tests).
DEFAULT_EXPORTER = "torchscript"
DYNAMO_MIN_OPSET = 18
FORMATS = ("onnx",)
SIZE_MULTIPLE = 32
INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")
# the sampling methods with an export form
_METHODS = ("default", "discrete")
# the largest batch and image side (in units of 32 px) the dynamic dimensions declare
MAX_BATCH = 1024
MAX_SIDE32 = 256


class ExportError(ValueError):
    """A bad export request (size, opset, format, exporter); the message is one line."""


# ------------------------------------------------------------------------------ validation
def check_size(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(H, W) from an int or a pair; both positive multiples of 32."""
    if isinstance(size, int):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) for s in size):
        raise ExportError(f"size must be (H, W) as two ints, got {size!r}")
    if not all(s >= SIZE_MULTIPLE and s % SIZE_MULTIPLE == 0 for s in size):
        raise ExportError(f"size {size[0]}x{size[1]} is not a multiple of {SIZE_MULTIPLE}: "
                          f"H and W must be positive multiples of {SIZE_MULTIPLE}")
    return size  # type: ignore[return-value]


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or opset not in OPSETS:
        raise ExportError(f"opset {opset!r} is not supported: choose {OPSETS[0]}-{OPSETS[-1]} "
                          f"(default {DEFAULT_OPSET})")
    return opset


def check_batch(batch: int) -> int:
    if not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch must be a positive int, got {batch!r}")
    return batch


def check_exporter(exporter: str) -> str:
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    return exporter


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return fmt


# ----------------------------------------------------------------------- the exported module
class DeployModel(nn.Module):
    """The exported graph: ``(images, orig_target_sizes) -> (labels, boxes, scores)``.

    Holds a deployed (RepConv-folded) eval-mode copy of ``model``; the caller's model is not
    changed. Its forward is the model's own forward followed by its post-processor, run inside
    the ops' export switch: the custom ops in their export forms, the shape-dependent tables
    computed from the input's shape when traced (see the module docstring). ``grid_sample``
    picks the bilinear deformable-attention form; a model with
    ``cross_attn_method="discrete"`` is exported as gathers either way (``deform_attn_form``
    names the form used).
    """

    def __init__(self, model: nn.Module, grid_sample: bool = True):
        super().__init__()
        if model.training:
            warnings.warn("export: the model is in training mode; exporting its eval mode "
                          "(RepConv folded, the final decoder layer's detections)", stacklevel=3)
        model = copy.deepcopy(model).float().eval()
        model.deploy()
        # the exported graph keeps value_proj before the sampling (the export forms and their
        # runtimes were measured that way) and plain aten ops in the stem (no extension op)
        for m in model.modules():
            if hasattr(m, "project_after_sampling"):
                m.project_after_sampling = False
        if hasattr(model.backbone, "winograd_stem"):
            model.backbone.winograd_stem = False
        # and the encoder's box head on every memory token before the top-K, as the exported
        # graph has always had it
        model.decoder.select_before_box_head = False
        self.model = model
        self.grid_sample = bool(grid_sample)
        # one sampling method per model (every decoder layer is a copy of one layer)
        methods = {layer.cross_attn.method for layer in model.decoder.decoder.layers}
        unknown = sorted(methods - set(_METHODS))
        if unknown:
            raise ExportError(f"no export form for cross_attn_method {unknown[0]!r}: the "
                              f"exporters know {', '.join(_METHODS)}")
        self.deform_attn_form = ", ".join(sorted(form_name(m, self.grid_sample)
                                                 for m in methods))
        self.num_top_queries = int(model.postprocessor.num_top_queries)
        self.eval()

    def train(self, mode: bool = True) -> "DeployModel":
        # always eval: torch.onnx.export restores the top module's mode recursively afterwards,
        # which would otherwise put the batch norms into training mode
        return super().train(False)

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with export_forms(grid_sample=self.grid_sample):
            out = self.model(images)
            # the graph takes (w, h), the post-processor (H, W)
            scores, labels, boxes = self.model.postprocessor.detections(
                out["pred_logits"], out["pred_boxes"], orig_target_sizes.flip(-1))
        return labels, boxes, scores


# ------------------------------------------------------------------------------- helpers
def example_inputs(size: Tuple[int, int], batch: int, device="cpu"
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random images [B,3,H,W] in [0,1] and their (w, h) sizes, for tracing and checks."""
    h, w = size
    images = torch.rand(batch, 3, h, w, device=device)
    sizes = torch.tensor([[w, h]] * batch, dtype=torch.int64, device=device)
    return images, sizes


def _dynamic_shapes(dynamic_size: bool = True):
    from torch.export import Dim

    batch = Dim("batch", min=1, max=MAX_BATCH)
    image = {0: batch}
    if dynamic_size:
        image[2] = SIZE_MULTIPLE * Dim("height32", min=1, max=MAX_SIDE32)
        image[3] = SIZE_MULTIPLE * Dim("width32", min=1, max=MAX_SIDE32)
    return {"images": image, "orig_target_sizes": {0: batch}}


def _deploy_module(model: nn.Module, grid_sample: bool) -> DeployModel:
    if isinstance(model, DeployModel):
        if model.grid_sample != grid_sample:
            model = DeployModel(model.model, grid_sample)
        return model
    return DeployModel(model, grid_sample)


# ---------------------------------------------------------------------------------- ONNX
def export_onnx(model: nn.Module, path: Union[str, os.PathLike], *, opset: int = DEFAULT_OPSET,
                size: Union[int, Sequence[int]] = (640, 640), batch: int = 1,
                grid_sample: bool = True, exporter: str = DEFAULT_EXPORTER,
                verify: bool = True, verbose: bool = False) -> Dict:
    """Write ``model`` as ONE self-contained ONNX file with dynamic batch and image size.

    ``size`` (H, W) and ``batch`` are the example input the graph is traced with, and checked
    at when ``verify`` (ONNX Runtime against PyTorch, when onnxruntime is installed); the file
    serves every batch and every H, W multiple of 32. ``grid_sample=False`` writes the
    deformable attention as gathers (no GridSample node). ``exporter``: ``"torchscript"``
    (default, the tracing exporter, opsets 16-20) or ``"dynamo"`` (torch.export-based, opsets
    18-20). Returns a summary dict (with the check's differences when ``verify``).
    """
    opset = check_opset(opset)
    size = check_size(size)
    batch = check_batch(batch)
    exporter = check_exporter(exporter)
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ExportError(f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or newer, got "
                          f"{opset}: use --opset {DYNAMO_MIN_OPSET}-{OPSETS[-1]} or the "
                          "torchscript exporter")
    path = os.fspath(path)
    module = _deploy_module(model, grid_sample)
    images, sizes = example_inputs(size, batch)
    if exporter == "dynamo":
        _export_onnx_dynamo(module, (images, sizes), path, opset, verbose)
    else:
        _export_onnx_torchscript(module, (images, sizes), path, opset, verbose)
    summary = {"path": path, "opset": opset, "exporter": exporter, "grid_sample": grid_sample,
               "deform_attn": module.deform_attn_form, "size": size, "batch": batch}
    if verify:
        summary.update(verify_onnx(path, module, size=size, batch=batch))
        if summary.get("max_score_diff", 0.0) > 1e-3 or summary.get("label_agreement", 1) < 0.9:
            warnings.warn(f"export: {path} differs from PyTorch at batch {batch}, "
                          f"{size[0]}x{size[1]}: max score diff {summary['max_score_diff']:.2e}, "
                          f"labels agree {100 * summary['label_agreement']:.0f}%", stacklevel=2)
    return summary


def _export_onnx_dynamo(module, args, path, opset, verbose):
    import contextlib
    import io

    # the translation prints progress lines on stdout; keep them unless asked
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with torch.no_grad(), sink, warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                    input_names=list(INPUT_NAMES),
                                    output_names=list(OUTPUT_NAMES),
                                    dynamic_shapes=_dynamic_shapes(), external_data=False,
                                    optimize=True, verbose=verbose)
        program.save(path, external_data=False)


def _export_onnx_torchscript(module, args, path, opset, verbose):
    with torch.no_grad(), warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        torch.onnx.export(module, args, path, dynamo=False, opset_version=opset,
                          input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        "orig_target_sizes": {0: "batch"},
                                        "labels": {0: "batch"}, "boxes": {0: "batch"},
                                        "scores": {0: "batch"}},
                          do_constant_folding=True, verbose=verbose)


def run_onnx(path_or_session, images: torch.Tensor, orig_target_sizes: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run an exported file (or an onnxruntime session) on the CPU: (labels, boxes, scores)."""
    import onnxruntime as ort

    sess = path_or_session
    if not isinstance(sess, ort.InferenceSession):
        sess = ort.InferenceSession(os.fspath(sess), providers=["CPUExecutionProvider"])
    out = sess.run(list(OUTPUT_NAMES), {"images": images.cpu().numpy(),
                                        "orig_target_sizes": orig_target_sizes.cpu().numpy()})
    return tuple(torch.from_numpy(o) for o in out)  # type: ignore[return-value]


def compare_detections(ours, ref, top: Optional[int] = None) -> Dict[str, float]:
    """Max differences of (labels, boxes, scores) against a reference: scores everywhere, boxes
    and labels where both runs ranked the same (query, class) pair (near-tied scores may swap)."""
    labels, boxes, scores = ours
    rlabels, rboxes, rscores = ref
    if top is not None:
        labels, boxes, scores = labels[:, :top], boxes[:, :top], scores[:, :top]
        rlabels, rboxes, rscores = rlabels[:, :top], rboxes[:, :top], rscores[:, :top]
    same = (labels == rlabels) & ((boxes - rboxes).abs().amax(-1) < 1.0)
    box_diff = (boxes - rboxes).abs().amax(-1)[same]
    return {"max_score_diff": float((scores.float() - rscores.float()).abs().max()),
            "max_box_diff_px": float(box_diff.max()) if box_diff.numel() else 0.0,
            "label_agreement": float((labels == rlabels).float().mean())}


def verify_onnx(path, module: DeployModel, size=(640, 640), batch: int = 1) -> Dict[str, float]:
    """ONNX Runtime against the PyTorch eager model on random images; {} without onnxruntime."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}
    images, sizes = example_inputs(check_size(size), batch)
    with torch.no_grad():
        ref = module(images, sizes)
    return compare_detections(run_onnx(path, images, sizes), ref)


# ------------------------------------------------------------------ torch.export, AOTInductor
def export_program(model: nn.Module, *, size: Union[int, Sequence[int]] = (640, 640),
                   batch: int = 2, grid_sample: bool = True, dynamic_size: bool = True
                   ) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of the deploy module: dynamic batch (and, with
    ``dynamic_size``, dynamic H and W in multiples of 32)."""
    size = check_size(size)
    batch = check_batch(batch)
    module = _deploy_module(model, grid_sample)
    with torch.no_grad():
        return torch.export.export(module, example_inputs(size, batch),
                                   dynamic_shapes=_dynamic_shapes(dynamic_size))


def export_aoti(model: nn.Module, path: Union[str, os.PathLike], *,
                size: Union[int, Sequence[int]] = (640, 640), batch: int = 2,
                grid_sample: bool = True, dynamic_size: bool = True) -> str:
    """Compile with AOTInductor into a ``.pt2`` package that runs without this package's Python
    code: ``torch._inductor.aoti_load_package(path)(images, orig_target_sizes)``."""
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ExportError(f"an AOTInductor package path must end in .pt2, got {path!r}")
    program = export_program(model, size=size, batch=batch, grid_sample=grid_sample,
                             dynamic_size=dynamic_size)
    return torch._inductor.aoti_compile_and_package(program, package_path=path)


def load_aoti(path: Union[str, os.PathLike]):
    """Load a package written by :func:`export_aoti`; call it as the model."""
    return torch._inductor.aoti_load_package(os.fspath(path))
