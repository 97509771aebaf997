"""Export to torchvision / detectron2: strict loading into torchvision's Mask R-CNN, d2 names."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from predet.cli import main
from predet.config import FinetuneConfig, PretrainConfig, load_config, to_dict
from predet.errors import UserError
from predet.export import check_init_sidecar, export_backbone
from predet.modeling.predet import build_predet
from predet.utils import save_checkpoint

TINY_FT = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "mask_rcnn_tiny_cpu.yaml"


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
    assert written == [out, tmp_path / "predet_box_head.pth", tmp_path / "predet.json"]
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


def test_torchvision_sidecar_json(r50_ckpt, tmp_path):
    path, _ = r50_ckpt
    out = tmp_path / "r50.pth"
    export_backbone(path, "torchvision", out, box_head=True)
    meta = json.loads((tmp_path / "r50.json").read_text())
    assert meta == {
        "format": "torchvision", "weights": "r50.pth", "box_head": "r50_box_head.pth", "architecture": "resnet50",
        "depth": 50, "block": "bottleneck", "stage_blocks": [3, 4, 6, 3], "groups": 1, "width_per_group": 64,
        "res2_out_channels": 256, "fpn_channels": 256, "fpn_levels": ["P2", "P3", "P4", "P5", "P6 (max-pool of P5)"],
        "box_head_dim": 1024, "norm": "bn",  # no config in this checkpoint: the kind the tensors show
        "input": {"channels": "RGB", "range": "0-1", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "source": {"checkpoint": str(path.resolve()), "run": None, "step": 3}, "producer": "predet export",
    }  # fmt: skip
    # the input normalisation is torchvision's Mask R-CNN's
    transform = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).transform
    assert meta["input"]["mean"] == transform.image_mean and meta["input"]["std"] == transform.image_std


@pytest.fixture(scope="module")
def narrow_exports(tmp_path_factory):
    """torchvision exports of a resnet18 + 32-channel FPN run trained with BN, and one with GN."""
    out = {}
    for norm in ("bn", "gn"):
        cfg = load_config(PretrainConfig, None, ["model.backbone=resnet18", "model.fpn_channels=32", f"model.norm={norm}"])
        run = tmp_path_factory.mktemp(norm) / "run"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text("seed: 0\n")
        ckpt = run / "checkpoints" / "last.pt"
        save_checkpoint({"model": build_predet(cfg, num_classes=3).state_dict(), "config": to_dict(cfg)}, ckpt)
        export_backbone(ckpt, "torchvision", run.parent / f"r18_{norm}.pth")
        out[norm] = run.parent / f"r18_{norm}.pth"
    return out


@pytest.mark.parametrize(
    "norm, override, message",
    [
        ("bn", "model.backbone=resnet34", "its r18_bn.json says backbone resnet18, but model.backbone=resnet34"),
        ("bn", "model.fpn_channels=64", "its r18_bn.json says FPN width 32, but model.fpn_channels=64"),
        ("bn", "model.norm=gn", "its r18_bn.json says norm bn, but model.norm=gn (use frozenbn, bn or syncbn)"),
        ("gn", "model.norm=frozenbn", "its r18_gn.json says norm gn, but model.norm=frozenbn (use gn)"),
    ],
)
def test_finetune_checks_the_init_sidecar(narrow_exports, tmp_path, capsys, norm, override, message):
    init = narrow_exports[norm]
    run = tmp_path / "ft"
    args = ["finetune", "--config", str(TINY_FT), "--init", str(init), "--out", str(run), override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"predet: error: --init {init}: {message}"
    assert not run.exists()  # checked before anything is written


def test_sidecar_accepts_matching_configs(narrow_exports, tmp_path):
    tiny = load_config(FinetuneConfig, TINY_FT)  # resnet18, 32-channel FPN, bn
    for norm in ("bn", "frozenbn", "syncbn"):
        cfg = load_config(FinetuneConfig, TINY_FT, [f"model.norm={norm}"])
        assert check_init_sidecar(narrow_exports["bn"], cfg.model)["norm"] == "bn"
    gn = load_config(FinetuneConfig, TINY_FT, ["model.norm=gn", "model.fpn_channels=null"])
    meta = check_init_sidecar(narrow_exports["gn"], gn.model)  # fpn_channels None: taken from the file
    assert (meta["norm"], meta["fpn_channels"], meta["source"]["run"]) == ("gn", 32, str(narrow_exports["gn"].parent / "run"))
    assert check_init_sidecar("scratch", tiny.model) is None
    plain = tmp_path / "plain.pth"  # a file without a sidecar: nothing to check
    plain.write_bytes(narrow_exports["bn"].read_bytes())
    assert check_init_sidecar(plain, tiny.model) is None
    (tmp_path / "plain.json").write_text("{not json")
    with pytest.raises(UserError, match="plain.json: not readable JSON"):
        check_init_sidecar(plain, tiny.model)


def test_export_norm_option_errors(narrow_exports, tmp_path, capsys):
    ckpt = narrow_exports["gn"].parent / "run" / "checkpoints" / "last.pt"
    out = tmp_path / "x.pkl"
    assert main(["export", "--ckpt", str(ckpt), "--format", "detectron2", "--out", str(out), "--norm", "frozenbn"]) == 2
    assert capsys.readouterr().err.strip() == (
        "predet: error: --norm frozenbn: the weights were trained with gn; choose gn")
    assert main(["export", "--ckpt", str(ckpt), "--format", "torchvision", "--out", str(tmp_path / "x.pth"),
                 "--norm", "gn"]) == 2  # fmt: skip
    assert "--norm: only for --format detectron2" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "x.pth").exists()


def test_export_out_names_are_checked(r50_ckpt, tmp_path, capsys):
    path, _ = r50_ckpt
    cases = [
        ("detectron2", "model.pth", "a detectron2 export must end in .pkl"),
        ("torchvision", "tv.pkl", "a torchvision export needs a suffix such as .pth"),
        ("torchvision", "tv.json", "a torchvision export needs a suffix such as .pth"),
        ("torchvision", "folder", "folder is a folder; give a file name"),
    ]
    (tmp_path / "folder").mkdir()
    for fmt, name, message in cases:
        assert main(["export", "--ckpt", str(path), "--format", fmt, "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_export_without_box_head_removes_a_stale_one(r50_ckpt, tmp_path):
    from predet.modeling.detectors import read_init

    path, _ = r50_ckpt
    out = tmp_path / "predet.pth"
    export_backbone(path, "torchvision", out, box_head=True)
    assert "fc6.weight" in read_init(out)
    assert export_backbone(path, "torchvision", out) == [out, tmp_path / "predet.json"]
    assert not (tmp_path / "predet_box_head.pth").exists() and "fc6.weight" not in read_init(out)
    # a head file the sidecar does not name (copied in by hand) is not read with the backbone
    export_backbone(path, "torchvision", tmp_path / "other.pth", box_head=True)
    (tmp_path / "other_box_head.pth").rename(tmp_path / "predet_box_head.pth")
    assert "fc6.weight" not in read_init(out)
    (tmp_path / "predet.json").unlink()  # without metadata, the sibling is the export's head
    assert "fc6.weight" in read_init(out)


def test_retinanet_backbone_is_not_exported(tmp_path):
    from predet.modeling.backbone import build_backbone

    backbone = build_backbone("resnet18", norm="frozenbn", fpn_channels=32, retinanet_levels=True)
    with pytest.raises(UserError, match=r"a RetinaNet backbone \(FPN on C3-C5 with P6/P7\)"):
        export_backbone({f"backbone.{k}": v for k, v in backbone.state_dict().items()}, "torchvision",
                        tmp_path / "r.pth")  # fmt: skip
    assert list(tmp_path.iterdir()) == []
