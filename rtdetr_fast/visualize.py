"""Drawing detections onto images."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
           (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0), (170, 255, 195),
           (128, 128, 0), (0, 0, 128), (128, 128, 128)]


def class_color(label: int):
    return PALETTE[int(label) % len(PALETTE)]


def _text_color(rgb):
    # black on light colours, white on dark ones (relative luminance)
    r, g, b = rgb
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1)
    except (TypeError, OSError, ImportError):  # older Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def auto_scale(width: int, height: int, min_side: int = 480) -> float:
    """An integer enlargement that brings a small image's shorter side to ``min_side`` or more,
    so labels stay readable; 1 for images that are already that large."""
    short = max(min(width, height), 1)
    return float(max(1, -(-min_side // short))) if short < min_side else 1.0


Rect = Tuple[float, float, float, float]


def _overlap(a: Rect, b: Rect) -> float:
    """Area shared by two (x0, y0, x1, y1) rectangles (touching edges share none)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(boxes: Sequence[Rect], sizes: Sequence[Tuple[float, float]], width: int,
                 height: int) -> List[Rect]:
    """Where each box's label goes: a (x0, y0, x1, y1) rectangle of its ``sizes[i]`` (w, h),
    inside the image and covering no label placed before it. ``boxes`` come in priority order
    (the first gets its first choice). Tried in order: above the box's top-left corner, inside
    it, below the box, inside its bottom edge, the same at the right edge, then up to three
    label heights further up and down; when every spot is taken (a crowded picture), the one
    overlapping least.
    """
    placed: List[Rect] = []
    for (bx0, by0, bx1, by1), (tw, th) in zip(boxes, sizes):
        def clamp(x, y):
            x = min(max(x, 0), max(width - tw, 0))
            y = min(max(y, 0), max(height - th, 0))
            return (x, y, x + tw, y + th)

        xs = (bx0, bx1 - tw)
        ys = (by0 - th, by0, by1, by1 - th)
        candidates = [clamp(x, y) for x in xs for y in ys]
        # then up to three rows of label height further from the box, above and below
        for k in range(1, 4):
            for x in xs:
                candidates += [clamp(x, by0 - th * (k + 1)), clamp(x, by1 + th * k)]
        free = next((r for r in candidates
                     if not any(_overlap(r, other) for other in placed)), None)
        if free is None:
            free = min(candidates, key=lambda r: sum(_overlap(r, other) for other in placed))
        placed.append(free)
    return placed


def draw_detections(image, det: Dict[str, torch.Tensor],
                    class_names: Optional[Sequence[str]] = None, scale: Optional[float] = None):
    """A PIL image with each box outlined in its class colour and labelled ``name score`` on a
    filled background. Labels stay inside the image and do not cover each other
    (:func:`place_labels`; the highest scores choose first); boxes are drawn before labels,
    so no outline crosses a label. ``det`` holds ``boxes`` [N,4] xyxy in the original image's
    pixels, ``scores`` and ``labels``; boxes are clipped to the image. ``scale`` enlarges the
    picture (default: small images are enlarged to about 480 pixels on their shorter side)."""
    from PIL import Image, ImageDraw

    from .data.images import to_tensor_list

    t = to_tensor_list(image)[0]
    img = Image.fromarray((t.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    w0, h0 = img.size
    if scale is None:
        scale = auto_scale(w0, h0)
    if scale != 1.0:
        img = img.resize((round(w0 * scale), round(h0 * scale)), Image.BICUBIC)
    W, H = img.size
    draw = ImageDraw.Draw(img)
    font_size = max(12, round(min(W, H) / 32))
    font = _font(font_size)
    line = max(2, round(min(W, H) / 240))
    pad = max(2, font_size // 5)
    boxes = torch.as_tensor(det["boxes"]).reshape(-1, 4).tolist()
    scores = torch.as_tensor(det["scores"]).reshape(-1).tolist()
    labels = torch.as_tensor(det["labels"]).reshape(-1).tolist()
    # highest score first: it chooses its label's place first
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    clipped, texts, sizes = [], [], []
    for i in order:
        x0, y0, x1, y1 = (v * scale for v in boxes[i])
        x0, x1 = sorted((min(max(x0, 0), W - 1), min(max(x1, 0), W - 1)))
        y0, y1 = sorted((min(max(y0, 0), H - 1), min(max(y1, 0), H - 1)))
        clipped.append((x0, y0, x1, y1))
        label = int(labels[i])
        name = class_names[label] if class_names and 0 <= label < len(class_names) else str(label)
        text = f"{name} {scores[i]:.2f}"
        l, t_, r, b = draw.textbbox((0, 0), text, font=font)
        texts.append((text, l, t_))
        sizes.append((r - l + 2 * pad, b - t_ + 2 * pad))
    places = place_labels(clipped, sizes, W, H)
    # drawn lowest score first, so the highest scores stay on top where things still overlap
    for k in reversed(range(len(order))):
        x0, y0, x1, y1 = clipped[k]
        color = class_color(int(labels[order[k]]))
        # a dark rim under the coloured line keeps boxes visible on backgrounds of their colour
        draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=(0, 0, 0), width=line + 2)
        draw.rectangle([x0, y0, x1, y1], outline=color, width=line)
    for k in reversed(range(len(order))):
        (text, l, t_), (lx, ly, lx1, ly1) = texts[k], places[k]
        color = class_color(int(labels[order[k]]))
        # the rectangle's corners are inclusive pixels: it ends one before the next label's start
        draw.rectangle([lx, ly, lx1 - 1, ly1 - 1], fill=color, outline=(0, 0, 0), width=1)
        draw.text((lx + pad - l, ly + pad - t_), text, fill=_text_color(color), font=font)
    return img


def detections_to_records(det: Dict[str, torch.Tensor], image_id: int, file_name: str,
                          class_names: Sequence[str], category_ids: Sequence[int],
                          image_size: Optional[Sequence[int]] = None) -> List[Dict]:
    """COCO results records (``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in image
    pixels, ``score``) with ``file_name``, ``category_name`` and ``label`` added."""
    out = []
    boxes = torch.as_tensor(det["boxes"]).reshape(-1, 4).tolist()
    for (x0, y0, x1, y1), score, label in zip(boxes, torch.as_tensor(det["scores"]).tolist(),
                                              torch.as_tensor(det["labels"]).tolist()):
        rec = {"image_id": int(image_id), "file_name": str(file_name),
               "category_id": int(category_ids[label]) if label < len(category_ids) else int(label),
               "category_name": (str(class_names[label]) if label < len(class_names)
                                 else str(label)),
               "label": int(label),
               "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
               "score": round(float(score), 4)}
        if image_size is not None:
            rec["image_height"], rec["image_width"] = int(image_size[0]), int(image_size[1])
        out.append(rec)
    return out
