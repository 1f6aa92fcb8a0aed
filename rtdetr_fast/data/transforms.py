"""Detection transforms over (image, target) pairs, without torchvision.

The training pipeline is the official RT-DETR one (``train_transforms``): photometric distortion,
zoom-out, SSD-style IoU crop, box sanitising, horizontal flip, resize to a fixed size. Every
transform is a callable ``t(image, target) -> (image, target)`` where

* ``image`` is a PIL image or a tensor ``[C,H,W]`` (uint8 in 0..255, or float in [0,1]); the
  geometric and photometric transforms return a tensor of the same dtype (uint8 for PIL input),
  and ``ToTensor`` makes it float in [0,1];
* ``target`` is a dict with ``boxes`` float ``[N,4]`` xyxy in pixels of the current image and
  optional per-object ``labels`` / ``area`` / ``iscrowd`` / ``masks`` ``[N,H,W]``, which are kept in
  step with the boxes. Other keys (``image_id``, ``orig_size``) pass through; ``size`` is updated.

Boxes stay xyxy in pixels throughout: the criterion normalises them itself.

Randomness: each random transform draws from ``generator`` (a ``torch.Generator``) when given,
else from torch's global RNG, so ``torch.manual_seed(s)`` (or DataLoader's per-worker seeding)
makes a pipeline deterministic.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

Target = Dict[str, Any]
# per-object fields: indexed together whenever boxes are dropped
INSTANCE_KEYS = ("boxes", "labels", "area", "iscrowd", "masks")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _as_tensor_image(image: Any) -> torch.Tensor:
    """PIL -> uint8 [3,H,W]; tensors pass through after a shape check."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3:
            raise ValueError(f"image tensors must be [C, H, W], got {list(image.shape)}")
        return image
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        a = np.asarray(image.convert("RGB"))
        return torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1).contiguous()
    raise TypeError(f"images must be PIL images or [C,H,W] tensors, got {type(image).__name__}")


