"""Drawing detections onto images."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch


def draw_detections(image, det: Dict[str, torch.Tensor],
                    class_names: Optional[Sequence[str]] = None, scale: float = 1.0):
    """A PIL image with each box outlined and labelled ``name score``; ``scale`` enlarges
    small images (boxes are in the original image's pixels)."""
    from PIL import Image, ImageDraw

    from .data.images import to_tensor_list

    t = to_tensor_list(image)[0]
    img = Image.fromarray((t.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8))
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
               (145, 30, 180), (70, 240, 240), (240, 50, 230)]
    for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                 det["labels"].tolist()):
        color = palette[label % len(palette)]
        name = class_names[label] if class_names and label < len(class_names) else str(label)
        box = [v * scale for v in box]
        draw.rectangle(box, outline=color, width=2)
        draw.text((box[0] + 2, box[1] + 1), f"{name} {score:.2f}", fill=color)
    return img
