"""The export form of ``ops.ms_deform_attn``: the same sampling as plain torch ops that every
exporter translates, with the level sizes taken as given (traced sizes under export; nothing
is read on the host or converted to a Python int).

- :func:`deform_attn_grid_sample`: ``F.grid_sample`` per level (ONNX GridSample, opset >= 16);
- :func:`deform_attn_gather`: the same bilinear sampling as gathers of the four corners (no
  GridSample node), for runtimes that lack or mis-compile GridSample;
- :func:`deform_attn_discrete`: RT-DETRv2's discrete (nearest-cell) sampling as a gather, in
  either form (there is nothing to interpolate).

``ops.ms_deform_attn`` runs :func:`ms_deform_attn_export` inside
``ops._export.export_forms``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["deform_attn_grid_sample", "deform_attn_gather", "deform_attn_discrete",
           "ms_deform_attn_export", "form_name", "FORMS"]


def _split_levels(value: torch.Tensor, shapes: Sequence[Tuple]) -> List[torch.Tensor]:
    return list(value.split([h * w for h, w in shapes], dim=1))


def _points_by_level(sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                     num_points_list: Optional[Sequence[int]]
                     ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Per level: locations [B,Q,H,P_l,2] and weights [B,Q,H,P_l], from either layout of
    ``ops.ms_deform_attn``: [B,Q,H,L,P,2] / [B,Q,H,L,P] (one count for every level), or
    [B,Q,H,N,2] / [B,Q,H,N] with ``num_points_list`` (RT-DETRv2's per-level counts, level l
    owning num_points_list[l] consecutive points)."""
    if num_points_list is None:
        L = sampling_locations.shape[3]
        return ([sampling_locations[:, :, :, lvl] for lvl in range(L)],
                [attention_weights[:, :, :, lvl] for lvl in range(L)])
    counts = [int(p) for p in num_points_list]
    return (list(sampling_locations.split(counts, dim=3)),
            list(attention_weights.split(counts, dim=3)))


