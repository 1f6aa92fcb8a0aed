from .rtdetr import RTDETR  # noqa: F401
