"""CocoDetection on small generated COCO folders; make_synthetic_coco."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from rtdetr_fast.data import transforms as T
from rtdetr_fast.data.coco import CocoDetection
from rtdetr_fast.data.synthetic import make_scene, make_synthetic_coco

RED = (255, 0, 0)


def _write(tmp_path, images, annotations, categories):
    (tmp_path / "annotations").mkdir(exist_ok=True)
    ann = tmp_path / "annotations" / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": categories}))
    return ann


@pytest.fixture
def coco_folder(tmp_path):
    """4 images: 1 annotated (normal, crowd, zero-width, partly and wholly outside boxes), 2 without
    annotations, 3 a corrupt file, 4 missing; category ids 7, 1, 3 (unsorted, non-contiguous)."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(img_dir / "a.png")
    Image.new("RGB", (32, 40), (0, 0, 0)).save(img_dir / "b.png")
    (img_dir / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
              {"id": 2, "file_name": "b.png", "width": 32, "height": 40},
              {"id": 3, "file_name": "c.png", "width": 32, "height": 32},
              {"id": 4, "file_name": "d.png", "width": 32, "height": 32}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 5, 10, 20], "area": 150, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 1},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [20, 20, 0, 10], "area": 0, "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 7, "bbox": [50, 40, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [70, 10, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 6, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
    ]
    cats = [{"id": 7, "name": "seven"}, {"id": 1, "name": "one"}, {"id": 3, "name": "three"}]
    return img_dir, _write(tmp_path, images, anns, cats)


@pytest.mark.pycocotools
def test_items_boxes_labels_and_mapping(coco_folder):
    ds = CocoDetection(*coco_folder)
    assert len(ds) == 4
    assert ds.class_names == ["one", "three", "seven"]
    assert ds.label_to_cat_id == [1, 3, 7]
    assert ds.cat_id_to_label == {1: 0, 3: 1, 7: 2}
    for cat in (1, 3, 7):
        assert ds.label_to_cat_id[ds.cat_id_to_label[cat]] == cat
    img, t = ds[0]
    assert img.dtype == torch.float32 and img.shape == (3, 48, 64)
    assert 0 <= img.min() and img.max() <= 1
    # crowd dropped, zero-width dropped, partly-outside clipped, wholly-outside dropped
    assert t["boxes"].tolist() == [[4, 5, 14, 25], [50, 40, 64, 48]]
    assert t["boxes"].dtype == torch.float32
    assert t["labels"].tolist() == [1, 2] and t["labels"].dtype == torch.int64
    assert t["image_id"] == 1
    assert t["orig_size"].tolist() == [48, 64] and t["orig_size"].dtype == torch.int64
    assert t["size"].tolist() == [48, 64]
    assert t["area"].tolist() == [150, 900] and t["iscrowd"].tolist() == [0, 0]


@pytest.mark.pycocotools
def test_image_without_annotations_is_kept(coco_folder):
    img, t = CocoDetection(*coco_folder)[1]
    assert img.shape == (3, 40, 32) and t["image_id"] == 2
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64


@pytest.mark.pycocotools
def test_corrupt_and_missing_images_are_skipped_counted_and_warned(coco_folder):
    ds = CocoDetection(*coco_folder)
    with pytest.warns(RuntimeWarning) as record:
        _, t3 = ds[2]   # corrupt -> falls through to the missing one, then wraps to image 1
    assert t3["image_id"] == 1
    messages = " ".join(str(w.message) for w in record)
    assert "c.png" in messages and "d.png" in messages and "missing" in messages
    assert ds.skipped == 2 and ds.bad_image_ids == {3, 4}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per image, not on every visit
        ids = [ds[i][1]["image_id"] for i in range(len(ds))]
    assert ids == [1, 2, 1, 1]
    assert ds.skipped == 2
    # a whole epoch through a DataLoader does not stop
    loader = torch.utils.data.DataLoader(CocoDetection(*coco_folder, transforms=T.eval_transforms((16, 16))),
                                         batch_size=2, collate_fn=T.collate_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert [b[0].shape for b in batches] == [(2, 3, 16, 16)] * 2


@pytest.mark.pycocotools
def test_no_readable_image_raises(tmp_path):
    (tmp_path / "im").mkdir()
    ann = _write(tmp_path, [{"id": 1, "file_name": "x.png", "width": 4, "height": 4}], [],
                 [{"id": 1, "name": "a"}])
    ds = CocoDetection(tmp_path / "im", ann)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="none of the 1 images"):
        ds[0]


@pytest.mark.pycocotools
def test_bad_inputs_give_clear_errors(tmp_path, coco_folder):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(coco_folder[0], missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        CocoDetection(coco_folder[0], bad)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        CocoDetection(tmp_path / "no_such_dir", coco_folder[1])
    wrong_cat = _write(tmp_path, [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
                       [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}],
                       [{"id": 1, "name": "a"}])
    with pytest.raises(ValueError, match="category_id 9"):
        CocoDetection(coco_folder[0], wrong_cat)


@pytest.mark.pycocotools
def test_transforms_run_and_orig_size_is_the_files(coco_folder):
    ds = CocoDetection(*coco_folder, transforms=T.eval_transforms((24, 32)))
    img, t = ds[0]
    assert img.shape == (3, 24, 32) and img.dtype == torch.float32
    assert t["size"].tolist() == [24, 32] and t["orig_size"].tolist() == [48, 64]
    assert torch.allclose(t["boxes"][0], torch.tensor([2.0, 2.5, 7.0, 12.5]))


# EXIF orientation -> the PIL transpose exif_transpose undoes it with
_UNDO = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
         6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}
