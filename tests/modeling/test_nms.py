"""grouped_nms equals torchvision.ops.nms applied group by group, index for index."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou, nms

from predet.modeling.nms import grouped_nms, nms_threshold

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


def reference(boxes, scores, valid, thresh, max_keep=None):
    """torchvision.ops.nms on each group's valid boxes, as slot indices, first max_keep."""
    rows = []
    for b, s, v in zip(boxes, scores, valid):
        slots = v.nonzero().squeeze(1)
        rows.append(slots[nms(b[slots], s[slots], thresh)][:max_keep].cpu())
    return rows


def check(boxes, scores, valid, thresh, max_keep=None, **kw):
    """grouped_nms == reference, exactly; returns the per-group kept slots."""
    index, kept = grouped_nms(boxes, scores, valid, thresh, max_keep, **kw)
    G, K = scores.shape
    M = K if max_keep is None else min(max_keep, K)
    assert index.shape == kept.shape == (G, M)
    assert index.dtype == torch.long and kept.dtype == torch.bool
    assert index.device == boxes.device
    index, kept = index.cpu(), kept.cpu()
    want = reference(boxes, scores, valid, thresh, max_keep)
    for g in range(G):
        n = len(want[g])
        assert index[g, :n].tolist() == want[g].tolist(), f"group {g}"
        assert kept[g, :n].all() and not kept[g, n:].any()
        assert (index[g, n:] == -1).all()
    return want


def random_groups(g, G, K, *, size=60.0, tie_decimals=None, valid_p=0.85, dtype=torch.float32):
    """Boxes crowded in a small view (many overlaps), some degenerate, scores with ties."""
    xy = torch.rand(G, K, 2, generator=g, dtype=torch.float64) * size
    wh = torch.rand(G, K, 2, generator=g, dtype=torch.float64) * size / 2
    wh[torch.rand(G, K, generator=g) < 0.05] = 0  # some zero-area boxes
    boxes = torch.cat([xy, xy + wh], 2).to(dtype)
    scores = torch.rand(G, K, generator=g, dtype=torch.float64).to(dtype)
    if tie_decimals is not None:
        scores = scores.round(decimals=tie_decimals)
    valid = torch.rand(G, K, generator=g) < valid_p
    return boxes, scores, valid


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_random_groups(device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n_kept = n_valid = 0
    for G, K, thresh, ties in [
        (7, 50, 0.5, None),
        (3, 130, 0.7, 1),
        (12, 9, 0.3, 2),
        (2, 70, 0.9, 0),
    ]:
        b, s, v = random_groups(g, G, K, tie_decimals=ties, dtype=dtype)
        kept = check(b.to(device), s.to(device), v.to(device), thresh)
        n_kept, n_valid = n_kept + sum(len(k) for k in kept), n_valid + int(v.sum())
        # every group with a valid box kept at least its best one; max_keep cuts the list
        assert all(len(k) >= 1 for k, row in zip(kept, v) if row.any())
        capped = check(b.to(device), s.to(device), v.to(device), thresh, max_keep=5)
        assert all(len(c) == min(5, len(k)) for c, k in zip(capped, kept))
    assert n_kept < n_valid  # the crowded groups had boxes to suppress


@pytest.mark.parametrize("device", DEVICES)
def test_chunks_and_rounds_do_not_change_the_result(device):
    g = torch.Generator().manual_seed(11)
    b, s, v = (x.to(device) for x in random_groups(g, 9, 40, tie_decimals=1))
    base = grouped_nms(b, s, v, 0.5)
    for kw in [dict(max_elements=1), dict(max_elements=3 * 40 * 40), dict(first_round=1),
               dict(first_round=1000)]:  # fmt: skip
        got = grouped_nms(b, s, v, 0.5, **kw)
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])
    check(b, s, v, 0.5, max_elements=1, first_round=1)


