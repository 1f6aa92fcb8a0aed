from .reference import topk_detections_reference, topk_select_reference  # noqa: F401