def deform_attn_grid_sample(value: torch.Tensor, shapes: Sequence[Tuple],
                            sampling_locations: torch.Tensor,
                            attention_weights: torch.Tensor,
                            num_points_list: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Multi-scale deformable attention with one ``grid_sample`` per level (ONNX GridSample).

    The reference formulation with the level sizes ``shapes`` [(H_l, W_l)] taken from the
    feature maps' shapes (symbolic under export) instead of a tensor read on the host.
    value [B,S,H,D]; sampling_locations [B,Q,H,L,P,2] and attention_weights [B,Q,H,L,P], or
    [B,Q,H,N,2] and [B,Q,H,N] with ``num_points_list`` -> [B,Q,H*D]."""
    B, _, H, D = value.shape
    Q = sampling_locations.shape[1]
    locs, weights = _points_by_level(sampling_locations, attention_weights, num_points_list)
    sampled = []
    for v, (h, w), loc in zip(_split_levels(value, shapes), shapes, locs):
        v = v.permute(0, 2, 3, 1).reshape(B * H, D, h, w)
        g = (2 * loc - 1).transpose(1, 2).flatten(0, 1)  # [B*H, Q, P_l, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [B*H, D, Q, P_l]
    # [B, Q, H, N] -> [B*H, 1, Q, N], the points in the order of the sampled columns
    weights = torch.cat(weights, dim=-1).transpose(1, 2).reshape(B * H, 1, Q, -1)
    out = (torch.cat(sampled, dim=-1) * weights).sum(-1)  # [B*H, D, Q]
    return out.view(B, H * D, Q).transpose(1, 2)


def _gathered_levels(value: torch.Tensor, shapes: Sequence[Tuple],
                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                     num_points_list: Optional[Sequence[int]], sample) -> torch.Tensor:
    """The gather forms' frame: per level, ``sample(rows, base, h, w, loc)`` reads the value
    rows [B*H*h*w, D] (those of one (batch, head) contiguous, starting at ``base`` [B,H,1,1])
    at the locations ``loc`` [B,H,Q,P_l,2] -> [B,H,Q,P_l,D]; the samples are weighted and
    summed over points and levels -> [B,Q,H*D]."""
    B, _, H, D = value.shape
    Q = sampling_locations.shape[1]
    locs, weights = _points_by_level(sampling_locations, attention_weights, num_points_list)
    out = None
    for v, (h, w), loc, aw in zip(_split_levels(value, shapes), shapes, locs, weights):
        rows = v.permute(0, 2, 1, 3).reshape(-1, D)
        base = (torch.arange(B * H, device=value.device, dtype=torch.int64) * (h * w)).view(
            B, H, 1, 1)
        sampled = sample(rows, base, h, w, loc.transpose(1, 2))
        lvl_out = (sampled * aw.transpose(1, 2).unsqueeze(-1)).sum(3)  # [B, H, Q, D]
        out = lvl_out if out is None else out + lvl_out
    return out.permute(0, 2, 1, 3).reshape(B, Q, H * D)


def _read_rows(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """rows [R, D] at idx [B,H,Q,P] -> [B,H,Q,P,D]."""
    B, H, Q = idx.shape[:3]
    return rows.index_select(0, idx.reshape(-1)).view(B, H, Q, -1, rows.shape[-1])


def _bilinear_corners(rows, base, h, w, loc):
    x = loc[..., 0] * w - 0.5
    y = loc[..., 1] * h - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.to(torch.int64), y0.to(torch.int64)
    acc = None
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            cw = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
            valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            corner = _read_rows(rows, torch.where(valid, base + yi * w + xi, torch.zeros_like(xi)))
            term = corner * (cw * valid.to(cw.dtype)).unsqueeze(-1)
            acc = term if acc is None else acc + term
    return acc


def deform_attn_gather(value: torch.Tensor, shapes: Sequence[Tuple],
                       sampling_locations: torch.Tensor,
                       attention_weights: torch.Tensor,
                       num_points_list: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The same bilinear sampling (align_corners=False, zeros outside) written with gathers of
    the four corners: no GridSample node in an ONNX graph. Layouts as
    :func:`deform_attn_grid_sample`."""
    return _gathered_levels(value, shapes, sampling_locations, attention_weights,
                            num_points_list, _bilinear_corners)


def _discrete_cell(t: torch.Tensor, n) -> torch.Tensor:
    """clamp(floor(t*n + 0.5), 0, n-1) as int64, NaN -> 0 (``reference.discrete_cells``, whose
    ``clamp(0, n - 1)`` needs an int ``n``; here ``n`` may be a traced size)."""
    f = torch.floor(t * n + 0.5)
    f = torch.where(torch.isnan(f), torch.zeros_like(f), f)
    return f.clamp(0, n - 1).to(torch.int64)


def _nearest_cell(rows, base, h, w, loc):
    ix, iy = _discrete_cell(loc[..., 0], w), _discrete_cell(loc[..., 1], h)
    return _read_rows(rows, base + iy * w + ix)


def deform_attn_discrete(value: torch.Tensor, shapes: Sequence[Tuple],
                         sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                         num_points_list: Optional[Sequence[int]] = None) -> torch.Tensor:
    """RT-DETRv2's discrete (nearest-cell) sampling as gathers, the export form of
    ``ops.ms_deform_attn(..., method="discrete")`` whatever ``grid_sample`` says (there is no
    interpolation to hand to GridSample): on level l of H_l x W_l cells, location (x, y) reads
    the value row of cell ix = clamp(floor(x*W_l + 0.5), 0, W_l-1), iy = clamp(floor(y*H_l +
    0.5), 0, H_l-1), each axis clamped to its own extent, times its weight; a NaN coordinate
    reads cell 0 of its axis. Layouts as :func:`deform_attn_grid_sample`."""
    return _gathered_levels(value, shapes, sampling_locations, attention_weights,
                            num_points_list, _nearest_cell)


# the export form of each (method, grid_sample): discrete sampling is a gather in both forms
FORMS = {"GridSample": deform_attn_grid_sample,
         "bilinear gathers": deform_attn_gather,
         "discrete gathers": deform_attn_discrete}


def form_name(method: str, grid_sample: bool) -> str:
    """The name of the form that samples ``method`` (a key of :data:`FORMS`)."""
    if method == "discrete":
        return "discrete gathers"
    return "GridSample" if grid_sample else "bilinear gathers"


def ms_deform_attn_export(value: torch.Tensor, spatial_shapes: Sequence[Tuple],
                          sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                          num_points_list: Optional[Sequence[int]] = None,
                          method: str = "default", grid_sample: bool = True) -> torch.Tensor:
    """``ops.ms_deform_attn`` in the export form for ``method`` and ``grid_sample``: the same
    arguments and layouts (``spatial_shapes`` as L pairs (H_l, W_l), traced sizes welcome; the
    level starts follow from them)."""
    fn = FORMS[form_name(method, grid_sample)]
    return fn(value, [tuple(hw) for hw in spatial_shapes], sampling_locations,
              attention_weights, num_points_list=num_points_list)
