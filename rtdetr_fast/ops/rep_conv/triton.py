"""Triton folded RepConv: act(conv3x3(x, weight, stride 1, padding 1) + bias) as an implicit GEMM.

GEMM view: M = B*H*W output pixels, N = C_out, K = 9*C_in ordered (tap, channel). A program owns
a BLOCK_M x BLOCK_N output tile; for each of the 9 taps it walks C_in in BLOCK_K chunks, loading
the shifted input pixels (zero outside the map: that is the padding) and the tap's weight slice,
and accumulates in float32 with ``tl.dot``. Bias and activation are applied to the float32
accumulator before the one store: the epilogue that saves the separate bias/SiLU pass.

Layout: the kernel takes explicit strides, so any memory format is *correct*; channels_last
(NHWC) is the fast one (a BLOCK_K run of channels is contiguous), so the wrapper converts x and the
weight to channels_last first and writes a channels_last output, as cuDNN does for channels_last
input. Every M, C_in, C_out is masked: arbitrary channel counts and map sizes are exact.

Precision: float16/bfloat16 inputs, float32 accumulation, output in the input dtype. float32
inputs run ``tl.dot`` in TF32 on the GPU (as torch's cuDNN convolution does by default,
``torch.backends.cudnn.allow_tf32``); in the interpreter the dot is exact float32.

Documented fallbacks to the reference (same result, never a silent wrong one): float64 and other
dtypes, inputs that need a gradient (this op is the deploy-time forward only), and tensors whose
per-image or output extent passes 2^31 elements. Mismatched dtypes or devices raise.

Importing this module does not import triton: the kernel is built on first use, which is also what
lets tests set ``TRITON_INTERPRET=1`` before triton decorates it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import _backend
from ._common import ACTIVATIONS, apply_activation, check_same, conv_act, empty_output

ACT_CODE = {"identity": 0, "relu": 1, "silu": 2}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_LIMIT = 2 ** 31 - 1

# CCFF shapes: C = 256 (384 for R101), K = 9*C = 2304..3456, M from 400 (B=1, 20x20) to
# 204800 (B=32, 80x80). Big tiles feed the tensor cores at large M; the 64-wide ones keep every SM
# busy when M is a few hundred pixels.
_CONFIGS = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
    (128, 128, 64, 3, 8),
    (128, 256, 64, 3, 8),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 5, 2),
]
# the interpreter runs the kernel with numpy on CPU: the smallest tiles tl.dot accepts
_INTERPRET_BLOCK = (16, 16, 16)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    # triton picks compiled or interpreted at decoration time, from TRITON_INTERPRET: one build
    # per mode, so a process that toggles the variable (the test suite) gets the right one
    import triton
    import triton.language as tl

    @triton.jit
    def _rep_conv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, C_in, C_out, H, W,
                         sxb, sxc, sxh, sxw, swo, swi, swh, sww, syb, syc, syh, syw,
                         HAS_BIAS: tl.constexpr, ACT: tl.constexpr, TF32: tl.constexpr,
                         DOT_F32: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        # core builtins only (arithmetic for tl.cdiv, tl.full for tl.zeros): the helpers of
        # triton's standard library are @triton.jit functions decorated when triton.language is
        # first imported, and the interpreter cannot call one built before TRITON_INTERPRET=1
        num_m = (M + BLOCK_M - 1) // BLOCK_M
        num_n = (C_out + BLOCK_N - 1) // BLOCK_N
        # grouped order: GROUP_M pixel tiles share the weight tiles while they sit in L2
        per_group = GROUP_M * num_n
        group = pid // per_group
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < C_out
        HW = H * W
        b = offs_m // HW
        r = offs_m % HW
        oh = r // W
        ow = r % W
        x_img = b.to(tl.int64) * sxb
        w_row = offs_n.to(tl.int64) * swo

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for tap in range(9):
            kh = tap // 3
            kw = tap % 3
            ih = oh + (kh - 1)
            iw = ow + (kw - 1)
            # the zero padding: taps that fall outside the map load nothing and read as 0
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_pix = x_img + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            w_tap = w_row + kh * swh + kw * sww
            for c0 in range(0, C_in, BLOCK_K):
                c = c0 + offs_k
                c_ok = c < C_in
                a = tl.load(x_ptr + x_pix[:, None] + c[None, :].to(tl.int64) * sxc,
                            mask=ok[:, None] & c_ok[None, :], other=0.0)
                w = tl.load(w_ptr + w_tap[None, :] + c[:, None].to(tl.int64) * swi,
                            mask=c_ok[:, None] & n_ok[None, :], other=0.0)
                if DOT_F32:
                    # triton 3.9's interpreter returns garbage from a bfloat16 tl.dot; a
                    # bfloat16 product is exact in float32, so the upcast dot is the same math
                    acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc,
                                 input_precision="ieee")
                elif TF32:
                    acc = tl.dot(a, w, acc, input_precision="tf32")
                else:
                    acc = tl.dot(a, w, acc)

        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        if ACT == 1:
            acc = tl.maximum(acc, 0.0)
        elif ACT == 2:
            # x * sigmoid(x) on the float32 accumulator; exp(-x) -> inf gives x / inf = -0,
            # the limit, so no clamp is needed
            acc = acc / (1.0 + tl.exp(-acc))
        y_off = (b.to(tl.int64) * syb + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None] \
            + offs_n.to(tl.int64)[None, :] * syc
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                             num_stages=s, num_warps=w) for bm, bn, bk, s, w in _CONFIGS]
    tuned = triton.autotune(configs=configs, key=["M", "C_in", "C_out"])(_rep_conv_kernel)
    return _rep_conv_kernel, tuned


def _fallback_reason(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
                     ) -> Optional[str]:
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype}"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return "inputs that need a gradient"
    B, C_in, H, W = x.shape
    C_out = weight.shape[0]
    if C_in * H * W > _INT32_LIMIT or B * H * W > _INT32_LIMIT or C_out * 9 * C_in > _INT32_LIMIT:
        return "extents past 2^31"
    return None


def launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           activation: str) -> torch.Tensor:
    """Run the kernel on valid input (the custom op's body)."""
    B, C_in, H, W = x.shape
    C_out = weight.shape[0]
    y = empty_output(x, weight)
    M = B * H * W
    if M == 0 or C_out == 0:
        return y
    if C_in == 0:
        # an empty K: the conv is zero, the output is act(bias)
        b = (bias if bias is not None else x.new_zeros(C_out)).view(1, C_out, 1, 1)
        return y.copy_(apply_activation(b.expand_as(y), activation))
    interpreting = _backend.triton_interpreting()
    x = x.contiguous(memory_format=torch.channels_last)
    w = weight.contiguous(memory_format=torch.channels_last)
    has_bias = bias is not None
    b_arg = bias.contiguous() if has_bias else w  # never read without HAS_BIAS
    plain, tuned = _kernels(interpreting)
    # triton 3.9's interpreter narrows float32 to bfloat16 by truncation (the GPU rounds to
    # nearest even), which alone doubles the error: there the kernel writes float32 and torch
    # rounds
    out = (torch.empty_like(y, dtype=torch.float32) if interpreting and x.dtype == torch.bfloat16
           else y)
    args = (x, w, b_arg, out, M, C_in, C_out, H, W, *x.stride(), *w.stride(), *out.stride())
    flags = dict(HAS_BIAS=has_bias, ACT=ACT_CODE[activation], TF32=x.dtype == torch.float32,
                 DOT_F32=interpreting and x.dtype == torch.bfloat16)
    if interpreting:
        bm, bn, bk = _INTERPRET_BLOCK
        grid = (triton_cdiv(M, bm) * triton_cdiv(C_out, bn),)
        plain[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    else:
        def grid(meta):
            return (triton_cdiv(M, meta["BLOCK_M"]) * triton_cdiv(C_out, meta["BLOCK_N"]),)
        with torch.cuda.device(x.device):
            tuned[grid](*args, **flags)
    if out is not y:
        y.copy_(out)
    return y


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# -- torch.library op, so torch.compile and CUDA graphs see one opaque call --------------------

@torch.library.custom_op("rtdetr_fast::rep_conv_triton", mutates_args=())
def _rep_conv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 activation: str) -> torch.Tensor:
    return launch(x, weight, bias, activation)


@_rep_conv_op.register_fake
def _rep_conv_fake(x, weight, bias, activation):
    return empty_output(x, weight)


def rep_conv_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    activation: str = "silu") -> torch.Tensor:
    """Triton backend of :func:`rtdetr_fast.ops.rep_conv` (shapes already validated there)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_same(x, weight, bias)
    if _fallback_reason(x, weight, bias) is not None:
        return conv_act(x, weight, bias, activation)
    return _rep_conv_op(x, weight, bias, activation)
