"""detectron2 export: its config fragment against detectron2's own config keys and, when detectron2 is
importable, FPN outputs of the stock Mask R-CNN R50-FPN config + ``F.yaml`` equal to torchvision's."""

from __future__ import annotations

import io
import pickle
import pickletools
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from predet.cli import main
from predet.config import PretrainConfig, load_config, to_dict
from predet.modeling.predet import build_predet
from predet.utils import save_checkpoint

# Every key of detectron2's `detectron2/config/defaults.py` (facebookresearch/detectron2 @ 02b5c4e2)
# under the sections the fragment writes, with its default's type; and get_norm's names.
D2_DEFAULTS = {
    "MODEL.WEIGHTS": str, "MODEL.PIXEL_MEAN": list, "MODEL.PIXEL_STD": list, "INPUT.FORMAT": str,
    "MODEL.RESNETS.DEPTH": int, "MODEL.RESNETS.OUT_FEATURES": list, "MODEL.RESNETS.NUM_GROUPS": int,
    "MODEL.RESNETS.NORM": str, "MODEL.RESNETS.WIDTH_PER_GROUP": int, "MODEL.RESNETS.STRIDE_IN_1X1": bool,
    "MODEL.RESNETS.RES5_DILATION": int, "MODEL.RESNETS.RES2_OUT_CHANNELS": int,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": int, "MODEL.RESNETS.DEFORM_ON_PER_STAGE": list,
    "MODEL.RESNETS.DEFORM_MODULATED": bool, "MODEL.RESNETS.DEFORM_NUM_GROUPS": int,
    "MODEL.FPN.IN_FEATURES": list, "MODEL.FPN.OUT_CHANNELS": int, "MODEL.FPN.NORM": str,
    "MODEL.FPN.FUSE_TYPE": str, "MODEL.ROI_BOX_HEAD.NAME": str, "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": tuple,
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": float, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": int,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": int, "MODEL.ROI_BOX_HEAD.POOLER_TYPE": str,
    "MODEL.ROI_BOX_HEAD.NUM_FC": int, "MODEL.ROI_BOX_HEAD.FC_DIM": int, "MODEL.ROI_BOX_HEAD.NUM_CONV": int,
    "MODEL.ROI_BOX_HEAD.CONV_DIM": int, "MODEL.ROI_BOX_HEAD.NORM": str,
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": bool, "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES": bool,
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": str, "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": float,
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS": bool, "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": bool,
    "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER": float, "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": int,
}  # fmt: skip
D2_NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")

