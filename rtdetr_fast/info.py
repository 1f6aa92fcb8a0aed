"""``python -m rtdetr_fast.info``: versions, how the extension was built, and which backend each
op has on each device."""
from __future__ import annotations

import platform
import sys


def collect() -> dict:
    import torch

    from . import __version__
    from .ops import _backend

    info = {
        "rtdetr_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "CUDA device": (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # a broken triton install must not break info
        info["triton"] = f"not available ({type(exc).__name__})"
    ext = _backend.extension()
    if ext is None:
        info["extension"] = "not built (reference and Triton backends only)"
    else:
        flags = ext.build_info()
        info["extension"] = ", ".join(f"{k}={v}" for k, v in sorted(flags.items()))
    info["backends"] = _backend.table()
    return info


def main() -> None:
    info = collect()
    backends = info.pop("backends")
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    print()
    print(f"{'op':<18}{'cpu':<32}cuda")
    for op, devs in backends.items():
        print(f"{op:<18}{', '.join(devs['cpu']) or '-':<32}{', '.join(devs['cuda']) or '-'}")


if __name__ == "__main__":
    main()
