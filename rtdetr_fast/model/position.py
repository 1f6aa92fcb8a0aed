"""The shape-driven tables of the model: the encoder's sine-cosine position embedding and the
decoder's anchors, written once for eager runs, torch.compile and every exporter.

Both take the feature-map sizes as they come: Python ints in eager and compiled runs (where the
modules cache the result per size), or the sizes an exporter traces (symbolic sizes under
torch.export, traced values under the TorchScript-based ONNX exporter). Nothing here converts a
size to a Python int or builds a tensor from a list of sizes, which would record the traced
size as a constant: one exported graph serves every input size.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

__all__ = ["sincos_position_embedding", "generate_anchors", "tracing"]


def tracing() -> bool:
    """Whether the forward is being traced into a graph by an exporter (torch.export, the
    TorchScript-based ONNX exporter, ``torch.jit.trace``): sizes are then graph values, and
    the tables are computed in the graph instead of read from a size-keyed cache."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def sincos_position_embedding(w, h, embed_dim: int = 256, temperature: float = 10000.0,
                              device=None) -> torch.Tensor:
    """2-D sin-cos embedding [1, w*h, embed_dim] in float32, laid out exactly as the official
    encoder's.

    The grid is built with meshgrid(w, h, indexing='ij'), so row t of the table belongs to
    (x = t // h, y = t % h), while the tokens it is added to are flattened row-major
    (y = t // w, x = t % w). The official models were trained with this pairing; it is kept.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32, device=device),
                                    torch.arange(h, dtype=torch.float32, device=device),
                                    indexing="ij")
    pos_dim = embed_dim // 4
    omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32, device=device)
                                   / pos_dim))
    out_w = grid_w.flatten()[:, None] @ omega[None]
    out_h = grid_h.flatten()[:, None] @ omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]


def generate_anchors(shapes: Sequence[Tuple], eps: float, grid_size: float = 0.05,
                     dtype=torch.float32, device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Unactivated anchors [1,S,4] (+inf where invalid) and the valid mask [1,S,1] for the
    levels ``shapes`` [(H_l, W_l)]: cell centres (x + 0.5) / W_l, (y + 0.5) / H_l and a side of
    ``grid_size * 2**l``, inverse-sigmoid'ed; an anchor with a coordinate outside
    (eps, 1 - eps) is invalid."""
    anchors = []
    for lvl, (h, w) in enumerate(shapes):
        gy, gx = torch.meshgrid(torch.arange(h, dtype=dtype, device=device),
                                torch.arange(w, dtype=dtype, device=device), indexing="ij")
        xy = torch.stack([(gx + 0.5) / w, (gy + 0.5) / h], -1)
        wh = torch.ones_like(xy) * grid_size * (2.0 ** lvl)
        anchors.append(torch.cat([xy, wh], -1).reshape(1, -1, 4))
    anchors = torch.cat(anchors, 1)
    valid = ((anchors > eps) * (anchors < 1 - eps)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1 - anchors))
    anchors = torch.where(valid, anchors, torch.full_like(anchors, float("inf")))
    return anchors, valid