def image_size(image: Any) -> Tuple[int, int]:
    """(H, W) of a PIL image or a [C,H,W] tensor."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    w, h = image.size
    return int(h), int(w)


def _rand(generator: Optional[torch.Generator]) -> float:
    return float(torch.rand((), generator=generator))


def _uniform(lo: float, hi: float, generator: Optional[torch.Generator]) -> float:
    return lo + (hi - lo) * _rand(generator)


def _boxes(target: Target) -> torch.Tensor:
    b = target.get("boxes")
    if b is None:
        return torch.zeros((0, 4), dtype=torch.float32)
    b = torch.as_tensor(b, dtype=torch.float32)
    if b.dim() != 2 or b.shape[-1] != 4:
        raise ValueError(f"target['boxes'] must be [N, 4] xyxy, got {list(b.shape)}")
    return b


def _set_size(target: Target, h: int, w: int) -> None:
    target["size"] = torch.tensor([h, w], dtype=torch.int64)


def select_instances(target: Target, keep: torch.Tensor) -> Target:
    """Index every per-object field of ``target`` with the bool/long tensor ``keep``."""
    out = dict(target)
    for k in INSTANCE_KEYS:
        if k in out and isinstance(out[k], torch.Tensor):
            out[k] = out[k][keep]
    return out


def _to_float(img: torch.Tensor) -> torch.Tensor:
    return img.float() / 255.0 if img.dtype == torch.uint8 else img.float()


def _like(img_float: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if ref.dtype == torch.uint8:
        return (img_float * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return img_float.to(ref.dtype)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix [N,M] of xyxy boxes."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=1e-12)


def resize_image_and_target(image: torch.Tensor, target: Target, size: Tuple[int, int]
                            ) -> Tuple[torch.Tensor, Target]:
    """Resize a [C,H,W] (or [B,C,H,W]) tensor to ``size`` (H, W), scaling boxes and area exactly
    by the size ratios (and masks by nearest neighbour)."""
    h, w = image.shape[-2:]
    nh, nw = int(size[0]), int(size[1])
    if nh <= 0 or nw <= 0:
        raise ValueError(f"resize size must be positive (H, W), got {tuple(size)}")
    if (nh, nw) != (h, w):
        batched = image.dim() == 4
        x = image if batched else image[None]
        # antialias: the official pipeline resizes with torchvision v2's default antialias=True
        x = F.interpolate(x if x.dtype == torch.uint8 else x.float(), size=(nh, nw),
                          mode="bilinear", align_corners=False, antialias=True)
        image = (x if batched else x[0]).to(image.dtype)
    return image, _scale_target(target, h, w, nh, nw)


# --------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------

class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> Tuple[Any, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"{type(self).__name__}([{inner}\n])"


class ToTensor:
    """Image -> float [3,H,W] in [0,1]; boxes float32."""

    def __call__(self, image: Any, target: Target) -> Tuple[torch.Tensor, Target]:
        img = _to_float(_as_tensor_image(image)).contiguous()
        target = dict(target)
        if "boxes" in target:
            target["boxes"] = _boxes(target)
        _set_size(target, *img.shape[-2:])
        return img, target

    def __repr__(self) -> str:
        return "ToTensor()"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5, generator: Optional[torch.Generator] = None):
        self.p, self.generator = p, generator

    def __call__(self, image: Any, target: Target) -> Tuple[Any, Target]:
        if _rand(self.generator) >= self.p:
            return image, target
        return hflip(image, target)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def hflip(image: Any, target: Target) -> Tuple[torch.Tensor, Target]:
    """Mirror left-right; x -> W - x maps pixel edges onto pixel edges, so flipping twice is exact."""
    img = _as_tensor_image(image).flip(-1)
    w = img.shape[-1]
    target = dict(target)
    if "boxes" in target:
        b = _boxes(target)
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=-1)
    if "masks" in target and isinstance(target["masks"], torch.Tensor):
        target["masks"] = target["masks"].flip(-1)
    return img, target


class Resize:
    """Resize to a fixed (H, W), ignoring aspect ratio as the official RT-DETR pipeline does."""

    def __init__(self, size: Tuple[int, int] | int):
        if isinstance(size, int):
            size = (size, size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"Resize size must be (H, W) of positive ints, got {size}")
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, image: Any, target: Target) -> Tuple[torch.Tensor, Target]:
        return resize_image_and_target(_as_tensor_image(image), target, self.size)

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class SanitizeBoundingBoxes:
    """Clip boxes to the image and drop those narrower or shorter than ``min_size`` pixels (with
    their labels and other per-object fields), as torchvision's SanitizeBoundingBoxes does."""

    def __init__(self, min_size: float = 1.0):
        self.min_size = float(min_size)

    def __call__(self, image: Any, target: Target) -> Tuple[Any, Target]:
        h, w = image_size(image)
        b = _boxes(target)
        b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h),
                         b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], dim=-1)
        keep = ((b[:, 2] - b[:, 0]) >= self.min_size) & ((b[:, 3] - b[:, 1]) >= self.min_size)
        target = dict(target)
        target["boxes"] = b
        return image, select_instances(target, keep)

    def __repr__(self) -> str:
        return f"SanitizeBoundingBoxes(min_size={self.min_size})"


class RandomZoomOut:
    """Place the image at a random spot of a canvas ``side`` times larger (side drawn from
    ``side_range``), filled with ``fill``; the objects get smaller, which helps small-object AP."""

    def __init__(self, fill: float = 0, side_range: Tuple[float, float] = (1.0, 4.0), p: float = 0.5,
                 generator: Optional[torch.Generator] = None):
        if side_range[0] < 1.0 or side_range[0] > side_range[1]:
            raise ValueError(f"side_range must satisfy 1 <= lo <= hi, got {side_range}")
        self.fill, self.side_range, self.p, self.generator = fill, tuple(side_range), p, generator

    def __call__(self, image: Any, target: Target) -> Tuple[Any, Target]:
        if _rand(self.generator) >= self.p:
            return image, target
        img = _as_tensor_image(image)
        c, h, w = img.shape
        r = _uniform(self.side_range[0], self.side_range[1], self.generator)
        cw, ch = int(w * r), int(h * r)
        left = int((cw - w) * _rand(self.generator))
        top = int((ch - h) * _rand(self.generator))
        # fill is in 0..255 units for uint8 images and [0,1] units for float ones, like torchvision
        canvas = torch.full((c, ch, cw), self.fill, dtype=img.dtype)
        canvas[:, top:top + h, left:left + w] = img
        target = dict(target)
        if "boxes" in target:
            target["boxes"] = _boxes(target) + torch.tensor([left, top, left, top], dtype=torch.float32)
        if "masks" in target and isinstance(target["masks"], torch.Tensor):
            m = target["masks"]
            mm = m.new_zeros((m.shape[0], ch, cw))
            mm[:, top:top + h, left:left + w] = m
            target["masks"] = mm
        _set_size(target, ch, cw)
        return canvas, target

    def __repr__(self) -> str:
        return f"RandomZoomOut(fill={self.fill}, side_range={self.side_range}, p={self.p})"


