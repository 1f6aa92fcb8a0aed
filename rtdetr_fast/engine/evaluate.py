"""COCO box evaluation (pycocotools COCOeval) of RT-DETR detections."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["CocoEvaluator", "evaluate", "STAT_NAMES"]

# the order of COCOeval.stats for iouType="bbox"
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _as_int(x: Any) -> int:
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


class CocoEvaluator:
    """Accumulates detections per image and scores them against a COCO ground truth.

    ``coco_gt``: a pycocotools ``COCO`` (e.g. ``CocoDetection.coco``) or the path of an instances
    JSON. ``label_to_cat_id``: the model's label -> COCO category id, as a sequence (index = label)
    or a mapping (``CocoDetection.label_to_cat_id``).

    Only images passed to ``update`` are scored, so images a dataset skipped (unreadable files)
    do not count as misses; an image id seen a second time (a dataset's fall-through duplicate)
    is ignored.
    """

    def __init__(self, coco_gt: Any, label_to_cat_id: Union[Sequence[int], Mapping[int, int]]):
        if isinstance(coco_gt, (str, os.PathLike)):
            from ..data.coco import load_coco_api

            coco_gt = load_coco_api(coco_gt)
        self.coco_gt = coco_gt
        if isinstance(label_to_cat_id, Mapping):
            self.label_to_cat_id = {int(k): int(v) for k, v in label_to_cat_id.items()}
        else:
            self.label_to_cat_id = {i: int(v) for i, v in enumerate(label_to_cat_id)}
        known = set(coco_gt.getCatIds())
        unknown = sorted(set(self.label_to_cat_id.values()) - known)
        if unknown:
            raise ValueError(f"label_to_cat_id maps to category ids {unknown}, which are not in "
                             f"the ground truth (its ids: {sorted(known)})")
        self.reset()

    @classmethod
    def from_dataset(cls, dataset: Any) -> "CocoEvaluator":
        """For a ``CocoDetection`` (or a Subset of one)."""
        base = getattr(dataset, "dataset", dataset)
        return cls(base.coco, base.label_to_cat_id)

    def reset(self) -> None:
        self.img_ids: List[int] = []
        self._seen: set = set()
        self.results: List[Dict[str, Any]] = []
        self.stats: Optional[Dict[str, float]] = None
        self.summary_text: str = ""
        self._coco_eval = None

    def update(self, image_ids: Iterable[Any], results: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """``results[i]`` (from ``model.postprocess``) holds ``boxes`` [K,4] xyxy in pixels of the
        original image, ``scores`` [K] and ``labels`` [K] for image ``image_ids[i]``."""
        image_ids = [_as_int(i) for i in (image_ids.tolist() if isinstance(image_ids, torch.Tensor)
                                          else image_ids)]
        if len(image_ids) != len(results):
            raise ValueError(f"got {len(image_ids)} image ids but {len(results)} results")
        for image_id, res in zip(image_ids, results):
            if image_id in self._seen:
                continue
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            self._seen.add(image_id)
            self.img_ids.append(image_id)
            self.results.extend(self._convert(image_id, res))
        self.stats = None

    def _convert(self, image_id: int, res: Mapping[str, torch.Tensor]) -> List[Dict[str, Any]]:
        boxes = torch.as_tensor(res["boxes"]).detach().float().cpu().reshape(-1, 4)
        scores = torch.as_tensor(res["scores"]).detach().float().cpu().reshape(-1)
        labels = torch.as_tensor(res["labels"]).detach().cpu().reshape(-1).long()
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {image_id}: boxes, scores and labels differ in length "
                             f"({len(boxes)}, {len(scores)}, {len(labels)})")
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        out = []
        for box, score, label in zip(xywh, scores.tolist(), labels.tolist()):
            cat = self.label_to_cat_id.get(label)
            if cat is None:
                raise ValueError(f"label {label} has no category id (label_to_cat_id covers "
                                 f"{sorted(self.label_to_cat_id)})")
            out.append({"image_id": image_id, "category_id": cat,
                        "bbox": [round(v, 3) for v in box], "score": round(score, 5)})
        return out

    def synchronize_between_processes(self) -> None:
        """Merge every rank's images and results (no-op unless torch.distributed is running)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.img_ids, self.results))
        self.reset()
        for img_ids, results in gathered:
            by_image: Dict[int, List[Dict[str, Any]]] = {}
            for r in results:
                by_image.setdefault(r["image_id"], []).append(r)
            for i in img_ids:
                if i not in self._seen:
                    self._seen.add(i)
                    self.img_ids.append(i)
                    self.results.extend(by_image.get(i, []))

    def summarize(self, verbose: bool = False) -> Dict[str, float]:
        """Run COCOeval (bbox) over the images seen; returns the 12 standard numbers by name.

        With no detections at all every number is 0.0. As in pycocotools, -1.0 means the ground
        truth has no object in that size range. ``verbose`` prints pycocotools' table; it is
        kept in ``summary_text`` either way."""
        self._coco_eval = None
        if not self.results or not self.img_ids:
            self.stats = {k: 0.0 for k in STAT_NAMES}
            self.summary_text = "no detections: all metrics are 0"
            if verbose:
                print(self.summary_text)
            return dict(self.stats)
        from pycocotools.cocoeval import COCOeval

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            # loadRes annotates the results it is given (area, id); keep ours clean for writing
            coco_dt = self.coco_gt.loadRes(copy.deepcopy(self.results))
            ev = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            ev.params.imgIds = sorted(self.img_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        self.summary_text = buf.getvalue()
        if verbose:
            print(self.summary_text, end="")
        self.stats = {k: float(v) for k, v in zip(STAT_NAMES, np.asarray(ev.stats).tolist())}
        self._coco_eval = ev
        return dict(self.stats)

    def per_class_ap(self) -> List[Dict[str, Any]]:
        """Per category (of the evaluated images): ``category_id``, ``name``, ``AP``
        (IoU 0.50:0.95), ``AP50`` and ``objects`` (non-crowd ground-truth boxes), after
        :meth:`summarize`. AP is -1.0 for a category without ground truth; 0.0 everywhere when
        there were no detections."""
        if self.stats is None:
            self.summarize()
        img_ids = set(self.img_ids)
        objects: Dict[int, int] = {}
        for ann in self.coco_gt.dataset.get("annotations", []):
            if ann["image_id"] in img_ids and not ann.get("iscrowd", 0):
                objects[ann["category_id"]] = objects.get(ann["category_id"], 0) + 1
        out = []
        ev = self._coco_eval
        cat_ids = list(ev.params.catIds) if ev is not None else sorted(self.coco_gt.getCatIds())
        for k, cid in enumerate(cat_ids):
            ap = ap50 = 0.0
            if ev is not None:
                # precision [T, R, K, A, M]: area "all" (0), the largest maxDets (-1)
                prec = ev.eval["precision"][:, :, k, 0, -1]
                valid = prec[prec > -1]
                ap = float(valid.mean()) if valid.size else -1.0
                p50 = prec[0][prec[0] > -1]
                ap50 = float(p50.mean()) if p50.size else -1.0
            cat = self.coco_gt.cats.get(cid, {})
            out.append({"category_id": int(cid), "name": str(cat.get("name", cid)),
                        "AP": round(ap, 4), "AP50": round(ap50, 4),
                        "objects": objects.get(cid, 0)})
        return out

    def write_results(self, path: Union[str, os.PathLike]) -> str:
        """Write the detections as a COCO results JSON (a list of image_id, category_id,
        bbox xywh, score); returns the path."""
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.results, f)
        return path


def evaluate(model: torch.nn.Module, data_loader: Iterable, device: Union[str, torch.device],
             evaluator: CocoEvaluator, progress: bool = True, verbose: bool = False
             ) -> Dict[str, float]:
    """Run ``model`` over ``data_loader`` (batches of (images [B,3,H,W], targets with
    ``image_id`` and ``orig_size``)), score with ``evaluator`` and return its summary.

    Boxes are post-processed to the original image size, since the ground truth is in the
    file's pixels. The model's train/eval mode is restored afterwards."""
    from tqdm.auto import tqdm

    net = getattr(model, "module", model)  # DistributedDataParallel keeps postprocess inside
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total = len(data_loader) if hasattr(data_loader, "__len__") else None
            for images, targets in tqdm(data_loader, desc="eval", total=total, disable=not progress,
                                        dynamic_ncols=True):
                missing = [k for k in ("image_id", "orig_size") if k not in targets[0]]
                if missing:
                    raise KeyError(f"evaluation targets need {missing}; CocoDetection provides them")
                images = images.to(device, non_blocking=True)
                outputs = model(images)
                orig = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(images.device)
                results = net.postprocess(outputs, orig)
                evaluator.update([_as_int(t["image_id"]) for t in targets], results)
    finally:
        model.train(was_training)
    evaluator.synchronize_between_processes()
    return evaluator.summarize(verbose=verbose)
