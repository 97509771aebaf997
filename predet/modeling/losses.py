"""The PreDet losses as plain functions of tensors (no modules, no parameters).

Shape legend:
    B: views, K: classes, L: FPN levels, Q: query slots per view, P: CROI candidates per view,
    M: selected (anchor or proposal, query) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["multilabel_softmax_ce", "multilabel_bce", "info_nce", "has_area", "box_regression_loss"]


def multilabel_softmax_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Multi-label softmax cross-entropy (Mahajan et al. 2018), target spread over the labels.

    Args:
        logits: ``[..., B, K]`` (e.g. ``[L, B, K]`` for one head applied to L levels).
        labels: ``[B, K]`` multi-hot (0/1 floats); a row without labels contributes nothing.
    Returns:
        scalar: mean over the leading dims and over the images that have at least one label.
    """
    count = labels.sum(dim=-1, keepdim=True)  # [B, 1]
    target = labels / count.clamp(min=1)  # [B, K], rows sum to 1 (or 0 when unlabelled)
    per_image = -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1)  # [..., B]
    has_label = (count.squeeze(-1) > 0).to(per_image.dtype)  # [B]
    return (per_image * has_label).sum(dim=-1).div(has_label.sum().clamp(min=1)).mean()


def multilabel_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy per class; ``logits [..., B, K]``, ``labels [B, K]``; mean over all."""
    return F.binary_cross_entropy_with_logits(logits, labels.expand_as(logits))


def info_nce(sim: Tensor, pos_index: Tensor, neg_mask: Tensor, valid: Tensor, tau: float) -> Tensor:
    """InfoNCE of the paper (§3.2.2): per query, one positive against the masked negatives.

    ``-log( exp(s+/tau) / (exp(s+/tau) + sum_{p in P_neg} exp(s_p/tau)) )`` averaged over the
    valid queries.

    Args:
        sim: ``[B, Q, P]`` similarities (cosine) of each query with each candidate.
        pos_index: ``[B, Q]`` int64, the candidate chosen as each query's positive.
        neg_mask: ``[B, Q, P]`` bool, each query's negatives.
        valid: ``[B, Q]`` bool, the queries that count.
        tau: temperature.
    Returns:
        scalar (0 with no valid query, still connected to ``sim``).
    """
    logits = sim / tau  # [B, Q, P]
    pos = logits.gather(2, pos_index.unsqueeze(2)).squeeze(2)  # [B, Q]
    neg = logits.masked_fill(~neg_mask, float("-inf"))  # [B, Q, P]
    # log-sum-exp over {positive} U negatives; -inf entries drop out of the sum
    denom = torch.logsumexp(torch.cat([pos.unsqueeze(2), neg], dim=2), dim=2)  # [B, Q]
    loss = (denom - pos) * valid.to(pos.dtype)
    return loss.sum() / valid.sum().clamp(min=1)


def has_area(boxes: Tensor) -> Tensor:
    """``[..., 4]`` XYXY -> ``[...]`` bool: positive width and height (a box that has a log-size
    regression target)."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def box_regression_loss(
    pred: Tensor, target: Tensor, normalizer: Tensor | int, beta: float = 1.0 / 9
) -> Tensor:
    """Smooth-L1 as in torchvision's RPN/ROI heads: summed over the 4 deltas and the M pairs,
    divided by ``normalizer``. ``pred``, ``target``: ``[M, 4]``."""
    loss = F.smooth_l1_loss(pred.float(), target.float(), beta=beta, reduction="sum")
    if isinstance(normalizer, Tensor):
        return loss / normalizer.clamp(min=1)
    return loss / max(normalizer, 1)
