"""timm export: timm's own ResNet loads ``model.safetensors`` / ``config.json`` and computes the
torchvision export's C2..C5 (rel. err <= 1e-4); Hugging Face transformers DETR-family models built
from the printed lines carry the same backbone. timm, transformers and safetensors are the ``test``
extra; without one, its tests skip with the reason."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from predet.cli import main
from predet.config import PretrainConfig, load_config, to_dict
from predet.errors import UserError
from predet.export import _ARCHS, export_backbone
from predet.export_timm import TIMM_ARCHS
from predet.modeling.backbone import BACKBONES, build_resnet
from predet.modeling.predet import build_predet
from predet.utils import save_checkpoint

# (name, backbone, trained norm): a BN ResNet-50, a GN ResNet-50, a FrozenBN ResNeXt (groups)
RUNS = [("bn", "resnet50", "bn"), ("gn", "resnet50", "gn"), ("resnext", "resnext50_32x4d", "frozenbn")]
# tensors of the body: 53 convs, and per norm layer weight, bias (+ running mean / var / counter for BN)
BODY_TENSORS = {"bn": 53 + 53 * 5, "gn": 53 + 53 * 2, "resnext": 53 + 53 * 5}
TINY_DETR = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                 encoder_attention_heads=2, decoder_attention_heads=2, num_queries=5)  # fmt: skip


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, dict]:
    """Each run of ``RUNS``: a PreDet checkpoint in a run folder (values perturbed, BN statistics away
    from 0/1, input size 320), exported to torchvision and timm through the CLI (timm's printed lines kept)."""
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install -e '.[test]')")
    out = {}
    for i, (name, arch, norm) in enumerate(RUNS):
        torch.manual_seed(i)
        cfg = load_config(PretrainConfig, None, [f"model.backbone={arch}", f"model.norm={norm}", "model.fpn_channels=32",
                                                 "model.box_head_dim=64", "model.input_size=320"])  # fmt: skip
        state = build_predet(cfg, num_classes=3).state_dict()
        for key, t in state.items():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.2 if key.endswith(("running_var", "running_mean")) else torch.randn_like(t) * 0.05)
        run = tmp_path_factory.mktemp(name) / "run"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
        save_checkpoint({"model": state, "step": 5, "config": to_dict(cfg)}, run / "checkpoints" / "last.pt")
        pth, folder = run.parent / f"{name}.pth", run.parent / f"{name}_timm"
        assert main(["export", "--run", str(run), "--format", "torchvision", "--out", str(pth)]) == 0
        capture = _Capture()
        with capture:
            assert main(["export", "--run", str(run), "--format", "timm", "--out", str(folder)]) == 0
        out[name] = {"arch": arch, "norm": norm, "pth": pth, "dir": folder, "run": run, "printed": capture.lines}
    return out


class _Capture:
    """stdout of the block, as lines (capsys is function-scoped; the fixture is module-scoped)."""

    def __enter__(self):
        import contextlib
        import io

        self._buf = io.StringIO()
        self._redirect = contextlib.redirect_stdout(self._buf)
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        self.lines = self._buf.getvalue().splitlines()


def torchvision_body(e: dict) -> nn.Module:
    """torchvision's own ResNet (no predet code) with the torchvision export loaded strictly; its
    ``.body`` gives C2..C5 as ``{"0": .., "3": ..}``."""
    norm_layer = partial(nn.GroupNorm, 32) if e["norm"] == "gn" else nn.BatchNorm2d
    body = getattr(torchvision.models, e["arch"])(weights=None, norm_layer=norm_layer)
    backbone = BackboneWithFPN(body, {f"layer{i + 1}": str(i) for i in range(4)}, [256 * 2**i for i in range(4)], 32,
                               extra_blocks=LastLevelMaxPool())  # fmt: skip
    backbone.load_state_dict(torch.load(e["pth"], weights_only=True), strict=True)
    return backbone.body.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """One normalised 96x96 RGB input (the smallest on which Deformable DETR's extra level is > 1x1)."""
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(1, 3, 96, 96, generator=g)
    return torchvision.transforms.functional.normalize(rgb, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def reference(exports, image) -> dict[str, list[torch.Tensor]]:
    """C2..C5 of torchvision's ResNet with each run's torchvision export."""
    with torch.no_grad():
        return {name: list(torchvision_body(e)(image).values()) for name, e in exports.items()}


def timm_norm_kwargs(e: dict) -> dict:
    return {"norm_layer": "groupnorm"} if e["norm"] == "gn" else {}


@pytest.mark.parametrize("name", [r[0] for r in RUNS])
@pytest.mark.parametrize("how", ["local-dir", "overlay"])
def test_timm_features_only_equals_torchvision(exports, reference, image, name: str, how: str) -> None:
    """Both printed timm lines: ``local-dir:DIR`` (architecture and norm from config.json) and the
    model name with the file as ``pretrained_cfg_overlay`` (+ ``norm_layer`` for GN)."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[test]')")
    e = exports[name]
    if how == "local-dir":
        model = timm.create_model(f"local-dir:{e['dir']}", pretrained=True, features_only=True)
    else:
        overlay = dict(file=str(e["dir"] / "model.safetensors"))
        model = timm.create_model(e["arch"], pretrained=True, pretrained_cfg_overlay=overlay, features_only=True,
                                  **timm_norm_kwargs(e))  # fmt: skip
    with torch.no_grad():
        feats = model.eval()(image)[1:]  # out_indices 0..4: the stem's act1, then layer1..4 = C2..C5
    assert [f.shape for f in feats] == [r.shape for r in reference[name]]
    errors = [rel_err(f, r) for f, r in zip(feats, reference[name])]
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("name", [r[0] for r in RUNS])
def test_timm_num_classes_0_holds_every_tensor(exports, name: str) -> None:
    """With ``num_classes=0`` the timm model's state dict is the export's body: same keys, every tensor equal."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[test]')")
    e = exports[name]
    overlay = dict(file=str(e["dir"] / "model.safetensors"))
    model = timm.create_model(e["arch"], pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0,
                              **timm_norm_kwargs(e))  # fmt: skip
    body = {k.removeprefix("body."): v for k, v in torch.load(e["pth"], weights_only=True).items() if k.startswith("body.")}
    got = model.state_dict()
    assert set(got) == set(body) and len(got) == BODY_TENSORS[name]
    for key, value in got.items():
        assert torch.equal(value, body[key]), key