# the inverse transposes, to build the raw array from the displayed image
_DO = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
       6: "ROTATE_90", 7: "TRANSVERSE", 8: "ROTATE_270"}


def _red_extent(img):
    red = (img[0] > 0.7) & (img[1] < 0.3) & (img[2] < 0.3)
    ys, xs = torch.nonzero(red, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("frame,orientation", [("displayed", o) for o in (2, 3, 6, 8)]
                         + [("raw", o) for o in (5, 6, 7, 8)])
@pytest.mark.pycocotools
def test_exif_rotated_jpeg(tmp_path, orientation, frame):
    """Boxes match the transposed image, whether annotated on it (the usual case) or on the raw
    array (recognised when the JSON's size is the raw one, so only for quarter turns)."""
    disp_w, disp_h, box = 40, 64, (8, 12, 24, 44)  # box xyxy on the displayed image
    shown = Image.new("RGB", (disp_w, disp_h), (0, 0, 160))
    shown.paste(RED, box)
    raw = shown.transpose(getattr(Image.Transpose, _DO[orientation]))
    assert raw.transpose(getattr(Image.Transpose, _UNDO[orientation])).tobytes() == shown.tobytes()
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "im").mkdir()
    raw.save(tmp_path / "im" / "r.jpg", quality=95, exif=exif)
    if frame == "displayed":  # annotated as labelling tools show it
        w, h, ann_box = disp_w, disp_h, box
    else:  # annotated on the raw array: the JSON's size is the raw one
        raw_arr = np.zeros((raw.height, raw.width), dtype=np.uint8)
        raw_arr[np.asarray(raw)[:, :, 0] > 128] = 1
        ys, xs = np.nonzero(raw_arr)
        w, h, ann_box = raw.width, raw.height, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    x0, y0, x1, y1 = (int(v) for v in ann_box)
    ann = _write(tmp_path, [{"id": 5, "file_name": "r.jpg", "width": w, "height": h}],
                 [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                   "area": 1.0, "iscrowd": 0}], [{"id": 1, "name": "red"}])
    img, t = CocoDetection(tmp_path / "im", ann)[0]
    assert img.shape == (3, disp_h, disp_w)
    assert t["orig_size"].tolist() == [disp_h, disp_w]
    assert t["boxes"].tolist() == [list(map(float, box))]
    got = _red_extent(img)
    assert all(abs(g - e) <= 1 for g, e in zip(got, box)), (got, box)


@pytest.mark.pycocotools
def test_masks(tmp_path):
    paths = make_synthetic_coco(tmp_path / "syn", num_train=3, num_val=0, size=(48, 64), seed=1)
    ds = CocoDetection(paths.train_images, paths.train_ann, return_masks=True)
    _, t = ds[0]
    assert t["masks"].shape == (len(t["boxes"]), 48, 64) and t["masks"].dtype == torch.uint8
    for m, (x0, y0, x1, y1) in zip(t["masks"], t["boxes"].tolist()):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert len(xs) > 0
        assert xs.min() >= x0 - 1 and xs.max() + 1 <= x1 + 1
        assert ys.min() >= y0 - 1 and ys.max() + 1 <= y1 + 1
    _, t = CocoDetection(paths.train_images, paths.train_ann, return_masks=True,
                         transforms=T.train_transforms((32, 32)))[1]
    assert t["masks"].shape == (len(t["boxes"]), 32, 32)


@pytest.mark.pycocotools
def test_make_synthetic_coco(tmp_path):
    paths = make_synthetic_coco(tmp_path / "a", num_train=12, num_val=4, size=(64, 80), seed=3,
                                classes=("rectangle", "ellipse", "triangle", "diamond"))
    data = json.loads(open(paths.train_ann).read())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
    assert len(data["images"]) == 12 and len(json.loads(open(paths.val_ann).read())["images"]) == 4
    per_image = {im["id"]: 0 for im in data["images"]}
    for a in data["annotations"]:
        per_image[a["image_id"]] += 1
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 80 and y + h <= 64 and w > 0 and h > 0
    assert 0 in per_image.values() and max(per_image.values()) > 1
    ds = CocoDetection(paths.train_images, paths.train_ann)
    img, t = ds[0]
    assert img.shape == (3, 64, 80) and len(t["boxes"]) == per_image[ds.ids[0]]
    again = make_synthetic_coco(tmp_path / "b", num_train=12, num_val=4, size=(64, 80), seed=3,
                                classes=("rectangle", "ellipse", "triangle", "diamond"))
    assert open(again.train_ann).read() == open(paths.train_ann).read()
    with pytest.raises(ValueError, match="classes"):
        make_synthetic_coco(tmp_path / "c", 1, 1, classes=("hexagon",))
    image, objects = make_scene(64, 80, num_objects=3, seed=0)
    assert image.shape == (64, 80, 3) and objects["boxes"].shape == (3, 4)


def test_synthetic_rectangles_fill_their_boxes(tmp_path):
    paths = make_synthetic_coco(tmp_path, num_train=6, num_val=0, size=(64, 64), seed=0,
                                classes=("rectangle",), max_objects=1)
    data = json.loads(open(paths.train_ann).read())
    for a in data["annotations"]:
        im = next(i for i in data["images"] if i["id"] == a["image_id"])
        arr = np.asarray(Image.open(paths.train_images + "/" + im["file_name"]), dtype=np.int16)
        x, y, w, h = (int(v) for v in a["bbox"])
        patch = arr[y:y + h, x:x + w].reshape(-1, 3)
        assert (patch == patch[0]).all()  # one flat colour exactly over the box
