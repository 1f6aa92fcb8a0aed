"""The CPU kernel of folded RepConv: rtdetr_fast::winograd_conv3x3 (Winograd F(4x4, 3x3)).

Against the direct convolution in float64 (exact up to rounding: the transform is exact in exact
arithmetic), float32 within the bound the module documents, odd sizes (H, W not multiples of
the 4x4 tile, 1x1 maps, batch 0 and 2), every activation, the baseline (non-AVX2) build in a
child process, bad input, the routing of ops.rep_conv on the CPU, the weight cache, opcheck and
torch.compile.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from rtdetr_fast import ops
from rtdetr_fast.ops import _backend
from rtdetr_fast.ops.rep_conv import onednn
from rtdetr_fast.ops.rep_conv import winograd as wg

from conftest import run_baseline_child

HAS_KERNEL = _backend.extension() is not None and wg.available()
pytestmark = pytest.mark.skipif(not HAS_KERNEL, reason="rtdetr_fast._C not built")

ACT = {"silu": F.silu, "relu": F.relu, "identity": lambda t: t}
# (N, C_in, H, W, C_out)
SHAPES = [(1, 8, 8, 8, 8), (2, 5, 13, 17, 7), (1, 3, 1, 1, 4), (1, 6, 5, 3, 9), (0, 4, 6, 6, 4),
          (1, 16, 4, 21, 16), (1, 3, 45, 9, 4), (2, 4, 22, 50, 6)]


def _inputs(N, C, H, W, K, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed + 100 * C + K)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(K, C, 3, 3, generator=g, dtype=torch.float64) / (3 * C ** 0.5)
    b = torch.randn(K, generator=g, dtype=torch.float64) if bias else None
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def _direct64(x, w, b, act):
    return ACT[act](F.conv2d(x.double(), w.double(), None if b is None else b.double(),
                             padding=1))


def _kernel(x, w, b, act):
    return torch.ops.rtdetr_fast.winograd_conv3x3(x, wg.winograd_weight(w), b, act)


@pytest.mark.parametrize("act", sorted(ACT))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float64_equals_direct_convolution(shape, act):
    x, w, b = _inputs(*shape, torch.float64)
    out = _kernel(x, w, b, act)
    ref = _direct64(x, w, b, act)
    assert out.shape == ref.shape and out.dtype == torch.float64
    if out.numel():
        assert (out - ref).abs().max().item() <= 1e-12 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_within_documented_bound(shape, bias):
    x, w, b = _inputs(*shape, torch.float32, bias=bias)
    out = _kernel(x, w, b, "identity")
    ref = _direct64(x, w, b, "identity")
    assert out.dtype == torch.float32
    if out.numel():
        # the transforms' rounding: about 1e-5 of the output's scale (module docstring)
        scale = ref.abs().max().item()
        assert (out.double() - ref).abs().max().item() <= 2e-5 * max(scale, 1.0)


@pytest.mark.parametrize("shape", [(1, 128, 40, 40, 128), (2, 64, 36, 44, 72)],
                         ids=lambda s: "x".join(map(str, s)))
def test_model_sized_layer_float32(shape):
    """Layers of the sizes the deployed detector runs (64 to 128 channels, 40x40), batch 2."""
    x, w, b = _inputs(*shape, torch.float32)
    out = _kernel(x, w, b, "silu")
    ref = _direct64(x, w, b, "silu")
    assert (out.double() - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


@pytest.mark.parametrize("shape", [(1, 9, 20, 20, 13), (1, 12, 16, 40, 8), (3, 7, 16, 16, 1),
                                   (1, 70, 36, 60, 24), (2, 17, 8, 33, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_float32_gemm_strips_and_panels(shape):
    """The float32 GEMMs run in 8-row panels of the output channels and 48-tile strips, the
    last strip masked (AVX-512 build; at::bmm elsewhere, and in the baseline child): tiles
    25, 40, 48, 135 and 36 reach every tail width class (one, two, three vectors, masked or
    whole), output channels 13, 8, 1, 24 and 9 every panel remainder kind."""
    x, w, b = _inputs(*shape, torch.float32)
    out = _kernel(x, w, b, "identity")
    ref = _direct64(x, w, b, "identity")
    assert (out.double() - ref).abs().max().item() <= 2e-5 * max(ref.abs().max().item(), 1.0)


# (N, C_in, H, W, C_out) that take the fused float32 schedule on AVX-512 (blocks of tile rows,
# a short last block, blocks in several images, H and W not multiples of 4)
FUSED = [(2, 9, 50, 34, 11), (1, 16, 70, 70, 8), (4, 3, 17, 64, 5), (2, 64, 36, 44, 72)]


@pytest.mark.parametrize("act", sorted(ACT))
@pytest.mark.parametrize("shape", FUSED, ids=lambda s: "x".join(map(str, s)))
def test_float32_fused_schedule_equals_unfused(shape, act, monkeypatch):
    """The fused schedule runs the same transforms and GEMM arithmetic per block as the unfused
    one does over the batch: bit for bit the same output (RTDETR_WINO_FUSED=0 forces the
    unfused one), and within the float32 bound of the direct convolution."""
    x, w, b = _inputs(*shape, torch.float32, bias=act != "relu")
    fused = _kernel(x, w, b, act)
    monkeypatch.setenv("RTDETR_WINO_FUSED", "0")
    unfused = _kernel(x, w, b, act)
    assert torch.equal(fused, unfused)
    ref = _direct64(x, w, b, act)
    assert (fused.double() - ref).abs().max().item() <= 2e-5 * max(ref.abs().max().item(), 1.0)


def test_float32_silu_epilogue():
    """The float32 SiLU epilogue computes e^-v with its own vectorised polynomial (kernels.inc):
    over [-87, 60] it matches float64 silu to the rounding of the pre-activation, past -87 it
    stays within |v| 2e-38 of zero, zero stays zero and NaN stays NaN. 1x1 maps, so that each
    value is its own tile and its transforms are nearly exact."""
    v = torch.cat([torch.linspace(-87.0, 60.0, 2941), torch.tensor([-1e-30, 1e-30, 0.0])])
    far = torch.tensor([-87.5, -90.0, -100.0, -1e3])
    x = torch.cat([v, far, torch.tensor([float("nan")])]).reshape(-1, 1, 1, 1)
    w = torch.zeros(1, 1, 3, 3)
    w[0, 0, 1, 1] = 1.0
    U = wg.winograd_weight(w)
    y = torch.ops.rtdetr_fast.winograd_conv3x3(x, U, None, "silu").flatten()
    pre = torch.ops.rtdetr_fast.winograd_conv3x3(x, U, None, "identity").flatten()
    n, m = v.numel(), far.numel()
    ref = F.silu(pre[:n].double())
    err = (y[:n].double() - ref).abs()
    assert (err <= 1e-6 * ref.abs() + 1e-37).all(), err.max()
    assert (y[n:n + m].abs() <= 2e-38 * far.abs()).all() and (y[n:n + m] <= 0).all()
    assert y[n - 1] == 0 and y[-1].isnan()


@pytest.mark.parametrize("act", sorted(ACT))
def test_nan_image_stays_nan_and_alone(act):
    """An image of NaN gives NaN for every activation (ReLU too, as torch.relu does), and the
    other image of the batch equals the direct convolution."""
    x, w, b = _inputs(2, 5, 11, 14, 6, torch.float64)
    x[1] = float("nan")
    out = _kernel(x, w, b, act)
    assert out[1].isnan().all()
    ref = _direct64(x[:1], w, b, act)
    assert (out[:1] - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()


@pytest.mark.skipif(os.environ.get("RTDETR_FAST_NO_AVX2") == "1", reason="this is the child")
def test_baseline_build_in_child():
    """The transforms exist twice (baseline x86-64 and AVX2+FMA, chosen at run time): the
    kernel tests run again in a child process forced onto the baseline build."""
    run_baseline_child(os.path.abspath(__file__), "-k", "float64 or float32", timeout=600)


def test_winograd_weight_shape_and_exactness():
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    U = wg.winograd_weight(w)
    assert U.shape == (36, 5, 3) and U.is_contiguous()
    # the corner entry of G w G^T is w[0, 0] / 16
    torch.testing.assert_close(U[0], w[:, :, 0, 0] / 16)
    assert wg.winograd_weight(w.float()).dtype == torch.float32


@pytest.mark.parametrize("bad, match", [
    (lambda x, U, b: (x[0], U, b, "relu"), r"\[N, C_in, H, W\]"),
    (lambda x, U, b: (x, U[:35], b, "relu"), "Winograd"),
    (lambda x, U, b: (x, U[:, :, :3], b, "relu"), "C_in=4"),
    (lambda x, U, b: (x.half(), U.half(), b.half(), "relu"), "float32 or float64"),
    (lambda x, U, b: (x, U.double(), b, "relu"), "dtype"),
    (lambda x, U, b: (x.transpose(2, 3), U, b, "relu"), "contiguous"),
    (lambda x, U, b: (x, U, b[:2], "relu"), r"bias must be \[C_out\]"),
    (lambda x, U, b: (x, U, b, "gelu"), "activation must be one of"),
])
def test_bad_input_raises_one_line(bad, match):
    x, w, b = _inputs(1, 4, 5, 6, 3, torch.float32)
    args = bad(x, wg.winograd_weight(w), b)
    with pytest.raises(RuntimeError, match=match) as info:
        torch.ops.rtdetr_fast.winograd_conv3x3(*args)
    assert "\n" not in str(info.value).split("\nException raised from")[0].strip()


def test_ops_rep_conv_routes_wide_layers_to_winograd():
    """ops.rep_conv on the CPU: the kernel for layers of MIN_CHANNELS and more without a
    gradient; below that oneDNN's conv with the activation fused in float32 and the reference
    (bit for bit torch's conv) in float64; the reference under autograd."""
    C = wg.MIN_CHANNELS
    x, w, b = _inputs(1, C, 9, 7, C, torch.float32)
    with torch.no_grad():
        out = ops.rep_conv(x, w, b, "relu")
        assert torch.equal(out, _kernel(x, w, b, "relu"))
        xn, wn, bn = x[:, :8], w[:8, :8], b[:8]
        for act in sorted(ACT):
            narrow = ops.rep_conv(xn, wn, bn, act)
            fused = onednn.conv_act(xn, wn, bn, (1, 1), (1, 1), (1, 1), 1, act)
            assert torch.equal(narrow, fused), act
            torch.testing.assert_close(narrow, _direct64(xn, wn, bn, act).float(), rtol=1e-5,
                                       atol=1e-5)
        xd, wd, bd = xn.double(), wn.double(), bn.double()
        assert torch.equal(ops.rep_conv(xd, wd, bd, "relu"),
                           F.relu(F.conv2d(xd, wd, bd, padding=1)))
    xg = x.clone().requires_grad_()
    out = ops.rep_conv(xg, w, b, "identity")
    assert torch.equal(out, F.conv2d(x, w, b, padding=1))
    out.sum().backward()
    assert xg.grad is not None


def test_cached_transform_follows_the_weight():
    C = wg.MIN_CHANNELS
    x, w, b = _inputs(1, C, 6, 6, C, torch.float64)
    with torch.no_grad():
        first = ops.rep_conv(x, w, b, "identity")
        w.mul_(-2.0)  # in place: the version counter moves, the cached transform is remade
        second = ops.rep_conv(x, w, b, "identity")
    torch.testing.assert_close(second, _direct64(x, w, b, "identity"), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(first, second)


def test_opcheck():
    x, w, b = _inputs(2, 5, 7, 6, 4, torch.float64)
    torch.library.opcheck(torch.ops.rtdetr_fast.winograd_conv3x3.default,
                          (x, wg.winograd_weight(w), b, "silu"),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiled_fullgraph_equals_eager():
    C = wg.MIN_CHANNELS
    x, w, b = _inputs(1, C, 10, 12, C, torch.float32)

    def f(x):
        return ops.rep_conv(x, w, b, "silu")

    torch._dynamo.reset()
    with torch.no_grad():
        eager = f(x)
        compiled = torch.compile(f, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_min_channels_follows_the_avx512_build():
    """32-channel layers take the kernel in float32 where its AVX-512 build (the fused
    schedule) runs; 64 elsewhere and in float64."""
    from torch.profiler import profile

    avx512 = _backend.cpu_kernels().get("avx512", False)
    assert wg.min_channels(torch.float64) == wg.MIN_CHANNELS == 64
    assert wg.min_channels(torch.float32) == (wg.MIN_CHANNELS_FUSED if avx512 else 64)
    for dtype in (torch.float32, torch.float64):
        x, w, b = _inputs(1, 32, 9, 7, 32, dtype)
        with torch.no_grad(), profile() as prof:
            out = ops.rep_conv(x, w, b, "relu")
        ran = any(e.key == "rtdetr_fast::winograd_conv3x3" for e in prof.key_averages())
        assert ran == (avx512 and dtype == torch.float32), dtype
        ref = _direct64(x, w, b, "relu")
        assert (out.double() - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


# ---- training: conv3x3_train (forward and input gradient on the kernel) ----------------------

@pytest.mark.parametrize("transpose_flip", [False, True])
def test_fast_weight_transform_matches_float64_one(transpose_flip):
    w = torch.randn(7, 5, 3, 3, generator=torch.Generator().manual_seed(3))
    ref = wg.winograd_weight(w.transpose(0, 1).flip(2, 3) if transpose_flip else w)
    got = wg.winograd_weight_fast(w, transpose_flip=transpose_flip)
    assert got.shape == ref.shape == ((36, 5, 7) if transpose_flip else (36, 7, 5))
    assert got.is_contiguous()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    w64 = w.double()
    torch.testing.assert_close(wg.winograd_weight_fast(w64, transpose_flip=transpose_flip),
                               wg.winograd_weight(w64.transpose(0, 1).flip(2, 3)
                                                  if transpose_flip else w64),
                               atol=1e-14, rtol=1e-14)


def test_train_conv_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(wg.conv3x3_train, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: wg.conv3x3_train(x, w, None), (x, w))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 32, 13, 17, 48), (1, 64, 40, 40, 32), (3, 40, 9, 22, 40)],
                         ids=lambda s: "x".join(map(str, s)))
def test_train_conv_float32_matches_direct(shape, bias):
    x, w, b = _inputs(*shape, torch.float32, bias=bias, seed=5)
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    out = wg.conv3x3_train(leaves[0], leaves[1], leaves[2] if bias else None)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    ref = F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, padding=1)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    for got, want in [(out, ref)] + list(zip(grads, ref_grads)):
        scale = max(want.abs().max().item(), 1.0)
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max().item() <= 2e-5 * scale


def test_trains_only_where_it_should():
    conv = torch.nn.Conv2d(64, 64, 3, 1, 1, bias=False)
    x = torch.randn(1, 64, 64, 64)
    if wg.min_channels(torch.float32) > 64:
        pytest.skip("this build's kernel takes 64 channels only from the fused AVX-512 path")
    assert wg.trains(x, conv)  # the weight needs a gradient
    with torch.no_grad():
        assert not wg.trains(x, conv)
    with ops.backend("reference"):
        assert not wg.trains(x, conv)
    assert not wg.trains(torch.randn(1, 64, 40, 40), conv)  # 1600 pixels < MIN_TRAIN_PIXELS
    assert not wg.trains(x.double(), conv.double())
    assert not wg.trains(x, torch.nn.Conv2d(64, 64, 3, 2, 1))
    narrow = torch.nn.Conv2d(64, 8, 3, 1, 1)
    assert not wg.trains(x, narrow)
    with torch.autocast("cpu", torch.bfloat16):
        assert not wg.trains(x, conv)


def test_training_model_layer_takes_the_kernel(monkeypatch):
    """A ConvNormLayer in training mode runs conv3x3_train, and its gradients match the
    oneDNN path's within float32 rounding."""
    from rtdetr_fast.model.layers import ConvNormLayer
    if wg.min_channels(torch.float32) > 32:
        pytest.skip("32-channel layers take the kernel only with its AVX-512 build")
    torch.manual_seed(7)
    layer = ConvNormLayer(32, 32, 3, 1, act="relu").train()
    x = torch.randn(2, 32, 48, 48, requires_grad=True)
    calls = []
    real = wg.conv3x3_train
    monkeypatch.setattr(wg, "conv3x3_train", lambda *a: calls.append(1) or real(*a))
    out = layer(x)
    got = torch.autograd.grad(out.square().sum(), (x, layer.conv.weight))
    assert calls == [1]
    with ops.backend("reference"):
        ref_out = layer(x)
        want = torch.autograd.grad(ref_out.square().sum(), (x, layer.conv.weight))
    assert calls == [1]
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-3 * b.abs().max().item(), rtol=1e-3)
    layer.eval()  # eval mode keeps the direct convolution, gradients or not
    layer(x).sum().backward()
    assert calls == [1]
