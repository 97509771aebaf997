"""Contrastive ROI head (paper §3.2.2): query-box lookup among the candidates of a view.

Shape legend:
    B: searched views, Q: query slots per view, P: proposals per view, P' = P + Q: candidates per
    view (the proposals, then the Q query boxes appended), E: box-head width, F: similarity
    embedding width, D': regression width, M: (query, positive candidate) pairs.

The box head (torchvision ``TwoMLPHead``, owned by ``PreDet`` because the CRPN's queries use it
too) turns RoI features into ``b_p`` / ``b_q``. ``ContrastiveROIHead`` is the rest of the part:
one FC shared by proposals and queries followed by cosine similarity, the query-conditioned
regression (``b_q -> 4 x D'``, ``b_p -> D'``, dot product -> 4 deltas), the candidates (the
query boxes appended to the proposals, as Faster R-CNN appends ground truth, so that every valid
query has a positive), their assignment, its box coder, InfoNCE, the regression loss and the
``lookup_top1`` metric.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

from predet.config import CROIConfig
from predet.modeling.losses import box_regression_loss, has_area, info_nce
from predet.modeling.proposals import batched_box_iou

__all__ = ["ContrastiveROIHead", "append_queries", "assign_candidates"]


class ContrastiveROIHead(nn.Module):
    """Scores each candidate box of a view against each query; InfoNCE and box regression.

    Args:
        in_dim: E, the box head's width.
        cfg: the ``model.croi`` section (widths, tau, IoU threshold, negatives).
        info, reg: which losses to compute (``loss.info``, ``loss.croi_reg``).
    """

    def __init__(
        self, *, in_dim: int, cfg: CROIConfig, info: bool = True, reg: bool = True
    ) -> None:
        super().__init__()
        self.cfg, self.use_info, self.use_reg = cfg, info, reg
        self.reg_dim = cfg.reg_dim
        self.embed = nn.Linear(in_dim, cfg.embed_dim)  # shared by b_p and b_q
        self.query_reg = nn.Linear(in_dim, 4 * cfg.reg_dim)
        self.proposal_reg = nn.Linear(in_dim, cfg.reg_dim)
        for fc in (self.query_reg, self.proposal_reg):
            nn.init.normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)
        self.box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))  # torchvision's ROI heads

    def forward(
        self,
        *,
        query_features: Tensor,
        query_boxes: Tensor,
        query_mask: Tensor,
        query_box_features: Tensor,
        proposals: Tensor,
        proposal_valid: Tensor,
        proposal_features: Tensor,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Losses and metrics of the lookup of each query among its view's candidates: the
        proposals, and the query boxes themselves, appended here (:func:`append_queries`).

        Args:
            query_features: ``b_q [B, Q, E]``, the queries pooled on the other view.
            query_boxes: ``[B, Q, 4]`` the same queries in the searched view, ``query_mask
                [B, Q]``, and ``query_box_features [B, Q, E]``: those boxes pooled on the
                searched view.
            proposals: ``[B, P, 4]`` with ``proposal_valid [B, P]`` and ``proposal_features
                b_p [B, P, E]``.
        Returns:
            losses ``loss_info`` / ``loss_croi_reg`` (those switched on, unweighted) and metrics
            ``lookup_top1`` (the appended query boxes compete too).
        """
        b_q, mask, cfg = query_features, query_mask, self.cfg
        candidates, candidate_valid, b_p = append_queries(
            proposals, proposal_valid, proposal_features, query_boxes, query_mask, query_box_features
        )  # [B, P', 4], [B, P'], [B, P', E]
        # iou [B, Q, P'], one positive per query [B, Q], negatives [B, Q, P']
        iou, pos_index, negative = assign_candidates(
            candidates, candidate_valid, query_boxes, mask,
            fg_iou=cfg.fg_iou, num_negatives=cfg.num_negatives,
            query_negatives=cfg.query_negatives,
        )  # fmt: skip
        sim = self.similarity(b_q, b_p)  # [B, Q, P']
        losses: dict[str, Tensor] = {}
        if self.use_info:
            losses["loss_info"] = info_nce(sim, pos_index, negative, mask, cfg.tau)
        if self.use_reg:
            losses["loss_croi_reg"] = self.regression_loss(
                b_q, b_p, candidates, pos_index, query_boxes, mask
            )
        with torch.no_grad():
            best = sim.masked_fill(~candidate_valid.unsqueeze(1), float("-inf")).argmax(dim=2)
            hit = (iou.gather(2, best.unsqueeze(2)).squeeze(2) > cfg.fg_iou) & mask  # [B, Q]
            top1 = hit.sum() / mask.sum().clamp(min=1)
        return losses, {"lookup_top1": top1}

    def regression_loss(
        self,
        b_q: Tensor,
        b_p: Tensor,
        candidates: Tensor,
        pos_index: Tensor,
        query_boxes: Tensor,
        query_mask: Tensor,
    ) -> Tensor:
        """Smooth-L1 of each valid query's positive candidate regressed onto the query box,
        averaged over the valid queries. ``b_q [B, Q, E]``, ``b_p [B, P', E]``, ``candidates
        [B, P', 4]``, ``pos_index [B, Q]`` (into P'), ``query_boxes [B, Q, 4]``, ``query_mask
        [B, Q]``."""
        # every (view, query) slot, the invalid ones at zero loss: no nonzero(), so nothing
        # here waits for the device (issue 11)
        E = b_p.shape[2]
        b_pos = b_p.gather(1, pos_index.unsqueeze(2).expand(-1, -1, E))  # [B, Q, E]
        box_pos = candidates.gather(1, pos_index.unsqueeze(2).expand(-1, -1, 4))  # [B, Q, 4]
        deltas = self.regression(b_q.flatten(0, 1), b_pos.flatten(0, 1)).float()  # [B*Q, 4]
        qb, pb = query_boxes.flatten(0, 1), box_pos.flatten(0, 1)
        target = self.box_coder.encode_single(qb, pb)
        # a zero-area box has no log-size target (log 0/0): its slot gets zero loss, like an
        # invalid one
        fits = query_mask.flatten() & has_area(qb) & has_area(pb)
        target = torch.where(fits.unsqueeze(1), target, deltas.detach())
        return box_regression_loss(deltas, target, query_mask.sum())

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


