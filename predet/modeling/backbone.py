"""ResNet / ResNeXt + FPN backbones, built from torchvision, named like torchvision's detectors.

Shape legend:
    B: views in the batch (2N for N images), S: input side,
    C: FPN channels, L = 5 FPN levels P2..P6 with strides 4, 8, 16, 32, 64.

``build_backbone`` returns a torchvision ``BackboneWithFPN`` whose state-dict keys are ``body.*``
(the ResNet trunk without ``fc``/``avgpool``) and ``fpn.*`` (FPN on layers 1-4 with a
``LastLevelMaxPool`` P6). For ``resnet50`` with C=256 and ``norm="bn"`` its state dict loads with
``strict=True`` into ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone``.
Forward: ``views [B, 3, S, S] -> OrderedDict {"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}``,
each ``[B, C, S/stride, S/stride]`` (rounded up).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch.nn as nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from predet.errors import UserError

__all__ = ["BACKBONES", "NORMS", "build_backbone", "build_resnet"]

# name -> (block, layers, groups, width_per_group); the torchvision ResNet class builds all of them
BACKBONES: dict[str, tuple[type[nn.Module], list[int], int, int]] = {
    "resnet18": (resnet.BasicBlock, [2, 2, 2, 2], 1, 64),
    "resnet34": (resnet.BasicBlock, [3, 4, 6, 3], 1, 64),
    "resnet50": (resnet.Bottleneck, [3, 4, 6, 3], 1, 64),
    "resnet101": (resnet.Bottleneck, [3, 4, 23, 3], 1, 64),
    "resnext50_32x4d": (resnet.Bottleneck, [3, 4, 6, 3], 32, 4),
    "resnext101_32x8d": (resnet.Bottleneck, [3, 4, 23, 3], 32, 8),  # the paper's default
    "resnext101_32x16d": (resnet.Bottleneck, [3, 4, 23, 3], 32, 16),  # not in torchvision's zoo
}
NORMS = ("bn", "syncbn", "gn", "frozenbn")


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm in ("bn", "syncbn"):  # syncbn: converted after construction (needs real BN modules)
        return nn.BatchNorm2d
    if norm == "frozenbn":
        return FrozenBatchNorm2d
    if norm == "gn":
        return partial(nn.GroupNorm, 32)  # 32 groups (Wu & He 2018); every ResNet width divides
    raise UserError(f"model.norm: unknown norm '{norm}' (choose from {', '.join(NORMS)})")


def build_resnet(name: str, *, norm: str = "bn") -> resnet.ResNet:
    """A randomly initialised torchvision ``ResNet`` for ``name`` (see ``BACKBONES``)."""
    if name not in BACKBONES:
        raise UserError(
            f"model.backbone: unknown backbone '{name}' (choose from {', '.join(BACKBONES)})"
        )
    block, layers, groups, width = BACKBONES[name]
    return resnet.ResNet(
        block, layers, groups=groups, width_per_group=width, norm_layer=_norm_layer(norm)
    )


def build_backbone(name: str, *, norm: str = "bn", fpn_channels: int = 256) -> BackboneWithFPN:
    """ResNet(``name``) + FPN on layers 1-4 + max-pool P6, all layers trainable.

    Args:
        name: one of ``BACKBONES``.
        norm: ``bn`` | ``syncbn`` (``nn.SyncBatchNorm``; needs a process group when training) |
            ``gn`` (GroupNorm, 32 groups) | ``frozenbn`` (``torchvision.ops.FrozenBatchNorm2d``).
        fpn_channels: C, the FPN width.
    """
    if fpn_channels <= 0:
        raise UserError(f"model.fpn_channels: must be positive, got {fpn_channels}")
    body = build_resnet(name, norm=norm)
    # stage widths: 64, 128, 256, 512 times the block expansion (1 basic, 4 bottleneck)
    expansion = body.layer4[-1].expansion
    in_channels_list = [64 * expansion * 2**i for i in range(4)]
    return_layers = {f"layer{i + 1}": str(i) for i in range(4)}
    backbone = BackboneWithFPN(
        body,
        return_layers=return_layers,
        in_channels_list=in_channels_list,
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    if norm == "syncbn":
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    return backbone