def test_config_json_is_what_timm_reads(exports) -> None:
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[test]')")
    from timm.models import PretrainedCfg
    from timm.models._hub import load_model_config_from_path, save_config_for_hf

    for name, e in exports.items():
        cfg = json.loads((e["dir"] / "config.json").read_text())
        pretrained_cfg, arch, model_args = load_model_config_from_path(e["dir"])
        assert arch == e["arch"] and cfg["num_features"] == 2048 and cfg["num_classes"] == 0
        assert model_args == {"num_classes": 0, "norm_layer": "groupnorm" if name == "gn" else "batchnorm2d"}
        PretrainedCfg(**pretrained_cfg)  # timm's dataclass takes every field (an unknown one is a TypeError)
        assert pretrained_cfg["input_size"] == [3, 320, 320] and pretrained_cfg["pool_size"] == [10, 10]
        assert cfg["predet"]["norm"] == e["norm"] and cfg["predet"]["format"] == "timm"
        assert cfg["predet"]["source"]["run"] == str(e["run"].resolve()) and "fpn_channels" not in cfg["predet"]
        # the input normalisation is torchvision's Mask R-CNN's
        transform = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).transform
        assert pretrained_cfg["mean"] == transform.image_mean and pretrained_cfg["std"] == transform.image_std
    # the layout timm itself writes for a model of ours: same top-level keys (+ predet), same pretrained_cfg keys
    model = timm.create_model(f"local-dir:{exports['bn']['dir']}", pretrained=True)
    save_config_for_hf(model, str(exports["bn"]["dir"].parent / "timm_written.json"))
    written = json.loads((exports["bn"]["dir"].parent / "timm_written.json").read_text())
    ours = json.loads((exports["bn"]["dir"] / "config.json").read_text())
    assert set(ours) - {"predet"} == set(written)
    assert set(ours["pretrained_cfg"]) == set(written["pretrained_cfg"]) - {"test_input_size"}
    for key in ("architecture", "num_classes", "num_features", "global_pool"):
        assert ours[key] == written[key], key


def test_local_dir_line_is_strict(exports, tmp_path: Path) -> None:
    """The first printed timm line fails loudly on a file that lacks a tensor (timm's name route would not)."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[test]')")
    from safetensors.torch import load_file, save_file

    e = exports["bn"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((e["dir"] / "config.json").read_text())
    tensors = load_file(e["dir"] / "model.safetensors")
    del tensors["layer3.2.bn2.running_var"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(RuntimeError, match=r"layer3\.2\.bn2\.running_var"):
        timm.create_model(f"local-dir:{broken}", pretrained=True, features_only=True)


def test_gn_needs_the_printed_norm(exports, reference, image) -> None:
    """A GN export read as a BN ResNet is another model (timm's name route loads non-strictly): the
    printed lines carry ``norm_layer='groupnorm'`` and config.json names it."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[test]')")
    e = exports["gn"]
    overlay = dict(file=str(e["dir"] / "model.safetensors"))
    as_bn = timm.create_model("resnet50", pretrained=True, pretrained_cfg_overlay=overlay, features_only=True).eval()
    with torch.no_grad():
        assert rel_err(as_bn(image)[4], reference["gn"][3]) > 0.1
    assert "norm_layer='groupnorm'" in next(line for line in e["printed"] if "pretrained_cfg_overlay" in line)
    assert not any("norm_layer" in line for line in exports["bn"]["printed"])