class RandomIoUCrop:
    """SSD-style crop (Liu et al. 2016), as torchvision's v2 RandomIoUCrop, applied with
    probability ``p`` (0.8 in the official RT-DETR config).

    A minimum IoU is drawn from ``sampler_options``; up to ``trials`` crops of random scale and
    aspect are tried until one contains at least one box centre and overlaps some box with at
    least that IoU. Boxes whose centre falls outside the crop are dropped; the others are clipped.
    Option 1.0 (or an image without boxes) leaves the image as it is.
    """

    def __init__(self, min_scale: float = 0.3, max_scale: float = 1.0, min_aspect_ratio: float = 0.5,
                 max_aspect_ratio: float = 2.0, sampler_options: Optional[Sequence[float]] = None,
                 trials: int = 40, p: float = 0.8, generator: Optional[torch.Generator] = None):
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_aspect_ratio, self.max_aspect_ratio = min_aspect_ratio, max_aspect_ratio
        self.options = list(sampler_options if sampler_options is not None
                            else (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0))
        self.trials, self.p, self.generator = trials, p, generator

    def _find_crop(self, boxes: torch.Tensor, h: int, w: int):
        g = self.generator
        # Each round exits with probability >= P(option >= 1), so this terminates quickly; the cap
        # only matters when a user passes options without 1.0 and no crop can ever qualify.
        for _ in range(1000):
            idx = int(torch.randint(len(self.options), (), generator=g))
            min_iou = self.options[idx]
            if min_iou >= 1.0:
                return None
            for _ in range(self.trials):
                sw = self.min_scale + (self.max_scale - self.min_scale) * _rand(g)
                sh = self.min_scale + (self.max_scale - self.min_scale) * _rand(g)
                nw, nh = int(w * sw), int(h * sh)
                if nh == 0 or not (self.min_aspect_ratio <= nw / nh <= self.max_aspect_ratio):
                    continue
                left = int((w - nw) * _rand(g))
                top = int((h - nh) * _rand(g))
                right, bottom = left + nw, top + nh
                if left == right or top == bottom:
                    continue
                cx = 0.5 * (boxes[:, 0] + boxes[:, 2])
                cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
                inside = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
                if not inside.any():
                    continue
                crop = torch.tensor([[left, top, right, bottom]], dtype=torch.float32)
                if box_iou(boxes[inside], crop).max() < min_iou:
                    continue
                return left, top, right, bottom, inside
        return None

    def __call__(self, image: Any, target: Target) -> Tuple[Any, Target]:
        if _rand(self.generator) >= self.p:
            return image, target
        boxes = _boxes(target)
        if boxes.shape[0] == 0:
            return image, target
        img = _as_tensor_image(image)
        h, w = img.shape[-2:]
        found = self._find_crop(boxes, h, w)
        if found is None:
            return img, target
        left, top, right, bottom, inside = found
        img = img[:, top:bottom, left:right]
        target = select_instances(dict(target), inside)
        b = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        nw, nh = right - left, bottom - top
        b = torch.stack([b[:, 0].clamp(0, nw), b[:, 1].clamp(0, nh),
                         b[:, 2].clamp(0, nw), b[:, 3].clamp(0, nh)], dim=-1)
        target["boxes"] = b
        if "area" in target and isinstance(target["area"], torch.Tensor):
            # the annotation area can only shrink with the box
            box_area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            target["area"] = torch.minimum(target["area"].float(), box_area)
        if "masks" in target and isinstance(target["masks"], torch.Tensor):
            target["masks"] = target["masks"][:, top:bottom, left:right]
        _set_size(target, nh, nw)
        return img, target

    def __repr__(self) -> str:
        return (f"RandomIoUCrop(min_scale={self.min_scale}, max_scale={self.max_scale}, "
                f"options={self.options}, trials={self.trials}, p={self.p})")


