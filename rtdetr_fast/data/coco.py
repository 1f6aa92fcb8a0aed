"""COCO-format detection datasets (pycocotools) -> (image, target) items for RT-DETR."""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .transforms import image_size

__all__ = ["CocoDetection", "load_coco_api"]

# PIL Image.transpose methods by EXIF orientation, the mapping ImageOps.exif_transpose applies
_ORIENTATION_METHOD = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                       6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}
_EXIF_ORIENTATION_TAG = 0x0112


def load_coco_api(ann_file: str | os.PathLike):
    """Read a COCO instances JSON into a pycocotools ``COCO`` object, with clear errors and the
    fields COCOeval needs (``iscrowd``, ``area``) filled in where a file leaves them out."""
    from pycocotools.coco import COCO

    path = os.fspath(ann_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO annotation file not found: {path!r}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path!r} is not a COCO instances file: it needs an 'images' list")
    if not isinstance(data.get("categories", []), list) or not data.get("categories"):
        raise ValueError(f"{path!r} has no 'categories' list")
    data.setdefault("annotations", [])
    cat_ids = {c["id"] for c in data["categories"]}
    img_ids = {im["id"] for im in data["images"]}
    for ann in data["annotations"]:
        if ann.get("category_id") not in cat_ids:
            raise ValueError(f"{path!r}: annotation {ann.get('id')} has category_id "
                             f"{ann.get('category_id')!r}, which is not in 'categories'")
        if ann.get("image_id") not in img_ids:
            raise ValueError(f"{path!r}: annotation {ann.get('id')} refers to image_id "
                             f"{ann.get('image_id')!r}, which is not in 'images'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                        and np.isfinite(v) for v in bbox)):
            raise ValueError(f"{path!r}: annotation {ann.get('id')} has bbox {bbox!r}; "
                             "expected [x, y, width, height] as 4 numbers")
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(max(bbox[2], 0) * max(bbox[3], 0)))
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """A COCO instances JSON and its image folder as a map-style dataset.

    Item: ``(image, target)`` with ``image`` float ``[3,H,W]`` in [0,1] (RGB, EXIF orientation
    applied) and ``target``:

    * ``boxes`` float32 ``[N,4]`` xyxy in pixels of the returned image (crowd boxes dropped,
      clipped to the image, empty ones dropped), ``labels`` int64 ``[N]`` in 0..C-1,
    * ``image_id`` int (the COCO id), ``orig_size`` int64 (H, W) of the image file (after EXIF
      orientation) — what ``model.postprocess`` needs to give boxes in the file's pixels,
    * ``size`` int64 (H, W) of the returned tensor, ``area`` float32 ``[N]`` and ``iscrowd`` int64
      ``[N]`` (all zero), and with ``return_masks=True`` ``masks`` uint8 ``[N,H,W]``.

    Labels are contiguous: category ids sorted ascending map to 0..C-1 (``cat_id_to_label``,
    ``label_to_cat_id``, ``class_names``). Images without annotations are kept, with empty targets.

    Annotations are taken to be in the frame of the image as displayed, i.e. after EXIF
    orientation (what labelling tools show). If instead the JSON's width/height match the raw
    pixel array and not the rotated one, the annotations were made on the raw array and are
    rotated along with the image.

    Unreadable images: a missing or corrupt file is skipped with a warning (once per image),
    counted in ``skipped`` and its id kept in ``bad_image_ids``; ``__getitem__`` then falls
    through to the next readable index (wrapping around), so an epoch never stops midway. The
    fallen-through item is a duplicate of another image; ``CocoEvaluator`` ignores repeated image
    ids. The flags live in shared memory, so DataLoader workers share them: each unreadable image
    is warned about once. If no image at all can be read, ``__getitem__`` raises RuntimeError.

    ``transforms(pil_image, target) -> (image, target)`` runs after loading (see
    ``rtdetr_fast.data.transforms``); its output image is converted to float [0,1] if it is not.
    """

    def __init__(self, img_folder: str | os.PathLike, ann_file: str | os.PathLike,
                 transforms: Optional[Callable] = None, return_masks: bool = False):
        self.img_folder = os.fspath(img_folder)
        if not os.path.isdir(self.img_folder):
            raise FileNotFoundError(f"image folder not found: {self.img_folder!r}")
        self.ann_file = os.fspath(ann_file)
        self.coco = load_coco_api(self.ann_file)
        self.transforms = transforms
        self.return_masks = return_masks
        self.ids: List[int] = sorted(self.coco.imgs.keys())
        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.label_to_cat_id: List[int] = [int(c["id"]) for c in cats]
        self.cat_id_to_label: Dict[int, int] = {cid: i for i, cid in enumerate(self.label_to_cat_id)}
        self.class_names: List[str] = [str(c.get("name", c["id"])) for c in cats]
        # one flag per image in shared memory: DataLoader workers (forked or spawned) mark an
        # unreadable image once for all, so it is warned about once per run, not once per
        # worker and epoch, and ``skipped`` counts it in the main process too
        self._index = {image_id: i for i, image_id in enumerate(self.ids)}
        self._bad = torch.zeros(len(self.ids), dtype=torch.uint8).share_memory_()

    @property
    def bad_image_ids(self) -> set:
        """The ids of the images found unreadable so far."""
        return {self.ids[i] for i in torch.nonzero(self._bad).flatten().tolist()}

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    @property
    def skipped(self) -> int:
        """How many distinct images were found unreadable so far (by any worker)."""
        return int(self._bad.sum())

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        n = len(self.ids)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        for k in range(n):
            image_id = self.ids[(index + k) % n]
            if self._bad[(index + k) % n]:
                continue
            item = self._load(image_id)
            if item is not None:
                return item
        raise RuntimeError(f"none of the {n} images listed in {self.ann_file!r} could be read "
                           f"from {self.img_folder!r}")

    # -----------------------------------------------------------------------------------------

    def _open(self, image_id: int):
        """(PIL RGB image after EXIF orientation, raw (H, W), orientation) or None if unreadable."""
        from PIL import Image, ImageOps

        info = self.coco.imgs[image_id]
        path = os.path.join(self.img_folder, info["file_name"])
        try:
            with Image.open(path) as im:
                orientation = int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
                raw_hw = (im.height, im.width)
                im.load()  # decode fully now, so a truncated file fails here and not later
                img = ImageOps.exif_transpose(im).convert("RGB")
        except Exception as exc:  # noqa: BLE001 - any decoder failure means the same: skip it
            i = self._index[image_id]
            first = not bool(self._bad[i])
            self._bad[i] = 1
            if first:
                reason = ("missing" if isinstance(exc, FileNotFoundError)
                          else f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
                warnings.warn(f"skipping image {image_id} at {path!r}: {reason}", RuntimeWarning,
                              stacklevel=3)
            return None
        return img, raw_hw, orientation

    def _load(self, image_id: int):
        opened = self._open(image_id)
        if opened is None:
            return None
        img, raw_hw, orientation = opened
        w, h = img.size
        info = self.coco.imgs[image_id]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]

        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = np.array([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        area = np.array([a.get("area", 0.0) for a in anns], dtype=np.float32)

        json_hw = (info.get("height"), info.get("width"))
        rotate_annotations = (orientation in _ORIENTATION_METHOD and json_hw == raw_hw
                              and raw_hw != (h, w))
        if rotate_annotations:
            boxes = _orient_boxes(boxes, orientation, raw_hw)

        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])

        target: Dict[str, Any] = {
            "boxes": torch.from_numpy(boxes[keep].astype(np.float32)).reshape(-1, 4),
            "labels": torch.from_numpy(labels[keep]),
            "image_id": int(image_id),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
            "area": torch.from_numpy(area[keep]),
            "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
        }
        if self.return_masks:
            target["masks"] = self._masks([a for a, k in zip(anns, keep) if k], image_id,
                                          orientation if rotate_annotations else 1, (h, w))

        if self.transforms is not None:
            image, target = self.transforms(img, target)
        else:
            image = img
        image = _to_float_tensor(image)
        target["size"] = torch.tensor(image_size(image), dtype=torch.int64)
        return image, target

    def _masks(self, anns: List[dict], image_id: int, orientation: int, hw: Tuple[int, int]
               ) -> torch.Tensor:
        from PIL import Image

        info = self.coco.imgs[image_id]
        out = []
        for a in anns:
            if not a.get("segmentation"):
                # no polygon: the box is the best mask there is
                m = np.zeros((info["height"], info["width"]), dtype=np.uint8)
                x, y, bw, bh = (int(round(v)) for v in a["bbox"])
                m[max(y, 0):y + bh, max(x, 0):x + bw] = 1
            else:
                with warnings.catch_warnings():
                    # pycocotools' decode trips numpy 2's copy-keyword deprecation; harmless
                    warnings.simplefilter("ignore", DeprecationWarning)
                    m = self.coco.annToMask(a)
            if orientation in _ORIENTATION_METHOD:
                pim = Image.fromarray(m).transpose(getattr(Image.Transpose,
                                                           _ORIENTATION_METHOD[orientation]))
                m = np.asarray(pim)
            if m.shape != hw:  # JSON size disagrees with the file: fit the mask to the image
                m = np.asarray(Image.fromarray(m).resize((hw[1], hw[0]), Image.NEAREST))
            out.append(torch.from_numpy(np.array(m, dtype=np.uint8)))
        if not out:
            return torch.zeros((0, *hw), dtype=torch.uint8)
        return torch.stack(out)


