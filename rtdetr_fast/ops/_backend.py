"""Which implementation of each op runs.

Backends: ``reference`` (pure PyTorch, every device), ``native`` (the C++/CUDA extension
``rtdetr_fast._C``), ``triton``. Nothing is probed at import: the extension and Triton are
looked up the first time an op runs or :func:`available_backends` is asked.

Selection, in order: the innermost ``with ops.backend(name)``, then the environment variable
``RTDETR_FAST_BACKEND``, then ``auto`` (native, then triton, then reference, taking the first
that has the op for the tensor's device; Triton on CPU tensors, i.e. its interpreter under
``TRITON_INTERPRET=1``, runs only when forced). A forced backend that cannot run the op raises; it
never falls back silently.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import sys
from typing import Callable, Dict, Iterator, List, Optional

import torch

BACKENDS = ("native", "triton", "reference")
_CHOICES = ("auto",) + BACKENDS

# op name -> backend -> (implementation, supports(device_type) -> bool)
_REGISTRY: Dict[str, Dict[str, tuple]] = {}
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("rtdetr_fast_backend",
                                                                         default=None)


def register(op: str, backend: str, supports: Callable[[str], bool]):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = (fn, supports)
        return fn

    return deco


# run once the extension is loaded: the Python side of the native ops (fake kernels, autograd)
# needs the schemas the extension registers
_LOAD_HOOKS: List[Callable[[], None]] = []
_extension_loaded = False


def on_extension_load(hook: Callable[[], None]) -> Callable[[], None]:
    """Run ``hook`` when the extension loads (at once if it already has)."""
    _LOAD_HOOKS.append(hook)
    if _extension_loaded:
        hook()
    return hook


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled extension module, or None when it was not built.

    Loading it registers the Python side of every native op once: the op packages are imported
    and each one's ``on_extension_load`` hooks run.
    """
    global _extension_loaded
    try:
        module = importlib.import_module("rtdetr_fast._C")
    except ImportError:
        return None
    _extension_loaded = True
    for hook in list(_LOAD_HOOKS):
        hook()
    _load_ops()  # op packages imported from here on run their hooks as they register them
    return module


@functools.lru_cache(maxsize=None)
def limits() -> Dict[str, int]:
    """The native kernels' limits, as the extension defines them (csrc/common/codes.h); empty
    without the extension."""
    module = extension()
    return dict(module.limits()) if module is not None and hasattr(module, "limits") else {}


@functools.lru_cache(maxsize=None)
def cpu_kernels() -> Dict[str, bool]:
    """Which builds of the CPU kernels run on this machine ({"avx2": ..., "avx512": ...},
    chosen at run time by the extension); empty without the extension."""
    module = extension()
    if module is None or not hasattr(module, "cpu_kernels"):
        return {}
    return {k: bool(v) for k, v in module.cpu_kernels().items()}


def extension_has(op: str, device_type: str) -> bool:
    """True when the extension registers a kernel of ``rtdetr_fast::op`` for ``device_type``."""
    if extension() is None:
        return False
    return registered(op, device_type)


def registered(op: str, device_type: str) -> bool:
    """Whether a kernel of ``rtdetr_fast::op`` for ``device_type`` is registered now, without
    loading the extension (for its on-load hooks)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"rtdetr_fast::{op}", key)
    except RuntimeError:  # no such op (an extension built before it existed)
        return False


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # triton raises more than ImportError on machines without a driver
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supports(device_type: str) -> bool:
    # decide on the device first: importing triton fixes its interpreter mode for the process,
    # so a CPU probe without TRITON_INTERPRET=1 must not import it
    if not (device_type == "cuda" or (device_type == "cpu" and triton_interpreting())):
        return False
    return triton_available()


def current() -> str:
    """The backend name in force here ('auto' unless forced)."""
    name = _forced.get()
    if name is None:
        name = os.environ.get("RTDETR_FAST_BACKEND", "auto") or "auto"
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r} "
                         "(from ops.backend(...) or RTDETR_FAST_BACKEND)")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force one implementation for every op inside the block."""
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _load_ops() -> None:
    # registration happens when the op packages are imported; ops/__init__ imports them
    importlib.import_module("rtdetr_fast.ops")


def select(op: str, device_type: str) -> Callable:
    """The implementation of ``op`` to run for tensors on ``device_type``."""
    if _is_compiling():
        # dynamo cannot trace the ContextVar read below: the choice becomes a constant of the
        # compiled graph (forcing another backend later needs torch._dynamo.reset())
        return _REGISTRY[op][_selected_name(op, device_type)][0]
    return _select(op, device_type)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _selected_name_eager(op: str, device_type: str) -> str:
    fn = _select(op, device_type)
    return next(name for name, (impl, _) in _REGISTRY[op].items() if impl is fn)


def _assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without importing torch._dynamo when it
    is not loaded yet: that import costs more than the rest of the package. The marker set here
    is the one that decorator sets (tests/ops/test_backend.py compares the two), and dynamo,
    once something compiles, reads it from the function."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


# decorated here, at import: dynamo refuses to trace the decorator itself
_selected_name = _assume_constant_result(_selected_name_eager)


def _select(op: str, device_type: str) -> Callable:
    impls = _REGISTRY.get(op, {})
    name = current()
    if name != "auto":
        if name not in impls:
            raise RuntimeError(f"backend {name!r} has no implementation of {op}")
        fn, supports = impls[name]
        if not supports(device_type):
            raise RuntimeError(f"backend {name!r} cannot run {op} on {device_type} "
                               f"(available: {available_backends(device_type, op)})")
        return fn
    for candidate in BACKENDS:
        # Triton on CPU tensors is its interpreter: a verification tool, never picked by auto
        if candidate == "triton" and device_type == "cpu":
            continue
        if candidate in impls and impls[candidate][1](device_type):
            return impls[candidate][0]
    raise RuntimeError(f"no backend can run {op} on {device_type}")


def available_backends(device="cpu", op: Optional[str] = None) -> List[str]:
    """Backends that can run ``op`` (every op when None) on ``device``, best first."""
    _load_ops()
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    ops = [op] if op is not None else list(_REGISTRY)
    out = []
    for candidate in BACKENDS:
        if all(candidate in _REGISTRY.get(o, {}) and _REGISTRY[o][candidate][1](device_type)
               for o in ops):
            out.append(candidate)
    return out


def table() -> Dict[str, Dict[str, List[str]]]:
    """op -> device type -> available backends (used by ``python -m rtdetr_fast.info``)."""
    _load_ops()
    return {op: {dev: available_backends(dev, op) for dev in ("cpu", "cuda")} for op in _REGISTRY}
