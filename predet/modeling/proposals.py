"""Proposal selection steps of the CRPN (paper §3.2.1), and jittered boxes for CRPN-off mode.

Shape legend:
    B: views, Q: query slots, T: anchors per view, L: FPN levels, Kl: top-K kept on level l,
    K = sum_l Kl, P: proposals kept per view after NMS (K_nms), J: jittered boxes per query.

Nothing here carries gradient: proposal boxes are detached (DESIGN §2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_area, clip_boxes_to_image

from predet.modeling.nms import grouped_nms

__all__ = ["top_k_per_level", "nms_per_view", "jitter_query_boxes", "box_recall", "batched_box_iou"]


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
) -> tuple[Tensor, list[int]]:
    """The ``k`` best anchors of each level of each view (a loop over the L levels only).

    ``objectness [B, T]`` -> anchor indices ``[B, K]`` (into T, level by level, each level's in
    decreasing score order) and Kl, the number of columns of each level (K = sum Kl).
    """
    top, sizes, start = [], [], 0
    for n in anchors_per_level:
        kl = min(k, n)
        top.append(objectness[:, start : start + n].topk(kl, dim=1).indices + start)  # [B, Kl]
        sizes.append(kl)
        start += n
    return torch.cat(top, dim=1), sizes


@torch.no_grad()
def nms_per_view(
    boxes: Tensor, scores: Tensor, level_sizes: list[int], *, nms_thresh: float, post_nms_top_n: int
) -> tuple[Tensor, Tensor]:
    """NMS inside each (view, level), then each view's ``post_nms_top_n`` best boxes.

    All (view, level) groups go through one ``grouped_nms`` (exact greedy NMS, equal to
    ``torchvision.ops.nms`` per group); nothing here waits for the device except its
    convergence tests.

    Args:
        boxes: ``[B, K, 4]`` decoded, clipped candidates. scores: ``[B, K]`` (-inf: drop it).
        level_sizes: Kl, the columns of each level, level after level (K = sum Kl).
    Returns:
        boxes ``[B, P, 4]`` (zero-padded) and valid ``[B, P]`` bool, each view's proposals in
        decreasing score order (equal scores: in column order), P = ``post_nms_top_n``.
    """
    B, K = scores.shape
    P, dev = post_nms_top_n, boxes.device
    if K == 0 or P == 0:
        return boxes.new_zeros(B, P, 4), torch.zeros(B, P, dtype=torch.bool, device=dev)
    L, Kmax = len(level_sizes), max(level_sizes)
    # groups [B, L, Kmax]: slot j of level l is column start_l + j; slots past Kl are padding
    column, real, start = [], [], 0
    slot = torch.arange(Kmax, device=dev)
    for n in level_sizes:
        column.append(slot.clamp(max=max(n - 1, 0)) + start)
        real.append(slot < n)
        start += n
    column, real = torch.stack(column), torch.stack(real)  # [L, Kmax] each
    g_boxes, g_scores = boxes[:, column], scores[:, column]  # [B, L, Kmax, 4], [B, L, Kmax]
    wh = g_boxes[..., 2:] - g_boxes[..., :2]
    ok = real & torch.isfinite(g_scores) & (wh > 1e-3).all(dim=3)  # views without queries: -inf
    index, kept = grouped_nms(
        g_boxes.flatten(0, 1), g_scores.flatten(0, 1), ok.flatten(0, 1), nms_thresh, max_keep=P
    )  # [B*L, M] slots, level by level, each in decreasing score order
    M = index.shape[1]
    slot = index.view(B, L, M).clamp(min=0) + torch.arange(L, device=dev)[:, None] * Kmax
    col = column.flatten()[slot].view(B, L * M)  # columns into K
    kept = kept.view(B, L * M)
    score = scores.gather(1, col).masked_fill(~kept, float("-inf"))
    # merge the levels of a view: stable, so equal scores stay in level, then column order
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :P]
    col, kept = col.gather(1, order), kept.gather(1, order)  # [B, min(P, L*M)]
    out = boxes.gather(1, col.unsqueeze(2).expand(-1, -1, 4))
    out = torch.where(kept.unsqueeze(2), out, 0.0)
    pad = P - col.shape[1]  # fewer than P candidates in all
    return F.pad(out, (0, 0, 0, pad)), F.pad(kept, (0, pad))


@torch.no_grad()
def jitter_query_boxes(
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
