"""Backbones: torchvision naming, strict load into Mask R-CNN, sizes, norms."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from predet.errors import UserError
from predet.modeling.backbone import BACKBONES, build_backbone


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet50_loads_strict_into_maskrcnn_backbone():
    torch.manual_seed(0)
    ours = build_backbone("resnet50", norm="bn", fpn_channels=256)
    mrcnn = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    result = mrcnn.backbone.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    key = "body.layer3.2.conv2.weight"
    assert torch.equal(mrcnn.backbone.state_dict()[key], ours.state_dict()[key])
    assert {k.split(".")[0] for k in ours.state_dict()} == {"body", "fpn"}


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x8d"]
)
def test_trunk_matches_torchvision_model(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ours = build_backbone(name, fpn_channels=256)
        ref = getattr(torchvision.models, name)(weights=None)
    trunk = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    body = {k[5:]: v.shape for k, v in ours.state_dict().items() if k.startswith("body.")}
    assert body == trunk


def test_resnext101_32x16d_widths():
    with torch.device("meta"):
        bb = build_backbone("resnext101_32x16d", fpn_channels=256)
    conv2 = bb.body.layer1[0].conv2
    assert (conv2.groups, conv2.in_channels) == (32, 512)  # 32 groups x 16 channels
    assert len(bb.body.layer3) == 23
    # torch.hub's ig_resnext101_32x16d has 194,026,792 parameters, 2,049,000 of them in its fc
    trunk = sum(p.numel() for n, p in bb.named_parameters() if n.startswith("body."))
    assert trunk == 194_026_792 - 2_049_000


def test_fpn_levels_and_strides():
    torch.manual_seed(0)
    bb = build_backbone("resnet18", fpn_channels=32).eval()
    with torch.no_grad():
        out = bb(torch.randn(2, 3, 64, 64))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape) for v in out.values()] == [
        (2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2), (2, 32, 1, 1)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "norm, cls", [("bn", nn.BatchNorm2d), ("syncbn", nn.SyncBatchNorm), ("gn", nn.GroupNorm),
                  ("frozenbn", FrozenBatchNorm2d)]
)  # fmt: skip
def test_norms(norm, cls):
    bb = build_backbone("resnet18", norm=norm, fpn_channels=32)
    kinds = (nn.BatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm, FrozenBatchNorm2d)
    norms = [m for m in bb.body.modules() if isinstance(m, kinds)]
    assert len(norms) == 20 and all(type(m) is cls for m in norms)  # resnet18: 20 norm layers
    if norm == "frozenbn":
        assert _count(bb.body) == 11_166_912  # resnet18 trunk minus fc and the BN affine params


def test_unknown_names_are_user_errors():
    with pytest.raises(UserError, match="model.backbone: unknown backbone 'resnet19'"):
        build_backbone("resnet19")
    with pytest.raises(UserError, match="model.norm: unknown norm 'ln'"):
        build_backbone("resnet18", norm="ln")
    # one table for pre-training and fine-tuning (issue 10: pre-training lacked these four)
    assert len(BACKBONES) == 11
    assert {"resnet152", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"} <= set(BACKBONES)


def test_frozen_layers_and_retinanet_levels():
    """trainable_layers freezes from the stem up (torchvision's resnet_fpn_backbone); RetinaNet's
    FPN reads C3..C5 and adds P6/P7."""
    with torch.device("meta"):
        bb = build_backbone("resnet18", fpn_channels=32, trainable_layers=2)
        rn = build_backbone("resnet18", fpn_channels=32, retinanet_levels=True)
    frozen = {n.split(".")[1] for n, p in bb.named_parameters() if not p.requires_grad}
    trained = {n.split(".")[0] for n, p in bb.body.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1", "layer2"} and trained == {"layer3", "layer4"}
    assert len(rn.fpn.inner_blocks) == 3 and type(rn.fpn.extra_blocks).__name__ == "LastLevelP6P7"
