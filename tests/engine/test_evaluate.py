"""CocoEvaluator and evaluate() against hand-made and synthetic ground truth."""
import json

import pytest
import torch

from rtdetr_fast.data import transforms as T
from rtdetr_fast.data.coco import CocoDetection, load_coco_api
from rtdetr_fast.data.synthetic import make_synthetic_coco
from rtdetr_fast.engine.evaluate import STAT_NAMES, CocoEvaluator, evaluate


@pytest.fixture(scope="module")
def gt_file(tmp_path_factory):
    """Category ids 1, 3, 7; 3 images with 2 objects each of mixed sizes, one with a crowd box."""
    root = tmp_path_factory.mktemp("gt")
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 150} for i in (10, 20, 30)]
    anns, k = [], 0
    for img_id in (10, 20, 30):
        for j, (box, cat) in enumerate((([5, 5, 20, 15], 1), ([40, 30, 120, 100], 3 if img_id != 30 else 7))):
            k += 1
            anns.append({"id": k, "image_id": img_id, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    anns.append({"id": 99, "image_id": 20, "category_id": 7, "bbox": [150, 100, 40, 40],
                 "area": 1600, "iscrowd": 1})
    path = root / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 7, "name": "g"}, {"id": 1, "name": "a"}, {"id": 3, "name": "c"}]}))
    return path


LABEL_TO_CAT = [1, 3, 7]
CAT_TO_LABEL = {1: 0, 3: 1, 7: 2}


def perfect_results(coco, shuffle_labels=False):
    ids, results = [], []
    for img_id in sorted(coco.imgs):
        anns = [a for a in coco.imgToAnns[img_id] if not a["iscrowd"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32)
        labels = torch.tensor([CAT_TO_LABEL[a["category_id"]] for a in anns])
        if shuffle_labels:
            labels = (labels + 1) % 3
        ids.append(img_id)
        results.append({"boxes": boxes.reshape(-1, 4), "scores": torch.linspace(0.9, 0.5, len(anns)),
                        "labels": labels})
    return ids, results


@pytest.mark.pycocotools
def test_perfect_predictions_score_one(gt_file, tmp_path):
    ev = CocoEvaluator(str(gt_file), LABEL_TO_CAT)
    ids, results = perfect_results(ev.coco_gt)
    ev.update(ids[:1], results[:1])
    ev.update(torch.tensor(ids[1:]), results[1:])
    stats = ev.summarize()
    assert list(stats) == list(STAT_NAMES)
    for k in ("AP", "AP50", "AP75", "APs", "APl", "AR100"):
        assert stats[k] == pytest.approx(1.0), k
    assert stats["APm"] == -1.0  # no medium objects in this ground truth
    assert "Average Precision" in ev.summary_text
    out = ev.write_results(tmp_path / "sub" / "res.json")
    written = json.loads(open(out).read())
    assert len(written) == 6
    assert {r["category_id"] for r in written} == {1, 3, 7}  # labels mapped back
    first = next(r for r in written if r["image_id"] == 10 and r["category_id"] == 1)
    assert first["bbox"] == [5, 5, 20, 15]  # xyxy -> xywh


@pytest.mark.pycocotools
def test_shuffled_labels_score_low(gt_file):
    ev = CocoEvaluator(load_coco_api(gt_file), {0: 1, 1: 3, 2: 7})
    ev.update(*perfect_results(ev.coco_gt, shuffle_labels=True))
    assert ev.summarize()["AP"] < 0.1


@pytest.mark.pycocotools
def test_zero_detections_give_zeros(gt_file, tmp_path):
    ev = CocoEvaluator(str(gt_file), LABEL_TO_CAT)
    assert ev.summarize() == {k: 0.0 for k in STAT_NAMES}
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    ev.update([10, 20], [empty, empty])
    assert ev.summarize() == {k: 0.0 for k in STAT_NAMES}
    assert json.loads(open(ev.write_results(tmp_path / "r.json")).read()) == []


@pytest.mark.pycocotools
def test_only_updated_images_count_and_duplicates_are_ignored(gt_file):
    ev = CocoEvaluator(str(gt_file), LABEL_TO_CAT)
    ids, results = perfect_results(ev.coco_gt)
    ev.update(ids[:2], results[:2])
    junk = {"boxes": torch.tensor([[0.0, 0.0, 3.0, 3.0]]), "scores": torch.ones(1),
            "labels": torch.zeros(1, dtype=torch.long)}
    ev.update([ids[0]], [junk])  # a fall-through duplicate of an image already scored
    assert ev.img_ids == ids[:2] and len(ev.results) == 4
    assert ev.summarize()["AP"] == pytest.approx(1.0)  # image 30 was never seen, so no misses


@pytest.mark.pycocotools
def test_bad_updates_raise(gt_file):
    ev = CocoEvaluator(str(gt_file), LABEL_TO_CAT)
    det = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([5])}
    with pytest.raises(ValueError, match="label 5"):
        ev.update([10], [det])
    with pytest.raises(ValueError, match="image id 12345"):
        ev.update([12345], [det])
    with pytest.raises(ValueError, match="image ids"):
        ev.update([10, 20], [det])
    with pytest.raises(ValueError, match="category ids"):
        CocoEvaluator(str(gt_file), [1, 2, 3])


class GroundTruthModel(torch.nn.Module):
    """Stands in for RTDETR: 'predicts' the dataset's boxes, normalised, in loader order, and
    post-processes like the real one (cxcywh normalised -> xyxy pixels of image_sizes)."""

    def __init__(self, dataset, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.queue = []
        for i in range(len(dataset)):
            _, t = dataset[i]
            h, w = t["size"].tolist()
            b = t["boxes"] / torch.tensor([w, h, w, h])
            self.queue.append((torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1), t["labels"]))
        self.calls = []
        self.param = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        self.calls.append((self.training, torch.is_grad_enabled()))
        out = [self.queue.pop(0) for _ in range(images.shape[0])]
        return {"per_image": out}

    def postprocess(self, outputs, image_sizes):
        res = []
        for (cxcywh, labels), (h, w) in zip(outputs["per_image"], image_sizes.tolist()):
            xyxy = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
            res.append({"boxes": xyxy * torch.tensor([w, h, w, h]), "scores": torch.ones(len(labels)),
                        "labels": labels})
        return res


@pytest.mark.pycocotools
def test_evaluate_loop_maps_boxes_to_original_pixels(tmp_path):
    paths = make_synthetic_coco(tmp_path, num_train=0, num_val=10, size=(48, 72), seed=2)
    # resized to a different shape than the files, so only orig_size gets the boxes back right
    ds = CocoDetection(paths.val_images, paths.val_ann, transforms=T.eval_transforms((32, 32)))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=T.collate_fn)
    model = GroundTruthModel(ds, ds.num_classes).train()
    ev = CocoEvaluator.from_dataset(ds)
    stats = evaluate(model, loader, "cpu", ev, progress=False)
    assert stats["AP"] > 0.99 and stats["AP50"] == pytest.approx(1.0)
    assert model.calls == [(False, False)] * 3  # eval mode, no grad, one call per batch
    assert model.training  # mode restored
    assert sorted(ev.img_ids) == ds.ids
