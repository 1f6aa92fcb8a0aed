"""Folded RepConv, act(conv3x3(x, weight, stride 1, padding 1) + bias): reference, native (CUDA
mma.sync) and Triton (implicit GEMM) backends. Each kernel module documents the calls it routes
to the reference instead."""
from .. import _backend
from . import native as _native
from . import triton as _triton
from .reference import ACTIVATIONS, apply_activation, rep_conv_reference  # noqa: F401

_backend.register("rep_conv", "native", _native.supports)(_native.rep_conv_native)
_backend.register("rep_conv", "triton", _backend.triton_supports)(_triton.rep_conv_triton)
