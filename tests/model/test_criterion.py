"""Loss pieces against brute force and hand-computed values; denoising groups."""
import itertools
import math

import pytest
import torch

from rtdetr_fast import RTDETR
from rtdetr_fast.model.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from rtdetr_fast.model.criterion import RTDETRCriterion, varifocal_loss
from rtdetr_fast.model.denoising import contrastive_denoising_group
from rtdetr_fast.model.matcher import HungarianMatcher


def _rand_boxes(n, g=None):
    c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat([c, wh], -1)


@pytest.mark.parametrize("seed", range(5))
def test_matcher_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    Q, M, C = 6, 3, 4
    logits = torch.randn(1, Q, C, generator=g)
    boxes = _rand_boxes(Q, g)[None]
    tgt = {"labels": torch.randint(0, C, (M,), generator=g), "boxes": _rand_boxes(M, g)}
    matcher = HungarianMatcher()
    (i, j), = matcher({"pred_logits": logits, "pred_boxes": boxes}, [tgt])
    cost = matcher.cost_matrix(logits[0], boxes[0], tgt["labels"], tgt["boxes"])
    best = min(sum(cost[q, m] for m, q in enumerate(perm))
               for perm in itertools.permutations(range(Q), M))
    assert len(i) == M and sorted(j.tolist()) == list(range(M))
    torch.testing.assert_close(cost[i, j].sum(), torch.as_tensor(best))


def test_matcher_cost_by_hand():
    """One prediction, one target: the cost's three terms computed by hand."""
    logits = torch.tensor([[0.3, -1.0]])
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    tbox = torch.tensor([[0.55, 0.5, 0.2, 0.2]])
    c = HungarianMatcher().cost_matrix(logits, box, torch.tensor([0]), tbox)
    p = 1 / (1 + math.exp(-0.3))
    cls = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
    # L1 = 0.05; IoU = 0.03 / 0.05 = 0.6, the hull equals the union so GIoU = IoU
    want = 2 * cls + 5 * 0.05 + 2 * -0.6
    assert abs(c.item() - want) < 1e-5


def test_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    # disjoint: IoU 0, hull 3, union 2 -> GIoU = -1/3
    assert abs(generalized_box_iou(a, b).item() + 1 / 3) < 1e-6
    assert abs(generalized_box_iou(a, a).item() - 1) < 1e-6


def test_varifocal_loss_by_hand():
    logits = torch.tensor([[[0.5, -0.2]]])
    one_hot = torch.tensor([[[1.0, 0.0]]])
    target = one_hot * 0.8
    got = varifocal_loss(logits, target, one_hot, num_boxes=1.0)
    p0, p1 = torch.sigmoid(torch.tensor([0.5, -0.2])).tolist()
    # positive: weight = IoU target, BCE towards 0.8; negative: weight 0.75 p^2, BCE towards 0
    pos = 0.8 * -(0.8 * math.log(p0) + 0.2 * math.log(1 - p0))
    neg = 0.75 * p1 ** 2 * -math.log(1 - p1)
    assert abs(got.item() - (pos + neg)) < 1e-6


def test_layer_losses_by_hand():
    crit = RTDETRCriterion(num_classes=2)
    out = {"pred_logits": torch.zeros(1, 2, 2), "pred_boxes": torch.tensor(
        [[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])}
    tgt = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.55, 0.5, 0.2, 0.2]])}]
    losses = crit.layer_losses(out, tgt, [(torch.tensor([0]), torch.tensor([0]))], 1.0)
    assert abs(losses["loss_bbox"].item() - 5 * 0.05) < 1e-6
    assert abs(losses["loss_giou"].item() - 2 * (1 - 0.6)) < 1e-5
    # logits 0 -> p = 0.5; one positive with IoU 0.6, three negatives; mean over Q=2 times Q
    pos = 0.6 * -(0.6 * math.log(0.5) + 0.4 * math.log(0.5))
    neg = 0.75 * 0.25 * -math.log(0.5)
    assert abs(losses["loss_vfl"].item() - (pos + 3 * neg)) < 1e-5


