"""Top-K query selection and detection post-processing: reference, native and Triton backends.

Every backend orders by (score descending, lower index first on ties, NaN below every real
score); see reference.py.
"""
from .. import _backend
from . import native as _native
from . import triton as _triton
from .reference import topk_detections_reference, topk_select_reference  # noqa: F401

_backend.register("topk_select", "native", _native.supports)(_native.topk_select_native)
_backend.register("topk_detections", "native", _native.supports)(_native.topk_detections_native)
_backend.register("topk_select", "triton", _backend.triton_supports)(_triton.topk_select_triton)
_backend.register("topk_detections", "triton", _backend.triton_supports)(
    _triton.topk_detections_triton)
