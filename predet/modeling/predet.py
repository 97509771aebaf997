"""PreDet (paper §3): classification + contrastive RPN + contrastive ROI head on a backbone + FPN.

Shape legend:
    N: images per batch, B = 2N views (view 1 of every image, then view 2), S: input side,
    Q: query slots per image, K: classes, E: box-head width, C: FPN channels, L = 5 levels,
    P: proposals per view (the CRPN's, or with it off the jittered boxes).

Both directions run in one pass: view b is the searched image and its queries are pooled from
view ``(b + N) % B`` (the same image's other view), so every detection loss averages the two
directions. A query slot counts only where ``query_mask`` is True; an image without valid
queries contributes to the classification loss only.

The parts, handed to ``PreDet`` by :func:`build_predet`: the backbone + FPN, ``ClsHead``
(``loss_cls``), the RoI pooler and box head (``b_q`` / ``b_p``), a proposer — ``ContrastiveRPN``
(``loss_crpn_cls``, ``loss_crpn_reg``, ``crpn_recall``) or, with ``loss.crpn`` off,
``JitterProposals`` — and ``ContrastiveROIHead`` (``loss_info``, ``loss_croi_reg``,
``lookup_top1``). Each returns its own unweighted losses; ``PreDet.forward`` weighs them in one
place (``LOSS_SWITCH``). The cls-only baseline is the same model without the detection parts
(``CLS_ONLY_SWITCHES``).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import NamedTuple, Union

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch import Tensor
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from predet.config import LossConfig, PretrainConfig, PretrainModelConfig
from predet.errors import UserError
from predet.modeling.backbone import build_backbone
from predet.modeling.cls_head import ClsHead
from predet.modeling.croi_head import ContrastiveROIHead
from predet.modeling.crpn import ContrastiveRPN, JitterProposals
from predet.modeling.roi_align import MultiScaleRoIAlign

__all__ = [
    "PreDet", "build_predet", "check_num_classes", "has_croi_head", "loss_weight", "LOSS_SWITCH",
    "CLS_ONLY_SWITCHES", "CLS_ONLY_OVERRIDES", "cls_only_config",
]  # fmt: skip

Proposer = Union[ContrastiveRPN, JitterProposals]

# Each loss term the parts return -> the ``loss.<switch>`` that turns it on and weighs it
# (``loss.<switch>_weight``).
LOSS_SWITCH = {
    "loss_cls": "cls",
    "loss_crpn_cls": "crpn",
    "loss_crpn_reg": "crpn",
    "loss_info": "info",
    "loss_croi_reg": "croi_reg",
}

# The cls-only baseline (paper Table 1's first row): the same backbone + FPN and classification
# head, trained on the classification loss alone; ``build_predet`` then builds no detection part.
CLS_ONLY_SWITCHES = {"cls": True, "crpn": False, "info": False, "croi_reg": False}
# the same as ``key=value`` overrides, for ``load_config`` and the command line
CLS_ONLY_OVERRIDES = tuple(f"loss.{s}={str(on).lower()}" for s, on in CLS_ONLY_SWITCHES.items())


def cls_only_config(cfg: PretrainConfig) -> PretrainConfig:
    """A copy of the pre-training config ``cfg`` with the cls-only baseline's loss switches."""
    out = copy.deepcopy(cfg)
    for switch, on in CLS_ONLY_SWITCHES.items():
        setattr(out.loss, switch, on)
    return out


def has_croi_head(loss: LossConfig) -> bool:
    """Whether a model of these loss switches holds the CROI head (``loss.info`` or
    ``loss.croi_reg`` on): the part that looks a query box up among the candidates."""
    return bool(loss.info or loss.croi_reg)


def loss_weight(loss: LossConfig, key: str) -> float:
    """The weight of loss ``key``: ``loss.<switch>_weight`` of its switch in ``LOSS_SWITCH``."""
    if key not in LOSS_SWITCH:
        raise ValueError(f"{key}: no loss switch owns it (losses: {', '.join(LOSS_SWITCH)})")
    return float(getattr(loss, f"{LOSS_SWITCH[key]}_weight"))


class TwoViews(NamedTuple):
    """One batch's views through the backbone, as both ``forward`` and ``lookup`` search them."""

    feats: "OrderedDict[str, Tensor]"  # {"0": P2, ..., "pool": P6}, each [B, C, Hl, Wl]
    size: tuple[int, int]  # (S, S), the views' size
    boxes: Tensor  # [B, Q, 4]: view b's own query boxes, in view b
    mask: Tensor  # [B, Q] bool: the valid query slots


