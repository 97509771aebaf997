"""Proposal construction vs a per-view reference; batched IoU; recall; jittered boxes."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou, clip_boxes_to_image, nms

from predet.modeling import proposals
from predet.modeling.proposals import (
    batched_box_iou,
    box_recall,
    jitter_query_boxes,
    nms_per_view,
    top_k_per_level,
)

SIZE = (48, 64)  # (H, W)


def _boxes(shape, g):
    wh = 2 + torch.rand(*shape, 2, generator=g) * 30
    xy = torch.rand(*shape, 2, generator=g) * 40 - 5  # some boxes leave the image: clipped
    return torch.cat([xy, xy + wh], -1)


def test_batched_box_iou_equals_box_iou():
    g = torch.Generator().manual_seed(0)
    a, b = _boxes((3, 7), g), _boxes((3, 5), g)
    got = batched_box_iou(a, b)
    for v in range(3):
        torch.testing.assert_close(got[v], box_iou(a[v], b[v]))
    zero = torch.zeros(1, 1, 4)
    assert batched_box_iou(zero, zero).item() == 0.0  # padding vs padding: 0, not NaN


# (pre, post): levels of 8, 8, 6 columns; 40, 20, 6 (padded groups) with P < each level's
# survivors; 3, 3, 3 with fewer candidates than P (zero padding)
@pytest.mark.parametrize("pre,post", [(8, 10), (40, 3), (3, 50)])
def test_proposals_equal_per_view_reference(pre, post):
    g = torch.Generator().manual_seed(0)
    B, Q, per_level = 3, 4, [40, 20, 6]
    T = sum(per_level)
    anchors = _boxes((T,), g)
    scores = torch.randn(B, Q, T, generator=g)
    deltas = torch.randn(B, Q, T, 4, generator=g) * 0.2
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    thresh = 0.5

    boxes, valid = select(scores, deltas, mask, anchors, per_level, pre, post, thresh)
    assert boxes.shape == (B, post, 4) and valid.shape == (B, post)
    assert not valid[1].any()  # no valid query, no proposal
    for b in (0, 2):
        q_ok = mask[b].nonzero().squeeze(1)
        s, arg = scores[b, q_ok].max(0)
        kept_boxes, kept_scores, start = [], [], 0
        for n in per_level:  # top-K per level, decode, clip, NMS per level
            idx = s[start : start + n].topk(min(pre, n)).indices + start
            q = q_ok[arg[idx]]
            bx = clip_boxes_to_image(coder.decode_single(deltas[b, q, idx], anchors[idx]), SIZE)
            big = ((bx[:, 2:] - bx[:, :2]) > 1e-3).all(1)  # boxes clipped to nothing go
            bx, idx = bx[big], idx[big]
            keep = nms(bx, s[idx], thresh)
            kept_boxes.append(bx[keep])
            kept_scores.append(s[idx][keep])
            start += n
        sc = torch.cat(kept_scores)
        order = sc.argsort(descending=True)[:post]
        ref = torch.cat(kept_boxes)[order]
        assert int(valid[b].sum()) == len(ref)
        torch.testing.assert_close(boxes[b, : len(ref)], ref)
        assert (boxes[b, len(ref) :] == 0).all()


def select(scores, deltas, mask, anchors, per_level, pre, post, thresh, size=SIZE):
    """ContrastiveRPN.select_proposals' steps, with the deltas ``[B, Q, T, 4]`` given."""
    B = scores.shape[0]
    objectness, best = scores.masked_fill(~mask.unsqueeze(2), float("-inf")).max(dim=1)
    anchor, sizes = top_k_per_level(objectness, per_level, pre)  # [B, K], Kl per level
    assert sizes == [min(pre, n) for n in per_level]
    view = torch.arange(B).unsqueeze(1).expand_as(anchor)  # [B, K]
    query = best.gather(1, anchor)
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    boxes = coder.decode_single(deltas[view, query, anchor].reshape(-1, 4), anchors[anchor.flatten()])
    boxes = clip_boxes_to_image(boxes, size).view(*anchor.shape, 4)
    score = objectness.gather(1, anchor)
    return nms_per_view(boxes, score, sizes, nms_thresh=thresh, post_nms_top_n=post)