# ---- photometric ----------------------------------------------------------------------------

def _grayscale(img: torch.Tensor) -> torch.Tensor:
    # ITU-R 601-2 luma, the weights PIL and torchvision use
    r, g, b = img[0], img[1], img[2]
    return (0.2989 * r + 0.587 * g + 0.114 * b)[None]


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: float) -> torch.Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp_(0.0, 1.0)


def adjust_brightness(img: torch.Tensor, factor: float) -> torch.Tensor:
    return (img * factor).clamp_(0.0, 1.0)


def adjust_contrast(img: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(img, _grayscale(img).mean(), factor)


def adjust_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(img, _grayscale(img), factor)


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img[0], img[1], img[2]
    maxc, _ = img.max(0)
    minc, _ = img.min(0)
    delta = maxc - minc
    s = delta / maxc.clamp(min=1e-12)
    d = delta.clamp(min=1e-12)
    # hue sextant by which channel is the max; ties resolve r, then g, as in colorsys
    h = torch.where(maxc == r, (g - b) / d,
                    torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = (h / 6.0).remainder_(1.0)
    return torch.stack([h, s, maxc])


_HSV_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    # closed form: channel n in (r, g, b) = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n' + 6h) mod 6
    # with n' = 5, 3, 1; a handful of whole-image ops instead of a 6-way select
    h, s, v = hsv[0:1], hsv[1:2], hsv[2:3]
    k = (_HSV_OFFSETS.to(hsv.dtype) + h * 6.0).remainder_(6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def adjust_hue(img: torch.Tensor, factor: float) -> torch.Tensor:
    if not -0.5 <= factor <= 0.5:
        raise ValueError(f"hue factor must be in [-0.5, 0.5], got {factor}")
    hsv = _rgb_to_hsv(img)
    hsv[0] = (hsv[0] + factor) % 1.0
    return _hsv_to_rgb(hsv).clamp_(0.0, 1.0)


class RandomPhotometricDistort:
    """torchvision v2's RandomPhotometricDistort (from SSD): brightness, contrast, saturation, hue
    and a channel permutation, each applied independently with probability ``p``; contrast goes
    before or after saturation/hue with equal chance. Boxes are untouched."""

    def __init__(self, brightness: Tuple[float, float] = (0.875, 1.125),
                 contrast: Tuple[float, float] = (0.5, 1.5),
                 saturation: Tuple[float, float] = (0.5, 1.5),
                 hue: Tuple[float, float] = (-0.05, 0.05), p: float = 0.5,
                 generator: Optional[torch.Generator] = None):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.p, self.generator = p, generator

    def __call__(self, image: Any, target: Target) -> Tuple[Any, Target]:
        g = self.generator
        # draw every decision first so the RNG stream does not depend on the image
        draws = [_rand(g) < self.p for _ in range(6)]
        contrast_first = _rand(g) < 0.5
        bf = _uniform(*self.brightness, g)
        cf = _uniform(*self.contrast, g)
        sf = _uniform(*self.saturation, g)
        hf = _uniform(*self.hue, g)
        perm = torch.randperm(3, generator=g)
        if not any(draws):
            return image, target
        ref = _as_tensor_image(image)
        if ref.shape[0] != 3:
            raise ValueError(f"photometric distortion needs RGB images, got {ref.shape[0]} channels")
        img = _to_float(ref)
        if draws[0]:
            img = adjust_brightness(img, bf)
        if draws[1] and contrast_first:
            img = adjust_contrast(img, cf)
        if draws[2]:
            img = adjust_saturation(img, sf)
        if draws[3]:
            img = adjust_hue(img, hf)
        if draws[4] and not contrast_first:
            img = adjust_contrast(img, cf)
        if draws[5]:
            img = img[perm]
        return _like(img, ref), target

    def __repr__(self) -> str:
        return (f"RandomPhotometricDistort(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue}, p={self.p})")


# --------------------------------------------------------------------------------------------
# pipelines
# --------------------------------------------------------------------------------------------

def train_transforms(size: Tuple[int, int] = (640, 640),
                     generator: Optional[torch.Generator] = None) -> Compose:
    """The official RT-DETR training pipeline (boxes kept xyxy in pixels)."""
    return Compose([
        RandomPhotometricDistort(p=0.5, generator=generator),
        RandomZoomOut(fill=0, generator=generator),
        RandomIoUCrop(p=0.8, generator=generator),
        SanitizeBoundingBoxes(min_size=1),
        RandomHorizontalFlip(generator=generator),
        Resize(size),
        SanitizeBoundingBoxes(min_size=1),
        ToTensor(),
    ])


def eval_transforms(size: Tuple[int, int] = (640, 640)) -> Compose:
    return Compose([Resize(size), ToTensor()])


# --------------------------------------------------------------------------------------------
# collation
# --------------------------------------------------------------------------------------------

def collate_fn(batch: Sequence[Tuple[torch.Tensor, Target]]) -> Tuple[torch.Tensor, List[Target]]:
    """Stack same-size images into [B,3,H,W]; targets stay a list of dicts."""
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in a batch must share one size, got {sorted(shapes)}; "
                         "add a Resize transform (eval_transforms / train_transforms do)")
    return torch.stack(images), targets


DEFAULT_SCALES = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)


class MultiScaleCollate:
    """Collate, then resize the whole batch to a square size drawn per batch from ``sizes``
    (images bilinearly, boxes and areas exactly), until ``set_epoch(e)`` reaches ``stop_epoch``.

    The default sizes are the official RT-DETR ones: 480..800 in steps of 32 with 640 three times,
    so training is centred on the evaluation size. ``stop_epoch=None`` never stops.
    Note: with ``persistent_workers=True`` the DataLoader's workers keep their own copy of this
    object, so ``set_epoch`` in the main process does not reach them; use non-persistent workers
    (recreated, and so re-pickled, every epoch) or num_workers=0 when ``stop_epoch`` matters.
    """

    def __init__(self, sizes: Sequence[int] = DEFAULT_SCALES, stop_epoch: Optional[int] = None,
                 generator: Optional[torch.Generator] = None):
        sizes = [int(s) for s in sizes]
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"sizes must be a non-empty list of positive ints, got {sizes}")
        self.sizes, self.stop_epoch, self.generator = sizes, stop_epoch, generator
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def enabled(self) -> bool:
        return self.stop_epoch is None or self.epoch < self.stop_epoch

    def __call__(self, batch: Sequence[Tuple[torch.Tensor, Target]]
                 ) -> Tuple[torch.Tensor, List[Target]]:
        images, targets = collate_fn(batch)
        if not self.enabled:
            return images, targets
        s = self.sizes[int(torch.randint(len(self.sizes), (), generator=self.generator))]
        if tuple(images.shape[-2:]) == (s, s):
            return images, targets
        h, w = images.shape[-2:]
        resized, _ = resize_image_and_target(images, {}, (s, s))
        return resized, [_scale_target(t, h, w, s, s) for t in targets]


def _scale_target(target: Target, h: int, w: int, nh: int, nw: int) -> Target:
    """The annotations of an image resized from (h, w) to (nh, nw)."""
    t = dict(target)
    if (nh, nw) == (h, w):
        _set_size(t, nh, nw)
        return t
    sx, sy = nw / w, nh / h
    if "boxes" in t:
        t["boxes"] = _boxes(t) * torch.tensor([sx, sy, sx, sy])
    if "area" in t and isinstance(t["area"], torch.Tensor):
        t["area"] = t["area"].float() * (sx * sy)
    if "masks" in t and isinstance(t["masks"], torch.Tensor):
        m = t["masks"]
        t["masks"] = (F.interpolate(m[:, None].float(), size=(nh, nw), mode="nearest")[:, 0].to(m.dtype)
                      if m.numel() else m.new_zeros((0, nh, nw)))
    _set_size(t, nh, nw)
    return t
