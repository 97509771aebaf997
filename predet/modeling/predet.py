"""PreDet (paper §3): classification + contrastive RPN + contrastive ROI head on a backbone + FPN.

Shape legend:
    N: images per batch, B = 2N views (view 1 of every image, then view 2), S: input side,
    G: locations over all levels, H: CRPN conv width, A/D: anchors per location / CRPN width,
    Q: query slots per image, K: classes, E: box-head width, C: FPN channels, L = 5 levels,
    T: anchors per view, P: CROI candidates per view (proposals + the Q appended query boxes).

Both directions run in one pass: view b is the searched image and its queries are pooled from
view ``(b + N) % B`` (the same image's other view), so every detection loss averages the two
directions. A query slot counts only where ``query_mask`` is True; an image without valid
queries contributes to the classification loss only.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign

from predet.config import LossConfig, PretrainConfig, PretrainModelConfig
from predet.errors import UserError
from predet.modeling.backbone import build_backbone
from predet.modeling.cls_head import ClsHead
from predet.modeling.croi_head import CROIHead, assign_candidates
from predet.modeling.crpn import CRPNHead, crpn_losses, match_anchors, sample_anchors
from predet.modeling.losses import box_regression_loss, info_nce
from predet.modeling.proposals import box_recall, build_proposals, jitter_boxes

__all__ = ["PreDet", "build_predet"]

NUM_LEVELS = 5  # P2..P6


class PreDet(nn.Module):
    """The pre-training model; ``forward(batch)`` returns weighted losses and detached metrics.

    Args:
        backbone: torchvision ``BackboneWithFPN`` (P2-P6, ``C`` channels).
        num_classes: K.
        model: the ``model`` config section (anchors, widths, sampling sizes, thresholds).
        loss: the ``loss`` config section (switches and weights).
    """

    def __init__(
        self,
        *,
        backbone: BackboneWithFPN,
        num_classes: int,
        model: PretrainModelConfig,
        loss: LossConfig,
    ) -> None:
        super().__init__()
        # plain dataclasses: no OmegaConf look-ups in the hot path, picklable, copyable
        self.cfg: PretrainModelConfig = OmegaConf.to_object(OmegaConf.structured(model))
        self.loss_cfg: LossConfig = OmegaConf.to_object(OmegaConf.structured(loss))
        model, loss = self.cfg, self.loss_cfg
        self.use_crpn = bool(loss.crpn)
        self.use_croi = bool(loss.info or loss.croi_reg)
        C = backbone.out_channels
        self.backbone = backbone
        self.cls_head = ClsHead(in_channels=C, num_classes=num_classes, loss=model.cls_loss)
        self.box_head: TwoMLPHead | None = None
        self.crpn: CRPNHead | None = None
        self.croi_head: CROIHead | None = None
        if self.use_crpn or self.use_croi:  # the cls-only baseline holds no detection modules
            self.roi_pool = MultiScaleRoIAlign(
                ["0", "1", "2", "3"], output_size=7, sampling_ratio=model.roi_sampling_ratio
            )
            self.box_head = TwoMLPHead(C * 7 * 7, model.box_head_dim)  # fc6, fc7
        if self.use_crpn:
            A = len(model.aspect_ratios)
            self.anchor_generator = AnchorGenerator(
                sizes=tuple((s,) for s in model.anchor_sizes),
                aspect_ratios=(tuple(model.aspect_ratios),) * NUM_LEVELS,
            )
            self.crpn = CRPNHead(
                in_channels=C,
                num_anchors=A,
                query_dim=model.box_head_dim,
                embed_dim=model.crpn_dim,
                conv_dim=model.crpn_conv_dim,
            )
            self.anchor_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))  # torchvision's RPN
        if self.use_croi:
            self.croi_head = CROIHead(
                in_dim=model.box_head_dim,
                embed_dim=model.croi_embed_dim,
                reg_dim=model.croi_reg_dim,
            )
            self.roi_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))  # torchvision's ROI heads
        self._anchor_cache: dict[tuple, tuple[Tensor, list[int]]] = {}

    # ------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``batch``: the collated two-view batch (``view1``/``view2`` ``[N, 3, S, S]``,
        ``boxes1``/``boxes2`` ``[N, Q, 4]``, ``query_mask [N, Q]``, ``labels [N, K]``).

        Returns the switched-on losses among ``loss_cls``, ``loss_crpn_cls``, ``loss_crpn_reg``,
        ``loss_info``, ``loss_croi_reg`` (weighted) and the metrics ``valid_queries`` (mean per
        image), ``crpn_recall`` (with the CRPN on) and ``lookup_top1`` (with the CROI head on);
        the detection terms are absent when the batch holds no valid query.
        """
        N = batch["view1"].shape[0]
        views = torch.cat([batch["view1"], batch["view2"]])  # [B, 3, S, S]
        feats = self.backbone(views)  # {"0": P2, ..., "pool": P6}, [B, C, Hl, Wl]
        out: dict[str, Tensor] = {}
        if self.loss_cfg.cls:
            logits = self.cls_head(feats)  # [L, B, K]
            labels = batch["labels"].repeat(2, 1)  # [N, K] -> [B, K], both views share labels
            out["loss_cls"] = self.loss_cfg.cls_weight * self.cls_head.loss(logits, labels)
        mask = batch["query_mask"].repeat(2, 1)  # [N, Q] -> [B, Q]
        out["valid_queries"] = batch["query_mask"].sum().detach().float() / N
        if (self.use_crpn or self.use_croi) and bool(mask.any()):
            boxes = torch.cat([batch["boxes1"], batch["boxes2"]]).float()  # [B, Q, 4] in view b
            out.update(self._detection(feats, boxes, mask, tuple(views.shape[-2:]), N))
        return out

    def _detection(
        self, feats: "OrderedDict[str, Tensor]", boxes: Tensor, mask: Tensor, size: tuple, N: int
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        b_own = self._box_features(feats, boxes, size)  # [B, Q, E], view b's boxes on view b
        b_q = b_own.roll(N, dims=0)  # [B, Q, E]: row b holds the queries of view (b + N) % B
        if self.use_crpn:
            proposals, valid, crpn_out = self._crpn(feats, b_q, boxes, mask, size)
            out.update(crpn_out)
        else:  # paper Table 1, CRPN off: boxes jittered around the queries replace proposals
            proposals, valid = jitter_boxes(
                boxes, mask, num_per_query=self.cfg.jitter_boxes_per_query, image_size=size
            )
        if self.use_croi:
            out.update(self._croi(feats, b_own, b_q, proposals, valid, boxes, mask, size))
        return out

    def _crpn(
        self, feats: "OrderedDict[str, Tensor]", b_q: Tensor, boxes: Tensor, mask: Tensor, size
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        cfg, w = self.cfg, self.loss_cfg.crpn_weight
        levels = list(feats.values())
        scores, hidden = self.crpn(levels, b_q)  # [B, Q, T], [B, G, H]
        q_reg = self.crpn.query_regression(b_q)  # [B, Q, A, 4, D]
        anchors, per_level = self._anchors(levels, size)  # [T, 4]
        labels, matched = match_anchors(
            anchors, boxes, mask, fg_iou=cfg.crpn_fg_iou, bg_iou=cfg.crpn_bg_iou
        )
        positive, negative = sample_anchors(
            labels,
            batch_per_view=cfg.crpn_batch_per_view,
            positive_fraction=cfg.crpn_positive_fraction,
        )
        loss_cls, loss_reg = crpn_losses(
            self.crpn, scores, hidden, q_reg, anchors, boxes, matched, positive, negative,
            self.anchor_coder,
        )  # fmt: skip
        proposals, valid = build_proposals(
            scores.detach(), mask, anchors, per_level,
            lambda v, a, q: self.crpn.regression(hidden, q_reg, v, a, q), self.anchor_coder,
            image_size=size, pre_nms_top_n=cfg.pre_nms_top_n,
            post_nms_top_n=cfg.post_nms_top_n, nms_thresh=cfg.nms_thresh,
        )  # fmt: skip
        out = {
            "loss_crpn_cls": w * loss_cls,
            "loss_crpn_reg": w * loss_reg,
            "crpn_recall": box_recall(proposals, valid, boxes, mask),
        }
        return proposals, valid, out

    def _croi(self, feats, b_own, b_q, proposals, valid, boxes, mask, size) -> dict[str, Tensor]:
        cfg, lc = self.cfg, self.loss_cfg
        candidates = torch.cat([proposals, boxes], dim=1)  # [B, P, 4], query boxes appended
        cand_valid = torch.cat([valid, mask], dim=1)  # [B, P]
        # the appended boxes are view b's own queries, already pooled on view b: reuse b_own
        b_p = torch.cat([self._box_features(feats, proposals, size), b_own], dim=1)  # [B, P, E]
        iou, pos_index, negative = assign_candidates(
            candidates, cand_valid, boxes, mask,
            fg_iou=cfg.croi_fg_iou, num_negatives=cfg.num_negatives,
            query_negatives=cfg.croi_query_negatives,
        )  # fmt: skip
        sim = self.croi_head.similarity(b_q, b_p)  # [B, Q, P]
        out: dict[str, Tensor] = {}
        if lc.info:
            out["loss_info"] = lc.info_weight * info_nce(sim, pos_index, negative, mask, cfg.tau)
        if lc.croi_reg:
            view, query = mask.nonzero(as_tuple=True)  # [M] valid queries
            pos = pos_index[view, query]
            deltas = self.croi_head.regression(b_q[view, query], b_p[view, pos])  # [M, 4]
            target = self.roi_coder.encode_single(boxes[view, query], candidates[view, pos])
            loss = box_regression_loss(deltas.float(), target, view.numel())
            out["loss_croi_reg"] = lc.croi_reg_weight * loss
        with torch.no_grad():
            best = sim.masked_fill(~cand_valid.unsqueeze(1), float("-inf")).argmax(dim=2)  # [B, Q]
            hit = (iou.gather(2, best.unsqueeze(2)).squeeze(2) > cfg.croi_fg_iou) & mask
            out["lookup_top1"] = hit.sum() / mask.sum().clamp(min=1)
        return out

    # ------------------------------------------------------------------------------------------
    def _box_features(self, feats: "OrderedDict[str, Tensor]", boxes: Tensor, size) -> Tensor:
        """RoIAlign 7x7 at each box's FPN level, then fc6/fc7: ``[B, n, 4]`` -> ``[B, n, E]``."""
        B, n = boxes.shape[:2]
        rois = self.roi_pool(feats, list(boxes.unbind(0)), [size] * B)  # [B*n, C, 7, 7]
        return self.box_head(rois).view(B, n, -1)  # [B*n, E] -> [B, n, E]

    def _anchors(self, levels: list[Tensor], size: tuple) -> tuple[Tensor, list[int]]:
        """Anchors of one view, float32 whatever the autocast dtype: ``[T, 4]`` and T per level."""
        shapes = tuple(tuple(x.shape[-2:]) for x in levels)
        key = (shapes, size, levels[0].device)
        if key not in self._anchor_cache:
            device = levels[0].device
            image = ImageList(torch.empty((1, 0, *size), device=device), [size])
            maps = [torch.empty((1, 0, *s), device=device) for s in shapes]  # only shapes are read
            anchors = self.anchor_generator(image, maps)[0]
            A = len(self.cfg.aspect_ratios)
            self._anchor_cache[key] = (anchors, [h * w * A for h, w in shapes])
        return self._anchor_cache[key]


def build_predet(cfg: PretrainConfig, num_classes: int) -> PreDet:
    """The PreDet model of a pre-training config; ``num_classes`` comes from the data's vocabulary
    (``cfg.model.num_classes``, when set, must agree with it)."""
    m = cfg.model
    if m.num_classes is not None and m.num_classes != num_classes:
        raise UserError(
            f"model.num_classes: {m.num_classes} given, but the data has {num_classes} classes"
        )
    if len(m.anchor_sizes) != NUM_LEVELS:
        raise UserError(
            f"model.anchor_sizes: need one size per FPN level P2-P6 ({NUM_LEVELS}), "
            f"got {list(m.anchor_sizes)}"
        )
    if not m.aspect_ratios or min(m.aspect_ratios) <= 0:
        raise UserError(f"model.aspect_ratios: need positive ratios, got {list(m.aspect_ratios)}")
    positive = (
        "input_size", "crpn_dim", "crpn_batch_per_view", "pre_nms_top_n", "post_nms_top_n",
        "box_head_dim", "croi_embed_dim", "croi_reg_dim", "num_negatives",
        "jitter_boxes_per_query", "roi_sampling_ratio",
    )  # fmt: skip
    for key in positive:
        if getattr(m, key) <= 0:
            raise UserError(f"model.{key}: must be positive, got {getattr(m, key)}")
    if m.crpn_conv_dim is not None and m.crpn_conv_dim <= 0:
        raise UserError(f"model.crpn_conv_dim: must be positive or null, got {m.crpn_conv_dim}")
    if not 0 < m.tau:
        raise UserError(f"model.tau: must be positive, got {m.tau}")
    for key in ("crpn_fg_iou", "crpn_bg_iou", "croi_fg_iou", "nms_thresh", "crpn_positive_fraction"):
        if not 0 < getattr(m, key) <= 1:
            raise UserError(f"model.{key}: must be in (0, 1], got {getattr(m, key)}")
    if m.crpn_bg_iou > m.crpn_fg_iou:
        raise UserError(
            f"model.crpn_bg_iou ({m.crpn_bg_iou}) must not exceed "
            f"model.crpn_fg_iou ({m.crpn_fg_iou})"
        )
    backbone = build_backbone(m.backbone, norm=m.norm, fpn_channels=m.fpn_channels)
    return PreDet(backbone=backbone, num_classes=num_classes, model=m, loss=cfg.loss)