def run_printed(lines: list[str], **tiny) -> dict:
    """Execute the printed Python lines (comments and shell lines skipped), the DETR config made tiny."""
    code = [line for line in lines if line and not line.startswith("#") and not line.startswith("/")]
    text = "\n".join(code).replace("num_labels=91", "num_labels=91, **TINY")
    namespace: dict = {"TINY": tiny}
    exec(compile(text, "<printed lines>", "exec"), namespace)
    return namespace


def test_cli_prints_lines_that_work(exports, reference, image) -> None:
    """The export prints the paths, then Python lines; run as printed they give the trained backbone."""
    pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[test]')")
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
    for name in ("bn", "gn"):
        e = exports[name]
        assert e["printed"][:2] == [str(e["dir"] / "model.safetensors"), str(e["dir"] / "config.json")]
        ns = run_printed(e["printed"], **TINY_DETR)
        with torch.no_grad():
            timm_feats = ns["backbone"].eval()(image)  # the last timm line: by name, out_indices C2..C5
            detr_feats = [f for f, _ in ns["model"].eval().model.backbone(image, torch.ones(1, 96, 96, dtype=torch.long))]
        for feats in (timm_feats, detr_feats):
            errors = [rel_err(f, r) for f, r in zip(feats, reference[name], strict=True)]
            assert max(errors) <= 1e-4, (name, errors)


@pytest.mark.parametrize("family", ["Detr", "ConditionalDetr", "DeformableDetr"])
def test_transformers_detr_backbone_equals_torchvision(exports, reference, image, family: str) -> None:
    """A tiny DETR-family model on the timm export (``backbone="local-dir:DIR"``, then the file loaded
    strictly, as printed): its backbone's feature maps are torchvision's; the image processor's
    default normalisation is the export's."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[test]')")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
    from safetensors.torch import load_file

    e = exports["bn"]
    config = getattr(transformers, f"{family}Config")(backbone=f"local-dir:{e['dir']}", use_timm_backbone=True,
                                                      num_labels=3, **TINY_DETR)  # fmt: skip
    model = getattr(transformers, f"{family}ForObjectDetection")(config).eval()
    mask = torch.ones(1, 96, 96, dtype=torch.long)
    with torch.no_grad():
        before = [f for f, _ in model.model.backbone(image, mask)]
        body = next(m for m in model.modules() if isinstance(m, timm.models.FeatureListNet))  # as printed
        assert body is model.model.backbone.model
        body.load_state_dict(load_file(e["dir"] / "model.safetensors"), strict=True)
        feats = [f for f, _ in model.model.backbone(image, mask)]
    ref = reference["bn"][4 - len(feats) :]  # Deformable DETR takes C3..C5
    errors = [rel_err(f, r) for f, r in zip(feats, ref, strict=True)]
    assert max(errors) <= 1e-4, errors
    assert min(rel_err(f, r) for f, r in zip(before, ref)) > 0.1  # transformers 5 builds it at random
    meta = json.loads((e["dir"] / "config.json").read_text())["pretrained_cfg"]
    processor = getattr(transformers, f"{family}ImageProcessor")()
    assert list(processor.image_mean) == meta["mean"] and list(processor.image_std) == meta["std"]


def test_timm_names_are_torchvisions_for_every_architecture() -> None:
    """Every architecture predet trains is a timm model whose state dict (``num_classes=0``) has
    torchvision's names and shapes (built on the meta device: shapes only, no memory)."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[test]')")
    assert set(TIMM_ARCHS) == set(_ARCHS.values()) == set(BACKBONES)
    for arch in TIMM_ARCHS:
        gn = [("gn", "groupnorm")] if arch in ("resnet18", "resnext50_32x4d") else []  # one of each block
        for norm, norm_layer in [("bn", "batchnorm2d"), *gn]:
            with torch.device("meta"):
                ours = build_resnet(arch, norm=norm).state_dict()
                theirs = timm.create_model(arch, pretrained=False, num_classes=0, norm_layer=norm_layer).state_dict()
            expected = {k: v.shape for k, v in ours.items() if not k.startswith("fc.")}
            assert {k: v.shape for k, v in theirs.items()} == expected, (arch, norm)


def test_timm_export_errors(exports, tmp_path: Path, capsys, monkeypatch) -> None:
    ckpt = exports["bn"]["run"] / "checkpoints" / "last.pt"
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    cases = [
        (["--out", str(tmp_path / "d"), "--box-head"], "--box-head: only for --format torchvision or detectron2"),
        (["--out", str(a_file)], "a timm export is a folder (model.safetensors + config.json), not a file"),
        (["--out", str(tmp_path / "d"), "--norm", "gn"], "--norm: only for --format detectron2"),
    ]
    for extra, message in cases:
        assert main(["export", "--ckpt", str(ckpt), "--format", "timm", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    monkeypatch.setitem(__import__("sys").modules, "safetensors.torch", None)  # as if not installed
    with pytest.raises(UserError, match=r"needs the Python package 'safetensors' \(pip install safetensors\)"):
        export_backbone(ckpt, "timm", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]