@pytest.mark.parametrize("device", DEVICES)
def test_tied_scores_keep_slot_order(device):
    # nine disjoint boxes, all with the same score: all kept, in slot order (stable sort)
    x = torch.arange(9, dtype=torch.float32) * 20
    boxes = torch.stack([x, x * 0, x + 10, x * 0 + 10], 1)[None].to(device)
    scores = torch.zeros(1, 9, device=device)
    want = check(boxes, scores, torch.ones(1, 9, dtype=torch.bool, device=device), 0.5)
    assert want[0].tolist() == list(range(9))
    # ties broken by slot: equal scores, slot 3 then slot 5 overlap -> 3 survives
    scores = torch.tensor([[0.1, 0.2, 0.1, 0.7, 0.2, 0.7, 0.0, 0.7, 0.3]], device=device)
    boxes[0, 5] = boxes[0, 3]
    want = check(boxes, scores, torch.ones(1, 9, dtype=torch.bool, device=device), 0.5)
    assert want[0].tolist() == [3, 7, 8, 1, 4, 0, 2, 6]


@pytest.mark.parametrize("device", DEVICES)
def test_identical_boxes_all_suppressed_but_the_best(device):
    boxes = torch.tensor([[5.0, 5, 25, 30]], device=device).expand(3, 12, 4).contiguous()
    scores = torch.rand(3, 12, generator=torch.Generator().manual_seed(0)).to(device)
    scores[1] = 0.5  # all tied: slot 0 survives
    valid = torch.ones(3, 12, dtype=torch.bool, device=device)
    valid[2, scores[2].argmax()] = False  # the best is invalid: the second best survives
    want = check(boxes, scores, valid, 0.7)
    assert [w.tolist() for w in want] == [
        [int(scores[0].argmax())],
        [0],
        [int(scores[2].topk(2).indices[1])],
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_invalid_and_single(device):
    f, b = torch.float32, torch.bool
    for G, K in [(0, 5), (3, 0), (0, 0)]:  # no groups, empty groups
        index, kept = grouped_nms(
            torch.zeros(G, K, 4, device=device), torch.zeros(G, K, device=device),
            torch.ones(G, K, dtype=b, device=device), 0.5,
        )  # fmt: skip
        assert index.shape == kept.shape == (G, K)
    boxes = torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5], [10, 10, 12, 13]], device=device)
    boxes = boxes.expand(4, 3, 4).contiguous()
    scores = torch.tensor([0.3, 0.9, 0.5], device=device).expand(4, 3).contiguous()
    valid = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 1]], dtype=b, device=device)
    want = check(boxes, scores, valid, 0.1)
    assert [w.tolist() for w in want] == [[], [1, 2], [1], [2, 0]]  # all-invalid group: none
    # K = 1: the box is kept when valid, whatever the threshold
    one = torch.tensor([[[1.0, 2, 3, 4]], [[1.0, 2, 3, 4]]], device=device)
    valid1 = torch.tensor([[True], [False]], device=device)
    for t in (0.0, 0.5, 1.0):
        assert [
            w.tolist() for w in check(one, torch.ones(2, 1, dtype=f, device=device), valid1, t)
        ] == [[0], []]
    index, kept = grouped_nms(boxes, scores, valid, 0.1, max_keep=0)
    assert index.shape == (4, 0) and kept.shape == (4, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_area_boxes_never_suppress(device):
    # identical zero-area boxes: IoU 0/0 is NaN, not > t; a point inside a box: IoU 0
    boxes = torch.tensor(
        [[[3.0, 3, 3, 9], [3, 3, 3, 9], [3, 3, 3, 9], [0, 0, 10, 10], [5, 5, 5, 5]]], device=device
    )
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.95]], device=device)
    valid = torch.ones(1, 5, dtype=torch.bool, device=device)
    for t in (0.0, 0.5):
        assert check(boxes, scores, valid, t)[0].tolist() == [4, 0, 1, 2, 3]


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_is_strict_and_rounded_as_torchvision(device):
    # IoU exactly 0.5 (integer coordinates: no rounding anywhere): > 0.5 is false
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 5]]], device=device)
    scores = torch.tensor([[0.9, 0.8]], device=device)
    valid = torch.ones(1, 2, dtype=torch.bool, device=device)
    assert check(boxes, scores, valid, 0.5)[0].tolist() == [0, 1]
    assert check(boxes, scores, valid, 0.4999)[0].tolist() == [0]
    # IoU = 1/10 in float32 = 0.1f > 0.1 as a double: the CPU kernel suppresses (its compare is
    # in double); the CUDA kernel compares with 0.1 rounded to float: equal, kept
    boxes = torch.tensor([[[0.0, 0, 1, 1], [0, 0, 10, 1]]], device=device)
    suppressed = device == "cpu"
    assert check(boxes, scores, valid, 0.1)[0].tolist() == ([0] if suppressed else [0, 1])
    assert check(boxes.double(), scores.double(), valid, 0.1)[0].tolist() == [0, 1]


