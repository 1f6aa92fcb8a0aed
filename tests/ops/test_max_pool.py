"""rtdetr_fast::max_pool_3x3_s2, the deployed CPU stem's NCHW max pool: torch's
F.max_pool2d(x, 3, stride=2, padding=1) value for value (NaN and infinities included), odd and
tiny maps, bad input, the wrapper's fallbacks, opcheck and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from rtdetr_fast import ops
from rtdetr_fast.ops import max_pool as pool

pytestmark = pytest.mark.skipif(not pool.available(), reason="rtdetr_fast._C not built")

SHAPES = [(1, 3, 8, 8), (2, 5, 7, 9), (1, 2, 1, 1), (1, 1, 2, 2), (3, 4, 6, 1), (1, 3, 1, 17),
          (2, 1, 13, 4), (0, 3, 5, 5), (1, 16, 64, 80)]


def _ref(x):
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_torch(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=dtype)
    flat = x.view(-1)
    if flat.numel() > 8:
        # NaN propagates through every window it is in; infinities are values like others
        idx = torch.randperm(flat.numel(), generator=g)[:6]
        flat[idx[:2]] = float("nan")
        flat[idx[2:4]] = float("inf")
        flat[idx[4:]] = -float("inf")
    got = torch.ops.rtdetr_fast.max_pool_3x3_s2(x)
    want = _ref(x)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_all_negative_border():
    """Padding never wins: a map of large negative values keeps them at the border."""
    x = -1e30 - torch.rand(1, 2, 5, 6)
    torch.testing.assert_close(torch.ops.rtdetr_fast.max_pool_3x3_s2(x), _ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (lambda x: x[0], r"\[N, C, H, W\]"),
    (lambda x: x.half(), "float32 or float64"),
    (lambda x: x.transpose(2, 3), "contiguous"),
    (lambda x: x[:, :, :0], "nonempty"),
])
def test_bad_input_raises_one_line(bad, match):
    x = torch.randn(1, 2, 5, 6)
    with pytest.raises(RuntimeError, match=match) as info:
        torch.ops.rtdetr_fast.max_pool_3x3_s2(bad(x))
    assert "\n" not in str(info.value).split("\nException raised from")[0].strip()


def test_wrapper_uses_the_kernel_and_falls_back():
    from torch.profiler import profile

    x = torch.randn(2, 3, 9, 10)
    with torch.no_grad(), profile() as prof:
        out = ops.max_pool_3x3_s2(x)
    assert any(e.key == "rtdetr_fast::max_pool_3x3_s2" for e in prof.key_averages())
    torch.testing.assert_close(out, _ref(x), rtol=0, atol=0)
    # torch's pool where the kernel does not apply: channels_last, bfloat16, a gradient
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ops.max_pool_3x3_s2(cl), _ref(cl), rtol=0, atol=0)
    torch.testing.assert_close(ops.max_pool_3x3_s2(x.bfloat16()), _ref(x.bfloat16()), rtol=0,
                               atol=0)
    xg = x.clone().requires_grad_()
    ops.max_pool_3x3_s2(xg).sum().backward()
    assert xg.grad is not None and xg.grad.sum().item() > 0


def test_opcheck():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.rtdetr_fast.max_pool_3x3_s2.default, (x,),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiled_fullgraph_equals_eager():
    x = torch.randn(1, 4, 11, 12)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(ops.max_pool_3x3_s2, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(compiled, _ref(x), rtol=0, atol=0)