class PreDet(nn.Module):
    """The pre-training model; ``forward(batch)`` returns weighted losses and detached metrics.

    Args:
        backbone: torchvision ``BackboneWithFPN`` (P2-P6, ``C`` channels).
        cls_head: the classification head.
        roi_pool, box_head: RoIAlign 7x7 by box size and the two-FC box head (``b_q``, ``b_p``);
            None for the cls-only baseline.
        proposer: ``ContrastiveRPN`` (with ``loss.crpn``), ``JitterProposals`` (CRPN off, CROI
            head on: paper Table 1) or None (cls-only).
        croi_head: ``ContrastiveROIHead`` (with ``loss.info`` or ``loss.croi_reg``) or None.
        loss: the ``loss`` config section (switches and weights); the parts must be those its
            switches call for (a ValueError otherwise, see :func:`build_predet`).
    """

    def __init__(
        self,
        *,
        backbone: BackboneWithFPN,
        cls_head: ClsHead,
        roi_pool: MultiScaleRoIAlign | None,
        box_head: TwoMLPHead | None,
        proposer: Proposer | None,
        croi_head: ContrastiveROIHead | None,
        loss: LossConfig,
    ) -> None:
        super().__init__()
        # a plain dataclass: no OmegaConf look-ups in the hot path, picklable, copyable
        self.loss_cfg: LossConfig = OmegaConf.to_object(OmegaConf.structured(loss))
        _check_parts(self.loss_cfg, roi_pool, box_head, proposer, croi_head)
        # registered in this order (the parameters' order, and so the optimizer's and the
        # gradient norm's); the proposer under the name its checkpoint keys carry (``crpn.*``)
        self.backbone, self.cls_head = backbone, cls_head
        self.roi_pool, self.box_head = roi_pool, box_head
        self.crpn = proposer if isinstance(proposer, ContrastiveRPN) else None
        self.jitter = proposer if isinstance(proposer, JitterProposals) else None
        self.croi_head = croi_head

    @property
    def proposer(self) -> Proposer | None:
        """The CRPN, or with it off the jittered boxes; None for the cls-only baseline."""
        return self.crpn if self.crpn is not None else self.jitter

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
        v = self._two_views(batch)
        losses: dict[str, Tensor] = {}
        metrics = {"valid_queries": batch["query_mask"].sum().detach().float() / N}
        if self.loss_cfg.cls:
            labels = batch["labels"].repeat(2, 1)  # [N, K] -> [B, K], both views share labels
            losses["loss_cls"] = self.cls_head.loss(self.cls_head(v.feats), labels)  # [L, B, K]
        has_queries = batch.get("has_queries")  # set on the host by the loop: no device wait
        if has_queries is None:
            has_queries = bool(v.mask.any())  # waits for the device (issue 11)
        if self.proposer is not None and has_queries:
            b_own, b_q = self._query_features(v)  # [B, Q, E] each
            proposals, valid, part_losses, part_metrics = self.proposer(
                list(v.feats.values()), b_q, v.boxes, v.mask, v.size
            )  # [B, P, 4], [B, P]
            losses.update(part_losses)
            metrics.update(part_metrics)
            if self.croi_head is not None:
                part_losses, part_metrics = self.croi_head(
                    query_features=b_q, query_boxes=v.boxes, query_mask=v.mask,
                    query_box_features=b_own, proposals=proposals, proposal_valid=valid,
                    proposal_features=self._box_features(v.feats, proposals, v.size),
                )  # fmt: skip
                losses.update(part_losses)
                metrics.update(part_metrics)
        weighted = {k: loss_weight(self.loss_cfg, k) * t for k, t in losses.items()}
        return {**weighted, **{k: t.detach() for k, t in metrics.items()}}

    @torch.no_grad()
    def lookup(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The query-box lookup without the losses, for pictures and accuracy
        (``predet analyze lookup``): in both directions, as ``forward`` runs it.

        Returns ``boxes [B, Q, 4]`` (each view's own query boxes: the targets in the searched view
        b of the queries pooled from view ``(b + N) % B``), ``mask [B, Q]``, the searched views'
        ``proposals [B, P, 4]`` with ``valid [B, P]`` (the CRPN's, or with it off the jittered
        boxes), and ``sim [B, Q, P]``, the CROI head's cosine similarity of each query to each
        proposal (the query boxes, which the CROI head appends in training, are left out: what
        is found, not what is given).
        """
        if self.croi_head is None or self.proposer is None:
            raise ValueError("lookup needs the CROI head (loss.info or loss.croi_reg on)")
        v = self._two_views(batch)
        _, b_q = self._query_features(v)
        features = list(v.feats.values())
        proposals, valid = self.proposer.propose(features, b_q, v.boxes, v.mask, v.size)
        sim = self.croi_head.similarity(b_q, self._box_features(v.feats, proposals, v.size))
        return {
            "boxes": v.boxes, "mask": v.mask, "proposals": proposals, "valid": valid, "sim": sim
        }

    def _two_views(self, batch: dict[str, Tensor]) -> TwoViews:
        """Both views of every image through the backbone in one batch, with their query boxes."""
        views = torch.cat([batch["view1"], batch["view2"]])  # 2 x [N, 3, S, S] -> [B, 3, S, S]
        return TwoViews(
            feats=self.backbone(views),
            size=tuple(views.shape[-2:]),
            boxes=torch.cat([batch["boxes1"], batch["boxes2"]]).float(),  # [B, Q, 4] in view b
            mask=batch["query_mask"].repeat(2, 1),  # [N, Q] -> [B, Q]
        )

    def _query_features(self, v: TwoViews) -> tuple[Tensor, Tensor]:
        """``b_own [B, Q, E]``: view b's query boxes pooled on view b (the boxes the searched view
        must find); ``b_q [B, Q, E]``: row b holds the queries of view ``(b + N) % B``, the same
        boxes pooled on the image's other view (what is searched for)."""
        b_own = self._box_features(v.feats, v.boxes, v.size)
        return b_own, b_own.roll(v.boxes.shape[0] // 2, dims=0)

    def _box_features(self, feats: "OrderedDict[str, Tensor]", boxes: Tensor, size) -> Tensor:
        """RoIAlign 7x7 at each box's FPN level, then fc6/fc7: ``[B, n, 4]`` -> ``[B, n, E]``."""
        B, n = boxes.shape[:2]
        rois = self.roi_pool(feats, list(boxes.unbind(0)), [size] * B)  # [B*n, C, 7, 7]
        return self.box_head(rois).view(B, n, -1)  # [B*n, E] -> [B, n, E]


def _check_parts(
    loss: LossConfig,
    roi_pool: nn.Module | None,
    box_head: nn.Module | None,
    proposer: nn.Module | None,
    croi_head: ContrastiveROIHead | None,
) -> None:
    """The parts handed to ``PreDet`` are those its loss switches call for (ValueError if not)."""
    use_croi = has_croi_head(loss)
    is_crpn = isinstance(proposer, ContrastiveRPN)
    wanted = {  # part: (given, needed, when it is needed)
        "croi_head": (croi_head is not None, use_croi, "loss.info or loss.croi_reg"),
        "a ContrastiveRPN proposer": (is_crpn, bool(loss.crpn), "loss.crpn"),
        "a proposer": (proposer is not None, bool(loss.crpn) or use_croi, "a detection loss"),
        "roi_pool": (roi_pool is not None, proposer is not None, "a proposer"),
        "box_head": (box_head is not None, proposer is not None, "a proposer"),
    }
    for part, (given, needed, when) in wanted.items():
        if given and not needed:
            raise ValueError(f"PreDet: {part} given, but only {when} calls for it")
        if needed and not given:
            raise ValueError(f"PreDet: {part} missing ({when} calls for it)")
    switches = (bool(loss.info), bool(loss.croi_reg))
    if croi_head is not None and (croi_head.use_info, croi_head.use_reg) != switches:
        raise ValueError("PreDet: croi_head's (info, reg) are not (loss.info, loss.croi_reg)")


def check_num_classes(model: PretrainModelConfig, num_classes: int) -> None:
    """``model.num_classes``, when set, must be the data's number of classes."""
    if model.num_classes is not None and model.num_classes != num_classes:
        raise UserError(
            f"model.num_classes: {model.num_classes} given, but the data has {num_classes} classes"
        )


def build_predet(cfg: PretrainConfig, num_classes: int) -> PreDet:
    """The PreDet model of a pre-training config (its values checked by ``load_config``):
    the parts its loss switches call for (the cls-only baseline holds no detection part);
    ``num_classes`` comes from the data's vocabulary.

    The parts are built in a fixed order (backbone, classification head, box head, proposer, CROI
    head): each draws its initial weights from the global RNG in turn.
    """
    check_num_classes(cfg.model, num_classes)
    # plain dataclasses: no OmegaConf look-ups in the hot path, picklable, copyable
    m: PretrainModelConfig = OmegaConf.to_object(OmegaConf.structured(cfg.model))
    loss: LossConfig = OmegaConf.to_object(OmegaConf.structured(cfg.loss))
    use_croi = has_croi_head(loss)
    backbone = build_backbone(m.backbone, norm=m.norm, fpn_channels=m.fpn_channels)
    C, E = backbone.out_channels, m.box_head_dim
    cls_head = ClsHead(in_channels=C, num_classes=num_classes, loss=m.cls.loss)
    roi_pool = box_head = proposer = croi_head = None
    if loss.crpn or use_croi:
        roi_pool = MultiScaleRoIAlign(
            ["0", "1", "2", "3"], output_size=7, sampling_ratio=m.roi_sampling_ratio,
            canonical_scale=m.roi_canonical_scale,
        )  # fmt: skip
        box_head = TwoMLPHead(C * 7 * 7, E)  # fc6, fc7
    if loss.crpn:
        proposer = ContrastiveRPN(in_channels=C, query_dim=E, cfg=m.crpn)
    elif use_croi:  # paper Table 1, CRPN off
        proposer = JitterProposals(boxes_per_query=m.jitter.boxes_per_query)
    if use_croi:
        croi_head = ContrastiveROIHead(in_dim=E, cfg=m.croi, info=loss.info, reg=loss.croi_reg)
    return PreDet(
        backbone=backbone, cls_head=cls_head, roi_pool=roi_pool, box_head=box_head,
        proposer=proposer, croi_head=croi_head, loss=loss,
    )  # fmt: skip
