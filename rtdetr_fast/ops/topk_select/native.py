"""Bindings of the extension's top-K ops.

The extension (csrc/topk_select/) defines
  rtdetr_fast::topk_select_indices(Tensor logits, int k) -> (Tensor scores, Tensor indices)
  rtdetr_fast::topk_detections(Tensor scores, Tensor boxes, Tensor image_sizes, int k)
      -> (Tensor scores, Tensor labels, Tensor boxes)
Their fake (meta) implementations and the autograd of the selection are registered here once,
when rtdetr_fast._C loads (the schemas exist only then, see _backend.on_extension_load). Nothing
here imports the extension at module import.

The selection op is the only opaque piece: the gathers of the caller's tensors are torch ops, so
their gradients are torch's; the gradient of the scores goes through the op's registered
backward, which matches ``logits.amax(-1)`` (shared evenly between tied maxima).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import importlib

import torch

from .. import _backend
from ._common import (detections_epilogue, detections_fake, gather_rows, rank, select_backward,
                      select_fake, select_setup_context)




_registered = False
# Read from the extension once, when it loads: a plain global is a constant to torch.compile,
# whereas a call into the (cached) extension loader would break a fullgraph trace.
_MAX_K = 0


def _register_python_side() -> None:
    global _registered, _MAX_K
    if _registered:
        return
    # the extension is imported by now (this runs from its load hook), so no loader call here
    _MAX_K = int(importlib.import_module("rtdetr_fast._C").limits()["topk_max_k"])
    torch.library.register_fake("rtdetr_fast::topk_select_indices")(select_fake)
    torch.library.register_fake("rtdetr_fast::topk_detections")(detections_fake)
    torch.library.register_autograd("rtdetr_fast::topk_select_indices", select_backward,
                                    setup_context=select_setup_context)
    _registered = True


_backend.on_extension_load(_register_python_side)


def supports(device_type: str) -> bool:
    return (_backend.extension_has("topk_select_indices", device_type)
            and _backend.extension_has("topk_detections", device_type))


def max_k() -> int:
    """The largest K of the native kernels (the CUDA kernel sorts the selection in shared
    memory; past it the selection is a full sort). Defined once, in the extension."""
    return _MAX_K

# the order key is built from float32 bits, exact for these; float64 takes the torch path
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def topk_select_native(logits: torch.Tensor, k: int, tensors: Sequence[torch.Tensor] = ()
                       ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    if k > max_k() or logits.dtype not in KERNEL_DTYPES:
        scores, idx = rank(logits.amax(-1), k)
        return scores, idx, gather_rows(idx, tensors)
    scores, idx = torch.ops.rtdetr_fast.topk_select_indices(logits.contiguous(), k)
    return scores, idx, gather_rows(idx, tensors)


def topk_detections_native(logits: torch.Tensor, boxes: torch.Tensor,
                           image_sizes: torch.Tensor, k: int
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # torch's own sigmoid makes the ranking key bit-identical to the reference's on this device
    # (a sigmoid inside the kernel would differ from torch's by an ulp now and then, and
    # saturated scores tie, so an ulp reorders detections)
    scores = torch.sigmoid(logits)
    if (k > max_k() or scores.dtype not in KERNEL_DTYPES or boxes.dtype not in KERNEL_DTYPES
            or image_sizes.dtype != torch.int64):
        s, idx = rank(scores.flatten(1), k)
        return detections_epilogue(s, idx, boxes, image_sizes, logits.shape[-1])
    return torch.ops.rtdetr_fast.topk_detections(scores.contiguous(), boxes.contiguous(),
                                                 image_sizes.contiguous(), k)
