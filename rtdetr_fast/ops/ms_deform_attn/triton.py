"""Triton backend of multi-scale deformable attention.

The kernels (``_triton_kernels``, which imports triton) load on first use, so importing this
module needs no Triton. They run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, read by ``triton.jit`` when a kernel is defined: the kernel module is
re-imported when that setting changed). Forward and backward are torch custom ops with fake
and autograd implementations, so torch.compile sees one opaque op. ``method`` is "default"
(bilinear) or "discrete" (RT-DETRv2's nearest cell, zero location gradient), a constexpr of
the kernels: each method compiles its own.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from collections import OrderedDict
from typing import Dict, Tuple

import torch

from .. import _backend

_kernel_modules: Dict[bool, object] = {}
_NAME = "rtdetr_fast.ops.ms_deform_attn._triton_kernels"


def _kernels():
    interpret = _backend.triton_interpreting()
    mod = _kernel_modules.get(interpret)
    if mod is None:
        if _NAME in sys.modules:
            mod = importlib.reload(sys.modules[_NAME])
        else:
            mod = importlib.import_module(_NAME)
        _kernel_modules.clear()
        _kernel_modules[interpret] = mod
    return mod


def _acc_dtype(value: torch.Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def _acc(kernels, value: torch.Tensor):
    return kernels.ACC_FLOAT64 if value.dtype == torch.float64 else kernels.ACC_FLOAT32


def _block_d(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def _launch_options(method: str) -> dict:
    # the discrete cell is floor(x*W + 0.5) with the product and the sum rounded separately,
    # as PyTorch and the native kernels compute it: no FMA fusion in that kernel (the
    # interpreter ignores the option)
    return {"DISCRETE": method == "discrete", **({"enable_fp_fusion": False}
                                                 if method == "discrete" else {})}


def _block_r(D: int) -> int:
    # about 2K elements per tile: enough rows in flight without spilling on wide D
    return max(1, min(64, 2048 // _block_d(D)))


@torch.library.custom_op("rtdetr_fast::ms_deform_attn_triton", mutates_args=())
def _forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
             sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
             method: str = "default") -> torch.Tensor:
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    out = value.new_empty((B, Q, H * D))
    rows = B * Q * H
    if out.numel() == 0:
        return out
    k = _kernels()
    BR = _block_r(D)
    with torch.device(value.device):
        k.ms_deform_attn_fwd[(triton_cdiv(rows, BR),)](
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
            rows, S, Q, H=H, D=D, L=L, P=P, BLOCK_R=BR, BLOCK_D=_block_d(D), ACC=_acc(k, value),
            **_launch_options(method))
    return out


@_forward.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      method="default"):
    B, _, H, D = value.shape
    return value.new_empty((B, sampling_locations.shape[1], H * D))


@torch.library.custom_op("rtdetr_fast::ms_deform_attn_triton_backward", mutates_args=())
def _backward_op(grad_output: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                 level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                 attention_weights: torch.Tensor, method: str = "default"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # float32 accumulation: half/bfloat16 atomics would round every addition
    grad_value = torch.zeros(value.shape, dtype=_acc_dtype(value), device=value.device)
    grad_loc = torch.zeros_like(sampling_locations)
    grad_attn = torch.zeros_like(attention_weights)
    rows = B * Q * H
    if rows and value.numel():
        k = _kernels()
        BR = _block_r(D)
        with torch.device(value.device):
            k.ms_deform_attn_bwd[(triton_cdiv(rows, BR),)](
                grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, grad_value, grad_loc, grad_attn, rows, S, Q, H=H, D=D, L=L,
                P=P, BLOCK_R=BR, BLOCK_D=_block_d(D), ACC=_acc(k, value),
                **_launch_options(method))
    return grad_value.to(value.dtype), grad_loc, grad_attn


@_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
      attention_weights, method="default"):
    return (torch.empty_like(value), torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.method = inputs[5] if len(inputs) > 5 else "default"


def _autograd_backward(ctx, grad_output):
    if torch.are_deterministic_algorithms_enabled():
        # float atomics: refuse (or warn, with warn_only=True) rather than be silently
        # nondeterministic; the native backend has a deterministic backward
        msg = ("rtdetr_fast ms_deform_attn backward (triton backend) does not have a "
               "deterministic implementation (float atomics); use the native backend, or "
               "torch.use_deterministic_algorithms(True, warn_only=True)")
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(msg)
        else:
            raise RuntimeError(msg)
    grad_value, grad_loc, grad_attn = _backward_op(grad_output.contiguous(), *ctx.saved_tensors,
                                                   ctx.method)
    return grad_value, None, None, grad_loc, grad_attn, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


_level_tables: "OrderedDict[tuple, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()


def _level_tensors(spatial_shapes, level_start_index, device):
    """The kernels read the level table from device memory: made once per (table, device) and
    kept (a bounded LRU), so a steady-state call copies nothing to the device."""
    if isinstance(spatial_shapes, torch.Tensor) and isinstance(level_start_index, torch.Tensor):
        return (spatial_shapes.to(device, torch.long).contiguous(),
                level_start_index.to(device, torch.long).contiguous())
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    if isinstance(level_start_index, torch.Tensor):
        level_start_index = level_start_index.tolist()
    key = (tuple((int(h), int(w)) for h, w in spatial_shapes),
           tuple(int(s) for s in level_start_index), str(device))
    hit = _level_tables.get(key)
    if hit is None:
        hit = (torch.tensor(key[0], dtype=torch.long, device=device).reshape(-1, 2),
               torch.tensor(key[1], dtype=torch.long, device=device))
        _level_tables[key] = hit
        if len(_level_tables) > 32:
            _level_tables.popitem(last=False)
    else:
        _level_tables.move_to_end(key)
    return hit


def ms_deform_attn_triton(value: torch.Tensor, spatial_shapes, level_start_index,
                          sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                          method: str = "default") -> torch.Tensor:
    shapes, starts = _level_tensors(spatial_shapes, level_start_index, value.device)
    return _forward(value.contiguous(), shapes, starts, sampling_locations.contiguous(),
                    attention_weights.contiguous(), method)


ms_deform_attn_triton.methods = ("default", "discrete")  # type: ignore[attr-defined]


_backend.register("ms_deform_attn", "triton", _backend.triton_supports)(ms_deform_attn_triton)
