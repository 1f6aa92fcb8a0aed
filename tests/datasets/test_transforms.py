"""Transforms keep boxes consistent with the pixels they describe; collation and multi-scale."""
import numpy as np
import pytest
import torch

from rtdetr_fast.data import transforms as T

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def scene(seed, h=72, w=96, n=4):
    """uint8 [3,H,W] black image with n non-overlapping filled rectangles of distinct pure colours;
    object k has label k and colour COLORS[k]."""
    rng = np.random.default_rng(seed)
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    boxes = []
    cols = 3
    cw, ch = w // cols, h // 2
    cells = rng.permutation(cols * 2)[:n]
    for k, cell in enumerate(cells):
        gx, gy = (cell % cols) * cw, (cell // cols) * ch
        bw, bh = int(rng.integers(6, cw - 2)), int(rng.integers(6, ch - 2))
        x0 = gx + int(rng.integers(0, cw - bw))
        y0 = gy + int(rng.integers(0, ch - bh))
        img[:, y0:y0 + bh, x0:x0 + bw] = torch.tensor(COLORS[k], dtype=torch.uint8)[:, None, None]
        boxes.append([x0, y0, x0 + bw, y0 + bh])
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.arange(n),
              "area": torch.tensor([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes], dtype=torch.float32),
              "iscrowd": torch.zeros(n, dtype=torch.int64), "image_id": 3,
              "size": torch.tensor([h, w])}
    return img, target


def check_consistent(img, target, tol=1.5):
    """Every kept box lies inside the image and tightly encloses the pixels of its colour."""
    img = img.float() / 255.0 if img.dtype == torch.uint8 else img
    _, h, w = img.shape
    b = target["boxes"]
    assert b.dtype == torch.float32 and b.shape[1] == 4
    assert len(b) == len(target["labels"]) == len(target["area"]) == len(target["iscrowd"])
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    for box, label in zip(b.tolist(), target["labels"].tolist()):
        color = torch.tensor(COLORS[label], dtype=torch.float32)[:, None, None] / 255.0
        dist = (img - color).abs().amax(0)
        if tol and min(box[2] - box[0], box[3] - box[1]) < 4:
            # too small to keep pure pixels after resampling: its best match must be in the box
            y, x = divmod(int(dist.argmin()), w)
            assert box[0] - tol <= x and x + 1 <= box[2] + tol, (label, box, x)
            assert box[1] - tol <= y and y + 1 <= box[3] + tol, (label, box, y)
            continue
        # interior pixels only: resampling blends the colour at the edges
        ys, xs = torch.nonzero(dist < 0.05, as_tuple=True)
        assert len(xs) > 0, f"no pixels of object {label} in its box {box}"
        got = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        for g, e in zip(got, box):
            assert abs(g - e) <= tol, f"object {label}: pixels span {got}, box {box}"


