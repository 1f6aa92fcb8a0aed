"""Folded RepConv kernels (Triton, native CUDA) against the float64 reference, and the fold itself.

Triton runs in its interpreter on CPU tensors (tiny shapes: the interpreter is numpy); the
variable is set for this module only, because a global TRITON_INTERPRET=1 would make ``auto``
pick the interpreted Triton kernels for every other test on CPU. CUDA cases skip without a GPU.

Tolerance, tied to torch's own error: max|out - ref64| <= 2 * max|torch same dtype - ref64| + atol.
"""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from rtdetr_fast import ops
from rtdetr_fast.model.norms import FrozenBatchNorm2d, freeze_batch_norm
from rtdetr_fast.model.encoder import RepVggBlock
from rtdetr_fast.ops import _backend
from rtdetr_fast.ops.rep_conv import native as rc_native
from rtdetr_fast.ops.rep_conv import triton as rc_triton

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ACT = {"silu": F.silu, "relu": F.relu, "identity": lambda t: t}
# (B, C_in, H, W, C_out): odd channel counts, a 1x1 map, a 7x5 map, batch 0
ODD = [(1, 3, 7, 5, 5), (1, 17, 7, 5, 19), (2, 17, 1, 1, 6), (0, 3, 7, 5, 4)]


def _inputs(B, C_in, H, W, C_out, dtype, device="cpu", channels_last=True, bias=True):
    g = torch.Generator().manual_seed(B * 1000 + C_in * 10 + C_out)
    x = torch.randn(B, C_in, H, W, generator=g)
    w = torch.randn(C_out, C_in, 3, 3, generator=g) / (3 * C_in ** 0.5)
    b = torch.randn(C_out, generator=g) if bias else None
    x, w = x.to(device, dtype), w.to(device, dtype)
    b = b.to(device, dtype) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b


def _assert_close_to_reference(out, x, w, b, act):
    """The house tolerance against float64, with torch's same-dtype conv as the yardstick."""
    ref64 = ACT[act](F.conv2d(x.double(), w.double(), None if b is None else b.double(),
                              padding=1))
    torch_same = ACT[act](F.conv2d(x, w, b, padding=1)).double()
    assert out.shape == ref64.shape and out.dtype == x.dtype
    if out.numel() == 0:
        return
    # over the tensor, as flash-attention's tests do: elementwise, an element where torch's
    # rounding happens to land on the exact value would demand zero error of ours
    err = (out.double() - ref64).abs().max().item()
    bound = 2 * (torch_same - ref64).abs().max().item() + ATOL[x.dtype]
    assert err <= bound, f"max error {err:.3g} exceeds 2 * torch's + atol = {bound:.3g}"


# -- Triton, in the interpreter --------------------------------------------------------------

@pytest.fixture(scope="module")
def interpret():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        pytest.importorskip("triton")
        yield


