"""Reference top-K selection and post-processing: order, ties, NaN, gradients, errors."""
import pytest
import torch

from rtdetr_fast import ops


def _brute_order(scores):
    """Sort key (score desc, real before NaN, index asc), one row at a time in Python."""
    rows = []
    for row in scores.tolist():
        def key(i):
            v = row[i]
            nan = v != v
            return (0 if nan else 1, float("-inf") if nan else v, -i)
        rows.append(sorted(range(len(row)), key=key, reverse=True))
    return torch.tensor(rows)


@pytest.mark.parametrize("B,N,C,K", [(2, 50, 7, 10), (1, 8, 3, 8), (3, 1000, 4, 300)])
def test_select_matches_brute_force(B, N, C, K):
    logits = torch.randn(B, N, C)
    feats = torch.randn(B, N, 5)
    boxes = torch.randn(B, N, 4)
    scores, idx, (f, b) = ops.topk_select(logits, K, [feats, boxes])
    want = _brute_order(logits.amax(-1))[:, :K]
    assert torch.equal(idx, want)
    assert idx.dtype == torch.int64
    assert torch.equal(scores, logits.amax(-1).gather(1, want))
    assert torch.equal(f, feats[torch.arange(B)[:, None], want])
    assert torch.equal(b, boxes[torch.arange(B)[:, None], want])


def test_ties_break_by_lower_index():
    logits = torch.zeros(1, 10, 2)
    logits[0, [7, 3, 5], 1] = 1.0
    _, idx, _ = ops.topk_select(logits, 5)
    assert idx.tolist() == [[3, 5, 7, 0, 1]]


def test_all_equal_scores_take_the_first_k():
    _, idx, _ = ops.topk_select(torch.ones(2, 100, 3), 7)
    assert idx.tolist() == [list(range(7))] * 2


def test_nan_ranks_below_real_scores_and_minus_inf():
    s = torch.tensor([[float("nan"), 1.0, float("-inf"), float("nan"), 2.0, float("-inf")]])
    _, idx, _ = ops.topk_select(s[..., None], 6)
    assert idx.tolist() == [[4, 1, 2, 5, 0, 3]]


def test_gradients_flow_to_gathered_tensors():
    logits = torch.randn(2, 30, 4, requires_grad=True)
    feats = torch.randn(2, 30, 6, requires_grad=True)
    scores, idx, (f,) = ops.topk_select(logits, 5, [feats])
    (f.sum() + scores.sum()).backward()
    g = torch.zeros(2, 30)
    g.scatter_(1, idx, 1.0)
    assert torch.equal(feats.grad, g[..., None].expand(-1, -1, 6))
    assert logits.grad.sum() == 10


def test_select_bad_input():
    with pytest.raises(ValueError, match=r"logits must be \[B, N, C\]"):
        ops.topk_select(torch.randn(4, 5), 2)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, N=5\]"):
        ops.topk_select(torch.randn(1, 5, 2), 6)
    with pytest.raises(ValueError, match=r"tensors\[0\] must be \[B, N, ...\]"):
        ops.topk_select(torch.randn(1, 5, 2), 2, [torch.randn(1, 4, 3)])


def test_detections_match_the_official_formulation():
    B, Q, C, K = 2, 40, 6, 30
    logits = torch.randn(B, Q, C)
    boxes = torch.rand(B, Q, 4) * 0.5 + 0.25
    sizes = torch.tensor([[480, 640], [100, 50]])
    scores, labels, xyxy = ops.topk_detections(logits, boxes, sizes, K)
    # official: sigmoid, topk over flattened (query, class), label = index % C, query = index // C
    flat = logits.sigmoid().flatten(1)
    want_s, want_i = flat.topk(K, dim=1)
    torch.testing.assert_close(scores, want_s)
    assert torch.equal(labels, want_i % C)
    q = want_i // C
    b = boxes[torch.arange(B)[:, None], q]
    cx, cy, w, h = b.unbind(-1)
    wh = torch.tensor([[640, 480, 640, 480], [50, 100, 50, 100]], dtype=torch.float32)[:, None]
    want_xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * wh
    torch.testing.assert_close(xyxy, want_xyxy)


def test_detections_bad_input():
    with pytest.raises(ValueError, match=r"boxes must be \[B, Q, 4\]"):
        ops.topk_detections(torch.randn(1, 5, 3), torch.rand(1, 4, 4), torch.ones(1, 2), 3)
    with pytest.raises(ValueError, match=r"image_sizes must be \[B, 2\]"):
        ops.topk_detections(torch.randn(1, 5, 3), torch.rand(1, 5, 4), torch.ones(2), 3)
    with pytest.raises(ValueError, match="k must be"):
        ops.topk_detections(torch.randn(1, 5, 3), torch.rand(1, 5, 4), torch.ones(1, 2), 16)
