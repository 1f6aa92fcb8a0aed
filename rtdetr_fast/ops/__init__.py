"""Stateless hot operations of RT-DETR, each with a pure-PyTorch reference.

Model code calls only these functions; which implementation runs is decided in
:mod:`rtdetr_fast.ops._backend` (``with ops.backend("reference"): ...`` or
``RTDETR_FAST_BACKEND=reference``). Inputs are validated here, once, in the words of the
dimension glossary: B batch, Q queries, H heads, L levels, P points, D channels per head,
S = sum of H_l*W_l, C classes, N anchors, K selected.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import _backend, _export
from ._backend import available_backends, backend, register
from .ms_deform_attn import ms_deform_attn_reference
from .ms_deform_attn.reference import METHODS as MSDA_METHODS
from .max_pool import max_pool_3x3_s2
from .rep_conv import ACTIVATIONS, rep_conv_reference
from .topk_select import topk_detections_reference, topk_select_reference

__all__ = [
    "max_pool_3x3_s2",
    "ms_deform_attn",
    "topk_select",
    "topk_detections",
    "rep_conv",
    "backend",
    "available_backends",
]


def _always(device_type: str) -> bool:
    return True


register("ms_deform_attn", "reference", _always)(ms_deform_attn_reference)
register("topk_select", "reference", _always)(topk_select_reference)
register("topk_detections", "reference", _always)(topk_detections_reference)
register("rep_conv", "reference", _always)(rep_conv_reference)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights, num_points_list=None) -> None:
    """Validates the arguments; returns the level table as host ints (shapes, starts)."""
    named = dict(value=value, sampling_locations=sampling_locations,
                 attention_weights=attention_weights)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"value must be [B, S, H, D], got {_shape(value)}")
    B, S, H, D = value.shape
    if num_points_list is None:
        if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
            raise ValueError(f"sampling_locations must be [B, Q, H, L, P, 2], got "
                             f"{_shape(sampling_locations)}")
        if attention_weights.dim() != 5:
            raise ValueError(f"attention_weights must be [B, Q, H, L, P], got "
                             f"{_shape(attention_weights)}")
        _, Q, _, L, P, _ = sampling_locations.shape
        if sampling_locations.shape[:5] != (B, Q, H, L, P):
            raise ValueError(f"sampling_locations must be [B, Q, H, L, P, 2] with B={B}, H={H} "
                             f"from value, got {_shape(sampling_locations)}")
        if tuple(attention_weights.shape) != (B, Q, H, L, P):
            raise ValueError(f"attention_weights must be [B, Q, H, L, P] = [{B}, {Q}, {H}, {L}, "
                             f"{P}], got {_shape(attention_weights)}")
    else:
        counts = list(num_points_list)
        if not counts or not all(isinstance(p, int) and p >= 1 for p in counts):
            raise ValueError(f"num_points_list must be positive ints, one per level, got "
                             f"{num_points_list!r}")
        L, N = len(counts), sum(counts)
        if sampling_locations.dim() != 5 or sampling_locations.shape[-1] != 2:
            raise ValueError(f"sampling_locations must be [B, Q, H, N, 2] with "
                             f"N = sum(num_points_list) = {N}, got {_shape(sampling_locations)}")
        Q = sampling_locations.shape[1]
        if tuple(sampling_locations.shape) != (B, Q, H, N, 2):
            raise ValueError(f"sampling_locations must be [B, Q, H, N, 2] = [{B}, {Q}, {H}, {N}, "
                             f"2] (B, H from value, N = sum(num_points_list)), got "
                             f"{_shape(sampling_locations)}")
        if tuple(attention_weights.shape) != (B, Q, H, N):
            raise ValueError(f"attention_weights must be [B, Q, H, N] = [{B}, {Q}, {H}, {N}], "
                             f"got {_shape(attention_weights)}")
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


def _is_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def _levels(spatial_shapes, level_start_index, L: int):
    """spatial_shapes (L pairs of ints, or an integer tensor [L,2]) and level_start_index (L
    ints, an integer tensor [L], or None for the running sums) -> ([(H_l, W_l)], [start_l]).
    A tensor is read on the host: a device-to-host copy, and a synchronisation on a GPU, per
    call. The model passes ints."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or tuple(spatial_shapes.shape) != (L, 2):
            raise ValueError(f"spatial_shapes must be [L, 2] = [{L}, 2], got "
                             f"{_shape(spatial_shapes)}")
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
        if len(shapes) != L or not all(len(hw) == 2 and all(map(_is_int, hw)) for hw in shapes):
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
                             f"{_shape(level_start_index)}")
        if level_start_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"level_start_index must be an integer tensor (int64), got "
                            f"{level_start_index.dtype}")
        starts = level_start_index.tolist()
    else:
        starts = list(level_start_index)
        if len(starts) != L or not all(map(_is_int, starts)):
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

    Under torch.autocast, mixed input dtypes are promoted to the widest of them, as autocast
    does for grid_sample.
    """
    if not isinstance(method, str) or method not in MSDA_METHODS:
        raise ValueError(f"method must be one of {MSDA_METHODS}, got {method!r}")
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
    shapes, starts = _check_ms_deform_attn(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights,
                                           num_points_list)
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


def topk_select(logits: torch.Tensor, k: int, tensors: Sequence[torch.Tensor] = ()
                ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """Top-K query selection.

    logits [B,N,C]; each of ``tensors`` [B,N,*]. Returns (scores [B,K], the max over C sorted
    descending; indices [B,K] int64; [t gathered at the indices, [B,K,*]]). Equal scores are
    ordered by the lower index; NaN ranks below every real score. Gradients flow to ``tensors``
    and to the scores.
    """
    if _export.current is not None:  # under an exporter: the op's export form
        return _export.topk_select(logits, k, tensors)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be [B, N, C], got "
                         f"{_shape(logits) if isinstance(logits, torch.Tensor) else type(logits)}")
    B, N, _ = logits.shape
    if not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in [1, N={N}], got {k!r}")
    for i, t in enumerate(tensors):
        if t.dim() < 2 or t.shape[:2] != (B, N):
            raise ValueError(f"tensors[{i}] must be [B, N, ...] = [{B}, {N}, ...], got {_shape(t)}")
        if t.device != logits.device:
            raise ValueError(f"tensors[{i}] is on {t.device}, logits on {logits.device}")
    fn = _backend.select("topk_select", logits.device.type)
    return fn(logits, k, list(tensors))


def topk_detections(logits: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor,
                    k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detection post-processing: top-K (query, class) pairs by sigmoid score.

    logits [B,Q,C]; boxes [B,Q,4] cxcywh normalised; image_sizes [B,2] as (H, W) in pixels.
    Returns scores [B,K], labels [B,K] int64, boxes [B,K,4] xyxy in pixels.
    """
    if _export.current is not None:  # under an exporter: the op's export form
        return _export.topk_detections(logits, boxes, image_sizes, k)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, Q, C], got {_shape(logits)}")
    B, Q, C = logits.shape
    if tuple(boxes.shape) != (B, Q, 4):
        raise ValueError(f"boxes must be [B, Q, 4] = [{B}, {Q}, 4], got {_shape(boxes)}")
    if tuple(image_sizes.shape) != (B, 2):
        raise ValueError(f"image_sizes must be [B, 2] = [{B}, 2] as (H, W), got "
                         f"{_shape(image_sizes)}")
    if not isinstance(k, int) or not 1 <= k <= Q * C:
        raise ValueError(f"k must be an int in [1, Q*C={Q * C}], got {k!r}")
    fn = _backend.select("topk_detections", logits.device.type)
    return fn(logits, boxes, image_sizes, k)


def rep_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             activation: str = "silu") -> torch.Tensor:
    """Folded RepConv: act(conv3x3(x, weight, stride 1, padding 1) + bias).

    x [B,C_in,H,W] (channels_last is the kernels' layout); weight [C_out,C_in,3,3]; bias [C_out].
    activation is one of 'silu', 'relu', 'identity'.

    Under torch.autocast on x's device, x, weight and bias are cast to the autocast dtype first,
    as autocast does for F.conv2d (a float32 weight meets a bfloat16 activation in a model
    deployed and then run under ``torch.autocast("cpu", torch.bfloat16)``).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C_in, H, W], got {_shape(x)}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1] or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [C_out, C_in, 3, 3] with C_in={x.shape[1]}, got "
                         f"{_shape(weight)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [C_out] = [{weight.shape[0]}], got {_shape(bias)}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    fn = _backend.select("rep_conv", x.device.type)
    return fn(x, weight, bias, activation)
