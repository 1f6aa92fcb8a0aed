"""rtdetr_fast: RT-DETR in PyTorch with hand-written kernels for its hot operations.

The model and the compiled form (``RTDETR``, ``FastDetector``, ``compile``) are imported on
first use, so that ``import rtdetr_fast`` and the command line's argument checks do not wait
for torch.
"""
__version__ = "0.1.0"

from .config import RTDETRConfig, get_config, list_presets  # noqa: E402

# public name -> the submodule that defines it, imported when the name is first asked for
_LAZY = {"RTDETR": ".model.rtdetr", "FastDetector": ".fast", "compile": ".fast"}

__all__ = ["RTDETR", "FastDetector", "compile", "RTDETRConfig", "get_config", "list_presets", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
