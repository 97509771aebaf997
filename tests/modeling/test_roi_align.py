"""The separable RoIAlign equals torchvision's kernel, forward and backward."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.ops import roi_align

from predet.modeling import roi_align as ra
from predet.modeling.roi_align import MultiScaleRoIAlign, interp_weights, roi_align_separable


def _boxes(g: torch.Generator, B: int, n: int, size: float, spill: float = 0.0) -> torch.Tensor:
    """``[B, n, 4]`` XYXY boxes of sides 2%-70% of ``size``; ``spill`` lets them leave the image."""
    wh = (0.02 + 0.68 * torch.rand(B, n, 2, generator=g)) * size
    lo, hi = -spill * size, size * (1 + spill)
    xy = lo + torch.rand(B, n, 2, generator=g) * (hi - lo - wh)
    return torch.cat([xy, xy + wh], dim=2)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sr", [1, 2, 3])
def test_single_level_matches_torchvision(aligned: bool, sr: int) -> None:
    g = torch.Generator().manual_seed(sr + 10 * aligned)
    B, n, C, H, W = 3, 17, 5, 9, 12
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    # boxes spill up to 30% outside the 48x36 image (samples beyond [-1, H] weigh nothing),
    # plus degenerate ones (zero width/height, a point, a box flipped inside out)
    boxes = _boxes(g, B, n, 48.0, spill=0.3).double()
    boxes[0, 0] = torch.tensor([10.0, 10.0, 10.0, 20.0])
    boxes[1, 1] = torch.tensor([5.0, 5.0, 5.0, 5.0])
    boxes[2, 2] = torch.tensor([30.0, 20.0, 12.0, 8.0])
    boxes[2, 3] = torch.tensor([47.5, 35.5, 48.0, 36.0])  # the last cell, where low == high
    scale = 0.25
    ref = roi_align(x, list(boxes.unbind(0)), 4, spatial_scale=scale, sampling_ratio=sr, aligned=aligned)
    got = roi_align_separable(x, boxes, 4, scale, sr, aligned=aligned).reshape(ref.shape)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    (g_got,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-12)


def test_bfloat16_features_keep_float32_coordinates_and_nan_boxes_sample_nothing() -> None:
    """bf16 features (CPU autocast): the box coordinates and weights stay float32, as in
    torchvision's kernel (in bf16 a box edge near x=100 moved by up to half a pixel: errors of 0.2
    against 0.005); a NaN box (a garbage masked-out slot) pools zeros instead of raising."""
    g = torch.Generator().manual_seed(0)
    B, n, C, H, W = 2, 9, 4, 40, 40
    x = torch.randn(B, C, H, W, generator=g)
    boxes = _boxes(g, B, n, 160.0) + 0.3  # off the bf16 grid (step 0.5 between 64 and 128)
    ref = roi_align(x, list(boxes.unbind(0)), 7, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    xb = x.bfloat16()
    got = roi_align_separable(xb, boxes, 7, 0.25, 2, aligned=True).reshape(ref.shape).float()
    tv = roi_align(xb.float(), list(boxes.unbind(0)), 7, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    assert (got - ref).abs().max() < 4 * (tv - ref).abs().max() + 0.02  # bf16 rounding of values only
    nan_boxes = boxes.clone()
    nan_boxes[0, 0] = float("nan")
    out = roi_align_separable(x, nan_boxes, 7, 0.25, 2, aligned=True)
    assert torch.isfinite(out).all() and out[0, 0].abs().max() == 0
    torch.testing.assert_close(out[0, 1:], roi_align_separable(x, boxes, 7, 0.25, 2, aligned=True)[0, 1:])


def test_interp_weights_hand_example() -> None:
    # one bin, one sample at the centre of [1, 3] on a 4-cell axis: x = 2.0 -> all weight on 2;
    # a sample at 2.5 splits 0.5 / 0.5; beyond the end (size 4 -> x = 3.7) clamps to cell 3;
    # below -1 weighs nothing
    starts = torch.tensor([1.0, 2.0, 3.2, -3.0])
    lengths = torch.tensor([2.0, 1.0, 1.0, 1.0])
    w = interp_weights(starts, lengths, size=4, out=1, sr=1)[:, 0]  # [4, 4]
    expected = torch.tensor(
        [[0, 0, 1, 0], [0, 0, 0.5, 0.5], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.float32
    )
    torch.testing.assert_close(w, expected)


def _features(g: torch.Generator, B: int, C: int, size: int) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict(
        (str(i), torch.randn(B, C, size // 4 >> i, size // 4 >> i, generator=g, requires_grad=True))
        for i in range(4)
    )


@pytest.mark.parametrize("output_size,counts", [(7, [40, 40, 40]), (14, [9, 0, 23])])
def test_multiscale_matches_torchvision(output_size: int, counts: list[int]) -> None:
    g = torch.Generator().manual_seed(output_size)
    size, C = 128, 6
    feats = _features(g, len(counts), C, size)
    boxes = [_boxes(g, 1, n, float(size))[0] for n in counts]  # spans all four FPN levels
    shapes = [(size, size)] * len(counts)
    # canonical box side 40 px instead of 224 (sized for ~800-px images), so that boxes of a
    # 128-px image reach every level
    kw = dict(canonical_scale=40)
    ref_pool = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, 2, **kw)
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, 2, **kw)
    assert pool._use_separable(list(feats.values()), boxes)
    levels = pool._scales_and_levels(list(feats.values()), shapes)[1](boxes)
    assert len(set(levels.tolist())) >= 3  # the boxes really spread over the levels
    ref, got = ref_pool(feats, boxes, shapes), pool(feats, boxes, shapes)
    assert got.shape == ref.shape == (sum(counts), C, output_size, output_size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ref.shape, generator=g)
    g_ref = torch.autograd.grad(ref, list(feats.values()), grad)
    g_got = torch.autograd.grad(got, list(feats.values()), grad)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_large_maps_fall_back_to_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    feats = _features(g, 2, 3, 64)
    boxes = [_boxes(g, 1, 5, 64.0)[0] for _ in range(2)]
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    assert pool._use_separable(list(feats.values()), boxes)
    monkeypatch.setattr(ra, "SEPARABLE_MAX_HW", 15 * 15)  # P2 is 16x16: too large now
    assert not pool._use_separable(list(feats.values()), boxes)
    adaptive = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 0)  # adaptive sampling: torchvision's
    assert not adaptive._use_separable(list(feats.values()), boxes)
    ref = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(feats, boxes, [(64, 64)] * 2)
    torch.testing.assert_close(pool(feats, boxes, [(64, 64)] * 2), ref)


def test_canonical_scale_reaches_every_pooler() -> None:
    """model.roi_canonical_scale sets the FPN level rule of PreDet's and the detectors' poolers;
    a smaller one sends the same box to a higher level (FPN paper eq. 1)."""
    from predet.config import FinetuneConfig, PretrainConfig, load_config
    from predet.errors import UserError
    from predet.modeling.detectors import build_detector
    from predet.modeling.predet import build_predet

    pre = load_config(PretrainConfig, None, ["model.backbone=resnet18", "model.fpn_channels=16",
                                             "model.box_head_dim=32", "model.roi_canonical_scale=30"])  # fmt: skip
    assert build_predet(pre, 3).roi_pool.canonical_scale == 30
    ft = load_config(FinetuneConfig, None, ["model.backbone=resnet18", "model.fpn_channels=16",
                                            "model.box_head_dim=32", "model.roi_canonical_scale=36"])  # fmt: skip
    heads = build_detector(ft, ["a", "b"]).roi_heads
    assert heads.box_roi_pool.canonical_scale == heads.mask_roi_pool.canonical_scale == 36
    feats = [torch.zeros(1, 1, 512 // 2**k, 512 // 2**k) for k in range(2, 6)]  # P2-P5 of 512 px
    box = [torch.tensor([[0.0, 0.0, 30.0, 30.0]])]
    levels = {
        c: MultiScaleRoIAlign(["0"], 7, 2, canonical_scale=c)._scales_and_levels(feats, [(512, 512)])[1](box)
        for c in (224, 30)
    }  # fmt: skip
    # a 30-px box: floor(4 + log2(30 / 224)) = 1 -> P2 (the lowest); floor(4 + log2(30 / 30)) -> P4
    assert (int(levels[224]), int(levels[30])) == (0, 2)
    with pytest.raises(UserError, match="roi_canonical_scale"):
        load_config(PretrainConfig, None, ["model.roi_canonical_scale=0"])