GEOMETRIC = {
    "zoom_out": lambda g: T.RandomZoomOut(p=1.0, generator=g),
    "iou_crop": lambda g: T.Compose([T.RandomIoUCrop(p=1.0, generator=g), T.SanitizeBoundingBoxes(1)]),
    "flip": lambda g: T.RandomHorizontalFlip(p=1.0, generator=g),
    "resize": lambda g: T.Resize((50, 61)),
    "pipeline": lambda g: T.Compose([t for t in T.train_transforms((64, 64), generator=g).transforms
                                     if not isinstance(t, T.RandomPhotometricDistort)]),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_geometric_transforms_keep_boxes_on_their_pixels(name):
    for seed in range(8):
        img, target = scene(seed)
        g = torch.Generator().manual_seed(seed)
        out, t = GEOMETRIC[name](g)(img, target)
        # resampling shrinks what counts as "interior" by about a pixel per side
        check_consistent(out, t, tol=2.5 if name in ("resize", "pipeline") else 0)
        assert tuple(t["size"].tolist()) == tuple(out.shape[-2:])


def test_full_train_pipeline_shapes_and_ranges():
    for seed in range(6):
        img, target = scene(seed)
        torch.manual_seed(seed)
        out, t = T.train_transforms((64, 64))(img, target)
        assert out.dtype == torch.float32 and out.shape == (3, 64, 64)
        assert 0.0 <= out.min() and out.max() <= 1.0
        b = t["boxes"]
        assert ((b >= 0) & (b <= 64)).all()
        assert ((b[:, 2:] - b[:, :2]) >= 1).all()
        assert len(b) == len(t["labels"]) and t["labels"].dtype == torch.int64
        assert t["image_id"] == 3


def test_pipeline_is_deterministic_given_a_seed():
    img, target = scene(1)
    runs = []
    for _ in range(2):
        out, t = T.train_transforms((48, 48), generator=torch.Generator().manual_seed(5))(img, target)
        runs.append((out, t["boxes"]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    torch.manual_seed(9)
    a = T.train_transforms((48, 48))(img, target)[0]
    torch.manual_seed(9)
    b = T.train_transforms((48, 48))(img, target)[0]
    assert torch.equal(a, b)


def test_flip_twice_is_identity():
    img, target = scene(2)
    out, t = T.hflip(*T.hflip(img, target))
    assert torch.equal(out, img)
    assert torch.equal(t["boxes"], target["boxes"])
    once, t1 = T.hflip(img, target)
    w = img.shape[-1]
    assert torch.equal(t1["boxes"][:, 0], w - target["boxes"][:, 2])


def test_resize_scales_boxes_exactly():
    img, target = scene(3)
    out, t = T.Resize((36, 192))(img, target)
    assert out.shape == (3, 36, 192) and out.dtype == torch.uint8
    scale = torch.tensor([2.0, 0.5, 2.0, 0.5])
    assert torch.allclose(t["boxes"], target["boxes"] * scale)
    assert torch.allclose(t["area"], target["area"])  # 2 * 0.5
    assert t["size"].tolist() == [36, 192]


def test_sanitize_drops_small_boxes_with_their_fields():
    img = torch.zeros(3, 20, 30, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[0, 0, 10, 10], [5, 5, 5.5, 15], [25, 2, 40, 12], [31, 0, 35, 5.]]),
              "labels": torch.tensor([0, 1, 2, 3]), "area": torch.ones(4), "iscrowd": torch.zeros(4)}
    _, t = T.SanitizeBoundingBoxes(min_size=1)(img, target)
    assert t["labels"].tolist() == [0, 2]
    assert t["boxes"].tolist() == [[0, 0, 10, 10], [25, 2, 30, 12]]  # clipped to the image
    assert len(t["area"]) == len(t["iscrowd"]) == 2


def test_iou_crop_without_boxes_and_with_p0_is_identity():
    img, target = scene(0)
    empty = {**target, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    out, t = T.RandomIoUCrop(p=1.0)(img, empty)
    assert torch.equal(out, img) and t["boxes"].shape == (0, 4)
    out, t = T.RandomIoUCrop(p=0.0)(img, target)
    assert out is img


def test_photometric_distort_keeps_boxes_dtype_and_range():
    img, target = scene(4)
    for seed in range(6):
        out, t = T.RandomPhotometricDistort(p=1.0, generator=torch.Generator().manual_seed(seed))(
            img, target)
        assert out.dtype == torch.uint8 and out.shape == img.shape
        assert torch.equal(t["boxes"], target["boxes"])
        f, _ = T.RandomPhotometricDistort(p=1.0, generator=torch.Generator().manual_seed(seed))(
            img.float() / 255, target)
        assert f.dtype == torch.float32 and 0 <= f.min() and f.max() <= 1
    same, _ = T.RandomPhotometricDistort(p=0.0)(img, target)
    assert same is img


def test_color_adjustments_match_their_definitions():
    x = torch.rand(3, 8, 9)
    assert torch.allclose(T.adjust_hue(x, 0.0), x, atol=1e-5)
    assert torch.allclose(T.adjust_saturation(x, 1.0), x)
    gray = T.adjust_saturation(x, 0.0)
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    red = torch.zeros(3, 2, 2)
    red[0] = 1
    # a hue turn of 1/3 takes pure red to pure green
    assert torch.allclose(T.adjust_hue(red, 1 / 3), torch.stack([red[1], red[0], red[2]]), atol=1e-5)
    with pytest.raises(ValueError):
        T.adjust_hue(x, 0.7)


def test_pil_input_and_to_tensor():
    from PIL import Image

    img, target = scene(5)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    out, t = T.eval_transforms((40, 40))(pil, target)
    assert out.dtype == torch.float32 and out.shape == (3, 40, 40)
    ref, _ = T.eval_transforms((40, 40))(img, target)
    assert torch.allclose(out, ref)


def test_masks_follow_the_boxes():
    img, target = scene(6)
    masks = torch.zeros(len(target["boxes"]), *img.shape[-2:], dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(target["boxes"].long().tolist()):
        masks[k, y0:y1, x0:x1] = 1
    target["masks"] = masks
    for seed in range(4):
        tr = T.Compose([t for t in T.train_transforms((64, 64), generator=torch.Generator().manual_seed(seed)
                                                      ).transforms
                        if not isinstance(t, T.RandomPhotometricDistort)])
        out, t = tr(img, target)
        assert t["masks"].shape == (len(t["boxes"]), 64, 64)
        for m, (x0, y0, x1, y1) in zip(t["masks"], t["boxes"].tolist()):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert xs.min() >= x0 - 1 and xs.max() + 1 <= x1 + 1
            assert ys.min() >= y0 - 1 and ys.max() + 1 <= y1 + 1


def _batch(n=3, h=40, w=50):
    return [scene(s, h, w) for s in range(n)]


def test_collate_fn_stacks_and_rejects_mixed_sizes():
    batch = [(img.float() / 255, t) for img, t in _batch()]
    images, targets = T.collate_fn(batch)
    assert images.shape == (3, 3, 40, 50) and len(targets) == 3
    with pytest.raises(ValueError, match="share one size"):
        T.collate_fn([batch[0], (torch.zeros(3, 10, 10), batch[1][1])])


def test_multiscale_collate_sizes_boxes_and_stop_epoch():
    batch = [(img.float() / 255, t) for img, t in _batch()]
    sizes = [32, 64, 96]
    mc = T.MultiScaleCollate(sizes=sizes, stop_epoch=2, generator=torch.Generator().manual_seed(0))
    seen = set()
    for _ in range(30):
        images, targets = mc(batch)
        s = images.shape[-1]
        assert images.shape == (3, 3, s, s) and s in sizes
        seen.add(s)
        for t, (_, orig) in zip(targets, batch):
            scale = torch.tensor([s / 50, s / 40, s / 50, s / 40])
            assert torch.allclose(t["boxes"], orig["boxes"] * scale)
            assert t["size"].tolist() == [s, s]
    assert seen == set(sizes)
    mc.set_epoch(2)
    images, targets = mc(batch)
    assert images.shape == (3, 3, 40, 50)
    assert torch.equal(targets[0]["boxes"], batch[0][1]["boxes"])
    assert T.MultiScaleCollate().sizes == [480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800]
