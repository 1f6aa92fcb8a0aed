"""Stateless hot operations of RT-DETR, each with a pure-PyTorch reference.

Model code calls only these functions; which implementation runs is decided in
:mod:`rtdetr_fast.ops._backend` (``with ops.backend("reference"): ...`` or
``RTDETR_FAST_BACKEND=reference``). Each op is a package, ``ops/<op>/``: its ``__init__.py``
holds the public function, whose docstring is the op's spec (shapes, dtypes, errors) and which
validates the inputs, once, in the words of the dimension glossary (B batch, Q queries, H heads,
L levels, P points, D channels per head, S = sum of H_l*W_l, C classes, N anchors, K selected),
then dispatches to the backend modules beside it (reference.py, native.py, triton.py; export.py
for the export form). This module re-exports the public functions and the backend API.

``ops.ms_deform_attn``, ``ops.topk_select`` and ``ops.rep_conv`` are the functions; their
packages stay importable by their full names (``from rtdetr_fast.ops.rep_conv import winograd``).
"""
from __future__ import annotations

from . import _backend, _export  # noqa: F401
from ._backend import available_backends, backend, register
# importing an op package registers its backends; each ``from .<op> import <op>`` binds the name
# to the function after the import machinery bound it to the package
from .ms_deform_attn import ms_deform_attn
from .max_pool import max_pool_3x3_s2
from .rep_conv import rep_conv
from .topk_select import topk_detections, topk_select

__all__ = [
    "max_pool_3x3_s2",
    "ms_deform_attn",
    "topk_select",
    "topk_detections",
    "rep_conv",
    "backend",
    "available_backends",
    "register",
]