def append_queries(
    proposals: Tensor,
    proposal_valid: Tensor,
    proposal_features: Tensor,
    query_boxes: Tensor,
    query_mask: Tensor,
    query_box_features: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The CROI head's candidates: each view's proposals, then its Q query boxes (candidate
    ``P + q`` is query q's own box, the layout :func:`assign_candidates` relies on).

    ``proposals [B, P, 4]``, ``proposal_valid [B, P]``, ``proposal_features [B, P, E]`` and
    ``query_boxes [B, Q, 4]``, ``query_mask [B, Q]``, ``query_box_features [B, Q, E]`` ->
    candidates ``[B, P', 4]``, valid ``[B, P']``, features ``[B, P', E]``.
    """
    candidates = torch.cat([proposals, query_boxes], dim=1)  # [B, P', 4]
    valid = torch.cat([proposal_valid, query_mask], dim=1)  # [B, P']
    features = torch.cat([proposal_features, query_box_features], dim=1)  # [B, P', E]
    return candidates, valid, features


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

    ``candidates`` are those of :func:`append_queries`: the last Q are the query boxes
    themselves, so candidate ``P' - Q + q`` is always a positive of query q, whatever its IoU.

    Args:
        candidates: ``[B, P', 4]`` with ``candidate_valid [B, P']`` bool.
        queries: ``[B, Q, 4]`` in the same view, ``query_mask [B, Q]`` bool.
        fg_iou: positives have IoU > fg_iou with the query; negatives (the paper's P_neg, one
            set per view) have IoU < fg_iou with every valid query of the view.
        num_negatives: at most this many negatives per view, drawn at random (fewer is allowed).
        query_negatives: instead, the negatives of query q are all the candidates with IoU
            < fg_iou with q, other queries' boxes included (up to ``num_negatives`` per query).
    Returns:
        iou ``[B, Q, P']``, positive index ``[B, Q]`` int64 (into P'), negative mask
        ``[B, Q, P']``.
    """
    B, Q = query_mask.shape
    P = candidates.shape[1]  # P' in the legend
    pair_valid = query_mask.unsqueeze(2) & candidate_valid.unsqueeze(1)  # [B, Q, P']
    iou = batched_box_iou(queries, candidates).masked_fill(~pair_valid, 0.0)  # [B, Q, P']

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
