"""The switch to the ops' export forms.

Inside ``with export_forms(grid_sample=...)`` every op runs its export form, plain torch ops
that every exporter translates (the TorchScript-based and the dynamo ONNX exporters,
torch.export, AOTInductor) and that take the feature-map sizes as traced values:

- ``ops.ms_deform_attn``: :mod:`.ms_deform_attn.export` (``F.grid_sample`` per level, or with
  ``grid_sample=False`` bilinear gathers; the discrete method as nearest-cell gathers);
- ``ops.topk_select`` and ``ops.topk_detections``: :mod:`.topk_select.export` (``torch.topk``);
- the other ops (``ops.rep_conv``, the max pool): their reference, a plain conv and pool.

The exporters set it around the model's own forward (``rtdetr_fast.export.DeployModel``); the
model code is the same with and without it. The switch is a module attribute, not a context
variable, so that a compiled graph reads it as a constant (it is off there).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional

from . import _backend


class ExportForms(NamedTuple):
    grid_sample: bool = True


# the forms in force, or None (the ops' kernels)
current: Optional[ExportForms] = None


@contextlib.contextmanager
def export_forms(grid_sample: bool = True) -> Iterator[ExportForms]:
    """Run every op in its export form inside the block (see the module docstring)."""
    global current
    previous, current = current, ExportForms(bool(grid_sample))
    try:
        with _backend.backend("reference"):
            yield current
    finally:
        current = previous


# the ops' export forms, called by the public ops (ops/<op>/__init__.py) while ``current`` is set
def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights,
                   num_points_list=None, method="default"):
    from .ms_deform_attn.export import ms_deform_attn_export

    return ms_deform_attn_export(value, spatial_shapes, sampling_locations, attention_weights,
                                 num_points_list, method, grid_sample=current.grid_sample)


def topk_select(logits, k, tensors=()):
    from .topk_select.export import topk_select_export

    return topk_select_export(logits, k, tensors)


def topk_detections(logits, boxes, image_sizes, k):
    from .topk_select.export import topk_detections_export

    return topk_detections_export(logits, boxes, image_sizes, k)
