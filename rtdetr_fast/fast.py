"""The one-call fast inference path: ``fast = rtdetr_fast.compile(model)``.

It deploys the model (RepConv and every batch norm folded, the device's memory format), then
compiles the whole forward as one graph (``torch.compile(fullgraph=True)``; the forward reads
no tensor data on the host, so there is no graph break):

- CPU: inductor with freezing (weights become constants), float32 unless ``dtype`` asks for
  bfloat16 autocast; the deployed model's CPU routes (the Winograd RepConv kernel, whose
  transformed weights are made before compiling; oneDNN convs with fused activations) stay in
  the graph as calls;
- CUDA: float16 autocast (``dtype=torch.bfloat16`` also works) and inductor's
  ``reduce-overhead`` mode, which replays the whole forward as CUDA graphs.

``fast(images)`` returns what ``model(images)`` returns in eval mode. Each new input shape
compiles once (``dynamic=False``); keep the size fixed (``model.config.eval_spatial_size``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

__all__ = ["compile", "FastDetector"]


class FastDetector:
    """A deployed, compiled detector: ``fast(images) -> {"pred_logits", "pred_boxes"}``."""

    def __init__(self, model: nn.Module, dtype: Optional[torch.dtype] = None,
                 mode: Optional[str] = None, options: Optional[dict] = None):
        self.model = model.deploy()
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.float16 if cuda else torch.float32)
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if not cuda and self.dtype == torch.float16:
            raise ValueError("float16 is a CUDA choice; use bfloat16 or float32 on the CPU")
        if mode is None and options is None:
            if cuda:
                mode = "reduce-overhead"  # CUDA graphs of the whole forward
            else:
                options = {"freezing": True}
        self.mode = mode
        self.cuda_graphs = cuda and mode in ("reduce-overhead", "max-autotune")
        if not cuda:
            # the Winograd kernels' transformed weights, made now: the graph reads them as
            # inputs instead of recomputing them on every call
            from .ops.rep_conv import winograd

            winograd.prepare(model)
        self._compiled = torch.compile(model, fullgraph=True, dynamic=False, mode=mode,
                                       options=options)

    def __call__(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.model.training:
            raise RuntimeError("the fast path is for inference: the model was put back into "
                               "training mode")
        images = images.to(self.device)
        autocast = self.dtype != torch.float32
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype,
                                             enabled=autocast):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = self._compiled(images)
        if self.cuda_graphs:
            # the graph's output buffers are overwritten by the next replay
            out = {k: v.clone() for k, v in out.items()}
        return out


def compile(model: nn.Module, dtype: Optional[torch.dtype] = None, mode: Optional[str] = None,
            options: Optional[dict] = None) -> FastDetector:  # noqa: A001 (torch's name)
    """Deploy ``model`` in place and return its compiled inference callable (see the module
    docstring). ``mode``/``options`` go to ``torch.compile`` and replace the defaults."""
    return FastDetector(model, dtype=dtype, mode=mode, options=options)
