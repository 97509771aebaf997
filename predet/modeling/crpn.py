"""Contrastive RPN (paper §3.2.1): query-conditioned anchor scores, regressions, proposals.

Shape legend:
    B: searched views, Q: query slots per view, C: FPN channels, H: CRPN conv width,
    A: anchors per location, E: query feature width (box head),
    D: CRPN embedding width, Hl/Wl: size of level l, T = sum_l Hl*Wl*A anchors per view
    (ordered level, y, x, anchor as torchvision's ``AnchorGenerator``), G = sum_l Hl*Wl locations,
    M: selected (view, anchor, query) triples, K: anchors kept before NMS per view,
    P: proposals per view (K_nms).

``ContrastiveRPN`` is the whole part, as detectron2's ``RPN``: it owns the head (``CRPNHead``),
the anchors, the box coder, matching, sampling, its losses and proposal selection, and its
``forward`` returns ``(proposals, valid, losses, metrics)``, and ``propose`` the proposals alone
(no losses: inference and analysis). ``JitterProposals`` has the same interface and is the
paper's CRPN-off ablation (Table 1).

The score of query q for anchor a at location (y, x) is the dot product of two D-vectors: one
from a 1x1 conv over the image features (``A*D`` channels) and one from a linear map of the
query's box-head feature. All views, queries, anchors and locations go through one einsum per
level (a 1x1 grouped conv with A groups). Regressions use ``4*A*D`` channels the same way; since
only (anchor, query) pairs that are sampled or kept as proposals are ever used, the 1x1
regression conv is evaluated at those locations only (``CRPNHead.regression``), which is the
same arithmetic as the full map (``CRPNHead.full_regression``) at a fraction of the cost.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import box_iou, clip_boxes_to_image

from predet.config import CRPNConfig
from predet.modeling.losses import box_regression_loss, has_area
from predet.modeling.proposals import (
    box_recall,
    jitter_query_boxes,
    nms_per_view,
    top_k_per_level,
)

__all__ = ["ContrastiveRPN", "JitterProposals", "CRPNHead", "match_anchors", "sample_anchors"]

# (proposals [B, P, 4], valid [B, P], losses {"loss_*": scalar}, metrics {name: scalar})
ProposalOutput = tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]


class ContrastiveRPN(nn.Module):
    """The CRPN: per anchor and query a score and a box, trained against the query boxes.

    Args:
        in_channels: C of the FPN levels.
        query_dim: E of the query features.
        cfg: the ``model.crpn`` section (anchors, widths, matching, sampling, proposal sizes).
    """

    def __init__(self, *, in_channels: int, query_dim: int, cfg: CRPNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_levels = len(cfg.anchor_sizes)
        self.head = CRPNHead(
            in_channels=in_channels,
            num_anchors=len(cfg.aspect_ratios),
            query_dim=query_dim,
            embed_dim=cfg.dim,
            conv_dim=cfg.conv_dim,
        )
        self.anchor_generator = AnchorGenerator(
            sizes=tuple((s,) for s in cfg.anchor_sizes),
            aspect_ratios=(tuple(cfg.aspect_ratios),) * self.num_levels,
        )
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))  # torchvision's RPN
        self._anchor_cache: dict[tuple, tuple[Tensor, list[int]]] = {}

    def forward(
        self,
        features: list[Tensor],
        query_features: Tensor,
        query_boxes: Tensor,
        query_mask: Tensor,
        image_size: tuple[int, int],
    ) -> ProposalOutput:
        """Proposals for the queries of each searched view, and the CRPN's losses.

        Args:
            features: L maps ``[B, C, Hl, Wl]`` of the searched views.
            query_features: ``[B, Q, E]``, the queries (pooled on the other view).
            query_boxes: ``[B, Q, 4]`` the same queries' boxes in the searched view.
            query_mask: ``[B, Q]`` bool. image_size: (H, W) of the views.
        Returns:
            proposals ``[B, P, 4]`` (detached) and valid ``[B, P]``; losses ``loss_crpn_cls``,
            ``loss_crpn_reg`` (unweighted); metrics ``crpn_recall``.
        """
        scores, hidden = self.head(features, query_features)  # [B, Q, T], [B, G, H]
        q_reg = self.head.query_regression(query_features)  # [B, Q, A, 4, D]
        anchors, per_level = self.anchors(features, image_size)  # [T, 4]
        cfg = self.cfg
        labels, matched = match_anchors(
            anchors, query_boxes, query_mask, fg_iou=cfg.fg_iou, bg_iou=cfg.bg_iou
        )  # [B, T] each
        positive, negative = sample_anchors(
            labels, batch_per_view=cfg.batch_per_view, positive_fraction=cfg.positive_fraction
        )
        losses = self.losses(scores, hidden, q_reg, anchors, query_boxes, matched, positive, negative)
        proposals, valid = self.select_proposals(
            scores.detach(), hidden, q_reg, query_mask, anchors, per_level, image_size
        )
        recall = box_recall(proposals, valid, query_boxes, query_mask)
        return proposals, valid, losses, {"crpn_recall": recall}

    @torch.no_grad()
    def propose(
        self,
        features: list[Tensor],
        query_features: Tensor,
        query_boxes: Tensor,
        query_mask: Tensor,
        image_size: tuple[int, int],
    ) -> tuple[Tensor, Tensor]:
        """The proposals ``forward`` makes (``[B, P, 4]``, valid ``[B, P]``), without the matching,
        sampling and losses: for inference and analysis. ``forward``'s arguments; the query boxes
        are not read (the proposals come from the query features)."""
        scores, hidden = self.head(features, query_features)  # [B, Q, T], [B, G, H]
        q_reg = self.head.query_regression(query_features)
        anchors, per_level = self.anchors(features, image_size)
        return self.select_proposals(scores, hidden, q_reg, query_mask, anchors, per_level, image_size)

    def losses(
        self,
        scores: Tensor,
        hidden: Tensor,
        q_reg: Tensor,
        anchors: Tensor,
        boxes: Tensor,
        matched: Tensor,
        positive: Tensor,
        negative: Tensor,
    ) -> dict[str, Tensor]:
        """BCE on the sampled (anchor, matched query) scores; smooth-L1 on the positives' deltas.

        Both are normalised by the number of sampled anchors over all views (torchvision's RPN).
        ``positive`` holds at most :func:`max_positives` anchors a view (``sample_anchors``).
        Args: ``scores [B, Q, T]``, ``hidden``/``q_reg`` from the head, ``anchors [T, 4]``,
        ``boxes [B, Q, 4]``, ``matched [B, T]``, ``positive``/``negative`` ``[B, T]`` bool.
        """
        # dense over [B, T] and a fixed number of positive slots per view: no nonzero(), so
        # nothing here waits for the device (issue 11); the sums are those over the sampled pairs
        sampled = positive | negative  # [B, T]
        num_sampled = sampled.sum()
        logits = scores.gather(1, matched.unsqueeze(1)).squeeze(1)  # [B, T]: each anchor's query
        bce = F.binary_cross_entropy_with_logits(logits, positive.to(logits.dtype), reduction="none")
        loss_cls = (bce * sampled).sum() / num_sampled.clamp(min=1)
        B, T = positive.shape
        slots = min(T, max(1, max_positives(self.cfg.batch_per_view, self.cfg.positive_fraction)))
        filled, panchor = positive.float().topk(slots, dim=1)  # [B, S]: positives first
        filled = filled.bool().flatten()  # [B*S]
        pview = torch.arange(B, device=positive.device).repeat_interleave(slots)  # [B*S]
        panchor = panchor.flatten()
        pquery = matched[pview, panchor]
        deltas = self.head.regression(hidden, q_reg, pview, panchor, pquery)  # [B*S, 4]
        matched_boxes = boxes[pview, pquery]
        target = self.box_coder.encode_single(matched_boxes, anchors[panchor])
        # empty slots, and a zero-area query (no log-size target): 0 loss
        target = torch.where((filled & has_area(matched_boxes)).unsqueeze(1), target, deltas.detach())
        loss_reg = box_regression_loss(deltas, target, num_sampled)
        return {"loss_crpn_cls": loss_cls, "loss_crpn_reg": loss_reg}

    @torch.no_grad()
    def select_proposals(
        self,
        scores: Tensor,
        hidden: Tensor,
        q_reg: Tensor,
        query_mask: Tensor,
        anchors: Tensor,
        anchors_per_level: list[int],
        image_size: tuple[int, int],
    ) -> tuple[Tensor, Tensor]:
        """Max over valid queries, decode with the argmax query's deltas, top-K per level, NMS
        per (view, level), keep K_nms per view: boxes ``[B, P, 4]`` and valid ``[B, P]``."""
        B = scores.shape[0]
        objectness, best_query = (
            scores.masked_fill(~query_mask.unsqueeze(2), float("-inf")).max(dim=1)  # [B, T] each
        )
        anchor, sizes = top_k_per_level(objectness, anchors_per_level, self.cfg.pre_nms_top_n)
        K = anchor.shape[1]  # anchor [B, K] (indices into T), sizes: Kl of each level
        view = torch.arange(B, device=scores.device).repeat_interleave(K)  # [B*K]
        anchor = anchor.flatten()  # [B, K] -> [B*K]
        query = best_query[view, anchor]
        deltas = self.head.regression(hidden, q_reg, view, anchor, query)  # [B*K, 4]
        boxes = self.box_coder.decode_single(deltas.float(), anchors[anchor].float())
        boxes = clip_boxes_to_image(boxes, image_size).view(B, K, 4)
        score = objectness[view, anchor].view(B, K)
        return nms_per_view(
            boxes, score, sizes,
            nms_thresh=self.cfg.nms_thresh, post_nms_top_n=self.cfg.post_nms_top_n,
        )  # fmt: skip

    def anchors(self, features: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, list[int]]:
        """Anchors of one view, float32 whatever the autocast dtype: ``[T, 4]`` and T per level.

        Level l (P2, P3, ...) has its cells every ``4 * 2**l`` pixels, the FPN's strides: torchvision's
        ``AnchorGenerator`` infers ``size // grid``, which for P6 (P5 subsampled by 2: 8 cells
        over a 480-px view) gives 60 instead of 64, and for a view side that is not a multiple of
        32, wrong strides on P3-P5 too — anchors tens of pixels from the cells that score them.
        Cached per (level shapes, image size, device): every view of a batch has the same."""
        shapes = tuple(tuple(x.shape[-2:]) for x in features)
        device = features[0].device
        key = (shapes, size, device)
        if key not in self._anchor_cache:
            gen = self.anchor_generator
            gen.set_cell_anchors(torch.float32, device)
            strides = [[torch.tensor(4 * 2**lvl, device=device)] * 2 for lvl in range(len(shapes))]
            anchors = torch.cat(gen.grid_anchors([list(s) for s in shapes], strides))
            A = self.head.num_anchors
            self._anchor_cache[key] = (anchors, [h * w * A for h, w in shapes])
        return self._anchor_cache[key]


class JitterProposals(nn.Module):
    """CRPN off (paper Table 1): boxes jittered around each query replace the CRPN's proposals.

    Same interface as :class:`ContrastiveRPN`; no parameters, no losses, no metrics.
    """

    def __init__(self, *, boxes_per_query: int) -> None:
        super().__init__()
        self.boxes_per_query = boxes_per_query

    def forward(
        self,
        features: list[Tensor],
        query_features: Tensor,
        query_boxes: Tensor,
        query_mask: Tensor,
        image_size: tuple[int, int],
    ) -> ProposalOutput:
        """``query_boxes [B, Q, 4]``, ``query_mask [B, Q]`` -> boxes ``[B, Q*J, 4]``, valid
        ``[B, Q*J]`` (features are not read)."""
        boxes, valid = self.propose(features, query_features, query_boxes, query_mask, image_size)
        return boxes, valid, {}, {}

    @torch.no_grad()
    def propose(
        self,
        features: list[Tensor],
        query_features: Tensor,
        query_boxes: Tensor,
        query_mask: Tensor,
        image_size: tuple[int, int],
    ) -> tuple[Tensor, Tensor]:
        """The boxes of ``forward`` (one draw from the global RNG) without its empty losses."""
        return jitter_query_boxes(
            query_boxes, query_mask, num_per_query=self.boxes_per_query, image_size=image_size
        )


class CRPNHead(nn.Module):
    """Shared 3x3 conv + 1x1 embedding convs on the image side, linear maps on the query side."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        query_dim: int,
        embed_dim: int,
        conv_dim: int | None = None,
    ) -> None:
        """``conv_dim``: width of the shared 3x3 conv (default ``in_channels``, as torchvision's
        RPN head); on P2 at 480 px that conv costs about a third of an R50-FPN forward, and
        narrowing it is the main lever on the PreDet step's cost."""
        super().__init__()
        self.num_anchors, self.embed_dim = num_anchors, embed_dim
        A, D, H = num_anchors, embed_dim, conv_dim or in_channels
        self.conv = nn.Conv2d(in_channels, H, kernel_size=3, padding=1)
        self.cls_embed = nn.Conv2d(H, A * D, kernel_size=1)  # f_I^cls
        self.reg_embed = nn.Conv2d(H, 4 * A * D, kernel_size=1)  # f_I^reg
        self.query_cls = nn.Linear(query_dim, A * D)  # f_q^cls
        self.query_reg = nn.Linear(query_dim, 4 * A * D)  # f_q^reg
        for conv in (self.conv, self.cls_embed, self.reg_embed):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        for fc in (self.query_cls, self.query_reg):
            nn.init.normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)

    def forward(self, features: list[Tensor], query_feats: Tensor) -> tuple[Tensor, Tensor]:
        """Scores of every (query, anchor) pair of every view.

        Args:
            features: L maps ``[B, C, Hl, Wl]`` of the searched views.
            query_feats: ``[B, Q, E]`` box-head features of the queries (from the other view).
        Returns:
            scores ``[B, Q, T]`` (logits) and hidden ``[B, G, H]``, the 3x3-conv output of every
            location (level-major) for ``regression``.
        """
        B, Q = query_feats.shape[:2]
        A, D = self.num_anchors, self.embed_dim
        q_cls = self.query_cls(_rms(query_feats)).view(B, Q, A, D)
        scores, hidden = [], []
        for x in features:  # a loop over the L levels, never over views or queries
            h = F.relu(self.conv(x))  # [B, H, Hl, Wl]
            f_cls = self.cls_embed(h)
            f_cls = f_cls.view(B, A, D, *f_cls.shape[-2:])  # [B, A*D, Hl, Wl] -> [B, A, D, Hl, Wl]
            s = torch.einsum("bqad,badyx->bqyxa", q_cls, f_cls)  # [B, Q, Hl, Wl, A]
            scores.append(s.flatten(2))  # [B, Q, Hl, Wl, A] -> [B, Q, Hl*Wl*A]
            hidden.append(h.flatten(2).transpose(1, 2))  # [B, H, Hl, Wl] -> [B, Hl*Wl, H]
        return torch.cat(scores, dim=2), torch.cat(hidden, dim=1)

    def query_regression(self, query_feats: Tensor) -> Tensor:
        """``[B, Q, E]`` -> f_q^reg ``[B, Q, A, 4, D]``."""
        B, Q = query_feats.shape[:2]
        return self.query_reg(_rms(query_feats)).view(B, Q, self.num_anchors, 4, self.embed_dim)

    def regression(
        self, hidden: Tensor, q_reg: Tensor, view: Tensor, anchor: Tensor, query: Tensor
    ) -> Tensor:
        """Deltas of M selected (view, anchor, query) triples.

        Args:
            hidden: ``[B, G, H]`` from ``forward``.
            q_reg: ``[B, Q, A, 4, D]`` from ``query_regression``.
            view, anchor, query: ``[M]`` int64 indices into B, T and Q.
        Returns:
            ``[M, 4]`` deltas (dx, dy, dw, dh) regressing the anchor onto the query's box.
        """
        A, D = self.num_anchors, self.embed_dim
        loc, a = anchor // A, anchor % A  # anchors are ordered (location, anchor)
        h = hidden[view, loc]  # [M, H]
        weight = self.reg_embed.weight.flatten(1)  # [4*A*D, H, 1, 1] -> [4*A*D, H]
        f_reg = F.linear(h, weight, self.reg_embed.bias).view(-1, A, 4, D)  # 1x1 conv at M points
        f_reg = f_reg[torch.arange(len(a), device=a.device), a]  # [M, A, 4, D] -> [M, 4, D]
        return (f_reg * q_reg[view, query, a]).sum(dim=2)  # [M, 4]

    def full_regression(self, features: list[Tensor], query_feats: Tensor) -> Tensor:
        """Deltas for every (query, anchor) pair, ``[B, Q, T, 4]`` (grouped conv with 4A groups).

        The reference the tests check ``regression`` and the proposal selection against; nothing
        calls it at run time (training and ``propose`` use the gathered form).
        """
        B, Q = query_feats.shape[:2]
        A, D = self.num_anchors, self.embed_dim
        q_reg = self.query_regression(query_feats)  # [B, Q, A, 4, D]
        out = []
        for x in features:
            f_reg = self.reg_embed(F.relu(self.conv(x)))
            f_reg = f_reg.view(B, A, 4, D, *f_reg.shape[-2:])  # [B, 4AD, ...] -> [B, A, 4, D, ...]
            r = torch.einsum("bqakd,bakdyx->bqyxak", q_reg, f_reg)  # [B, Q, Hl, Wl, A, 4]
            out.append(r.flatten(2, 4))  # -> [B, Q, Hl*Wl*A, 4]
        return torch.cat(out, dim=2)