def _dtypes():
    return [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("shape", ODD, ids=lambda s: "x".join(map(str, s)))
def test_triton_interpreter_odd_shapes(interpret, shape, dtype):
    x, w, b = _inputs(*shape, dtype)
    with ops.backend("triton"):
        out = ops.rep_conv(x, w, b, "silu")
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_close_to_reference(out, x, w, b, "silu")


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("act", ["relu", "identity"])
def test_triton_interpreter_activations_without_bias(interpret, act):
    x, w, _ = _inputs(1, 17, 7, 5, 19, torch.float32)
    with ops.backend("triton"):
        out = ops.rep_conv(x, w, None, act)
    _assert_close_to_reference(out, x, w, None, act)


@pytest.mark.triton_interpreter
def test_triton_interpreter_contiguous_nchw_and_several_k_chunks(interpret):
    # C_in = 40 spans three 16-channel chunks per tap (the last one ragged); NCHW input
    x, w, b = _inputs(1, 40, 5, 6, 17, torch.float32, channels_last=False)
    assert x.is_contiguous()
    with ops.backend("triton"):
        out = ops.rep_conv(x, w, b, "silu")
    _assert_close_to_reference(out, x, w, b, "silu")


@pytest.mark.triton_interpreter
def test_triton_fallbacks_are_the_reference(interpret):
    # float64 and inputs that need a gradient run the reference (documented), never a wrong result
    x, w, b = _inputs(1, 3, 4, 4, 5, torch.float64)
    with ops.backend("triton"):
        out = ops.rep_conv(x, w, b, "silu")
    torch.testing.assert_close(out, F.silu(F.conv2d(x, w, b, padding=1)), rtol=0, atol=0)
    x, w, b = _inputs(1, 3, 4, 4, 5, torch.float32)
    w.requires_grad_(True)
    with ops.backend("triton"):
        ops.rep_conv(x, w, b, "silu").sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.triton_interpreter
def test_triton_mismatched_dtypes_raise(interpret):
    x, w, b = _inputs(1, 3, 4, 4, 5, torch.float32)
    with ops.backend("triton"), pytest.raises(TypeError, match="weight dtype"):
        ops.rep_conv(x, w.half(), b, "silu")
    with ops.backend("triton"), pytest.raises(TypeError, match="bias dtype"):
        ops.rep_conv(x, w, b.half(), "silu")


@pytest.mark.triton_interpreter
def test_triton_custom_op_is_opaque_and_consistent(interpret):
    x, w, b = _inputs(1, 3, 3, 2, 4, torch.float32)
    torch.library.opcheck(torch.ops.rtdetr_fast.rep_conv_triton.default, (x, w, b, "silu"),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(rc_triton.rep_conv_triton, fullgraph=True, backend="aot_eager")
    _assert_close_to_reference(compiled(x, w, b, "silu"), x, w, b, "silu")


@pytest.mark.triton_interpreter
def test_triton_deployed_block_matches_training_form(interpret):
    block = _block(6, 7, eps=1e-3, frozen=True)
    x = torch.randn(1, 6, 5, 3)
    with torch.no_grad():
        before = block(x)
        block.fold()
        with ops.backend("triton"):
            after = block(x)
    assert ((after - before).abs().max() / before.abs().max()).item() < 1e-5


# -- native CUDA -----------------------------------------------------------------------------

def test_native_schema_registered_without_a_cpu_kernel():
    if _backend.extension() is None:
        pytest.skip("rtdetr_fast._C is not built")
    assert hasattr(torch.ops.rtdetr_fast, "rep_conv")
    # the reference serves the CPU
    assert not _backend.extension_has("rep_conv", "cpu")


def _native_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not rc_native.supports("cuda"):
        pytest.skip("rtdetr_fast._C was built without CUDA")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ODD + [(2, 24, 7, 5, 19), (1, 8, 1, 1, 3),
                                         (3, 64, 13, 11, 130), (1, 256, 20, 20, 256)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ["silu", "relu", "identity"])
def test_native_cuda_against_reference(shape, dtype, act):
    _native_cuda()
    x, w, b = _inputs(*shape, dtype, device="cuda")
    with ops.backend("native"):
        out = ops.rep_conv(x, w, b if act != "relu" else None, act)
    _assert_close_to_reference(out, x, w, b if act != "relu" else None, act)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", ODD + [(3, 64, 13, 11, 130), (2, 256, 20, 20, 256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_cuda_against_reference(shape, dtype):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, w, b = _inputs(*shape, dtype, device="cuda")
    with ops.backend("triton"):
        out = ops.rep_conv(x, w, b, "silu")
    # float32 runs TF32 in both (torch.backends.cudnn.allow_tf32 is on by default)
    _assert_close_to_reference(out, x, w, b, "silu")


@pytest.mark.cuda
def test_native_cuda_boundary_errors():
    _native_cuda()
    x, w, b = _inputs(1, 16, 4, 4, 8, torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="channels_last"):
        torch.ops.rtdetr_fast.rep_conv(x.contiguous(), w.contiguous(
            memory_format=torch.channels_last), b, "silu")
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.rtdetr_fast.rep_conv(x, w[:, :8].contiguous(
            memory_format=torch.channels_last), b, "silu")
    with pytest.raises(RuntimeError, match="activation"):
        torch.ops.rtdetr_fast.rep_conv(x, w.contiguous(memory_format=torch.channels_last), b,
                                       "gelu")


# -- the fold --------------------------------------------------------------------------------

def _block(c_in, c_out, eps=1e-5, frozen=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    block = RepVggBlock(c_in, c_out, act="silu")
    for branch in (block.conv1, block.conv2):
        branch.norm.eps = eps
    if frozen:
        freeze_batch_norm(block)
        assert isinstance(block.conv1.norm, FrozenBatchNorm2d)
        assert block.conv1.norm.eps == eps
    with torch.no_grad():
        for branch in (block.conv1, block.conv2):
            n = branch.norm
            n.running_mean.copy_(torch.rand(c_out, generator=g) - 0.5)
            # variances near eps make eps matter: leaving it out would move the result
            n.running_var.copy_(torch.rand(c_out, generator=g) * 4 * eps)
            n.weight.copy_(torch.rand(c_out, generator=g) + 0.5)
            n.bias.copy_(torch.rand(c_out, generator=g) - 0.5)
    return block.eval()


@pytest.mark.parametrize("frozen", [False, True], ids=["BatchNorm2d", "FrozenBatchNorm2d"])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_fold_exact_float32_with_eps(frozen, eps):
    block = _block(8, 12, eps=eps, frozen=frozen)
    ref = copy.deepcopy(block).double()
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        before = block(x)
        kernel, bias = block.equivalent_kernel_bias()
        block.fold()
        after = block(x)
        block.fold()  # idempotent
        again = block(x)
    assert kernel.dtype == torch.float64
    assert ((after - before).abs().max() / before.abs().max()).item() < 1e-5
    assert torch.equal(after, again)
    # the float64 fold matches the float64 two-branch form to float64 rounding
    with torch.no_grad():
        torch.testing.assert_close(F.silu(F.conv2d(x.double(), kernel, bias, padding=1)),
                                   ref(x.double()), rtol=1e-12, atol=1e-12)


def test_fold_depends_on_eps():
    # able to fail: the same statistics folded with another eps give a different block
    a, b = _block(4, 4, eps=1e-5), _block(4, 4, eps=1e-3)
    ka, _ = a.equivalent_kernel_bias()
    kb, _ = b.equivalent_kernel_bias()
    assert not torch.allclose(ka, kb)


def test_deployed_block_state_dict_saves_and_loads():
    block = _block(8, 12, frozen=True)
    block.fold()
    assert block.conv.weight.is_contiguous(memory_format=torch.channels_last)
    buf = io.BytesIO()
    torch.save(block.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd) == {"conv.weight", "conv.bias"}  # the deploy() keys
    fresh = _block(8, 12, frozen=True, seed=1)
    fresh.fold()
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        assert torch.equal(fresh(x), block(x))
    # a deployed state dict does not load into a training-form block
    with pytest.raises(RuntimeError, match="conv1"):
        copy.deepcopy(_block(8, 12, frozen=True)).load_state_dict(sd, strict=True)

