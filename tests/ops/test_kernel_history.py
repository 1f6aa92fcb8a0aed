"""A CPU kernel's result depends on its inputs only: the same call gives the same bits after
calls of other shapes (which reuse and resize per-thread buffers, the large-block cache of the
gradients and the transformed weights), for the Winograd convolution (fused and unfused
schedules, the training Function) and the native deformable attention (forward and backward)."""
from __future__ import annotations

import pytest
import torch

from rtdetr_fast import ops
from rtdetr_fast.ops import _backend
from rtdetr_fast.ops.rep_conv import winograd as wg

HAS_WINOGRAD = _backend.extension() is not None and wg.available()
HAS_MSDA = _backend.extension_has("ms_deform_attn", "cpu")
AVX512 = bool(_backend.cpu_kernels().get("avx512"))


def _conv_inputs(N, C, H, W, K, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(K, C, 3, 3, generator=g) / (3 * C ** 0.5)
    b = torch.randn(K, generator=g)
    return x, w, b


def _winograd(x, w, b):
    return torch.ops.rtdetr_fast.winograd_conv3x3(x, wg.winograd_weight(w), b, "silu")


# (N, C_in, H, W, C_out): the first takes the fused schedule on AVX-512, the second the unfused
# one (too wide for a block in the cache), the rest differ in every dimension and in the tails of
# the tile strips
PROBES = [(2, 64, 36, 44, 72), (1, 256, 20, 20, 256)]
OTHERS = [(1, 32, 81, 79, 40), (3, 128, 17, 9, 96), (2, 64, 160, 160, 64), (1, 48, 5, 7, 56)]


@pytest.mark.skipif(not HAS_WINOGRAD, reason="rtdetr_fast._C not built")
@pytest.mark.parametrize("probe", PROBES, ids=lambda s: "x".join(map(str, s)))
def test_winograd_same_bits_after_calls_of_other_shapes(probe):
    x, w, b = _conv_inputs(*probe, seed=1)
    first = _winograd(x, w, b)
    for i, other in enumerate(OTHERS):
        _winograd(*_conv_inputs(*other, seed=10 + i))
    assert torch.equal(_winograd(x.clone(), w.clone(), b.clone()), first)


def _train_step(x, w, b, g):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    y = wg.conv3x3_train(x, w, b)
    return (y.detach(), *torch.autograd.grad(y, (x, w, b), g))


@pytest.mark.skipif(not HAS_WINOGRAD, reason="rtdetr_fast._C not built")
def test_winograd_training_same_bits_after_calls_of_other_shapes():
    if not AVX512:
        pytest.skip("the AVX-512 kernels do not run on this CPU: the training path at 32 "
                    "channels is the one the model takes there")
    x, w, b = _conv_inputs(2, 32, 64, 64, 64, seed=2)
    g = torch.randn(2, 64, 64, 64, generator=torch.Generator().manual_seed(3))
    first = _train_step(x, w, b, g)
    for i, (N, C, H, W, K) in enumerate([(4, 64, 32, 32, 64), (2, 64, 40, 40, 128),
                                         (1, 32, 90, 70, 32)]):
        xo, wo, bo = _conv_inputs(N, C, H, W, K, seed=20 + i)
        _train_step(xo, wo, bo, torch.randn(N, K, H, W))
    again = _train_step(x, w, b, g)
    for a, c in zip(first, again):
        assert torch.equal(a, c)


def _msda_inputs(B, Q, H, D, shapes, P, seed):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    value = torch.randn(B, S, H, D, generator=g)
    loc = torch.rand(B, Q, H, len(shapes), P, 2, generator=g) * 1.4 - 0.2
    attn = torch.rand(B, Q, H, len(shapes), P, generator=g)
    grad = torch.randn(B, Q, H * D, generator=g)
    return value, shapes, starts, loc, attn, grad


def _msda(value, shapes, starts, loc, attn, grad):
    value, loc, attn = (t.clone().requires_grad_(True) for t in (value, loc, attn))
    with ops.backend("native"):
        out = ops.ms_deform_attn(value, shapes, starts, loc, attn)
    return (out.detach(), *torch.autograd.grad(out, (value, loc, attn), grad))


@pytest.mark.skipif(not HAS_MSDA, reason="rtdetr_fast._C not built")
def test_ms_deform_attn_same_bits_after_calls_of_other_shapes():
    # large enough that the value gradient comes from the large-block cache (tens of MB)
    probe = _msda_inputs(4, 300, 8, 32, [(80, 80), (40, 40), (20, 20)], 4, seed=4)
    first = _msda(*probe)
    for i, (B, Q, H, D, shapes, P) in enumerate([
            (8, 200, 8, 32, [(80, 80), (40, 40), (20, 20)], 4),
            (2, 17, 3, 30, [(6, 5), (3, 4), (1, 1)], 2),
            (4, 300, 8, 32, [(40, 40), (20, 20), (10, 10)], 4)]):
        _msda(*_msda_inputs(B, Q, H, D, shapes, P, seed=30 + i))
    again = _msda(*probe)
    for a, c in zip(first, again):
        assert torch.equal(a, c)
