"""Proposal selection steps of the CRPN (paper §3.2.1), and jittered boxes for CRPN-off mode.

Shape legend:
    B: views, Q: query slots, T: anchors per view, L: FPN levels, Kl: top-K kept on level l,
    K = sum_l Kl, P: proposals kept per view after NMS (K_nms), J: jittered boxes per query.

Nothing here carries gradient: proposal boxes are detached (DESIGN §2).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area, clip_boxes_to_image, nms

__all__ = ["top_k_per_level", "nms_per_view", "jitter_boxes", "box_recall", "batched_box_iou"]

MAX_NMS_BOXES = 8192  # boxes per nms call: its suppression mask is O(n^2) bits


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of ``[B, n, 4]`` with ``[B, m, 4]`` per view: ``[B, n, m]``.

    ``torchvision.ops.box_iou`` has no batch dimension, and running it on the flattened boxes
    would cost B times more (every view against every view); this is its formula, broadcast.
    """
    area1, area2 = box_area(boxes1.flatten(0, 1)), box_area(boxes2.flatten(0, 1))
    area1, area2 = area1.view(boxes1.shape[:2]), area2.view(boxes2.shape[:2])  # [B, n], [B, m]
    lt = torch.max(boxes1[:, :, None, :2], boxes2[:, None, :, :2])  # [B, n, m, 2]
    rb = torch.min(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=3)  # [B, n, m]
    union = area1[:, :, None] + area2[:, None, :] - inter
    return inter / union.clamp(min=1e-9)  # two empty (padding) boxes: IoU 0, not NaN


def top_k_per_level(
    objectness: Tensor, anchors_per_level: list[int], k: int
) -> tuple[Tensor, Tensor]:
    """The ``k`` best anchors of each level of each view (a loop over the L levels only).

    ``objectness [B, T]`` -> anchor indices ``[B, K]`` (into T, level by level) and the level of
    each of the K columns ``[K]``.
    """
    top, levels, start = [], [], 0
    for level, n in enumerate(anchors_per_level):
        kl = min(k, n)
        top.append(objectness[:, start : start + n].topk(kl, dim=1).indices + start)  # [B, Kl]
        levels.append(torch.full((kl,), level, device=objectness.device))
        start += n
    return torch.cat(top, dim=1), torch.cat(levels)