# (name, backbone, trained norm, FPN width, box head, --norm): a BN run, a GN run, a narrow-FPN run
# (the CPU configs' width, with its box head) and a SyncBN ResNeXt (groups / width per group)
RUNS = [
    ("bn", "resnet50", "bn", 256, False, None),
    ("gn", "resnet50", "gn", 256, False, None),
    ("narrow", "resnet18", "bn", 32, True, None),
    ("resnext", "resnext50_32x4d", "syncbn", 64, False, "frozenbn"),
]
EXPECTED = {  # MODEL.RESNETS / FPN / ROI_BOX_HEAD of each run's fragment
    "bn": {"DEPTH": 50, "NORM": "FrozenBN", "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "RES2_OUT_CHANNELS": 256},
    "gn": {"DEPTH": 50, "NORM": "GN", "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "RES2_OUT_CHANNELS": 256},
    "narrow": {"DEPTH": 18, "NORM": "FrozenBN", "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "RES2_OUT_CHANNELS": 64},
    "resnext": {"DEPTH": 50, "NORM": "FrozenBN", "NUM_GROUPS": 32, "WIDTH_PER_GROUP": 4, "RES2_OUT_CHANNELS": 256},
}  # fmt: skip


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, dict]:
    """Each run of ``RUNS``: a PreDet checkpoint in a run folder (values perturbed, BN statistics
    away from 0/1), exported to torchvision and detectron2 through the CLI."""
    out = {}
    for i, (name, arch, norm, fpn, box_head, d2_norm) in enumerate(RUNS):
        torch.manual_seed(i)
        cfg = load_config(PretrainConfig, None, [f"model.backbone={arch}", f"model.norm={norm}",
                                                 f"model.fpn_channels={fpn}", "model.box_head_dim=128"])  # fmt: skip
        state = build_predet(cfg, num_classes=3).state_dict()
        for key, t in state.items():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.2 if key.endswith(("running_var", "running_mean")) else torch.randn_like(t) * 0.05)
        run = tmp_path_factory.mktemp(name) / "run"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
        save_checkpoint({"model": state, "step": 7, "config": to_dict(cfg)}, run / "checkpoints" / "last.pt")
        extra = ["--box-head"] if box_head else []
        pkl, pth = run.parent / f"{name}.pkl", run.parent / f"{name}.pth"
        assert main(["export", "--run", str(run), "--format", "detectron2", "--out", str(pkl), *extra,
                     *(["--norm", d2_norm] if d2_norm else [])]) == 0  # fmt: skip
        assert main(["export", "--run", str(run), "--format", "torchvision", "--out", str(pth), *extra]) == 0
        out[name] = {"arch": arch, "norm": norm, "fpn": fpn, "box_head": box_head, "pkl": pkl, "pth": pth,
                     "yaml": yaml.safe_load(pkl.with_suffix(".yaml").read_text()), "run": run}  # fmt: skip
    return out


@pytest.mark.parametrize("name", [r[0] for r in RUNS])
def test_fragment_keys_are_detectron2_keys(exports, name: str) -> None:
    e = exports[name]
    flat = _flat(e["yaml"])
    for key, value in flat.items():
        assert key in D2_DEFAULTS, key
        kind = D2_DEFAULTS[key]
        assert isinstance(value, kind) and not (kind is int and isinstance(value, bool)), (key, value)
    assert flat["MODEL.RESNETS.NORM"] in D2_NORMS
    assert flat["MODEL.RESNETS.STRIDE_IN_1X1"] is False and flat["INPUT.FORMAT"] == "RGB"
    assert flat["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53] and flat["MODEL.PIXEL_STD"] == [58.395, 57.12, 57.375]
    assert flat["MODEL.WEIGHTS"] == str(e["pkl"].resolve())
    assert {k.rsplit(".", 1)[1]: v for k, v in flat.items() if ".RESNETS." in k} == {
        **EXPECTED[name], "STRIDE_IN_1X1": False}
    assert flat["MODEL.FPN.OUT_CHANNELS"] == e["fpn"]
    assert flat.get("MODEL.ROI_BOX_HEAD.FC_DIM") == (128 if e["box_head"] else None)
    # the same facts travel in the pkl, beside "model"
    obj = pickle.loads(e["pkl"].read_bytes())
    assert obj["predet"]["detectron2"] == e["yaml"]
    assert obj["predet"]["architecture"] == e["arch"] and obj["predet"]["norm"] == e["norm"]
    assert obj["predet"]["source"] == {"checkpoint": str((e["run"] / "checkpoints" / "last.pt").resolve()),
                                       "run": str(e["run"].resolve()), "step": 7}  # fmt: skip


def test_cli_prints_the_train_net_line(exports, tmp_path: Path, capsys) -> None:
    e = exports["narrow"]
    out = tmp_path / "n.pkl"
    assert main(["export", "--run", str(e["run"]), "--format", "detectron2", "--out", str(out), "--box-head"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [str(out), str(out.with_suffix(".yaml"))]
    cmd = lines[-1]
    assert cmd.startswith("python tools/train_net.py --config-file "
                          "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml MODEL.WEIGHTS ")  # fmt: skip
    for piece in ("MODEL.RESNETS.STRIDE_IN_1X1 False", "MODEL.RESNETS.DEPTH 18", "MODEL.FPN.OUT_CHANNELS 32",
                  "MODEL.ROI_BOX_HEAD.FC_DIM 128", "INPUT.FORMAT RGB", "MODEL.PIXEL_MEAN '[123.675,116.28,103.53]'"):
        assert piece in cmd, piece


def test_pickle_loads_without_numpy_core(exports) -> None:
    """The pickle names only ``numpy.ndarray`` and ``builtins.bytearray`` (pickletools), and an
    unpickler with numpy < 1.26's layout (no ``numpy._core``) reads it, as detectron2 does, into
    writable float32 arrays equal to the torchvision export's tensors."""
    e = exports["bn"]
    data = e["pkl"].read_bytes()
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    assert {arg for _, arg in ops if isinstance(arg, str) and arg.startswith("numpy")} == {"numpy"}
    assert sum(name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ") for name, _ in ops) == 2  # two classes, memoised
    assert b"_core" not in data and b"multiarray" not in data

    class OldNumpyUnpickler(pickle.Unpickler):
        referenced: set = set()

        def find_class(self, module: str, name: str):
            self.referenced.add(f"{module}.{name}")
            if module.startswith(("numpy._core", "numpy.core")):
                raise ModuleNotFoundError(f"No module named '{module}'")
            return super().find_class(module, name)

    unpickler = OldNumpyUnpickler(io.BytesIO(data), encoding="latin1")
    obj = unpickler.load()
    assert unpickler.referenced == {"numpy.ndarray", "builtins.bytearray"}
    tv = torch.load(e["pth"], weights_only=True)
    w = obj["model"]["backbone.bottom_up.res3.1.conv2.weight"]
    assert isinstance(w, np.ndarray) and w.flags.writeable and w.dtype == np.float32 and w.shape == (128, 128, 3, 3)
    np.testing.assert_array_equal(w, tv["body.layer2.1.conv2.weight"].numpy())
    np.testing.assert_array_equal(obj["model"]["backbone.fpn_output4.bias"], tv["fpn.layer_blocks.2.0.bias"].numpy())
    assert all(isinstance(v, np.ndarray) for v in obj["model"].values())


def torchvision_backbone(e: dict) -> BackboneWithFPN:
    """torchvision's own ResNet + FPN (no predet code) with the ``F.pth`` export loaded strictly."""
    norm_layer = partial(nn.GroupNorm, 32) if e["norm"] == "gn" else nn.BatchNorm2d
    body = getattr(torchvision.models, e["arch"])(weights=None, norm_layer=norm_layer)
    c2 = 64 if e["arch"] in ("resnet18", "resnet34") else 256
    backbone = BackboneWithFPN(body, {f"layer{i + 1}": str(i) for i in range(4)}, [c2 * 2**i for i in range(4)],
                               e["fpn"], extra_blocks=LastLevelMaxPool())  # fmt: skip
    backbone.load_state_dict(torch.load(e["pth"], weights_only=True), strict=True)
    return backbone.eval()


def stock_config() -> str:
    """detectron2's ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml`` (its ``model_zoo``
    ``get_config_file`` needs ``pkg_resources``, which recent setuptools no longer ship)."""
    import detectron2

    package = Path(detectron2.__file__).parent
    for folder in (package / "model_zoo" / "configs", package.parent / "configs"):
        path = folder / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_1x.yaml"
        if path.is_file():
            return str(path)
    pytest.skip("detectron2 is installed without its configs/")


def fpn_relative_errors(e: dict, image_path: Path, *, with_fragment: bool = True) -> dict[str, float]:
    """||P_d2 - P_tv|| / ||P_tv|| per level: detectron2's stock Mask R-CNN R50-FPN config (+ ``F.yaml``)
    reading the image as its data loader does vs torchvision's normalisation from ``F.json``."""
    import json

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.data.detection_utils import read_image
    from detectron2.modeling import build_model
    from PIL import Image

    cfg = get_cfg()
    cfg.merge_from_file(stock_config())
    if with_fragment:
        cfg.merge_from_file(str(e["pkl"].with_suffix(".yaml")))
    else:
        cfg.MODEL.WEIGHTS = str(e["pkl"])
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    image = torch.as_tensor(read_image(str(image_path), format=cfg.INPUT.FORMAT).copy()).permute(2, 0, 1).float()
    meta = json.loads(e["pth"].with_suffix(".json").read_text())["input"]
    rgb = torchvision.transforms.functional.to_tensor(Image.open(image_path).convert(meta["channels"]))
    x = torchvision.transforms.functional.normalize(rgb, meta["mean"], meta["std"])[None]
    with torch.no_grad():
        d2 = model.backbone(model.preprocess_image([{"image": image}]).tensor)
        tv = torchvision_backbone(e)(x)
    return {f"p{i + 2}": float((d2[f"p{i + 2}"] - tv[k]).norm() / tv[k].norm())
            for i, k in enumerate(["0", "1", "2", "3", "pool"])}  # fmt: skip


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    """A 192x256 RGB photo-like image (sizes divisible by 32: no padding on either side)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:192, 0:256]
    img = np.stack([(xx * 255 / 256), (yy * 255 / 192), 128 + 60 * np.sin(xx / 9.0)], -1)
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "image.png"
    Image.fromarray(img).save(path)
    return path


@pytest.mark.parametrize("name", [r[0] for r in RUNS])
def test_detectron2_fpn_equals_torchvision(exports, image_path: Path, name: str) -> None:
    pytest.importorskip("detectron2.modeling", reason="detectron2 is not installed")
    errors = fpn_relative_errors(exports[name], image_path)
    assert max(errors.values()) < 1e-4, errors
    if name == "bn":  # the stock config alone (BGR, Caffe mean, std 1, stride in 1x1) is far off
        assert min(fpn_relative_errors(exports[name], image_path, with_fragment=False).values()) > 0.1


def test_train_net_line_sets_what_the_fragment_sets(exports) -> None:
    """detectron2's ``merge_from_list`` of the printed options gives the config ``merge_from_file`` of
    ``F.yaml`` gives (both over the stock Mask R-CNN R50-FPN config)."""
    pytest.importorskip("detectron2.config", reason="detectron2 is not installed")
    import shlex

    from detectron2.config import get_cfg

    from predet.export import train_net_command

    stock = stock_config()
    for e in exports.values():
        fragment = e["pkl"].with_suffix(".yaml")
        argv = shlex.split(train_net_command(yaml.safe_load(fragment.read_text())))
        from_file, from_opts = get_cfg(), get_cfg()
        for cfg in (from_file, from_opts):
            cfg.merge_from_file(stock)
        from_file.merge_from_file(str(fragment))
        from_opts.merge_from_list(argv[argv.index("--config-file") + 2 :])
        assert from_opts == from_file and from_file.MODEL.RESNETS.STRIDE_IN_1X1 is False


def test_embedded_key_list_is_detectron2s() -> None:
    """``D2_DEFAULTS`` holds every key of those sections in detectron2's defaults, with their types."""
    pytest.importorskip("detectron2.config", reason="detectron2 is not installed")
    from detectron2.config import get_cfg

    flat = _flat(get_cfg())
    sections = ("MODEL.RESNETS.", "MODEL.FPN.", "MODEL.ROI_BOX_HEAD.")
    assert {k for k in flat if k.startswith(sections)} | {"MODEL.WEIGHTS", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD",
                                                          "INPUT.FORMAT"} == set(D2_DEFAULTS)  # fmt: skip
    assert {k: type(flat[k]) for k in D2_DEFAULTS} == D2_DEFAULTS
