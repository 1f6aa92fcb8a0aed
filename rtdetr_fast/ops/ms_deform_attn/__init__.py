"""Multi-scale deformable attention: the public op (:func:`ms_deform_attn`, which validates its
inputs once and dispatches) and its reference, native (extension) and Triton backends; the export
form is :mod:`.export`."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import _backend, _export
from .._checks import any_device, is_int, shape_str
# registering the native and Triton backends loads neither the extension nor triton
from . import native, triton  # noqa: F401
from .reference import METHODS, ms_deform_attn_reference

__all__ = ["METHODS", "ms_deform_attn", "ms_deform_attn_reference"]

_backend.register("ms_deform_attn", "reference", any_device)(ms_deform_attn_reference)


def ms_deform_attn(value: torch.Tensor,
                   spatial_shapes: Union[Sequence[Tuple[int, int]], torch.Tensor],
                   level_start_index: Union[Sequence[int], torch.Tensor, None],
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   num_points_list: Optional[Sequence[int]] = None,
                   method: str = "default") -> torch.Tensor:
    """Multi-scale deformable attention.

    value [B,S,H,D]; spatial_shapes: L pairs (H_l, W_l) of Python ints, or an int64 tensor
    [L,2]; level_start_index: L ints (the running sums of H_l*W_l), an int64 tensor [L], or
    None (computed). Ints cost nothing; a tensor is read on the host on every call (on a GPU a
    synchronisation, which a CUDA graph capture forbids), so the model passes ints.
    sampling_locations [B,Q,H,L,P,2] normalised (x, y) (outside [0,1] samples zeros);
    attention_weights [B,Q,H,L,P] -> [B,Q,H*D]. Bilinear, align_corners=False, zero padding.

    RT-DETRv2's per-level point counts: pass ``num_points_list`` (length L) with
    sampling_locations [B,Q,H,N,2] and attention_weights [B,Q,H,N], N = sum(num_points_list),
    level l owning num_points_list[l] consecutive points.

    ``method``: ``"default"`` samples bilinearly (above); ``"discrete"`` is RT-DETRv2's
    nearest-cell sampling (the official ``deformable_attention_core_func_v2`` with
    method='discrete'): on level l of H_l x W_l cells, location (x, y) reads the value row of
    cell ix = clamp(floor(x*W_l + 0.5), 0, W_l-1), iy = clamp(floor(y*H_l + 0.5), 0, H_l-1),
    times its weight; no interpolation and no zero padding, every sample reads a cell. The
    official clamps both axes to H_l - 1, which is wrong on non-square levels: each axis is
    clamped to its own extent here, as the transformers port does. A NaN coordinate reads
    cell 0 of its axis, +inf the last one, -inf the first. Gradients flow to value and
    attention_weights; sampling_locations gets a zero gradient (the official detaches the
    offsets in this mode).

    Dtypes: value floating point; sampling_locations and attention_weights of value's dtype,
    all three on one device. Under torch.autocast, mixed input dtypes are promoted to the
    widest of them, as autocast does for grid_sample.

    Errors (one-line messages naming the argument and the expected shape):

    - ``ValueError``: ``method`` not one of :data:`METHODS`; a shape that does not match the
      forms above (B and H are read from value, Q, L and P from sampling_locations, or N from
      num_points_list); spatial_shapes or level_start_index entries that are not ints;
      ``num_points_list`` not positive ints; a level of zero size; a sum of
      H_l*W_l other than S; a level_start_index other than the running sums; sampling_locations
      or attention_weights on another device than value.
    - ``TypeError``: value, sampling_locations or attention_weights not a tensor; value not
      floating point; sampling_locations or attention_weights of another dtype than value (outside
      autocast); spatial_shapes neither pairs nor a tensor; a spatial_shapes or level_start_index
      tensor not of an integer dtype (int64 or int32).
    - ``RuntimeError``: the backend in force has no kernel for ``method``, or cannot run the op
      on the tensors' device (see :mod:`rtdetr_fast.ops._backend`).

    Under the export switch (:func:`rtdetr_fast.ops._export.export_forms`) only ``method`` is
    checked: the op runs its export form, :mod:`.export`, on traced shapes.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if _export.current is not None:  # under an exporter: the op's export form
        return _export.ms_deform_attn(value, spatial_shapes, sampling_locations,
                                      attention_weights, num_points_list, method)
    if (isinstance(value, torch.Tensor) and isinstance(sampling_locations, torch.Tensor)
            and isinstance(attention_weights, torch.Tensor)
            and torch.is_autocast_enabled(value.device.type)):
        dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                                    attention_weights.dtype)
        value, sampling_locations, attention_weights = (
            value.to(dtype), sampling_locations.to(dtype), attention_weights.to(dtype))
    shapes, starts = _check(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, num_points_list)
    fn = _backend.select("ms_deform_attn", value.device.type)
    # the method is passed only when it is not the default: a backend function that predates
    # it keeps working
    kw = {} if method == "default" else {"method": method}
    if method not in getattr(fn, "methods", ("default",)):
        # a backend without the mode must not run bilinear in its place
        raise RuntimeError(f"the selected ms_deform_attn backend has no method={method!r} "
                           f"kernel")
    if num_points_list is None:
        return fn(value, shapes, starts, sampling_locations, attention_weights, **kw)
    if getattr(fn, "supports_num_points_list", False):
        return fn(value, shapes, starts, sampling_locations, attention_weights,
                  num_points_list=list(num_points_list), **kw)
    loc, w = _pad_points(sampling_locations, attention_weights, list(num_points_list))
    return fn(value, shapes, starts, loc, w, **kw)


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
           num_points_list=None) -> Tuple[List[Tuple[int, int]], List[int]]:
    """Validates the arguments; returns the level table as host ints (shapes, starts)."""
    named = dict(value=value, sampling_locations=sampling_locations,
                 attention_weights=attention_weights)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"value must be [B, S, H, D], got {shape_str(value)}")
    B, S, H, D = value.shape
    if num_points_list is None:
        if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
            raise ValueError(f"sampling_locations must be [B, Q, H, L, P, 2], got "
                             f"{shape_str(sampling_locations)}")
        if attention_weights.dim() != 5:
            raise ValueError(f"attention_weights must be [B, Q, H, L, P], got "
                             f"{shape_str(attention_weights)}")
        _, Q, _, L, P, _ = sampling_locations.shape
        if sampling_locations.shape[:5] != (B, Q, H, L, P):
            raise ValueError(f"sampling_locations must be [B, Q, H, L, P, 2] with B={B}, H={H} "
                             f"from value, got {shape_str(sampling_locations)}")
        if tuple(attention_weights.shape) != (B, Q, H, L, P):
            raise ValueError(f"attention_weights must be [B, Q, H, L, P] = [{B}, {Q}, {H}, {L}, "
                             f"{P}], got {shape_str(attention_weights)}")
    else:
        counts = list(num_points_list)
        if not counts or not all(isinstance(p, int) and p >= 1 for p in counts):
            raise ValueError(f"num_points_list must be positive ints, one per level, got "
                             f"{num_points_list!r}")
        L, N = len(counts), sum(counts)
        if sampling_locations.dim() != 5 or sampling_locations.shape[-1] != 2:
            raise ValueError(f"sampling_locations must be [B, Q, H, N, 2] with "
                             f"N = sum(num_points_list) = {N}, got "
                             f"{shape_str(sampling_locations)}")
        Q = sampling_locations.shape[1]
        if tuple(sampling_locations.shape) != (B, Q, H, N, 2):
            raise ValueError(f"sampling_locations must be [B, Q, H, N, 2] = [{B}, {Q}, {H}, {N}, "
                             f"2] (B, H from value, N = sum(num_points_list)), got "
                             f"{shape_str(sampling_locations)}")
        if tuple(attention_weights.shape) != (B, Q, H, N):
            raise ValueError(f"attention_weights must be [B, Q, H, N] = [{B}, {Q}, {H}, {N}], "
                             f"got {shape_str(attention_weights)}")
    shapes, starts = _levels(spatial_shapes, level_start_index, L)
    if not value.is_floating_point():
        raise TypeError(f"value must be floating point, got {value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if named[name].dtype != value.dtype:
            raise TypeError(f"{name} dtype {named[name].dtype} differs from value dtype "
                            f"{value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if named[name].device != value.device:
            raise ValueError(f"{name} is on {named[name].device}, value on {value.device}")
    # the level table is host ints (the model passes them so): checking it reads no tensor
    expect, total = [], 0
    for h, w in shapes:
        if h < 1 or w < 1:
            raise ValueError(f"spatial_shapes entries must be positive, got {shapes}")
        expect.append(total)
        total += h * w
    if total != S:
        raise ValueError(f"sum of H_l*W_l over spatial_shapes is {total}, but value has "
                         f"S={S}")
    if starts != expect:
        raise ValueError(f"level_start_index must be {expect} for spatial_shapes {shapes}, "
                         f"got {starts}")
    return shapes, starts


def _levels(spatial_shapes, level_start_index, L: int):
    """spatial_shapes (L pairs of ints, or an integer tensor [L,2]) and level_start_index (L
    ints, an integer tensor [L], or None for the running sums) -> ([(H_l, W_l)], [start_l]).
    A tensor is read on the host: a device-to-host copy, and a synchronisation on a GPU, per
    call. The model passes ints."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or tuple(spatial_shapes.shape) != (L, 2):
            raise ValueError(f"spatial_shapes must be [L, 2] = [{L}, 2], got "
                             f"{shape_str(spatial_shapes)}")
        if spatial_shapes.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"spatial_shapes must be an integer tensor (int64), got "
                            f"{spatial_shapes.dtype}")
        shapes = [(h, w) for h, w in spatial_shapes.tolist()]
    else:
        try:
            shapes = [tuple(hw) for hw in spatial_shapes]
        except TypeError:
            raise TypeError(f"spatial_shapes must be L pairs (H_l, W_l) of ints or an int64 "
                            f"tensor [L, 2], got {type(spatial_shapes).__name__}") from None
        if len(shapes) != L or not all(len(hw) == 2 and all(map(is_int, hw)) for hw in shapes):
            raise ValueError(f"spatial_shapes must be [L, 2] = [{L}, 2]: L pairs (H_l, W_l) of "
                             f"ints, got {spatial_shapes!r}")
    if level_start_index is None:
        starts, total = [], 0
        for h, w in shapes:
            starts.append(total)
            total += h * w
    elif isinstance(level_start_index, torch.Tensor):
        if tuple(level_start_index.shape) != (L,):
            raise ValueError(f"level_start_index must be [L] = [{L}], got "
                             f"{shape_str(level_start_index)}")
        if level_start_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"level_start_index must be an integer tensor (int64), got "
                            f"{level_start_index.dtype}")
        starts = level_start_index.tolist()
    else:
        starts = list(level_start_index)
        if len(starts) != L or not all(map(is_int, starts)):
            raise ValueError(f"level_start_index must be [L] = [{L}] ints, got "
                             f"{level_start_index!r}")
    return shapes, starts


def _pad_points(sampling_locations, attention_weights, num_points_list):
    """Per-level points [B,Q,H,N,2] / [B,Q,H,N] -> [B,Q,H,L,max P,2] / [B,Q,H,L,max P] with
    zero weights on the padding: the same output and gradients, for backends without the form."""
    P = max(num_points_list)
    locs = sampling_locations.split(list(num_points_list), dim=3)
    weights = attention_weights.split(list(num_points_list), dim=3)
    loc = torch.stack([torch.nn.functional.pad(t, (0, 0, 0, P - t.shape[3])) for t in locs], 3)
    w = torch.stack([torch.nn.functional.pad(t, (0, P - t.shape[3])) for t in weights], 3)
    return loc, w