@torch.no_grad()
def nms_per_view(
    boxes: Tensor, scores: Tensor, levels: Tensor, *, nms_thresh: float, post_nms_top_n: int
) -> tuple[Tensor, Tensor]:
    """NMS inside each (view, level), then each view's ``post_nms_top_n`` best boxes.

    Args:
        boxes: ``[B, K, 4]`` decoded, clipped candidates. scores: ``[B, K]`` (-inf: drop it).
        levels: ``[K]`` the FPN level of each column.
    Returns:
        boxes ``[B, P, 4]`` (zero-padded) and valid ``[B, P]`` bool, each view's proposals in
        decreasing score order, P = ``post_nms_top_n``.
    """
    B, K = scores.shape
    boxes, score = boxes.reshape(B * K, 4), scores.reshape(B * K)  # [B, K, 4] -> [B*K, 4]
    view = torch.arange(B, device=boxes.device).repeat_interleave(K)  # [B*K]
    wh = boxes[:, 2:] - boxes[:, :2]
    keep = torch.isfinite(score) & (wh > 1e-3).all(dim=1)  # views without queries score -inf
    num_levels = int(levels.max()) + 1 if levels.numel() else 1
    group = view * num_levels + levels.repeat(B)  # [B*K] (view, level)
    views_per_chunk = max(1, MAX_NMS_BOXES // max(K, 1))
    kept = []
    for start in range(0, B * K, views_per_chunk * K):  # whole views per chunk, in view order
        chunk = torch.arange(start, min(start + views_per_chunk * K, B * K), device=view.device)
        chunk = chunk[keep[chunk]]
        kept.append(chunk[_nms_per_group(boxes[chunk], score[chunk], group[chunk], nms_thresh)])
    idx = torch.cat(kept) if kept else torch.empty(0, dtype=torch.long, device=boxes.device)
    return _first_per_view(boxes[idx], view[idx], B, post_nms_top_n)


def _nms_per_group(boxes: Tensor, scores: Tensor, group: Tensor, thresh: float) -> Tensor:
    """NMS inside each group, in one ``torchvision.ops.nms`` call: boxes of different groups
    are shifted apart so they never overlap (what ``batched_nms`` does for small inputs; for
    large ones it launches one nms per group, i.e. per (view, level) here). Returns indices in
    decreasing score order."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = group.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, thresh)


def _first_per_view(boxes: Tensor, view: Tensor, num_views: int, k: int) -> tuple[Tensor, Tensor]:
    """Scatter ``boxes [M, 4]`` (sorted by score) into ``[B, k, 4]`` keeping each view's first k."""
    order = torch.argsort(view, stable=True)  # group by view, keep score order inside a group
    boxes, view = boxes[order], view[order]
    count = torch.bincount(view, minlength=num_views)  # [B]
    first = torch.cumsum(count, 0) - count  # [B] start of each view's run
    rank = torch.arange(len(view), device=view.device) - first[view]  # [M]
    sel = rank < k
    out = boxes.new_zeros(num_views, k, 4)
    valid = torch.zeros(num_views, k, dtype=torch.bool, device=boxes.device)
    out[view[sel], rank[sel]] = boxes[sel]
    valid[view[sel], rank[sel]] = True
    return out, valid


@torch.no_grad()
def jitter_boxes(
    boxes: Tensor,
    mask: Tensor,
    *,
    num_per_query: int,
    image_size: tuple[int, int],
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Random boxes around each query for CRPN-off training (paper Table 1).

    Centres move by up to 0.3 of the box size and sides scale by up to exp(+-0.5), so about
    half of the boxes overlap their query with IoU > 0.5 and the rest are negatives.
    ``boxes [B, Q, 4]``, ``mask [B, Q]`` -> boxes ``[B, Q*J, 4]``, valid ``[B, Q*J]``.
    """
    B, Q = mask.shape
    J = num_per_query
    noise = torch.rand((B, Q, J, 4), generator=generator, device=boxes.device) * 2 - 1
    wh = (boxes[..., 2:] - boxes[..., :2]).unsqueeze(2)  # [B, Q, 1, 2]
    ctr = (boxes[..., :2] + boxes[..., 2:]).unsqueeze(2) / 2 + noise[..., :2] * 0.3 * wh
    half = wh * torch.exp(noise[..., 2:] * 0.5) / 2  # [B, Q, J, 2]
    out = torch.cat([ctr - half, ctr + half], dim=3)  # [B, Q, J, 4]
    out = clip_boxes_to_image(out.flatten(1, 2), image_size)  # [B, Q, J, 4] -> [B, Q*J, 4]
    size = out[..., 2:] - out[..., :2]
    valid = mask.repeat_interleave(J, dim=1) & (size > 1e-3).all(dim=2)
    return out, valid


@torch.no_grad()
def box_recall(
    proposals: Tensor, valid: Tensor, queries: Tensor, query_mask: Tensor, thresh: float = 0.5
) -> Tensor:
    """Fraction of valid queries covered by a valid proposal with IoU > ``thresh`` (a scalar).

    ``proposals [B, P, 4]``, ``valid [B, P]``, ``queries [B, Q, 4]``, ``query_mask [B, Q]``.
    """
    iou = batched_box_iou(queries, proposals)  # [B, Q, P]
    best = iou.masked_fill(~valid.unsqueeze(1), 0).amax(dim=2)  # [B, Q]
    covered = (best > thresh) & query_mask
    return covered.sum() / query_mask.sum().clamp(min=1)
