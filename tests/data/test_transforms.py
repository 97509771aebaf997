"""Two-view transform: boxes follow the pixels, `valid` matches a reference, colour ops match
torchvision, the cv2 fast path matches the batched tensor path, the collate pads and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from predet.data.color import blur_radius, color_augment_uint8
from predet.data.datasets import collate_two_view
from predet.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoViewTransform,
    common_part,
    map_boxes,
    sample_seed,
)

NO_COLOUR = dict(color_jitter=False, grayscale_p=0.0, blur_p=0.0)


def _denorm(view: torch.Tensor) -> np.ndarray:
    """(3, S, S) normalised -> (S, S, 3) float in 0..255."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((view * std + mean) * 255).permute(1, 2, 0).numpy()


def _painted(seed: int, w: int = 320, h: int = 240) -> tuple[Image.Image, torch.Tensor]:
    """Dark noise with one white box (integer corners); returns the image and the box (1, 4)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 100, (h, w, 3), dtype=np.uint8)
    bw, bh = int(rng.integers(70, 180)), int(rng.integers(60, 150))
    x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    img[y1 : y1 + bh, x1 : x1 + bw] = 255
    return Image.fromarray(img), torch.tensor([[x1, y1, x1 + bw, y1 + bh]], dtype=torch.float32)


def _coverage(view: np.ndarray, box: torch.Tensor) -> tuple[float, float]:
    """(fraction of the box's pixels that are paint, fraction of paint pixels inside the box)."""
    paint = view.min(axis=2) > 178  # halfway between the noise's max (99) and the paint (255)
    S = view.shape[0]
    centres = np.arange(S) + 0.5
    x1, y1, x2, y2 = box.tolist()
    inside = ((centres[None, :] > x1) & (centres[None, :] < x2)) & ((centres[:, None] > y1) & (centres[:, None] < y2))
    return float(paint[inside].mean()), float(paint[inside].sum() / max(paint.sum(), 1))


@pytest.mark.parametrize("region", ["each", "common"])
def test_painted_box_covers_its_mapped_box_in_both_views(region: str) -> None:
    """On random seeds, a box painted white covers >= 95% of its mapped box in both views whenever
    the box is valid, and >= 95% of the paint lies inside the mapped box — for "common", when both
    crops hold all of it (otherwise a view shows paint the other does not: outside the query)."""
    t = TwoViewTransform(128, **NO_COLOUR, query_region=region)
    recalls, precisions = [], []
    for seed in range(16):
        img, box = _painted(seed)
        for k in range(4):  # four draws of views per image
            g_seed = sample_seed(seed, 0, k)
            out = t(img, box, generator=torch.Generator().manual_seed(g_seed))
            if not bool(out["valid"][0]):
                continue
            g = torch.Generator().manual_seed(g_seed)  # the crops the transform drew first
            whole = common_part(box, [t.sample_params(img.width, img.height, g).crop for _ in range(2)])[1] == 1
            for view, b in ((out["view1"], out["boxes1"][0]), (out["view2"], out["boxes2"][0])):
                recall, precision = _coverage(_denorm(view), b)
                recalls.append(recall)
                if region == "each" or bool(whole[0]):
                    precisions.append(precision)
    assert len(recalls) >= 40 and len(precisions) >= 10  # enough (image, draw) pairs of each kind
    assert min(recalls) >= 0.95 and min(precisions) >= 0.95, (min(recalls), min(precisions))


def _reference_valid(t: TwoViewTransform, w: int, h: int, boxes: np.ndarray, seed: int) -> tuple[np.ndarray, list]:
    """Per-box python loop: query_region "each": the visible area fraction in each view's crop,
    then the AND of >= 0.5; "common": the part of the box inside both crops is >= 0.5 of it."""
    g = torch.Generator().manual_seed(seed)
    params = [t.sample_params(w, h, g) for _ in range(2)]
    valid = []
    for box in boxes.tolist():
        area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
        parts = [_clipped(box, [p]) for p in params] if t.query_region == "each" else [_clipped(box, params)]
        valid.append(area > 0 and all((x2 - x1) * (y2 - y1) / area >= 0.5 for x1, y1, x2, y2 in parts))
    return np.array(valid), params


def _clipped(box: list, params: list) -> list:
    """The box clipped to every view's crop of ``params`` (an empty box at its low corner when
    they miss)."""
    x1, y1, x2, y2 = box
    for p in params:
        cx, cy, cw, ch = p.crop
        x1, y1, x2, y2 = max(x1, cx), max(y1, cy), min(x2, cx + cw), min(y2, cy + ch)
    return [x1, y1, max(x2, x1), max(y2, y1)]


@pytest.mark.parametrize("region", ["each", "common"])
def test_valid_and_boxes_match_reference(region: str) -> None:
    rng = np.random.default_rng(0)
    w, h, S = 200, 150, 64
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    t = TwoViewTransform(S, **NO_COLOUR, query_region=region)
    agree = total = nvalid = 0
    for seed in range(25):
        xy = rng.uniform(-20, 190, (40, 2))
        wh = rng.uniform(0, 80, (40, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        out = t(img, boxes, generator=torch.Generator().manual_seed(seed))
        ref, params = _reference_valid(t, w, h, boxes, seed)
        agree += int((out["valid"].numpy() == ref).sum())
        total += len(ref)
        nvalid += int(ref.sum())
        # boxes: python reference of (common part ->) crop -> scale -> clip -> flip
        for b_out, p in ((out["boxes1"], params[0]), (out["boxes2"], params[1])):
            cx, cy, cw, ch = p.crop
            for box, got in zip(boxes.tolist(), b_out.tolist()):
                x1, y1, x2, y2 = box if region == "each" else _clipped(box, params)
                m = [min(max((x1 - cx) * S / cw, 0), S), min(max((y1 - cy) * S / ch, 0), S),
                     min(max((x2 - cx) * S / cw, 0), S), min(max((y2 - cy) * S / ch, 0), S)]
                if p.flip:
                    m = [S - m[2], m[1], S - m[0], m[3]]
                assert got == pytest.approx(m, abs=1e-3)
    assert agree == total == 1000
    assert 50 < nvalid < 950  # the test exercises both outcomes


def test_a_query_is_the_same_region_in_both_views() -> None:
    """A box that each crop shows a different 60% of: the query is the 20% both show (valid only
    at min_visible <= 0.2), and unmapping either view's box gives that same region."""
    box = torch.tensor([[0.0, 0.0, 100.0, 50.0]])
    crops = [(0, 0, 60, 80), (40, 0, 60, 80)]  # x 0..60 and x 40..100
    part, frac = common_part(box, crops)
    assert part.tolist() == [[40.0, 0.0, 60.0, 50.0]] and frac.tolist() == pytest.approx([0.2])
    _, none = common_part(box, [(0, 0, 30, 80), (70, 0, 30, 80)])  # crops that share no pixel of it
    assert none.tolist() == [0.0]
    S = 32
    for crop, flip in ((crops[0], False), (crops[1], True)):
        x0, y0, w, h = crop
        b = map_boxes(part, crop, S, flip)[0].tolist()
        if flip:
            b = [S - b[2], b[1], S - b[0], b[3]]
        back = [b[0] * w / S + x0, b[1] * h / S + y0, b[2] * w / S + x0, b[3] * h / S + y0]
        assert back == pytest.approx([40.0, 0.0, 60.0, 50.0], abs=1e-4)


def test_no_crop_no_flip_is_a_plain_resize() -> None:
    img = Image.fromarray(np.zeros((100, 200, 3), np.uint8))
    t = TwoViewTransform(50, crop=False, flip_p=0.0, **NO_COLOUR)
    out = t(img, torch.tensor([[20.0, 10.0, 60.0, 90.0]]))
    expected = torch.tensor([[5.0, 5.0, 15.0, 45.0]])
    assert torch.allclose(out["boxes1"], expected) and torch.allclose(out["boxes2"], expected)
    assert out["valid"].tolist() == [True]
    assert out["view1"].shape == (3, 50, 50)


def test_same_generator_seed_same_sample_and_zero_boxes() -> None:
    img, box = _painted(3)
    t = TwoViewTransform(64)
    a = t(img, box, generator=torch.Generator().manual_seed(7))
    b = t(img, box, generator=torch.Generator().manual_seed(7))
    c = t(img, box, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["view1"], c["view1"])
    empty = t(img, torch.zeros(0, 4), generator=torch.Generator().manual_seed(7))
    assert empty["boxes1"].shape == (0, 4) and empty["valid"].shape == (0,)
    assert torch.equal(empty["view1"], a["view1"])  # the boxes do not consume randomness


# ---------------------------------------------------------------------------------------------
# Colour ops
# ---------------------------------------------------------------------------------------------
def _torchvision(x: np.ndarray, p: dict) -> np.ndarray:
    """The reference: ``color_augment_uint8``'s parameters through torchvision's float ops."""
    y = torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    if p["jitter"]:
        for op in p["jitter_order"]:
            y = ops[op](y, float(p["jitter_factors"][op]))
    if p["gray"]:
        y = TF.rgb_to_grayscale(y, num_output_channels=3)
    if p["blur_sigma"] > 0:
        k = 2 * blur_radius(p["blur_sigma"], min(x.shape[:2])) + 1
        y = TF.gaussian_blur(y, [k, k], [float(p["blur_sigma"])] * 2)
    return (y[0].permute(1, 2, 0) * 255).numpy()


@pytest.fixture(scope="module")
def smooth() -> np.ndarray:
    import cv2

    rng = np.random.default_rng(0)
    return cv2.resize(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), (96, 96), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize(
    "op, f", [(0, 0.6), (0, 1.4), (1, 0.6), (1, 1.4), (2, 0.6), (2, 1.4), (3, -0.37), (3, 0.03), (3, 0.5)]
)
def test_each_jitter_op_matches_torchvision(smooth: np.ndarray, op: int, f: float) -> None:
    factors = [1.0, 1.0, 1.0, 0.0]
    factors[op] = f
    p = dict(jitter=True, jitter_factors=factors, jitter_order=[op], gray=False, blur_sigma=0.0)
    diff = np.abs(color_augment_uint8(smooth.copy(), **p).astype(np.float32) - _torchvision(smooth, p))
    if op == 3:  # OpenCV's HSV holds hue in 256 steps a turn: a few levels on saturated pixels
        assert diff.max() < 12 and diff.mean() < 1.0, (diff.max(), diff.mean())
    else:  # uint8 rounding
        assert diff.max() <= 1.0, diff.max()


def test_grey_and_blur_match_torchvision(smooth: np.ndarray) -> None:
    for gray, sigma in ((True, 0.0), (False, 0.7), (False, 1.5)):
        p = dict(jitter=False, jitter_factors=[1.0, 1.0, 1.0, 0.0], jitter_order=[0, 1, 2, 3], gray=gray, blur_sigma=sigma)
        diff = np.abs(color_augment_uint8(smooth.copy(), **p).astype(np.float32) - _torchvision(smooth, p))
        assert diff.max() <= 1.0, (gray, sigma, diff.max())


def test_cv2_path_matches_torchvision() -> None:
    """Whole draws of the transform (random order, grey, blur): the uint8 path equals torchvision's
    ops up to uint8 rounding and the 1/256-turn hue quantisation of OpenCV's HSV."""
    import cv2

    rng = np.random.default_rng(0)
    smooth = cv2.resize(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), (96, 96), interpolation=cv2.INTER_CUBIC)
    t = TwoViewTransform(96)
    diffs = []
    for seed in range(12):
        p = t.sample_params(96, 96, torch.Generator().manual_seed(seed)).color_kwargs()
        a = color_augment_uint8(smooth.copy(), **p).astype(np.float32)
        diffs.append(np.abs(a - _torchvision(smooth, p)).mean())
        assert np.abs(a - _torchvision(smooth, p)).max() < 20, seed
    assert np.mean(diffs) < 1.5


# ---------------------------------------------------------------------------------------------
# Collate
# ---------------------------------------------------------------------------------------------
def _sample(m: int, valid: list[bool], seed: int, k: int = 5, s: int = 8) -> dict:
    boxes = torch.arange(m * 4, dtype=torch.float32).view(m, 4)
    return {
        "view1": torch.full((3, s, s), float(seed)),
        "view2": torch.full((3, s, s), -float(seed)),
        "boxes1": boxes,
        "boxes2": boxes + 1000,
        "valid": torch.tensor(valid, dtype=torch.bool).view(-1),
        "labels": torch.eye(k)[seed % k],
        "seed": seed,
        "skipped": seed % 2,
    }


def test_collate_shapes_masks_and_sampling() -> None:
    Q = 4
    samples = [
        _sample(10, [True] * 7 + [False] * 3, seed=1),  # 7 valid > Q: Q sampled among the valid
        _sample(3, [True, False, True], seed=2),  # 2 valid < Q: padded
        _sample(0, [], seed=3),  # no query at all: all-False row
        _sample(2, [False, False], seed=4),  # none valid
    ]
    b = collate_two_view(samples, num_queries=Q)
    assert b["view1"].shape == (4, 3, 8, 8) and b["view2"].shape == (4, 3, 8, 8)
    assert b["boxes1"].shape == (4, Q, 4) and b["boxes2"].shape == (4, Q, 4)
    assert b["query_mask"].tolist() == [[True] * 4, [True, True, False, False], [False] * 4, [False] * 4]
    assert b["labels"].shape == (4, 5) and b["labels"].dtype == torch.float32
    assert int(b["num_skipped"]) == 2
    # sampled queries are distinct valid ones and the two views hold the same query
    rows = (b["boxes1"][0, :, 0] / 4).long().tolist()
    assert len(set(rows)) == 4 and all(r < 7 for r in rows)
    assert torch.equal(b["boxes2"][0], b["boxes1"][0] + 1000)
    assert torch.equal(b["boxes1"][1, :2], samples[1]["boxes1"][[0, 2]])
    assert b["boxes1"][1:, 2:].abs().sum() == 0 and b["boxes1"][2:].abs().sum() == 0
    # reproducible from the sample seeds alone
    assert torch.equal(collate_two_view(samples, num_queries=Q)["boxes1"], b["boxes1"])


def test_from_config_switches() -> None:
    from predet.config import PretrainConfig, load_config

    cfg = load_config(PretrainConfig, None, ["data.aug.crop=false", "data.aug.flip_p=0", "data.aug.color_jitter=false",
                                             "data.aug.grayscale_p=0", "data.aug.blur_p=0", "data.aug.min_visible=0.9",
                                             "data.aug.query_region=common"])
    t = TwoViewTransform.from_config(cfg.data.aug, 32)
    assert t.min_visible == 0.9 and not t.crop and t.jitter_p == 0.0 and t.query_region == "common"
    assert TwoViewTransform.from_config(PretrainConfig().data.aug, 32).query_region == "each"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = t(img, torch.tensor([[0.0, 0.0, 32.0, 32.0]]))
    plain = torch.from_numpy(np.asarray(img.resize((32, 32), Image.BOX), np.float32) / 255).permute(2, 0, 1)
    want = (plain - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(out["view1"], want, atol=0.03)  # 2x2 means, +-1 uint8 level of rounding
    assert torch.equal(out["view1"], out["view2"])
    assert out["boxes1"].tolist() == [[0.0, 0.0, 16.0, 16.0]]


@pytest.mark.parametrize("size, scale", [(64, 0.35), (480, 0.2)])
def test_draft_side_keeps_the_smallest_crop_at_view_resolution(size: int, scale: float) -> None:
    """A square image decoded at draft_side: every crop's short side still holds the view's size
    (the most elongated crop of the smallest area sets it: 0.87x that of a square crop)."""
    from predet.data.datasets import draft_side
    from predet.data.transforms import sample_crop

    t = TwoViewTransform(size, crop_scale=(scale, 1.0))
    side = draft_side(t)
    assert side == {64: 125, 480: 1240}[size]  # 109 and 1074 before the crop's aspect was counted
    g = torch.Generator().manual_seed(0)
    shortest = min(min(sample_crop(side, side, t.crop_scale, t.crop_ratio, g)[2:]) for _ in range(4000))
    assert size - 1 <= shortest < size * 1.05
    assert draft_side(TwoViewTransform(size, crop=False)) == size
