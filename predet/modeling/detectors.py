"""torchvision detectors on ResNet/ResNeXt + FPN of any depth, and loading ``--init`` into them.

``build_detector(cfg, classes)`` builds ``mask_rcnn`` / ``faster_rcnn`` (FPN on C2..C5 + max-pool
P6, as ``maskrcnn_resnet50_fpn``) or ``retinanet`` (FPN on C3..C5 + P6/P7, as
``retinanet_resnet50_fpn``), with the backbone's norm layers chosen by ``model.norm``:
``frozenbn`` (torchvision's FrozenBatchNorm2d), ``bn``, ``syncbn`` (BN converted to SyncBN once
DDP is up) or ``gn`` (GroupNorm, 32 groups).

``load_init(model, init)`` fills the backbone (``body.*`` + ``fpn.*``) from:

- a ``predet export --format torchvision`` file (keys ``body.*``, ``fpn.*``, optionally the box
  head's ``fc6.*``/``fc7.*``), or a whole torchvision detector's state dict (``backbone.*``);
- a plain torchvision ResNet/ResNeXt state dict (``conv1.weight``, ``layer1.*``, ``fc.*``);
- ``scratch``: nothing.

For RetinaNet the export's FPN blocks for C2..C5 (``inner_blocks.0..3``) map to RetinaNet's C3..C5
blocks by shifting the index (``1..3 -> 0..2``); the C2 blocks and RetinaNet's P6/P7 convs are
reported as unused / not loaded. Every tensor is accounted for in the returned :class:`InitReport`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from predet.errors import UserError
from predet.modeling.backbone import build_backbone
from predet.modeling.roi_align import MultiScaleRoIAlign
from predet.utils import load_checkpoint

__all__ = ["ARCHS", "InitReport", "build_detector", "load_init", "read_init", "init_widths"]

ARCHS = ("mask_rcnn", "faster_rcnn", "retinanet")


def build_detector(cfg, classes: Sequence[str], *, for_test: bool = False) -> nn.Module:
    """A torchvision detector for ``cfg.model`` (a :class:`~predet.config.FinetuneConfig`).

    Labels are ``1..len(classes)`` (0 is the background). Training resizes the shortest side to a
    size drawn from ``model.train_sizes`` (torchvision's ``GeneralizedRCNNTransform``); with
    ``for_test`` it is ``model.test_size``.
    """
    m = cfg.model  # values checked by load_config
    # SyncBN: the fine-tuning engine converts BN once the process group is up (CUDA only)
    norm = "bn" if m.norm == "syncbn" else m.norm
    backbone = build_backbone(m.backbone, norm=norm, fpn_channels=m.fpn_channels or 256,
                              trainable_layers=m.trainable_layers,
                              retinanet_levels=m.arch == "retinanet")  # fmt: skip
    min_size = (m.test_size,) if for_test else tuple(m.train_sizes)
    num_classes = len(classes) + 1
    common = dict(min_size=min_size, max_size=m.max_size, detections_per_img=m.detections_per_img)
    sizes = m.anchor_sizes
    if m.arch == "retinanet":
        base = sizes or [32, 64, 128, 256, 512]
        anchors = AnchorGenerator(
            tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in base), ((0.5, 1.0, 2.0),) * 5
        )  # 3 scales x 3 ratios per level, as retinanet_resnet50_fpn
        model = RetinaNet(backbone, num_classes, anchor_generator=anchors, score_thresh=m.score_thresh, **common)
        model.head.register_forward_hook(_float32_outputs)
        return model
    anchors = None
    if sizes is not None:
        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * 5)
    box_dim = m.box_head_dim or 1024
    rcnn_args = dict(
        # torchvision's poolers (P2-P5, 7x7 / 14x14, sampling ratio 2), separable on small CPU maps
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2,
                                        canonical_scale=m.roi_canonical_scale),
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, box_dim),  # on 7x7 RoIAlign features
        box_predictor=FastRCNNPredictor(box_dim, num_classes),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=m.proposals_train,
        rpn_post_nms_top_n_train=m.proposals_train,
        rpn_pre_nms_top_n_test=m.proposals_test,
        rpn_post_nms_top_n_test=m.proposals_test,
        box_batch_size_per_image=m.roi_batch_size_per_image,
        box_score_thresh=m.score_thresh,
        box_detections_per_img=m.detections_per_img,
        min_size=min_size,
        max_size=m.max_size,
    )
    if m.arch == "faster_rcnn":
        model = FasterRCNN(backbone, None, **rcnn_args)
    else:
        dim = m.mask_head_dim  # the heads of maskrcnn_resnet50_fpn, with a configurable width
        mask_head = MaskRCNNHeads(backbone.out_channels, [dim] * 4, dilation=1)
        mask_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=2,
                                       canonical_scale=m.roi_canonical_scale)
        model = MaskRCNN(backbone, None, mask_roi_pool=mask_pool, mask_head=mask_head,
                         mask_predictor=MaskRCNNPredictor(dim, dim, num_classes), **rcnn_args)  # fmt: skip
    model.rpn.head.register_forward_hook(_float32_outputs)
    model.roi_heads.box_predictor.register_forward_hook(_float32_outputs)
    return model


def _float32_outputs(module: nn.Module, args, output):
    """Forward hook: a head's outputs in float32. torchvision's ``BoxCoder.decode`` casts the
    anchors / proposals to the dtype of the predicted deltas, so under bf16 autocast every box
    came out in bf16 (8 significant bits: coordinates in 512..1024 px rounded to multiples of 4,
    box AP lost at evaluation, proposals moved in training); detectron2 decodes in float32 the
    same way (``Box2BoxTransform.apply_deltas``). A no-op without autocast."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, dict):
        return {k: _float32_outputs(module, args, v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return type(output)(_float32_outputs(module, args, v) for v in output)
    return output


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------
@dataclass
class InitReport:
    """What ``--init`` put into the model.

    ``loaded``/``missing``: the model's backbone (+ box head) tensors filled / left as initialised;
    ``unused``: the file's tensors that went nowhere (e.g. a ResNet's ``fc.*``).
    """

    name: str
    path: str | None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    named: bool = False  # the name was given (config ``name``), not taken from the file's stem

    def to_dict(self) -> dict:
        return {"init": self.name, "path": self.path, "named": self.named, "loaded": self.loaded,
                "missing": self.missing, "unused": self.unused}  # fmt: skip

    def summary(self) -> str:
        return (f"init '{self.name}': loaded {len(self.loaded)} tensors, not loaded {len(self.missing)}, "
                f"unused from the file {len(self.unused)}")  # fmt: skip


_RESNET_KEY = re.compile(r"^(conv1|bn1|layer[1-4])\.")  # a plain ResNet (its fc.* stays unused)
_FPN_BLOCK = re.compile(r"^fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(.*)$")


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a file's keys onto ``body.*`` / ``fpn.*`` / ``fc6.*`` / ``fc7.*`` names."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        key = re.sub(r"^roi_heads\.box_head\.", "", key)
        if _RESNET_KEY.match(key):
            key = "body." + key
        out[key] = value
    return out


def _shift_fpn(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Re-index an FPN exported on C2..C5 for a target FPN on the top ``num_levels`` of them."""
    blocks = [int(m.group(2)) for k in state if (m := _FPN_BLOCK.match(k))]
    if not blocks:
        return state
    shift = max(blocks) + 1 - num_levels
    if shift <= 0:
        return state
    out = {}
    for key, value in state.items():
        m = _FPN_BLOCK.match(key)
        if m and int(m.group(2)) >= shift:
            key = f"fpn.{m.group(1)}.{int(m.group(2)) - shift}.{m.group(3)}"
        elif m:  # a block of a level the target has no FPN input for (C2 for RetinaNet)
            key = f"unused.{key}"
        out[key] = value
    return out


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    obj = load_checkpoint(path)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"--init {path}: not a state dict of tensors")
    return obj


def read_init(init: str | Path) -> dict[str, torch.Tensor]:
    """The init file's tensors under ``body.*``/``fpn.*``/``fc6.*``/``fc7.*`` names.

    ``predet export --box-head`` writes the box head beside the backbone file as
    ``<stem>_box_head<suffix>``; when that file exists it is read too.
    """
    from predet.export import read_sidecar  # export imports no model code: no cycle

    path = Path(init)
    state = _read_state(path)
    head = path.with_name(f"{path.stem}_box_head{path.suffix}")
    meta = read_sidecar(path) if head.is_file() else None
    # a head file the export's metadata does not name is another export's: left alone
    if head.is_file() and (meta is None or meta.get("box_head") is not None):
        state = {**state, **_read_state(head)}
    return _normalise_keys(state)


def init_widths(init: str) -> dict[str, int]:
    """``fpn_channels`` / ``box_head_dim`` of an init file (those it has), for ``model.* = None``."""
    if init == "scratch":
        return {}
    state = read_init(init)
    out = {}
    if "fpn.inner_blocks.0.0.weight" in state:
        out["fpn_channels"] = int(state["fpn.inner_blocks.0.0.weight"].shape[0])
    if "fc6.weight" in state:
        out["box_head_dim"] = int(state["fc6.weight"].shape[0])
    return out


def load_init(model: nn.Module, init: str, *, name: str | None = None) -> InitReport:
    """Load ``init`` (a file or ``scratch``) into ``model.backbone`` (and the box head's fc6/fc7).

    A backbone/FPN tensor whose shape differs from the model's is a :class:`UserError` naming it
    (usually a ``model.backbone`` that is not the file's depth); a box head of another width than
    ``model.box_head_dim`` is left out (listed as unused).
    """
    targets: dict[str, torch.Tensor] = dict(model.backbone.state_dict())
    box_head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    if box_head is not None:
        targets.update(box_head.state_dict())  # fc6.*, fc7.* (TwoMLPHead)
    if init == "scratch":
        return InitReport(name=name or "scratch", path=None, missing=sorted(model.backbone.state_dict()),
                          named=bool(name))  # fmt: skip
    path = Path(init)
    state = read_init(path)
    num_levels = len(model.backbone.fpn.inner_blocks)
    state = _shift_fpn(state, num_levels)
    _check_norm_kind(state, targets, path)
    report = InitReport(name=name or path.stem, path=str(path), named=bool(name))
    with torch.no_grad():
        for key, value in state.items():
            if key not in targets:
                if not key.endswith("num_batches_tracked"):  # BN's counter; FrozenBN/GN have none
                    report.unused.append(key.removeprefix("unused."))
                continue
            if targets[key].shape != value.shape and key.startswith(("fc6.", "fc7.")):
                report.unused.append(key)  # a box head of another width (model.box_head_dim) is optional
                continue
            if targets[key].shape != value.shape:
                raise UserError(
                    f"--init {path}: tensor '{key}' has shape {tuple(value.shape)} but the model's is "
                    f"{tuple(targets[key].shape)} (do model.backbone / fpn_channels / box_head_dim match it?)"
                )
            targets[key].copy_(value)  # state_dict() tensors share storage with the parameters
            report.loaded.append(key)
    backbone_keys = model.backbone.state_dict().keys()
    if not any(k in backbone_keys for k in report.loaded):  # e.g. a --box-head export given as --init
        raise UserError(
            f"--init {path}: none of its {len(state)} tensors is a backbone or FPN tensor of the model "
            f"(first: {next(iter(state), '-')}); expected a `predet export --format torchvision` backbone "
            "file or a ResNet state dict"
        )
    report.missing = sorted(k for k in backbone_keys if k not in set(report.loaded))
    _check_body_depth(report, path)
    report.loaded.sort()
    report.unused.sort()
    return report


def _check_norm_kind(state: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], path: Path) -> None:
    """A BatchNorm file for a GroupNorm model or the reverse is a :class:`UserError` (the affine
    weights have the same names and shapes: BN's would land in GN, or a frozen BN would keep
    mean 0 / var 1 and never normalise). The same rule as ``check_init_sidecar``, read from the
    tensors, so that it holds for a file without ``F.json`` (a ResNet, a copied export)."""
    for key in state:
        if key.startswith("body.") and key.endswith(".running_mean"):
            weight = key.removesuffix("running_mean") + "weight"
            if key not in targets and weight in targets:
                raise UserError(f"--init {path}: BatchNorm statistics ('{key}') for a GroupNorm model "
                                "(model.norm=gn): use model.norm=frozenbn, bn or syncbn")  # fmt: skip
    for key in targets:
        if key.startswith("body.") and key.endswith(".running_mean") and key not in state:
            weight = key.removesuffix("running_mean") + "weight"
            if weight in state:
                raise UserError(f"--init {path}: '{weight}' has no BatchNorm statistics (a GroupNorm "
                                "backbone?) for a BatchNorm model: use model.norm=gn")  # fmt: skip


def _check_body_depth(report: InitReport, path: Path) -> None:
    """A ResNet body of another depth of the same widths (R18 / R34, R50 / R101 / R152) matches
    every shared tensor: a :class:`UserError` instead of a half-random body or a half-used file."""
    loaded_body = [k for k in report.loaded if k.startswith("body.")]
    if not loaded_body:
        return  # an FPN-only or head-only file: nothing to compare
    # BN's step counters are not weights (a frozen-BN file has none)
    missing = [k for k in report.missing if k.startswith("body.") and not k.endswith("num_batches_tracked")]
    unused = [k for k in report.unused if k.startswith("body.")]
    if missing or unused:
        def blocks(keys: list[str]) -> str:
            return ", ".join(sorted({".".join(k.split(".")[1:3]) for k in keys})[:4])

        raise UserError(
            f"--init {path}: its ResNet body is not the model's (model.backbone of another depth?): "
            + "; ".join(x for x in (
                f"{len(missing)} body tensors of the model are not in the file ({blocks(missing)}...)" if missing else "",
                f"{len(unused)} of the file are not in the model ({blocks(unused)}...)" if unused else "",
            ) if x)  # fmt: skip
        )