def test_nms_threshold_values():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    f32 = float(torch.tensor(0.1, dtype=torch.float32))  # 0.10000000149 > 0.1
    assert f32 > 0.1
    below = nms_threshold(0.1, torch.float32, cpu)
    assert below < 0.1 < f32 and float(torch.tensor(below, dtype=torch.float32)) == below
    assert nms_threshold(0.1, torch.float32, cuda) == f32
    assert nms_threshold(0.1, torch.float64, cpu) == 0.1
    assert nms_threshold(0.5, torch.float32, cpu) == 0.5  # exact in float32
    rounded_down = float(torch.tensor(0.7, dtype=torch.float32))  # 0.69999999 < 0.7
    assert rounded_down < 0.7 and nms_threshold(0.7, torch.float32, cpu) == rounded_down
    with pytest.raises(TypeError, match="float32 or float64"):
        nms_threshold(0.5, torch.float16, cpu)


@pytest.mark.parametrize("device", DEVICES)
def test_long_suppression_chain(device):
    # box i overlaps box i+1 (IoU 0.6) but not i+2: greedy keeps 0, 2, 4, ...; the fixed-point
    # iteration needs about K steps here (several rounds), and still matches
    K = 97
    x = torch.arange(K, dtype=torch.float32) * 4
    boxes = torch.stack([x, torch.zeros(K), x + 16, torch.full((K,), 10.0)], 1)[None].to(device)
    scores = torch.linspace(1, 0, K, device=device)[None]
    valid = torch.ones(1, K, dtype=torch.bool, device=device)
    iou = box_iou(boxes[0, :1].double(), boxes[0, 1:3].double()).flatten().tolist()
    assert iou == [0.6, 1 / 3]
    want = check(boxes, scores, valid, 0.5)
    assert want[0].tolist() == list(range(0, K, 2))
    check(boxes, scores, valid, 0.5, first_round=1)
    check(boxes.expand(3, K, 4), scores.expand(3, K), valid.expand(3, K), 0.5, max_keep=10)


@pytest.mark.parametrize("device", DEVICES)
def test_all_suppressed_by_one_and_minus_inf_scores(device):
    # one big box suppresses every other; -inf scores are valid boxes ranked last
    boxes = torch.tensor([[0.0, 0, 100, 100]], device=device).repeat(1, 8, 1)
    boxes[0, 1:, 2:] -= torch.arange(1, 8, device=device)[:, None].float()  # IoU 0.86..0.98
    scores = torch.tensor(
        [[0.1, 0.5, 0.2, float("-inf"), 0.4, 0.3, float("-inf"), 0.0]], device=device
    )
    valid = torch.ones(1, 8, dtype=torch.bool, device=device)
    assert check(boxes, scores, valid, 0.8)[0].tolist() == [1]
    boxes[0, 1] = torch.tensor([200.0, 200, 210, 210], device=device)  # slot 1 moves away
    assert check(boxes, scores, valid, 0.8)[0].tolist() == [1, 4]
    valid[0, :3] = False  # 4 first, then the -inf ones are suppressed by it too
    assert check(boxes, scores, valid, 0.8)[0].tolist() == [4]
    assert check(boxes, scores, valid, 0.99)[0].tolist() == [4, 5, 7, 3, 6]


def test_rejects_bad_shapes_and_dtypes():
    b, s, v = torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[G, K, 4\]"):
        grouped_nms(b[:, :2], s, v, 0.5)
    with pytest.raises(ValueError, match="bool"):
        grouped_nms(b, s, v.float(), 0.5)
    with pytest.raises(TypeError, match="float32 or float64"):
        grouped_nms(b.half(), s.half(), v, 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_methods_agree_above_the_cpu_loop_size(device):
    from predet.modeling.nms import CPU_LOOP_MIN_K

    g = torch.Generator().manual_seed(5)
    b, s, v = (x.to(device) for x in random_groups(g, 3, CPU_LOOP_MIN_K + 20, size=200.0, tie_decimals=2))
    for method in ("auto", "matrix", "loop"):
        check(b, s, v, 0.7, max_keep=64, method=method)
    with pytest.raises(ValueError, match="method"):
        grouped_nms(b, s, v, 0.7, method="fast")
