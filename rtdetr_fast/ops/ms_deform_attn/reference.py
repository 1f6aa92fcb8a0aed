"""Pure-PyTorch multi-scale deformable attention, the ground of every kernel's tests.

``method="default"``: the grid_sample formulation of the official RT-DETR decoder (bilinear,
align_corners=False, zero padding). ``method="discrete"``: RT-DETRv2's nearest-cell sampling
(``deformable_attention_core_func_v2`` with method='discrete'), written with gather: see
:func:`discrete_cells` for the exact rule."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

METHODS = ("default", "discrete")


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes, level_start_index,
                             sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor,
                             method: str = "default") -> torch.Tensor:
    """value [B,S,H,D], spatial_shapes L pairs (H_l, W_l), level_start_index L ints (either
    may also be an int64 tensor, [L,2] / [L], read on the host), sampling_locations
    [B,Q,H,L,P,2] (x, y) normalised, attention_weights [B,Q,H,L,P] -> [B,Q,H*D]."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    if isinstance(level_start_index, torch.Tensor):
        level_start_index = level_start_index.tolist()
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    starts = [int(s) for s in level_start_index]
    if method == "default":
        return _bilinear(value, shapes, starts, sampling_locations, attention_weights)
    if method == "discrete":
        return _discrete(value, shapes, starts, sampling_locations, attention_weights)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _bilinear(value, shapes, starts, sampling_locations, attention_weights):
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, starts[lvl]:starts[lvl] + h * w]
        # [B, h*w, H, D] -> [B*H, D, h, w]
        v = v.permute(0, 2, 3, 1).reshape(B * H, D, h, w)
        # [B, Q, H, P, 2] -> [B*H, Q, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [B*H, D, Q, P]
    # [B, Q, H, L, P] -> [B*H, 1, Q, L*P]
    w = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1)  # [B*H, D, Q]
    return out.view(B, H * D, Q).transpose(1, 2)


def discrete_cells(x: torch.Tensor, y: torch.Tensor, h: int, w: int
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The cell (column, row) that discrete sampling reads on a level of h x w cells.

    The official computes ``int64(loc * (w, h) + 0.5)`` (truncation toward zero) and clamps
    both axes to ``h - 1``, which is wrong on non-square levels; each axis is clamped to its
    own extent here, as the transformers port does: ix = clamp(floor(x*w + 0.5), 0, w-1), iy
    likewise with h (truncation then clamping at 0 equals floor then clamping). Locations
    outside [0, 1] read the nearest border cell, never zero padding. Non-finite locations: a
    NaN coordinate reads cell 0 of its axis, +inf the last, -inf the first (no float->int
    conversion of a non-finite or out-of-range value anywhere). For float16/bfloat16 the
    product and sum are rounded to float32, the kernels' arithmetic (the official rounds
    them in the location dtype); the product and the sum are rounded separately, never fused."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()

    def axis(t, n):
        f = torch.floor(t * n + 0.5)
        f = torch.where(torch.isnan(f), torch.zeros_like(f), f)
        return f.clamp(0, n - 1).to(torch.int64)

    return axis(x, w), axis(y, h)


class _NoLocationGrad(torch.autograd.Function):
    """Identity on the output whose backward gives sampling_locations a zero gradient: discrete
    sampling does not differentiate through the cell choice (the official detaches the
    offsets), but callers still get a tensor, as from the kernels."""

    @staticmethod
    def forward(ctx, out, loc):
        ctx.loc_shape, ctx.loc_dtype, ctx.loc_device = loc.shape, loc.dtype, loc.device
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.zeros(ctx.loc_shape, dtype=ctx.loc_dtype, device=ctx.loc_device)


def _discrete(value, shapes, starts, sampling_locations, attention_weights):
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    loc = sampling_locations.detach()
    out = value.new_zeros((B, H, Q, D))
    for lvl, (h, w) in enumerate(shapes):
        ix, iy = discrete_cells(loc[:, :, :, lvl, :, 0], loc[:, :, :, lvl, :, 1], h, w)
        # [B, Q, H, P] -> [B, H, Q*P, D]: row of the level each sample reads
        idx = (iy * w + ix).permute(0, 2, 1, 3).reshape(B, H, Q * P, 1).expand(-1, -1, -1, D)
        v = value[:, starts[lvl]:starts[lvl] + h * w].permute(0, 2, 1, 3)  # [B, H, h*w, D]
        sampled = torch.gather(v, 2, idx).view(B, H, Q, P, D)
        a = attention_weights[:, :, :, lvl].permute(0, 2, 1, 3)  # [B, H, Q, P]
        out = out + (sampled * a[..., None]).sum(3)
    out = out.permute(0, 2, 1, 3).reshape(B, Q, H * D)
    if sampling_locations.requires_grad and torch.is_grad_enabled():
        out = _NoLocationGrad.apply(out, sampling_locations)
    return out


# the sampling methods this implementation has (ops.ms_deform_attn reads it of every backend)
ms_deform_attn_reference.methods = METHODS  # type: ignore[attr-defined]
