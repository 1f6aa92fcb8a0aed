"""Turning the image kinds users hold into float RGB tensors [3,H,W] in [0,1]."""
from __future__ import annotations

import os
from typing import Any, List

import numpy as np
import torch


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file (EXIF orientation applied) as float RGB [3,H,W] in [0,1]."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image file at {os.fspath(path)!r}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            return from_pil(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {exc}") from exc


def from_pil(im) -> torch.Tensor:
    return from_numpy(np.asarray(im.convert("RGB")))


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """HWC (or HW grayscale) array, uint8 or float in [0,1] -> [3,H,W] float."""
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"a numpy image must be HxW or HxWxC with C in 1, 3, 4; got {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    a = a[:, :, :3]
    t = torch.from_numpy(np.array(a, copy=True, order="C")).permute(2, 0, 1)
    return _to_unit_float(t)


def _to_unit_float(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.is_floating_point():
        t = t.float()
        if t.numel() and float(t.max()) > 2.0:
            raise ValueError(f"float images must hold values in [0, 1], got values up to "
                             f"{float(t.max()):.1f}; divide by 255 (or pass uint8)")
        return t
    raise TypeError(f"image tensors must be uint8 or floating point, got {t.dtype}")


def from_tensor(t: torch.Tensor) -> List[torch.Tensor]:
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[1] != 3:
        raise ValueError(f"image tensors must be [3, H, W] or [B, 3, H, W] (RGB), got "
                         f"[{', '.join(map(str, t.shape))}]")
    return [_to_unit_float(x) for x in t]


def to_tensor_list(images: Any) -> List[torch.Tensor]:
    """One image or a list of images of any supported kind -> list of [3,H,W] float tensors."""
    try:
        from PIL import Image
        pil_type = Image.Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        pil_type = ()
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        out: List[torch.Tensor] = []
        for im in images:
            out.extend(to_tensor_list(im))
        return out
    if isinstance(images, torch.Tensor):
        return from_tensor(images)
    if isinstance(images, np.ndarray):
        return [from_numpy(images)]
    if pil_type and isinstance(images, pil_type):
        return [from_pil(images)]
    if isinstance(images, (str, os.PathLike)):
        return [load_image(images)]
    raise TypeError(f"unsupported image type {type(images).__name__}; pass tensors, numpy "
                    "arrays, PIL images or file paths")
