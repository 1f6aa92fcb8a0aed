"""Labels of predict's pictures: inside the image and not covering each other."""
import itertools

import pytest
import torch

from rtdetr_fast.visualize import _overlap, draw_detections, place_labels


def inside(rect, width, height):
    x0, y0, x1, y1 = rect
    return 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height


def assert_disjoint(rects):
    for a, b in itertools.combinations(rects, 2):
        assert _overlap(a, b) == 0, (a, b)


def test_two_overlapping_boxes_get_separate_labels():
    boxes = [(100, 100, 300, 300), (110, 105, 310, 305)]
    rects = place_labels(boxes, [(90, 20), (90, 20)], 480, 480)
    assert_disjoint(rects)
    assert all(inside(r, 480, 480) for r in rects)
    # the first (highest-scoring) box keeps the usual place: above its top-left corner
    assert rects[0] == (100, 80, 190, 100)


@pytest.mark.parametrize("box", [(0, 0, 50, 40), (430, 440, 480, 480), (-20, 200, 500, 260)],
                         ids=["top-left corner", "bottom-right corner", "wider than the image"])
def test_boxes_at_the_edges_keep_their_labels_inside(box):
    others = [(box[0] + 3, box[1] + 2, box[2] - 1, box[3] + 1), box]
    rects = place_labels(others, [(120, 24), (120, 24)], 480, 480)
    assert_disjoint(rects)
    assert all(inside(r, 480, 480) for r in rects)


def test_a_pile_of_boxes_at_one_place():
    boxes = [(200 + k, 200 + k, 280 + k, 260 + k) for k in range(6)]
    rects = place_labels(boxes, [(100, 22)] * 6, 480, 480)
    assert_disjoint(rects)
    assert all(inside(r, 480, 480) for r in rects)


def filled_block(img, color):
    """Bounding rectangle of the pixels of ``color`` whose 3x3 neighbourhood is all that
    colour: the inside of a filled label, not a box outline (2 pixels wide at this size)."""
    pixels = img.load()
    W, H = img.size
    found = [(x, y) for x in range(1, W - 1) for y in range(1, H - 1)
             if all(pixels[x + dx, y + dy] == color for dx in (-1, 0, 1) for dy in (-1, 0, 1))]
    if not found:
        return None
    xs, ys = [p[0] for p in found], [p[1] for p in found]
    return (min(xs), min(ys), max(xs) + 1, max(ys) + 1)


def test_drawn_labels_do_not_cover_each_other():
    """Two overlapping boxes of different classes, drawn: each label's filled background is
    seen, inside the picture, and the two do not overlap (none drawn over the other)."""
    from rtdetr_fast.visualize import class_color

    image = torch.full((3, 120, 120), 0.5)
    det = {"boxes": torch.tensor([[20.0, 30, 90, 100], [22.0, 31, 92, 101]]),
           "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}
    img = draw_detections(image, det, class_names=["cat", "dog"])
    blocks = [filled_block(img, class_color(label)) for label in (0, 1)]
    assert all(b is not None for b in blocks), blocks
    assert _overlap(*blocks) == 0, blocks
    # each seen whole: "cat 0.90" and "dog 0.80" are labels of about one size
    (w0, h0), (w1, h1) = [(b[2] - b[0], b[3] - b[1]) for b in blocks]
    assert abs(w0 - w1) <= 0.3 * max(w0, w1) and abs(h0 - h1) <= 0.3 * max(h0, h1), blocks
    assert all(inside(b, *img.size) for b in blocks)
