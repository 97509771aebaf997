"""ResNet / ResNeXt + FPN backbones, built from torchvision, named like torchvision's detectors.

Shape legend:
    B: views or images in the batch, S: input side,
    C: FPN channels, L = 5 FPN levels P2..P6 with strides 4, 8, 16, 32, 64 (P3..P7 for RetinaNet).

The one backbone builder of the package: pre-training (``PreDet``) and fine-tuning
(``predet.modeling.detectors``) both call ``build_backbone``, so the exported ``body.*`` /
``fpn.*`` names come from this single function. It returns a torchvision ``BackboneWithFPN``
whose state-dict keys are ``body.*`` (the ResNet trunk without ``fc``/``avgpool``) and ``fpn.*``
(FPN on layers 1-4 with a ``LastLevelMaxPool`` P6). For ``resnet50`` with C=256 and
``norm="bn"`` its state dict loads with ``strict=True`` into
``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone``.
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
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from predet.errors import UserError

__all__ = ["BACKBONES", "NORMS", "build_backbone", "build_resnet"]


def _resnext101_32x16d(*, weights: None = None, **kwargs) -> resnet.ResNet:
    """The paper's largest backbone; torchvision has no constructor for it."""
    return resnet.ResNet(resnet.Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=16, **kwargs)


_RESNETS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "resnext50_32x4d": resnet.resnext50_32x4d,
    "resnext101_32x8d": resnet.resnext101_32x8d,  # the paper's default
    "resnext101_64x4d": resnet.resnext101_64x4d,
    "resnext101_32x16d": _resnext101_32x16d,  # not in torchvision's zoo
    "wide_resnet50_2": resnet.wide_resnet50_2,
    "wide_resnet101_2": resnet.wide_resnet101_2,
}
BACKBONES = tuple(_RESNETS)
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
    if name not in _RESNETS:
        raise UserError(
            f"model.backbone: unknown backbone '{name}' (choose from {', '.join(BACKBONES)})"
        )
    return _RESNETS[name](weights=None, norm_layer=_norm_layer(norm))


def build_backbone(
    name: str,
    *,
    norm: str = "bn",
    fpn_channels: int = 256,
    trainable_layers: int = 5,
    retinanet_levels: bool = False,
) -> BackboneWithFPN:
    """ResNet(``name``) + FPN, named like torchvision's detectors (``body.*``, ``fpn.*``).

    Args:
        name: one of ``BACKBONES``.
        norm: ``bn`` | ``syncbn`` (``nn.SyncBatchNorm``; needs a process group when training) |
            ``gn`` (GroupNorm, 32 groups) | ``frozenbn`` (``torchvision.ops.FrozenBatchNorm2d``).
        fpn_channels: C, the FPN width.
        trainable_layers: 0..5, counted from ``layer4`` down to the stem as torchvision's
            ``resnet_fpn_backbone``; the rest is frozen (5: everything trains).
        retinanet_levels: FPN on C3..C5 with P6/P7 convs (``retinanet_resnet50_fpn``) instead
            of C2..C5 with a max-pooled P6.
    """
    if not 0 <= trainable_layers <= 5:
        raise UserError(f"model.trainable_layers={trainable_layers}: must be in 0..5")
    body = build_resnet(name, norm=norm)
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for pname, p in body.named_parameters():
        if not any(pname.startswith(layer) for layer in layers_to_train):
            p.requires_grad_(False)  # fc.* too, which BackboneWithFPN drops anyway
    if retinanet_levels:  # C3..C5 -> P3..P5, then P6/P7 from P5
        returned, extra = [2, 3, 4], LastLevelP6P7(fpn_channels, fpn_channels)
    else:  # C2..C5 -> P2..P5, then max-pooled P6
        returned, extra = [1, 2, 3, 4], LastLevelMaxPool()
    c2 = body.inplanes // 8  # channels of layer1's output (64 for resnet18/34, 256 for resnet50+)
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(returned)},
        in_channels_list=[c2 * 2 ** (k - 1) for k in returned],
        out_channels=fpn_channels,
        extra_blocks=extra,
    )
    if norm == "syncbn":
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    return backbone
