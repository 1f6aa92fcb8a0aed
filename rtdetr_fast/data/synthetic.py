"""Synthetic scenes: coloured shapes on textured backgrounds, with their boxes and classes."""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

SHAPES = ("rectangle", "ellipse", "triangle")


def make_scene(height: int = 480, width: int = 640, num_objects: int = 5, seed: int = 0
               ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """An RGB uint8 image [H,W,3] and its objects: ``boxes`` [N,4] xyxy pixels, ``labels`` [N]
    (index into SHAPES)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    # low-frequency noise background so the scene is not trivially flat
    coarse = rng.integers(40, 200, size=(height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    bg = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    noise = rng.integers(-20, 20, size=(height, width, 3))
    img = Image.fromarray(np.clip(np.asarray(bg, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    boxes, labels = [], []
    for _ in range(num_objects):
        w = int(rng.integers(width // 10, width // 3))
        h = int(rng.integers(height // 10, height // 3))
        x0 = int(rng.integers(0, width - w))
        y0 = int(rng.integers(0, height - h))
        label = int(rng.integers(0, len(SHAPES)))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        box = (x0, y0, x0 + w, y0 + h)
        if SHAPES[label] == "rectangle":
            draw.rectangle(box, fill=color)
        elif SHAPES[label] == "ellipse":
            draw.ellipse(box, fill=color)
        else:
            draw.polygon([(x0 + w / 2, y0), (x0, y0 + h), (x0 + w, y0 + h)], fill=color)
        boxes.append(box)
        labels.append(label)
    return np.asarray(img), {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
                             "labels": np.array(labels, dtype=np.int64)}
