"""Contrastive ROI head (paper §3.2.2): query-box lookup among the candidates of a view.

Shape legend:
    B: searched views, Q: query slots per view, P: candidates per view (proposals, then the Q
    query boxes appended), E: box-head width, F: similarity embedding width, D': regression width,
    M: (query, positive candidate) pairs.

The box head (torchvision ``TwoMLPHead``, owned by ``PreDet``) turns RoI features into
``b_p`` / ``b_q``; this head holds the layers after it: one FC shared by proposals and queries
followed by cosine similarity, and the query-conditioned regression (``b_q -> 4 x D'``,
``b_p -> D'``, dot product -> 4 deltas).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from predet.modeling.proposals import batched_box_iou

__all__ = ["CROIHead", "assign_candidates"]


class CROIHead(nn.Module):
    def __init__(self, *, in_dim: int, embed_dim: int, reg_dim: int) -> None:
        super().__init__()
        self.reg_dim = reg_dim
        self.embed = nn.Linear(in_dim, embed_dim)  # shared by b_p and b_q
        self.query_reg = nn.Linear(in_dim, 4 * reg_dim)
        self.proposal_reg = nn.Linear(in_dim, reg_dim)
        for fc in (self.query_reg, self.proposal_reg):
            nn.init.normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)

    def similarity(self, b_q: Tensor, b_p: Tensor) -> Tensor:
        """Cosine similarity ``s^{pq}``: ``b_q [B, Q, E]``, ``b_p [B, P, E]`` -> ``[B, Q, P]``."""
        # float32 whatever the autocast dtype: InfoNCE divides by tau = 0.07, where bf16's
        # 8-bit mantissa would leave steps of ~0.06 between logits
        z_q, z_p = self.embed(b_q), self.embed(b_p)  # [B, Q, F], [B, P, F]
        with torch.autocast(z_q.device.type, enabled=False):
            z_q = F.normalize(z_q.float(), dim=-1)
            z_p = F.normalize(z_p.float(), dim=-1)
            return torch.bmm(z_q, z_p.transpose(1, 2))

    def regression(self, b_q: Tensor, b_p: Tensor) -> Tensor:
        """Deltas regressing proposal p onto query q: ``b_q``, ``b_p`` ``[M, E]`` -> ``[M, 4]``."""
        b_q, b_p = F.normalize(b_q, dim=-1), F.normalize(b_p, dim=-1)  # see below
        r_q = self.query_reg(b_q).view(-1, 4, self.reg_dim)  # [M, 4*D'] -> [M, 4, D']
        r_p = self.proposal_reg(b_p).unsqueeze(1)  # [M, 1, D']
        return (r_q * r_p).sum(dim=2)


# Why unit-norm inputs to the regression: its deltas are a product of two linear maps of the
# box-head features, i.e. quadratic in their scale, and the InfoNCE term (a cosine, scale-free)
# lets that scale drift upwards. Unnormalised, the product blew up within ~60 SGD steps at lr
# 0.005 on the tiny model; with unit-RMS inputs (norm sqrt(E)) it still blew up at lr 0.02 on
# the built-in world (step ~10, `configs/pretrain/tiny_cpu.yaml`); with unit-norm inputs it is
# stable there and the lookup is still learned (tests/modeling/test_learnability.py).


def assign_candidates(
    candidates: Tensor,
    candidate_valid: Tensor,
    queries: Tensor,
    query_mask: Tensor,
    *,
    fg_iou: float,
    num_negatives: int,
    query_negatives: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One random positive per query and its negatives (DESIGN §2, CROI head).

    The last Q candidates must be the query boxes themselves (appended, as Faster R-CNN appends
    ground truth): candidate ``P - Q + q`` is always a positive of query q, whatever its IoU.

    Args:
        candidates: ``[B, P, 4]`` with ``candidate_valid [B, P]`` bool.
        queries: ``[B, Q, 4]`` in the same view, ``query_mask [B, Q]`` bool.
        fg_iou: positives have IoU > fg_iou with the query; negatives (the paper's P_neg, one
            set per view) have IoU < fg_iou with every valid query of the view.
        num_negatives: at most this many negatives per view, drawn at random (fewer is allowed).
        query_negatives: instead, the negatives of query q are all the candidates with IoU
            < fg_iou with q, other queries' boxes included (up to ``num_negatives`` per query).
    Returns:
        iou ``[B, Q, P]``, positive index ``[B, Q]`` int64 (into P), negative mask ``[B, Q, P]``.
    """
    B, Q = query_mask.shape
    P = candidates.shape[1]
    pair_valid = query_mask.unsqueeze(2) & candidate_valid.unsqueeze(1)  # [B, Q, P]
    iou = batched_box_iou(queries, candidates).masked_fill(~pair_valid, 0.0)  # [B, Q, P]

    is_pos = iou > fg_iou
    own = torch.arange(Q, device=iou.device) + (P - Q)  # [Q] each query's appended box
    is_pos[:, torch.arange(Q, device=iou.device), own] = True
    key = torch.rand(iou.shape, generator=generator, device=iou.device)  # [B, Q, P]
    pos_index = key.masked_fill(~is_pos, -1.0).argmax(dim=2)  # a uniform pick among positives

    if query_negatives:
        is_neg = pair_valid & (iou < fg_iou)  # [B, Q, P]
    else:
        is_neg = candidate_valid & (iou.amax(dim=1) < fg_iou)  # [B, P]
        is_neg[:, P - Q :] &= ~query_mask  # an appended valid query box is never in P_neg
        is_neg = is_neg.unsqueeze(1).expand(B, Q, P)  # the same set for every query
    neg_key = torch.rand(is_neg.shape[::2], generator=generator, device=iou.device)  # [B, P]
    neg_key = neg_key.unsqueeze(1).masked_fill(~is_neg, 2.0)  # [B, Q, P]
    rank = neg_key.argsort(dim=2).argsort(dim=2)  # position in a random order of the view's
    return iou, pos_index, is_neg & (rank < num_negatives)
