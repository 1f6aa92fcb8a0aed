"""rtdetr_fast: RT-DETR in PyTorch with hand-written kernels for its hot operations."""
__version__ = "0.1.0"

from .config import RTDETRConfig, get_config, list_presets  # noqa: E402
from .model.rtdetr import RTDETR  # noqa: E402
from .fast import FastDetector, compile  # noqa: E402,A004

__all__ = ["RTDETR", "FastDetector", "compile", "RTDETRConfig", "get_config", "list_presets", "__version__"]
