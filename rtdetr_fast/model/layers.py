"""Building blocks of the backbone, encoder and decoder: activations, conv + norm + activation
(with its CPU kernel routes), MLP heads, initialisation, resizing."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.rep_conv import onednn
from ..ops.rep_conv import winograd
from ..ops.rep_conv.winograd import is_conv3x3_same
from .norms import fold_conv_norm


def get_activation(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    table = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "identity": nn.Identity}
    if name.lower() not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(table)}")
    return table[name.lower()]()


class ConvNormLayer(nn.Module):
    """Conv2d (no bias unless asked) + BatchNorm2d + activation."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int,
                 padding: int | None = None, bias: bool = False, act: str | None = None):
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=padding, bias=bias)
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded and x.device.type == "cpu":
            act = self._rep_conv_act()
            if act is not None:
                # a folded 3x3 stride-1 conv is the folded-RepConv op: on the CPU its native
                # kernel is Winograd F(4x4, 3x3) (ops/rep_conv/winograd.py)
                return ops.rep_conv(x, self.conv.weight, self.conv.bias, act)
            c = self.conv
            name = _ACT_NAMES.get(type(self.act))
            if (name is not None and isinstance(c.padding, tuple)
                    and onednn.fusable(x, c.weight, c.bias, c.padding_mode)):
                return onednn.conv_act(x, c.weight, c.bias, c.stride, c.padding, c.dilation,
                                       c.groups, name)
        elif self.training and winograd.trains(x, self.conv):
            # training on the CPU: the Winograd kernel runs the forward and the input gradient
            # (eval mode, gradients or not, keeps the direct convolution: the official numbers)
            return self.act(self.norm(winograd.conv3x3_train(x, self.conv.weight,
                                                             self.conv.bias)))
        return self.act(self.norm(self.conv(x)))

    def _rep_conv_act(self):
        """The activation's name when act(conv(x)) is ops.rep_conv's form, else None."""
        if not is_conv3x3_same(self.conv):
            return None
        return _ACT_NAMES.get(type(self.act))

    @property
    def folded(self) -> bool:
        return isinstance(self.norm, nn.Identity)

    @torch.no_grad()
    def fold(self) -> None:
        """Fold the (eval-mode) norm into the conv: act(conv'(x)), conv' with a bias.
        Idempotent."""
        if not self.folded:
            self.conv = fold_conv_norm(self.conv, self.norm)
            self.norm = nn.Identity()


# ops.rep_conv's activation names, which oneDNN's fused conv (ops/rep_conv/onednn.py) takes too;
# a bare conv ("identity") takes that call as well, and inductor fuses it with a following
# residual add (+ ReLU) into one oneDNN call
_ACT_NAMES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Identity: "identity"}


class MLP(nn.Module):
    """``num_layers`` linear layers with an activation between them (not after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 act: str = "relu"):
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, outs))
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = self.act(x)
        return x


def bias_init_with_prob(prior_prob: float = 0.01) -> float:
    return float(-math.log((1 - prior_prob) / prior_prob))


def nearest_upsample_to(x: torch.Tensor, size) -> torch.Tensor:
    """Nearest upsampling to ``size``: equal to scale_factor=2 when size is exactly twice x's,
    and defined for odd sizes (inputs that are not multiples of 32) too."""
    return F.interpolate(x, size=tuple(size), mode="nearest")
