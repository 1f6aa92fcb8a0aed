"""Binding of the extension's ``rtdetr_fast::ms_deform_attn`` and its backward op.

The ops are defined in C++ (csrc/ms_deform_attn/ms_deform_attn.cpp); their fake (meta)
implementations and autograd formula are registered here, in Python, so torch.compile and
CUDA graphs see one opaque op. They are registered once, when the extension loads
(``_backend.on_extension_load``): importing this module loads neither the extension nor CUDA. ``spatial_shapes`` ([2L] ints: H_0, W_0, H_1, ...) and
``level_start_index`` ([L] ints) are ``int[]`` in the schema: host ints, so no call reads data
back from the device. ``method`` ("default" bilinear, "discrete" nearest cell) is the schema's
``str method="default"``; the discrete mode's location gradient is zero.
"""
from __future__ import annotations

import threading
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _backend

_lock = threading.Lock()
_registered = False


def _supports(device_type: str) -> bool:
    return _backend.extension_has("ms_deform_attn", device_type) and _ensure_registered()


def _fake_forward(value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights, num_points, method="default"):
    B, _, H, D = value.shape
    return value.new_empty((B, sampling_locations.shape[1], H * D))


def _fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, num_points, deterministic, method="default"):
    return (torch.empty_like(value), torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights))


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, num_points \
        = inputs[:6]
    ctx.save_for_backward(value, sampling_locations, attention_weights)
    ctx.method = inputs[6] if len(inputs) > 6 else "default"
    ctx.spatial_shapes = list(spatial_shapes)
    ctx.level_start_index = list(level_start_index)
    ctx.num_points = list(num_points)


def _backward(ctx, grad_output):
    value, sampling_locations, attention_weights = ctx.saved_tensors
    # read when the backward runs (or is traced), so the mode in force at backward time decides
    deterministic = torch.are_deterministic_algorithms_enabled()
    grad_value, grad_loc, grad_attn = torch.ops.rtdetr_fast.ms_deform_attn_backward(
        grad_output.contiguous(), value, ctx.spatial_shapes, ctx.level_start_index,
        sampling_locations, attention_weights, ctx.num_points, deterministic, ctx.method)
    return grad_value, None, None, grad_loc, grad_attn, None, None


def _register_python_side() -> None:
    """The fake and autograd implementations, registered once when the extension loads."""
    global _registered
    with _lock:
        if _registered:
            return
        try:
            torch.ops.rtdetr_fast.ms_deform_attn.default
        except (AttributeError, RuntimeError):
            return  # an extension built without this op
        torch.library.register_fake("rtdetr_fast::ms_deform_attn", _fake_forward)
        torch.library.register_fake("rtdetr_fast::ms_deform_attn_backward", _fake_backward)
        torch.library.register_autograd("rtdetr_fast::ms_deform_attn", _backward,
                                        setup_context=_setup_context)
        _registered = True


_backend.on_extension_load(_register_python_side)


def _ensure_registered() -> bool:
    """True when the extension is loaded and the op's Python side registered (by its load hook)."""
    # the global first: torch.compile must not trace into the extension loader
    return _registered or (_backend.extension() is not None and _registered)


def flatten_points(sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   num_points_list: Optional[Sequence[int]]):
    """[B,Q,H,L,P,2] / [B,Q,H,L,P] (or the per-level [B,Q,H,N,2] / [B,Q,H,N] with
    num_points_list) -> the op's flattened form and its num_points."""
    if num_points_list is None:
        B, Q, H, L, P, _ = sampling_locations.shape
        return (sampling_locations.reshape(B, Q, H, L * P, 2),
                attention_weights.reshape(B, Q, H, L * P), [P] * L)
    return sampling_locations, attention_weights, [int(p) for p in num_points_list]


def flat_levels(spatial_shapes, level_start_index) -> Tuple[List[int], List[int]]:
    """Level table as the op's ``int[]`` arguments: ([H_0, W_0, H_1, W_1, ...], [start_0, ...]).
    Sequences of ints pass through; a tensor is read on the host (the caller's choice)."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    if isinstance(level_start_index, torch.Tensor):
        level_start_index = level_start_index.tolist()
    return ([s for hw in spatial_shapes for s in hw], list(level_start_index))


def ms_deform_attn_native(value: torch.Tensor, spatial_shapes: Sequence[Tuple[int, int]],
                          level_start_index: Sequence[int], sampling_locations: torch.Tensor,
                          attention_weights: torch.Tensor,
                          num_points_list: Optional[Sequence[int]] = None,
                          method: str = "default") -> torch.Tensor:
    if not _ensure_registered():
        raise RuntimeError("the native extension rtdetr_fast._C with ms_deform_attn is not built")
    loc, attn, num_points = flatten_points(sampling_locations, attention_weights,
                                           num_points_list)
    shapes, starts = flat_levels(spatial_shapes, level_start_index)
    return torch.ops.rtdetr_fast.ms_deform_attn(
        value.contiguous(), shapes, starts, loc.contiguous(), attn.contiguous(), num_points,
        method)


# ops.ms_deform_attn passes num_points_list through instead of padding to max(P)
ms_deform_attn_native.supports_num_points_list = True  # type: ignore[attr-defined]
ms_deform_attn_native.methods = ("default", "discrete")  # type: ignore[attr-defined]

_backend.register("ms_deform_attn", "native", _supports)(ms_deform_attn_native)

__all__: List[str] = ["ms_deform_attn_native"]
