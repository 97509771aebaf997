"""RoIAlign as two small matrix products, for the CPU and small feature maps.

With a fixed sampling ratio, RoIAlign is separable: each output bin averages ``sr x sr``
bilinear samples on a regular grid, and a bilinear sample is a product of a weight along y and a
weight along x. So for one RoI on a ``[C, H, W]`` map::

    out[c, i, j] = sum_{h, w} Wy[i, h] * x[c, h, w] * Wx[j, w]

with ``Wy [out, H]`` / ``Wx [out, W]`` the bin-averaged interpolation weights (zero for samples
outside ``[-1, H]``, clamped at the border, exactly as ``torchvision.ops.roi_align`` does). Both
directions are then batched matmuls: no scatter, no atomics, and a backward as fast as the
forward. torchvision's CPU kernel runs its backward as a serial scatter: it was 48% of a
``configs/pretrain/small_cpu.yaml`` PreDet step (0.48 s of 0.98 s on 2 cores).

The cost grows with ``H x W`` per RoI (the dense weights touch every row and column), so this
only pays on small maps; :class:`MultiScaleRoIAlign` uses it on the CPU when every level has at
most ``SEPARABLE_MAX_HW`` cells and calls torchvision otherwise (CUDA, large maps, adaptive
sampling). Results equal torchvision's to float rounding (tests/modeling/test_roi_align.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torchvision
from torch import Tensor
from torchvision.ops.poolers import LevelMapper

__all__ = ["roi_align_separable", "interp_weights", "MultiScaleRoIAlign", "SEPARABLE_MAX_HW"]

# largest level (H x W cells) on which the separable form is used on the CPU: 64 x 64 keeps the
# dense per-RoI products below torchvision's per-sample cost at the CPU configs' sizes
SEPARABLE_MAX_HW = 64 * 64


def interp_weights(start: Tensor, length: Tensor, size: int, out: int, sr: int) -> Tensor:
    """Bin-averaged linear-interpolation weights along one axis: ``[R] -> [R, out, size]``.

    ``start``/``length``: the RoI's start and extent in feature cells (already scaled, aligned
    offset applied). Samples at ``start + (i + (k + 0.5) / sr) * length / out``; a sample below
    -1 or above ``size`` weighs nothing; otherwise it is clamped to ``[0, size - 1]``.
    """
    R = start.shape[0]
    k = (torch.arange(out * sr, device=start.device, dtype=start.dtype) + 0.5) / sr  # [out*sr]
    p = start[:, None] + k * (length[:, None] / out)  # [R, out*sr]
    p = torch.nan_to_num(p, nan=-2.0)  # a NaN box (e.g. in a masked-out slot) samples nothing
    inside = (p >= -1.0) & (p <= size)
    p = p.clamp(min=0.0)
    low = p.floor().clamp(max=size - 1)
    at_end = low >= size - 1
    p = torch.where(at_end, low, p)
    frac = p - low
    low_i = low.long()
    high_i = torch.where(at_end, low_i, low_i + 1)
    w_low = torch.where(inside, 1.0 - frac, torch.zeros_like(frac)) / sr
    w_high = torch.where(inside, frac, torch.zeros_like(frac)) / sr
    W = torch.zeros(R, out * sr, size, device=start.device, dtype=start.dtype)
    W.scatter_add_(2, low_i.unsqueeze(2), w_low.unsqueeze(2))
    W.scatter_add_(2, high_i.unsqueeze(2), w_high.unsqueeze(2))
    return W.view(R, out, sr, size).sum(dim=2)  # [R, out, size]


def roi_align_separable(
    x: Tensor,
    boxes: Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
    weight: Optional[Tensor] = None,
) -> Tensor:
    """``torchvision.ops.roi_align`` for ``n`` boxes per image: ``x [B, C, H, W]``,
    ``boxes [B, n, 4]`` (XYXY, input-image coordinates) -> ``[B, n, C, out, out]``.

    ``weight`` (``[B, n]``, optional) multiplies each RoI's result (0 drops it): the multi-level
    pooler sums the levels' results with a 0/1 level mask this way.
    """
    if sampling_ratio < 1:
        raise ValueError("roi_align_separable needs a fixed sampling_ratio >= 1")
    B, C, H, Wd = x.shape
    n = boxes.shape[1]
    # coordinates and interpolation weights in float32 at least: in bfloat16 (8-bit mantissa) a
    # box edge at x=100.3 would move by up to half a pixel (torchvision's kernel runs in float32)
    cdtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    b = boxes.reshape(B * n, 4).to(cdtype) * spatial_scale
    if aligned:
        b = b - 0.5
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    if not aligned:  # torchvision: "force malformed ROIs to be 1x1"
        w, h = w.clamp(min=1.0), h.clamp(min=1.0)
    wy = interp_weights(b[:, 1], h, H, output_size, sampling_ratio)  # [B*n, out, H]
    wx = interp_weights(b[:, 0], w, Wd, output_size, sampling_ratio)  # [B*n, out, W]
    if weight is not None:
        wy = wy * weight.reshape(B * n, 1, 1).to(wy.dtype)
    wy, wx = wy.to(x.dtype), wx.to(x.dtype)
    o = output_size
    # rows: [B, n*out, H] @ [B, H, C*W] -> [B, n*out, C*W]
    rows = torch.bmm(wy.view(B, n * o, H), x.permute(0, 2, 1, 3).reshape(B, H, C * Wd))
    rows = rows.view(B * n, o * C, Wd)  # [B*n, out*C, W]
    pooled = torch.bmm(rows, wx.transpose(1, 2))  # [B*n, out*C, out]
    return pooled.view(B, n, o, C, o).permute(0, 1, 3, 2, 4)  # [B, n, C, out, out]


class MultiScaleRoIAlign(torchvision.ops.MultiScaleRoIAlign):
    """``torchvision.ops.MultiScaleRoIAlign`` (same arguments, levels and results) that pools
    with :func:`roi_align_separable` on the CPU when the maps are small (see the module doc)."""

    def forward(self, x, boxes, image_shapes):  # type: ignore[override]
        feats = [x[k] for k in self.featmap_names]
        if not self._use_separable(feats, boxes):
            return super().forward(x, boxes, image_shapes)
        scales, mapper = self._scales_and_levels(feats, image_shapes)
        counts = torch.tensor([len(bx) for bx in boxes], device=feats[0].device)
        n = int(counts.max())
        padded = torch.stack([torch.cat([bx, bx.new_zeros(n - len(bx), 4)]) for bx in boxes])
        valid = torch.arange(n, device=padded.device)[None, :] < counts[:, None]  # [B, n]
        level_of = torch.full(valid.shape, -1, dtype=torch.long, device=padded.device)
        level_of[valid] = mapper(list(boxes)).to(padded.device)
        out: Tensor | float = 0.0
        for lvl, (feat, scale) in enumerate(zip(feats, scales)):
            mask = level_of == lvl  # [B, n]
            if bool(mask.any()):  # on the CPU: no sync cost
                out = out + roi_align_separable(
                    feat, padded, self.output_size[0], scale, self.sampling_ratio, weight=mask
                )
            else:  # a level without boxes adds zeros: skip the products, keep its (zero) gradient
                out = out + feat.reshape(-1)[:1].sum() * 0.0
        assert isinstance(out, Tensor)
        if bool(valid.all()):  # every image has n boxes (the PreDet step): no gather
            return out.reshape(-1, *out.shape[2:])
        return out[valid]  # [R, C, out, out], the images' boxes in order

    def _use_separable(self, feats: list[Tensor], boxes: list[Tensor]) -> bool:
        return (
            feats[0].device.type == "cpu"
            and self.sampling_ratio >= 1
            and self.output_size[0] == self.output_size[1]
            and all(f.shape[-2] * f.shape[-1] <= SEPARABLE_MAX_HW for f in feats)
            and sum(len(b) for b in boxes) > 0
        )

    def _scales_and_levels(self, feats: list[Tensor], image_shapes) -> tuple[list[float], LevelMapper]:
        """torchvision's scale inference (power of two per level) and FPN level mapper."""
        size = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        scales = []
        for f in feats:
            s = [2.0 ** round(math.log2(a / b)) for a, b in zip(f.shape[-2:], size)]
            if s[0] != s[1]:
                raise ValueError(f"feature map {tuple(f.shape[-2:])} is not a power-of-two scale of {size}")
            scales.append(s[0])
        k_min, k_max = -math.log2(scales[0]), -math.log2(scales[-1])
        mapper = LevelMapper(
            int(k_min), int(k_max),
            canonical_scale=self.canonical_scale, canonical_level=self.canonical_level,
        )  # fmt: skip
        return scales, mapper
