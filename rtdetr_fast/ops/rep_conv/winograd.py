"""The CPU kernel of folded RepConv: ``rtdetr_fast::winograd_conv3x3`` (csrc/rep_conv/cpu/).

  rtdetr_fast::winograd_conv3x3(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor

act(conv3x3(x, w, stride 1, padding 1) + bias) as Winograd F(4x4, 3x3): 36 multiplies per 4x4
output tile instead of 144, as 36 GEMMs over the channels between an input and an output
transform written in C++. ``weight`` is the transformed kernel ``U = G w G^T``
([36, C_out, C_in], :func:`winograd_weight`), made in float64 once per weight and kept.

The GEMMs: in float32 on a CPU with AVX-512, the kernel's own (csrc/rep_conv/cpu/
winograd_gemm_avx512.inc), and for narrow layers on large maps (64-128 channels at 80x80 and
up) a fused schedule in which each thread transforms, multiplies and transforms back blocks of
tile rows in its own cache; elsewhere (float64, no AVX-512, ``RTDETR_FAST_NO_AVX512=1``)
``at::bmm``. ``RTDETR_WINO_FUSED=0`` turns the fused schedule off; both give the same bits.

Numerics: exact in exact arithmetic; in float32 the transforms' rounding gives differences of
about 1e-5 of the output's scale against a direct convolution (the tests bound it), in float64
about 1e-13. ops.rep_conv runs it for inference only (no gradient), float32 and float64, NCHW;
calls it does not cover, and channel counts below :func:`min_channels`, run the reference
(ops.rep_conv's native backend sends the narrow float32 ones to oneDNN, see native.py).
Training on the CPU takes it through :func:`conv3x3_train` (an autograd Function: the kernel runs
the forward and the input gradient, oneDNN the weight gradient), which the model's 3x3 stride-1
ConvNormLayers use in float32 when :func:`trains` says so. From 64 channels the kernel
beats torch's conv then SiLU (benchmarks/ops/bench_rep_conv.py; benchmarks/RESULTS.md). At 32
channels it wins only with the
fused schedule (float32, AVX-512), where the stem's convs take it too; elsewhere they stay on
oneDNN's channels_last convolution, which was faster there.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _backend

# Lavin & Gray's F(4x4, 3x3) kernel transform, interpolation points 0, +-1, +-2, infinity
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))

MIN_CHANNELS = 64  # C_in or C_out below this: the direct convolution
# ... except in float32 where the AVX-512 GEMMs and the fused schedule run, which beat oneDNN's
# channels_last conv on the stem's 32-channel convs at 320x320 (benchmarks/ops/bench_rep_conv.py)
MIN_CHANNELS_FUSED = 32
_DTYPES = (torch.float32, torch.float64)
_registered = False
_avx512 = False  # whether the extension's AVX-512 kernels run (read when it loads)


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """U = G w G^T of a [C_out, C_in, 3, 3] kernel: [36, C_out, C_in] (row-major 6x6 index),
    computed in float64 and rounded once to ``weight``'s dtype."""
    G = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    U = torch.einsum("ij,kcjl,ml->imkc", G, weight.detach().double(), G)
    return U.reshape(36, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


def _fake(x, weight, bias, activation):
    return x.new_empty((x.shape[0], weight.shape[1], x.shape[2], x.shape[3]))


def _register_python_side() -> None:
    global _registered, _avx512
    if _registered:
        return
    torch.library.register_fake("rtdetr_fast::winograd_conv3x3")(_fake)
    # read once here, not in min_channels: a compiled forward must not call into the extension
    module = importlib.import_module("rtdetr_fast._C")
    _avx512 = bool(getattr(module, "cpu_kernels", dict)().get("avx512", False))
    _registered = True


_backend.on_extension_load(_register_python_side)


def is_conv3x3_same(conv: torch.nn.Conv2d) -> bool:
    """Whether ``conv`` has rep_conv's geometry: 3x3, stride 1, zero padding 1, no dilation,
    no groups."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def available() -> bool:
    return _backend.extension_has("winograd_conv3x3", "cpu")


def min_channels(dtype: torch.dtype) -> int:
    """The narrowest C_in and C_out the kernel takes in ``dtype``: :data:`MIN_CHANNELS_FUSED`
    in float32 on a CPU whose AVX-512 kernels run, else :data:`MIN_CHANNELS`."""
    if dtype == torch.float32 and _avx512_kernels():
        return MIN_CHANNELS_FUSED
    return MIN_CHANNELS


def _avx512_kernels() -> bool:
    """Whether the extension's AVX-512 kernels run. Loads the extension first (which sets the
    flag through its load hook): a flag read before it loaded would route the first calls of a
    process differently from the later ones, so the same step would compute other bits in a
    fresh process (a resumed run) than in a long one. A compiled forward never loads it here:
    ``prepare`` and the eager calls before compiling have."""
    if not _registered and not torch.compiler.is_compiling():
        _backend.extension()
    return _avx512


def covers(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether the Winograd kernel runs this call (else the reference does)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        return False
    narrowest = min_channels(x.dtype)
    if x.shape[1] < narrowest or weight.shape[0] < narrowest:
        return False
    return not (torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)))


def _transformed(weight: torch.Tensor) -> torch.Tensor:
    """The weight's transform, kept on the weight tensor itself and remade when the weight is
    written to (its version counter moves) or is another tensor's copy."""
    if torch.compiler.is_compiling():
        hit = getattr(weight, "_rtdetr_fast_winograd", None)
        if hit is not None:
            return hit[1]
        return winograd_weight(weight)
    # an inference tensor (a model deployed under inference_mode) has no version counter
    version = None if weight.is_inference() else weight._version
    key = (version, weight.data_ptr(), weight.dtype, tuple(weight.shape))
    hit = getattr(weight, "_rtdetr_fast_winograd", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    U = winograd_weight(weight)
    weight._rtdetr_fast_winograd = (key, U)
    return U


def prepare(module: torch.nn.Module) -> int:
    """Make and keep the transformed weight of every 3x3 stride-1 conv under ``module`` wide
    enough for the kernel, so that a compiled graph reads it instead of recomputing it
    (``rtdetr_fast.compile`` calls this). Returns how many were made."""
    n = 0
    for m in module.modules():
        if (isinstance(m, torch.nn.Conv2d) and is_conv3x3_same(m)
                and min(m.in_channels, m.out_channels) >= min_channels(m.weight.dtype)
                and m.weight.device.type == "cpu" and m.weight.dtype in _DTYPES):
            with torch.no_grad():
                _transformed(m.weight)
            n += 1
    return n


def rep_conv_winograd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      activation: str) -> torch.Tensor:
    """The kernel on a call :func:`covers` accepts (shapes validated by ops.rep_conv)."""
    return torch.ops.rtdetr_fast.winograd_conv3x3(
        x.contiguous(), _transformed(weight), None if bias is None else bias.contiguous(),
        activation)


