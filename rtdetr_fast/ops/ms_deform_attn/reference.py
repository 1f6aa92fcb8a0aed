"""Pure-PyTorch multi-scale deformable attention: the grid_sample formulation of the official
RT-DETR decoder (bilinear, align_corners=False, zero padding). Every kernel is tested against it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes, level_start_index,
                             sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor) -> torch.Tensor:
    """value [B,S,H,D], spatial_shapes L pairs (H_l, W_l), level_start_index L ints (either
    may also be an int64 tensor, [L,2] / [L], read on the host), sampling_locations
    [B,Q,H,L,P,2] (x, y) in [0,1], attention_weights [B,Q,H,L,P] -> [B,Q,H*D]."""
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    if isinstance(level_start_index, torch.Tensor):
        level_start_index = level_start_index.tolist()
    shapes = [(h, w) for h, w in spatial_shapes]
    starts = list(level_start_index)
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
