"""PreDet (paper §3): classification + contrastive RPN + contrastive ROI head on a backbone + FPN.

Shape legend:
    N: images per batch, B = 2N views (view 1 of every image, then view 2), S: input side,
    Q: query slots per image, K: classes, E: box-head width, C: FPN channels, L = 5 levels,
    P: CRPN proposals per view, P' = P + Q: CROI candidates per view (the queries appended).

Both directions run in one pass: view b is the searched image and its queries are pooled from
view ``(b + N) % B`` (the same image's other view), so every detection loss averages the two
directions. A query slot counts only where ``query_mask`` is True; an image without valid
queries contributes to the classification loss only.

The parts: ``ClsHead`` (``loss_cls``), ``ContrastiveRPN`` (``loss_crpn_cls``, ``loss_crpn_reg``,
``crpn_recall``) or, with ``loss.crpn`` off, ``JitterProposals``, and ``ContrastiveROIHead``
(``loss_info``, ``loss_croi_reg``, ``lookup_top1``). Each returns its own unweighted losses;
``PreDet.forward`` applies the ``loss.*_weight`` in one place.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch import Tensor
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from predet.config import LOSS_SWITCHES, LossConfig, PretrainConfig, PretrainModelConfig
from predet.errors import UserError
from predet.modeling.backbone import build_backbone
from predet.modeling.cls_head import ClsHead
from predet.modeling.croi_head import ContrastiveROIHead
from predet.modeling.crpn import ContrastiveRPN, JitterProposals
from predet.modeling.roi_align import MultiScaleRoIAlign

__all__ = ["PreDet", "build_predet", "check_num_classes", "has_croi_head", "loss_weight"]


def has_croi_head(loss: LossConfig) -> bool:
    """Whether a model of these loss switches holds the CROI head (``loss.info`` or
    ``loss.croi_reg`` on): the part that looks a query box up among the candidates."""
    return bool(loss.info or loss.croi_reg)


def loss_weight(loss: LossConfig, key: str) -> float:
    """The weight of loss ``key``: ``loss.<switch>_weight`` of the switch that owns it, i.e. the
    longest switch ``s`` with ``key == f"loss_{s}"`` or ``key.startswith(f"loss_{s}_")``."""
    name = key.removeprefix("loss_")
    owners = [s for s in LOSS_SWITCHES if name == s or name.startswith(s + "_")]
    if not owners:
        raise ValueError(f"{key}: no loss switch owns it (loss switches: {LOSS_SWITCHES})")
    return float(getattr(loss, f"{max(owners, key=len)}_weight"))


class PreDet(nn.Module):
    """The pre-training model; ``forward(batch)`` returns weighted losses and detached metrics.

    Args:
        backbone: torchvision ``BackboneWithFPN`` (P2-P6, ``C`` channels).
        num_classes: K.
        model: the ``model`` config section.
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
        m: PretrainModelConfig = OmegaConf.to_object(OmegaConf.structured(model))
        self.loss_cfg: LossConfig = OmegaConf.to_object(OmegaConf.structured(loss))
        use_croi = has_croi_head(self.loss_cfg)
        C, E = backbone.out_channels, m.box_head_dim
        self.backbone = backbone
        self.cls_head = ClsHead(in_channels=C, num_classes=num_classes, loss=m.cls.loss)
        self.box_head: TwoMLPHead | None = None
        self.crpn: ContrastiveRPN | None = None
        self.jitter: JitterProposals | None = None
        self.croi_head: ContrastiveROIHead | None = None
        if self.loss_cfg.crpn or use_croi:  # the cls-only baseline holds no detection modules
            self.roi_pool = MultiScaleRoIAlign(
                ["0", "1", "2", "3"], output_size=7, sampling_ratio=m.roi_sampling_ratio,
                canonical_scale=m.roi_canonical_scale,
            )  # fmt: skip
            self.box_head = TwoMLPHead(C * 7 * 7, E)  # fc6, fc7
        if self.loss_cfg.crpn:
            self.crpn = ContrastiveRPN(in_channels=C, query_dim=E, cfg=m.crpn)
        elif use_croi:  # paper Table 1, CRPN off
            self.jitter = JitterProposals(boxes_per_query=m.jitter.boxes_per_query)
        if use_croi:
            self.croi_head = ContrastiveROIHead(
                in_dim=E, cfg=m.croi, info=self.loss_cfg.info, reg=self.loss_cfg.croi_reg
            )

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``batch``: the collated two-view batch (``view1``/``view2`` ``[N, 3, S, S]``,
        ``boxes1``/``boxes2`` ``[N, Q, 4]``, ``query_mask [N, Q]``, ``labels [N, K]``; optional
        ``has_queries``, the Python bool ``query_mask.any()`` read on the host before the batch
        went to the device, so that the forward never waits for it).

        Returns the switched-on losses among ``loss_cls``, ``loss_crpn_cls``, ``loss_crpn_reg``,
        ``loss_info``, ``loss_croi_reg`` (weighted) and the metrics ``valid_queries`` (mean per
        image), ``crpn_recall`` (with the CRPN on) and ``lookup_top1`` (with the CROI head on);
        the detection terms are absent when the batch holds no valid query.
        """
        N = batch["view1"].shape[0]
        views = torch.cat([batch["view1"], batch["view2"]])  # [B, 3, S, S]
        feats = self.backbone(views)  # {"0": P2, ..., "pool": P6}, [B, C, Hl, Wl]
        size = tuple(views.shape[-2:])
        losses: dict[str, Tensor] = {}
        metrics = {"valid_queries": batch["query_mask"].sum().detach().float() / N}
        if self.loss_cfg.cls:
            labels = batch["labels"].repeat(2, 1)  # [N, K] -> [B, K], both views share labels
            losses["loss_cls"] = self.cls_head.loss(self.cls_head(feats), labels)  # [L, B, K]
        mask = batch["query_mask"].repeat(2, 1)  # [N, Q] -> [B, Q]
        propose = self.crpn if self.crpn is not None else self.jitter
        has_queries = batch.get("has_queries")  # set on the host by the loop: no device wait
        if has_queries is None:
            has_queries = bool(mask.any())  # waits for the device (issue 11)
        if propose is not None and has_queries:
            boxes = torch.cat([batch["boxes1"], batch["boxes2"]]).float()  # [B, Q, 4] in view b
            b_own = self._box_features(feats, boxes, size)  # [B, Q, E], view b's boxes on view b
            b_q = b_own.roll(N, dims=0)  # [B, Q, E]: row b holds the queries of view (b + N) % B
            proposals, valid, part_losses, part_metrics = propose(
                list(feats.values()), b_q, boxes, mask, size
            )  # [B, P, 4], [B, P]
            losses.update(part_losses)
            metrics.update(part_metrics)
            if self.croi_head is not None:
                candidates = torch.cat([proposals, boxes], dim=1)  # [B, P', 4], queries appended
                cand_valid = torch.cat([valid, mask], dim=1)  # [B, P']
                # the appended boxes are view b's own queries, already pooled on view b
                b_p = torch.cat([self._box_features(feats, proposals, size), b_own], dim=1)
                part_losses, part_metrics = self.croi_head(
                    b_q, b_p, candidates, cand_valid, boxes, mask
                )
                losses.update(part_losses)
                metrics.update(part_metrics)
        weighted = {k: loss_weight(self.loss_cfg, k) * v for k, v in losses.items()}
        return {**weighted, **{k: v.detach() for k, v in metrics.items()}}

    @torch.no_grad()
    def lookup(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The query-box lookup without the losses, for pictures and accuracy
        (``predet analyze lookup``): in both directions, as ``forward`` runs it.

        Returns ``boxes [B, Q, 4]`` (each view's own query boxes: the targets in the searched view
        b of the queries pooled from view ``(b + N) % B``), ``mask [B, Q]``, the searched views'
        ``proposals [B, P, 4]`` with ``valid [B, P]`` (the CRPN's, or with it off the jittered
        boxes), and ``sim [B, Q, P]``, the CROI head's cosine similarity of each query to each
        proposal (the appended query boxes are left out: what is found, not what is given).
        """
        if self.croi_head is None:
            raise ValueError("lookup needs the CROI head (loss.info or loss.croi_reg on)")
        N = batch["view1"].shape[0]
        views = torch.cat([batch["view1"], batch["view2"]])
        feats = self.backbone(views)
        size = tuple(views.shape[-2:])
        boxes = torch.cat([batch["boxes1"], batch["boxes2"]]).float()
        mask = batch["query_mask"].repeat(2, 1)
        b_q = self._box_features(feats, boxes, size).roll(N, dims=0)
        if self.crpn is not None:
            proposals, valid = self.crpn.propose(list(feats.values()), b_q, mask, size)
        else:
            proposals, valid, _, _ = self.jitter(list(feats.values()), b_q, boxes, mask, size)
        sim = self.croi_head.similarity(b_q, self._box_features(feats, proposals, size))
        return {"boxes": boxes, "mask": mask, "proposals": proposals, "valid": valid, "sim": sim}

    def _box_features(self, feats: "OrderedDict[str, Tensor]", boxes: Tensor, size) -> Tensor:
        """RoIAlign 7x7 at each box's FPN level, then fc6/fc7: ``[B, n, 4]`` -> ``[B, n, E]``."""
        B, n = boxes.shape[:2]
        rois = self.roi_pool(feats, list(boxes.unbind(0)), [size] * B)  # [B*n, C, 7, 7]
        return self.box_head(rois).view(B, n, -1)  # [B*n, E] -> [B, n, E]


def check_num_classes(model: PretrainModelConfig, num_classes: int) -> None:
    """``model.num_classes``, when set, must be the data's number of classes."""
    if model.num_classes is not None and model.num_classes != num_classes:
        raise UserError(
            f"model.num_classes: {model.num_classes} given, but the data has {num_classes} classes"
        )


def build_predet(cfg: PretrainConfig, num_classes: int) -> PreDet:
    """The PreDet model of a pre-training config (its values checked by ``load_config``);
    ``num_classes`` comes from the data's vocabulary."""
    m = cfg.model
    check_num_classes(m, num_classes)
    backbone = build_backbone(m.backbone, norm=m.norm, fpn_channels=m.fpn_channels)
    return PreDet(backbone=backbone, num_classes=num_classes, model=m, loss=cfg.loss)
