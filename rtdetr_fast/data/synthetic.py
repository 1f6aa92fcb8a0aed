"""Synthetic scenes: coloured shapes on textured backgrounds, with their boxes and classes."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

SHAPES = ("rectangle", "ellipse", "triangle")
# every shape make_synthetic_coco can draw; SHAPES stays as it is so make_scene is unchanged
DRAWABLE = SHAPES + ("diamond", "cross")


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


class SyntheticCoco(NamedTuple):
    """Where make_synthetic_coco wrote its files."""
    root: str
    train_images: str
    val_images: str
    train_ann: str
    val_ann: str


def _textured_background(rng: np.random.Generator, h: int, w: int):
    from PIL import Image

    # coarse colour blobs + oriented stripes + pixel noise: enough texture that the background
    # is not separable from the shapes by colour alone, cheap enough for hundreds of images
    coarse = rng.integers(30, 220, size=(h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    bg = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
    yy, xx = np.mgrid[0:h, 0:w]
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 24)
    stripes = (np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period))
               * rng.uniform(5, 25)).astype(np.int16)
    noise = rng.integers(-15, 16, size=(h, w, 3), dtype=np.int16)
    return np.clip(bg + stripes[:, :, None] + noise, 0, 255).astype(np.uint8)


def _shape_polygon(kind: str, x0: int, y0: int, w: int, h: int) -> List[Tuple[float, float]]:
    """Outline of a shape filling the pixel box [x0, x0+w) x [y0, y0+h)."""
    x1, y1 = x0 + w - 1, y0 + h - 1  # PIL fills polygons including their last pixel
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "rectangle":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if kind == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if kind == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if kind == "cross":
        tx, ty = max(w // 6, 1), max(h // 6, 1)
        return [(cx - tx, y0), (cx + tx, y0), (cx + tx, cy - ty), (x1, cy - ty), (x1, cy + ty),
                (cx + tx, cy + ty), (cx + tx, y1), (cx - tx, y1), (cx - tx, cy + ty), (x0, cy + ty),
                (x0, cy - ty), (cx - tx, cy - ty)]
    # ellipse, as a 24-gon: PIL draws the ellipse itself, this only serves the segmentation
    rx, ry = (x1 - x0) / 2, (y1 - y0) / 2
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t))
            for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]


def _polygon_area(poly: Sequence[Tuple[float, float]]) -> float:
    xs = np.array([p[0] for p in poly])
    ys = np.array([p[1] for p in poly])
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def _iou(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _write_split(folder: str, ann_path: str, n: int, size: Tuple[int, int], classes: Sequence[str],
                 max_objects: int, rng: np.random.Generator, split: str) -> None:
    from PIL import Image, ImageDraw

    h, w = size
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    min_side = max(4, min(h, w) // 12)
    for i in range(n):
        image_id = i + 1
        file_name = f"{split}_{image_id:06d}.png"
        img = Image.fromarray(_textured_background(rng, h, w))
        draw = ImageDraw.Draw(img)
        # every tenth image is empty, so splits of 10+ images always contain background-only ones
        num = 0 if i % 10 == 9 else int(rng.integers(1, max_objects + 1))
        placed: List[Tuple[int, int, int, int]] = []
        for _ in range(num * 4):  # a few attempts per object to respect the overlap limit
            if len(placed) == num:
                break
            bw = int(rng.integers(min_side, max(min_side + 1, w // 2)))
            bh = int(rng.integers(min_side, max(min_side + 1, h // 2)))
            x0 = int(rng.integers(0, w - bw + 1))
            y0 = int(rng.integers(0, h - bh + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            # partial overlaps are allowed, near-total occlusion is not (the box would lie)
            if any(_iou(box, p) > 0.3 for p in placed):
                continue
            label = int(rng.integers(0, len(classes)))
            kind = classes[label]
            color = tuple(int(c) for c in rng.integers(0, 256, size=3))
            poly = _shape_polygon(kind, x0, y0, bw, bh)
            if kind == "ellipse":
                draw.ellipse((x0, y0, x0 + bw - 1, y0 + bh - 1), fill=color)
            else:
                draw.polygon(poly, fill=color)
            placed.append(box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                "bbox": [float(x0), float(y0), float(bw), float(bh)],
                "area": max(_polygon_area(poly), 1.0), "iscrowd": 0,
                "segmentation": [[float(c) for pt in poly for c in pt]],
            })
        # compress_level=1: PNG encoding dominates the cost otherwise
        img.save(os.path.join(folder, file_name), compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
    data = {
        "info": {"description": f"rtdetr_fast synthetic shapes ({split})"},
        "images": images, "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"}
                       for k, name in enumerate(classes)],
    }
    os.makedirs(os.path.dirname(ann_path), exist_ok=True)
    with open(ann_path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def make_synthetic_coco(root: str | os.PathLike, num_train: int = 160, num_val: int = 40,
                        size: Tuple[int, int] = (256, 256),
                        classes: Sequence[str] = ("rectangle", "ellipse", "triangle"),
                        seed: int = 0, max_objects: int = 6) -> SyntheticCoco:
    """Write a small COCO-format detection dataset of coloured shapes on textured backgrounds.

    Layout: ``root/train/*.png``, ``root/val/*.png``, ``root/annotations/instances_train.json``
    and ``instances_val.json``; category ids 1..C in the order of ``classes`` (each one of
    ``DRAWABLE``); 1..``max_objects`` objects per image (partial overlaps allowed), every tenth
    image empty. Deterministic given ``seed``. Returns the paths as a ``SyntheticCoco``.
    """
    classes = tuple(classes)
    unknown = [c for c in classes if c not in DRAWABLE]
    if not classes or unknown:
        raise ValueError(f"classes must be a non-empty subset of {DRAWABLE}, got {classes}")
    h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(h, w) < 32:
        raise ValueError(f"size must be at least 32x32, got {(h, w)}")
    if num_train < 0 or num_val < 0 or max_objects < 1:
        raise ValueError("num_train and num_val must be >= 0 and max_objects >= 1")
    root = os.fspath(root)
    out = SyntheticCoco(root=root, train_images=os.path.join(root, "train"),
                        val_images=os.path.join(root, "val"),
                        train_ann=os.path.join(root, "annotations", "instances_train.json"),
                        val_ann=os.path.join(root, "annotations", "instances_val.json"))
    train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    _write_split(out.train_images, out.train_ann, num_train, (h, w), classes, max_objects,
                 train_rng, "train")
    _write_split(out.val_images, out.val_ann, num_val, (h, w), classes, max_objects, val_rng, "val")
    return out
