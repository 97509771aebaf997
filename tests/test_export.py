"""Export to torchvision / detectron2: strict loading into torchvision's Mask R-CNN, d2 names."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision

from predet.cli import main
from predet.config import PretrainConfig, load_config
from predet.export import export_backbone
from predet.modeling.predet import build_predet
from predet.utils import save_checkpoint


@pytest.fixture(scope="module")
def r50_ckpt(tmp_path_factory):
    """A resnet50 PreDet model's state, perturbed so that no tensor equals its initial value."""
    torch.manual_seed(0)
    cfg = load_config(PretrainConfig, None, ["model.backbone=resnet50"])
    model = build_predet(cfg, num_classes=5)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.rand_like(t))
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "step": 3}, path)
    return path, model.state_dict()


def test_torchvision_export_loads_strict_into_maskrcnn(r50_ckpt, tmp_path):
    path, state = r50_ckpt
    out = tmp_path / "backbone.pth"
    assert main(["export", "--ckpt", str(path), "--format", "torchvision", "--out", str(out)]) == 0
    exported = torch.load(out, weights_only=True)
    detector = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    detector.backbone.load_state_dict(exported, strict=True)
    loaded = detector.backbone.state_dict()
    assert set(loaded) == set(exported)
    for key, value in loaded.items():
        assert torch.equal(value, state[f"backbone.{key}"]), key


def test_box_head_exports_beside_backbone(r50_ckpt, tmp_path):
    path, state = r50_ckpt
    out = tmp_path / "predet.pth"
    written = export_backbone(path, "torchvision", out, box_head=True)
    assert written == [out, tmp_path / "predet_box_head.pth"]
    head = torchvision.models.detection.faster_rcnn.TwoMLPHead(256 * 7 * 7, 1024)
    head.load_state_dict(torch.load(written[1], weights_only=True), strict=True)
    assert torch.equal(head.fc6.weight, state["box_head.fc6.weight"])
    assert torch.equal(head.fc7.bias, state["box_head.fc7.bias"])


def test_detectron2_export_names_and_values(r50_ckpt, tmp_path):
    path, state = r50_ckpt
    out = tmp_path / "predet.pkl"
    export_backbone(path, "detectron2", out, box_head=True)
    obj = pickle.loads(out.read_bytes())
    assert obj["__author__"] == "predet" and obj["matching_heuristics"] is True
    d2 = obj["model"]
    assert all(isinstance(v, np.ndarray) for v in d2.values())
    pairs = {
        "backbone.bottom_up.stem.conv1.weight": "backbone.body.conv1.weight",
        "backbone.bottom_up.stem.conv1.norm.running_var": "backbone.body.bn1.running_var",
        "backbone.bottom_up.res2.0.conv1.weight": "backbone.body.layer1.0.conv1.weight",
        "backbone.bottom_up.res2.0.shortcut.weight": "backbone.body.layer1.0.downsample.0.weight",
        "backbone.bottom_up.res2.0.shortcut.norm.bias": "backbone.body.layer1.0.downsample.1.bias",
        "backbone.bottom_up.res4.5.conv2.norm.running_mean": "backbone.body.layer3.5.bn2.running_mean",
        "backbone.bottom_up.res5.2.conv3.norm.weight": "backbone.body.layer4.2.bn3.weight",
        "backbone.fpn_lateral2.weight": "backbone.fpn.inner_blocks.0.0.weight",
        "backbone.fpn_lateral5.bias": "backbone.fpn.inner_blocks.3.0.bias",
        "backbone.fpn_output2.bias": "backbone.fpn.layer_blocks.0.0.bias",
        "backbone.fpn_output5.weight": "backbone.fpn.layer_blocks.3.0.weight",
        "roi_heads.box_head.fc1.weight": "box_head.fc6.weight",
        "roi_heads.box_head.fc2.bias": "box_head.fc7.bias",
    }
    for d2_name, ours in pairs.items():
        np.testing.assert_array_equal(d2[d2_name], state[ours].numpy())
    # every backbone tensor but the BN counters, plus fc1/fc2: R50 has 53 convs + 53 BNs, FPN 16
    n_tv = sum(1 for k in state if k.startswith("backbone.") and "num_batches" not in k)
    assert len(d2) == n_tv + 4 == 53 + 53 * 4 + 16 + 4
    assert not any(k.startswith("backbone.body") or "num_batches" in k for k in d2)


def test_export_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "x.pth"
    assert main(["export", "--ckpt", str(bad), "--format", "torchvision", "--out", str(out)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    save_checkpoint({"model": {"cls_head.fc.weight": torch.zeros(2, 2)}}, bad)
    assert main(["export", "--ckpt", str(bad), "--format", "detectron2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no backbone + FPN weights" in err[0]
    assert main(["export", "--run", str(tmp_path / "nope"), "--format", "torchvision",
                 "--out", str(out)]) == 2
    assert not out.exists()