@pytest.mark.parametrize("post", [4, 9, 30])
def test_nms_per_view_with_tied_scores_equals_torchvision_per_level(post):
    """Ties within and across levels, -inf scores, boxes clipped to nothing: per (view, level)
    torchvision nms, then the view's survivors by score, equal scores in column order."""
    g = torch.Generator().manual_seed(3)
    B, sizes, thresh = 4, [7, 5, 3], 0.4
    K = sum(sizes)
    boxes = _boxes((B, K), g)
    boxes[0, 2, 2] = boxes[0, 2, 0]  # zero width: dropped
    boxes[1, :4] = boxes[1, 4]  # identical boxes across levels 0 and 1
    scores = (torch.rand(B, K, generator=g) * 4).floor()  # 0..3: many ties
    scores[2] = float("-inf")  # a view without valid queries
    scores[3, 5:9] = float("-inf")
    out, valid = nms_per_view(boxes, scores, sizes, nms_thresh=thresh, post_nms_top_n=post)
    assert out.shape == (B, post, 4) and valid.shape == (B, post)
    for b in range(B):
        cols, start = [], 0
        for n in sizes:
            c = torch.arange(start, start + n)
            wh = boxes[b, c, 2:] - boxes[b, c, :2]
            c = c[torch.isfinite(scores[b, c]) & (wh > 1e-3).all(1)]
            cols.append(c[nms(boxes[b, c], scores[b, c], thresh)])
            start += n
        c = torch.cat(cols)
        c = c[torch.sort(scores[b, c], descending=True, stable=True).indices][:post]
        assert valid[b].tolist() == [True] * len(c) + [False] * (post - len(c))
        assert torch.equal(out[b, : len(c)], boxes[b, c])
        assert (out[b, len(c) :] == 0).all()
    assert not valid[2].any() and valid[0, 0]


def test_max_nms_boxes_is_defined_before_the_functions_that_read_it():
    """A module constant read by a function must be bound above it (readers go top down)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(proposals))
    assigned = {
        t.id: node.lineno
        for node in tree.body if isinstance(node, ast.Assign)
        for t in node.targets if isinstance(t, ast.Name) and t.id.isupper()
    }  # fmt: skip
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for name in ast.walk(node):
                if isinstance(name, ast.Name) and name.id in assigned:
                    assert assigned[name.id] < node.lineno, (name.id, node.name)


def test_box_recall():
    props = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 30, 30]], [[0.0, 0, 10, 10], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, True], [True, False]])
    queries = torch.tensor(
        [[[0.0, 0, 10, 12], [50, 50, 60, 60]], [[20.0, 20, 30, 30], [1, 1, 9, 9]]]
    )
    mask = torch.tensor([[True, True], [True, True]])
    # covered: (0,0) IoU 0.83, (1,1) IoU 0.64; (1,0) only matches the invalid padding slot
    assert box_recall(props, valid, queries, mask).item() == 0.5
    mask[0, 1] = False
    assert abs(box_recall(props, valid, queries, mask).item() - 2 / 3) < 1e-6


def test_jitter_query_boxes():
    g = torch.Generator().manual_seed(0)
    queries = torch.tensor([[[10.0, 10, 40, 30], [0, 0, 64, 48]], [[30, 20, 50, 40], [0, 0, 0, 0]]])
    mask = torch.tensor([[True, True], [True, False]])
    out, valid = jitter_query_boxes(queries, mask, num_per_query=200, image_size=SIZE, generator=g)
    assert out.shape == (2, 400, 4)
    assert valid[:, :200].all() and valid[0].all() and not valid[1, 200:].any()
    assert (out[..., 0::2] >= 0).all() and (out[..., 0::2] <= 64).all()
    assert (out[..., 1::2] >= 0).all() and (out[..., 1::2] <= 48).all()
    iou = box_iou(queries[0, :1], out[0, :200])[0]
    frac_pos = (iou > 0.5).float().mean().item()
    assert 0.25 < frac_pos < 0.75  # both positives and negatives for the CROI head
