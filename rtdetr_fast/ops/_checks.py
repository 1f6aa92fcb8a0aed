"""Small helpers shared by the ops' input checks (each op's checks live in its package's
``__init__.py``, next to the public function whose docstring they implement)."""
from __future__ import annotations

import torch


def shape_str(t: torch.Tensor) -> str:
    """A tensor's shape as the error messages write it: ``[2, 300, 4]``."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def is_int(x) -> bool:
    """A Python int (or a symbolic int under tracing), not a bool."""
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def any_device(device_type: str) -> bool:
    """The ``supports`` of a backend that runs on every device (the pure-PyTorch references)."""
    return True