def _rms(x: Tensor) -> Tensor:
    """Unit-RMS query features. The score is bilinear in (query, image) features, and the
    box-head features' scale drifts upwards under the scale-free InfoNCE term (a cosine);
    unnormalised, the CRPN loss blew up within ~30 SGD steps at lr 0.02 on a fixed tiny batch."""
    return F.rms_norm(x, x.shape[-1:])


def match_anchors(
    anchors: Tensor,
    boxes: Tensor,
    mask: Tensor,
    *,
    fg_iou: float,
    bg_iou: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Assign every anchor of every view to a query and a label (DESIGN §2, CRPN).

    Each anchor takes the valid query of max IoU (a random valid query when all its IoUs are
    0); it is positive if that IoU > ``fg_iou``, negative if < ``bg_iou``, ignored in between.
    As in Faster R-CNN the best anchor(s) of each valid query (ties included, IoU > 0) are also
    positives, keeping their own best query. A view without valid queries is all ignored.

    Args:
        anchors: ``[T, 4]`` XYXY, the same for every view.
        boxes: ``[B, Q, 4]`` query boxes in the searched view. mask: ``[B, Q]`` bool.
    Returns:
        labels ``[B, T]`` int64 in {1, 0, -1} and matched query ``[B, T]`` int64.
    """
    B, Q = mask.shape
    T = anchors.shape[0]
    iou = box_iou(boxes.reshape(B * Q, 4), anchors).view(B, Q, T)  # [B*Q, T] -> [B, Q, T]
    iou = iou.masked_fill(~mask.unsqueeze(2), -1.0)
    best_iou, matched = iou.max(dim=1)  # [B, T]

    has_query = mask.any(dim=1)  # [B]
    # a uniform valid query per anchor: the floor(u * V)-th of the V valid ones, u ~ U[0, 1)
    valid_first = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # [B, Q]
    num_valid = mask.sum(dim=1, keepdim=True)  # [B, 1]
    u = torch.rand((B, T), generator=generator, device=mask.device)
    pick = (u * num_valid).long().clamp(max=Q - 1)  # [B, T]
    random_query = valid_first.gather(1, pick)
    matched = torch.where(best_iou <= 0, random_query, matched)

    labels = torch.full_like(matched, -1)
    labels[best_iou < bg_iou] = 0
    labels[best_iou > fg_iou] = 1
    best_per_query = iou.max(dim=2, keepdim=True).values  # [B, Q, 1]
    is_best = (iou == best_per_query) & (best_per_query > 0)  # invalid queries have -1
    labels[is_best.any(dim=1)] = 1
    labels[~has_query] = -1
    return labels, matched


def max_positives(batch_per_view: int, positive_fraction: float) -> int:
    """The most positives ``sample_anchors`` keeps in a view (torchvision's rule)."""
    return int(batch_per_view * positive_fraction)


def sample_anchors(
    labels: Tensor,
    *,
    batch_per_view: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Per view, up to ``batch_per_view * positive_fraction`` random positives, negatives fill
    the rest (torchvision's ``BalancedPositiveNegativeSampler``, batched over views).

    ``labels [B, T]`` -> (positive ``[B, T]`` bool, negative ``[B, T]`` bool).
    """
    pos, neg = labels == 1, labels == 0
    num_pos = pos.sum(dim=1).clamp(max=max_positives(batch_per_view, positive_fraction))  # [B]
    num_neg = neg.sum(dim=1).clamp(max=batch_per_view - num_pos)  # [B]
    key = torch.rand(labels.shape, generator=generator, device=labels.device)  # [B, T]
    return _random_subset(pos, num_pos, key), _random_subset(neg, num_neg, key)


def _random_subset(candidates: Tensor, count: Tensor, key: Tensor) -> Tensor:
    """Per row, the ``count`` candidates of smallest random ``key``: ``[B, T]`` bool."""
    key = key.masked_fill(~candidates, 2.0)  # keys are in [0, 1): non-candidates sort last
    rank = key.argsort(dim=1).argsort(dim=1)  # [B, T]: position of each entry in its row's order
    return candidates & (rank < count.unsqueeze(1))

