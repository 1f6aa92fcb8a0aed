"""Reference folded RepConv and its boundary checks."""
import pytest
import torch
import torch.nn.functional as F

from rtdetr_fast import ops


@pytest.mark.parametrize("act,fn", [("silu", F.silu), ("relu", F.relu), ("identity", lambda t: t)])
@pytest.mark.parametrize("shape", [(2, 17, 7, 5), (1, 3, 1, 1), (0, 8, 4, 4)])
def test_reference_equals_conv_bias_act(act, fn, shape):
    x = torch.randn(*shape, dtype=torch.float64)
    w = torch.randn(6, shape[1], 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    want = fn(F.conv2d(x, w, None, padding=1) + b.view(1, -1, 1, 1))
    torch.testing.assert_close(ops.rep_conv(x, w, b, act), want)


def test_rep_conv_bad_input():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"weight must be \[C_out, C_in, 3, 3\] with C_in=4"):
        ops.rep_conv(x, torch.randn(8, 3, 3, 3), None)
    with pytest.raises(ValueError, match=r"bias must be \[C_out\] = \[8\]"):
        ops.rep_conv(x, torch.randn(8, 4, 3, 3), torch.randn(7))
    with pytest.raises(ValueError, match="activation"):
        ops.rep_conv(x, torch.randn(8, 4, 3, 3), None, "gelu")
    with pytest.raises(ValueError, match=r"x must be \[B, C_in, H, W\]"):
        ops.rep_conv(x[0], torch.randn(8, 4, 3, 3), None)