# ---------------------------------------------------------------------------------------------
# Training: the kernel inside an autograd Function (float32, CPU)
#
# A 3x3 stride-1 conv's input gradient is the same conv of the output gradient with the kernel
# transposed and flipped, so the kernel runs the forward and that half of the backward; the
# weight gradient is oneDNN's (aten.convolution_backward). The weights change every step, so
# their transforms are made per call in float32, as one [36, 9] x [9, C_out*C_in] GEMM
# (kron(G, G)), not in float64 as the inference path keeps them.

def _kron_g(dtype: torch.dtype, device) -> torch.Tensor:
    # U[e] = sum_f kron(G, G)[e, f] w[f], e = 6*row + column, f = 3*row + column
    G = torch.tensor(_G, dtype=torch.float64)
    return torch.kron(G, G).to(device=device, dtype=dtype)  # [36, 9]


def winograd_weight_fast(weight: torch.Tensor, transpose_flip: bool = False) -> torch.Tensor:
    """U = G w G^T of a [C_out, C_in, 3, 3] kernel in ``weight``'s own dtype, as one
    [36, 9] x [9, C_out*C_in] GEMM: [36, C_out, C_in], the layout of :func:`winograd_weight`,
    differing from it by the dtype's rounding. ``transpose_flip``: the transform of
    ``weight.transpose(0, 1).flip(2, 3)`` instead ([36, C_in, C_out], the kernel of the input
    gradient), the flip folded into the 9 columns' order."""
    K, C = weight.shape[:2]
    kron = _kron_g(weight.dtype, weight.device)
    w = weight.detach()
    if transpose_flip:
        kron = kron.flip(1)  # (2 - row, 2 - column) is 8 - f
        w = w.transpose(0, 1)
        K, C = C, K
    return (kron @ w.reshape(K * C, 9).t()).reshape(36, K, C)


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.rtdetr_fast.winograd_conv3x3(
            x, winograd_weight_fast(weight), None if bias is None else bias.detach().contiguous(),
            "identity")

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.rtdetr_fast.winograd_conv3x3(
                grad_y, winograd_weight_fast(weight, transpose_flip=True), None, "identity")
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad_y, x, weight.detach(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [False, True, False])[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


# The least B*H*W for the training path: below it (20x20 maps at batch 2) the per-call weight
# transforms and the short tile strips make forward+backward slower than oneDNN's; from 40x40 at
# batch 2, and 20x20 at batch 8, the kernel is as fast or faster
# (benchmarks/model/bench_train_step.py; benchmarks/results/cpu-train-step-*.log).
MIN_TRAIN_PIXELS = 3200


def trains(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether :func:`conv3x3_train` runs ``conv(x)``: a gradient is needed, float32 on the
    CPU, 3x3 stride 1 padding 1, both widths at least :func:`min_channels`, B*H*W at least
    :data:`MIN_TRAIN_PIXELS`, the extension's kernel present, the backend not forced to the
    reference, no autocast, and not inside torch.compile."""
    w = conv.weight
    return (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
            and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.dim() == 4 and x.shape[0] * x.shape[2] * x.shape[3] >= MIN_TRAIN_PIXELS
            and is_conv3x3_same(conv)
            and min(conv.in_channels, conv.out_channels) >= min_channels(torch.float32)
            and not torch.compiler.is_compiling() and _backend.current() in ("auto", "native")
            and not torch.is_autocast_enabled("cpu") and available())


def conv3x3_train(x: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """conv2d(x, weight, bias, stride 1, padding 1) with gradients, on the Winograd kernel
    (forward and input gradient); callers check :func:`trains` first."""
    return _Conv3x3.apply(x, weight, bias)