def _orient_boxes(boxes: np.ndarray, orientation: int, raw_hw: Tuple[int, int]) -> np.ndarray:
    """Map xyxy boxes on the raw pixel array through the transpose exif_transpose applies."""
    H, W = raw_hw
    x0, y0, x1, y1 = boxes.T
    if orientation == 2:    # mirror left-right
        pts = (W - x1, y0, W - x0, y1)
    elif orientation == 3:  # rotate 180
        pts = (W - x1, H - y1, W - x0, H - y0)
    elif orientation == 4:  # mirror top-bottom
        pts = (x0, H - y1, x1, H - y0)
    elif orientation == 5:  # transpose: (x, y) -> (y, x)
        pts = (y0, x0, y1, x1)
    elif orientation == 6:  # rotate 90 clockwise: (x, y) -> (H - y, x)
        pts = (H - y1, x0, H - y0, x1)
    elif orientation == 7:  # transverse: (x, y) -> (H - y, W - x)
        pts = (H - y1, W - x1, H - y0, W - x0)
    elif orientation == 8:  # rotate 90 counter-clockwise: (x, y) -> (y, W - x)
        pts = (y0, W - x1, y1, W - x0)
    else:
        return boxes
    return np.stack(pts, axis=1).astype(boxes.dtype).reshape(-1, 4)


def _to_float_tensor(image: Any) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        return image.float()
    from .images import from_pil

    return from_pil(image)