def test_denoising_group_shapes_and_mask():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(6, 8, padding_idx=5)
    targets = [{"labels": torch.tensor([0, 1, 2]), "boxes": _rand_boxes(3)},
               {"labels": torch.tensor([4]), "boxes": _rand_boxes(1)},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    q, b, mask, meta = contrastive_denoising_group(targets, 5, 10, embed, num_denoising=10)
    G, M = 10 // 3, 3
    total = G * 2 * M
    assert meta["dn_num_group"] == G and meta["dn_num_split"] == [total, 10]
    assert q.shape == (3, total, 8) and b.shape == (3, total, 4) and mask.shape == (total + 10,) * 2
    assert [len(p) for p in meta["dn_positive_idx"]] == [3 * G, 1 * G, 0]
    # positives sit in the first M of each 2M group
    assert all(int(i) % (2 * M) < M for i in meta["dn_positive_idx"][0])
    assert mask[total:, :total].all() and not mask[total:, total:].any()
    for g in range(G):
        rows = slice(g * 2 * M, (g + 1) * 2 * M)
        assert not mask[rows, rows].any()
        assert mask[rows, :g * 2 * M].all() and mask[rows, (g + 1) * 2 * M:total].all()
        assert not mask[rows, total:].any()
    # padded slots keep the padding class: their embedding is the zero padding row
    assert torch.equal(q[1, 1], torch.zeros(8))
    # positives stay near their box, negatives are pushed farther
    boxes = torch.sigmoid(b[0])
    gt = targets[0]["boxes"]
    pos_err = (boxes[:3] - gt).abs().max()
    assert pos_err <= gt[:, 2:].max() + 1e-6


def test_no_boxes_means_no_denoising():
    embed = torch.nn.Embedding(3, 4)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    assert contrastive_denoising_group(empty, 2, 5, embed) is None
    assert contrastive_denoising_group(empty * 2, 2, 5, embed, num_denoising=0) is None


def tiny(num_classes=3, **kw):
    return RTDETR.from_name("rtdetr_r18vd", num_classes=num_classes, hidden_dim=64,
                            dim_feedforward=128, num_queries=30, num_denoising=20, **kw)


def test_model_loss_terms_and_target_forms():
    torch.manual_seed(0)
    model = tiny().train()
    x = torch.rand(2, 3, 128, 128)
    t = [{"boxes": torch.tensor([[10.0, 20, 60, 90]]), "labels": torch.tensor([2])},
         {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    torch.manual_seed(1)
    out = model(x, t)
    keys = set(out["loss_dict"])
    for base in ("loss_vfl", "loss_bbox", "loss_giou"):
        assert base in keys and f"{base}_enc" in keys
        assert {f"{base}_aux_{i}" for i in range(2)} <= keys
        assert {f"{base}_dn_{i}" for i in range(3)} <= keys
    assert torch.isclose(out["loss"], sum(out["loss_dict"].values()))
    # the same targets in the Hugging Face form give the same loss
    hf = [{"class_labels": torch.tensor([2]),
           "boxes": torch.tensor([[35.0 / 128, 55.0 / 128, 50.0 / 128, 70.0 / 128]])},
          {"class_labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    torch.manual_seed(1)
    out2 = model(x, hf)
    torch.testing.assert_close(out2["loss"], out["loss"])
    out["loss"].backward()


@pytest.mark.parametrize("bad,match", [
    ([{"boxes": torch.zeros(1, 4)}], "needs 'boxes' and 'labels'"),
    ([{"boxes": torch.zeros(2, 4), "labels": torch.tensor([1])}], r"boxes must be \[N, 4\]"),
    ([{"boxes": torch.zeros(1, 4), "labels": torch.tensor([7])}], r"labels must be in \[0, 3\)"),
    ({"boxes": torch.zeros(1, 4)}, "list of 1 dicts"),
])
def test_bad_targets(bad, match):
    model = tiny().train()
    with pytest.raises(ValueError, match=match):
        model(torch.rand(1, 3, 128, 128), bad)
