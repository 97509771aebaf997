"""``predet export``: a pre-trained backbone + FPN in torchvision, detectron2 or timm format (DESIGN §4).

- ``torchvision``: a plain state dict with ``body.*`` / ``fpn.*`` keys, which loads with
  ``strict=True`` into ``.backbone`` of torchvision's ``maskrcnn_resnet50_fpn(weights=None,
  weights_backbone=None)`` (same depth/width as the run's ``model.backbone``). ``fine-tune --init``
  takes this file. Beside ``F.pth`` goes ``F.json`` (:func:`backbone_metadata`: architecture, stage
  widths, FPN / box-head width, the norm it was trained with, the input normalisation and the
  pre-training run it came from); ``predet finetune --init F.pth`` checks its config against it.
- ``detectron2``: a ``.pkl`` with ``{"model": {name: numpy}, "__author__": "predet",
  "matching_heuristics": True, "predet": <the same metadata>}`` and detectron2's names
  (``backbone.bottom_up.stem.*``, ``backbone.bottom_up.res{2..5}.*``, ``backbone.fpn_lateral{2..5}.*``,
  ``backbone.fpn_output{2..5}.*``), pickled so that numpy >= 1.24 loads it (the arrays reference
  only ``numpy.ndarray``, never numpy 2's ``numpy._core``). Beside ``F.pkl`` goes ``F.yaml``, the
  detectron2 config fragment these weights need: torchvision's ResNet strides in the 3x3 conv and
  takes RGB input normalised with ImageNet's mean/std, so ``MODEL.RESNETS.STRIDE_IN_1X1: False``,
  ``INPUT.FORMAT: RGB``, ``MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]``, ``MODEL.PIXEL_STD:
  [58.395, 57.12, 57.375]``; plus ``RESNETS.DEPTH`` / ``NORM`` / ``NUM_GROUPS`` /
  ``WIDTH_PER_GROUP`` / ``RES2_OUT_CHANNELS``, ``FPN.OUT_CHANNELS`` and, with the box head,
  ``ROI_BOX_HEAD.FC_DIM``. Without them detectron2 runs on silently wrong features (or skips the
  FPN's tensors as shape mismatches). ``predet export`` prints the ``tools/train_net.py`` line that
  applies them to the stock Mask R-CNN R50-FPN config.

The detectron2 ``NORM`` is the trained one (a BN or FrozenBN run -> ``FrozenBN``, SyncBN ->
``SyncBN``, GN -> ``GN``) unless ``--norm`` asks for another of the same kind (BN statistics cannot
feed a GroupNorm, nor GroupNorm weights a BN).

- ``timm``: a folder with ``model.safetensors`` (the ResNet body under timm's names) and ``config.json``
  (the hub layout timm reads); see :mod:`predet.export_timm`, which also prints the lines that load it
  into timm and into a Hugging Face transformers DETR.

With ``box_head=True`` the box-head MLP is exported too: torchvision's ``TwoMLPHead`` names
``fc6.*``/``fc7.*`` in a sibling file ``<out stem>_box_head<suffix>`` (loads with ``strict=True``
into ``model.roi_heads.box_head``, keeping the backbone file loadable on its own), detectron2's
``roi_heads.box_head.fc1/fc2`` inside the same ``.pkl``.
"""

from __future__ import annotations

import copyreg
import io
import json
import pickle
import re
import shlex
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
import yaml

from predet import export_timm
from predet.errors import UserError
from predet.utils import (
    atomic_write_bytes,
    atomic_write_text,
    flatten_keys,
    load_checkpoint,
    write_json,
)

__all__ = [
    "export_backbone", "extract_backbone", "extract_box_head", "to_detectron2", "backbone_metadata",
    "detectron2_config", "dump_detectron2", "sidecar_path", "read_sidecar", "check_init_sidecar",
]  # fmt: skip

FORMATS = ("torchvision", "detectron2", "timm")
NORMS = ("frozenbn", "bn", "syncbn", "gn")
# ImageNet statistics of torchvision's ResNets (RGB, 0-1); detectron2 wants them in 0-255
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
D2_PIXEL_MEAN = [123.675, 116.28, 103.53]  # 255 x IMAGENET_MEAN
D2_PIXEL_STD = [58.395, 57.12, 57.375]  # 255 x IMAGENET_STD
D2_NORM = {"frozenbn": "FrozenBN", "bn": "BN", "syncbn": "SyncBN", "gn": "GN"}
D2_BASE_CONFIG = "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"  # in detectron2's repo

# (block, blocks per stage, groups, width per group) -> torchvision / predet backbone name
_ARCHS: dict[tuple[str, tuple[int, ...], int, int], str] = {
    ("basic", (2, 2, 2, 2), 1, 64): "resnet18",
    ("basic", (3, 4, 6, 3), 1, 64): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 1, 64): "resnet50",
    ("bottleneck", (3, 4, 23, 3), 1, 64): "resnet101",
    ("bottleneck", (3, 8, 36, 3), 1, 64): "resnet152",
    ("bottleneck", (3, 4, 6, 3), 32, 4): "resnext50_32x4d",
    ("bottleneck", (3, 4, 23, 3), 32, 8): "resnext101_32x8d",
    ("bottleneck", (3, 4, 23, 3), 64, 4): "resnext101_64x4d",
    ("bottleneck", (3, 4, 23, 3), 32, 16): "resnext101_32x16d",
    ("bottleneck", (3, 4, 6, 3), 1, 128): "wide_resnet50_2",
    ("bottleneck", (3, 4, 23, 3), 1, 128): "wide_resnet101_2",
}

# torchvision name (under body./fpn./fc6/fc7) -> detectron2 name; first match wins
_D2_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^body\.conv1\.weight$"), r"backbone.bottom_up.stem.conv1.weight"),
    (re.compile(r"^body\.bn1\.(\w+)$"), r"backbone.bottom_up.stem.conv1.norm.\1"),
    (re.compile(r"^body\.layer(\d)\.(\d+)\.conv(\d)\.weight$"), r"RES\1.\2.conv\3.weight"),
    (re.compile(r"^body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)$"), r"RES\1.\2.conv\3.norm.\4"),
    (re.compile(r"^body\.layer(\d)\.(\d+)\.downsample\.0\.weight$"), r"RES\1.\2.shortcut.weight"),
    (re.compile(r"^body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)$"), r"RES\1.\2.shortcut.norm.\3"),
    (re.compile(r"^fpn\.inner_blocks\.(\d)\.0\.(\w+)$"), r"LATERAL\1.\2"),
    (re.compile(r"^fpn\.layer_blocks\.(\d)\.0\.(\w+)$"), r"OUTPUT\1.\2"),
    (re.compile(r"^fc6\.(\w+)$"), r"roi_heads.box_head.fc1.\1"),
    (re.compile(r"^fc7\.(\w+)$"), r"roi_heads.box_head.fc2.\1"),
]


def _model_state(ckpt_or_state: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str, dict]:
    """The model state dict (``module.`` prefixes removed), a name for messages, and the checkpoint's
    other entries (``config``, ``step``; empty for a bare state dict)."""
    if isinstance(ckpt_or_state, (str, Path)):
        name = str(ckpt_or_state)
        obj = load_checkpoint(ckpt_or_state)
    else:
        name, obj = "state dict", ckpt_or_state
    if not isinstance(obj, Mapping):
        raise UserError(f"{name}: expected a checkpoint or state dict, got {type(obj).__name__}")
    wrapped = isinstance(obj.get("model"), Mapping)
    state = obj["model"] if wrapped else obj
    extra = {k: v for k, v in obj.items() if k != "model"} if wrapped else {}
    return {k.removeprefix("module."): v for k, v in state.items()}, name, extra


def extract_backbone(state: Mapping[str, Any], name: str = "state dict") -> dict[str, torch.Tensor]:
    """``backbone.body.*``/``backbone.fpn.*`` (a PreDet model) or ``body.*``/``fpn.*`` -> ``body.*``,
    ``fpn.*`` (torchvision ``BackboneWithFPN`` names).

    A BatchNorm entry without ``num_batches_tracked`` (a model trained with frozen BN) gets a
    zero counter, so the file also loads strictly into torchvision's ``BatchNorm2d`` backbone.
    """
    prefix = "backbone." if any(k.startswith("backbone.body.") for k in state) else ""
    out = {
        k[len(prefix) :]: v.detach().clone().contiguous()
        for k, v in state.items()
        if k.startswith(f"{prefix}body.") or k.startswith(f"{prefix}fpn.")
    }
    if "body.conv1.weight" not in out or not any(k.startswith("fpn.") for k in out):
        raise UserError(f"{name}: no backbone + FPN weights (keys backbone.body.*, backbone.fpn.*)")
    if any(k.startswith("fpn.extra_blocks.p7.") for k in out):  # FPN on C3..C5 + P6/P7
        raise UserError(
            f"{name}: a RetinaNet backbone (FPN on C3-C5 with P6/P7): the exports are the P2-P6 FPN "
            "of Mask / Faster R-CNN; export the pre-training run instead"
        )
    for key in [k for k in out if k.endswith(".running_mean")]:
        counter = key.removesuffix("running_mean") + "num_batches_tracked"
        out.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return out


def extract_box_head(state: Mapping[str, Any], name: str = "state dict") -> dict[str, torch.Tensor]:
    """``box_head.fc6.*``/``box_head.fc7.*`` -> ``fc6.*``/``fc7.*`` (torchvision ``TwoMLPHead``)."""
    out = {
        k.removeprefix("box_head."): v.detach().clone().contiguous()
        for k, v in state.items()
        if k.startswith("box_head.fc6.") or k.startswith("box_head.fc7.")
    }
    if len(out) != 4:
        raise UserError(
            f"{name}: no box head (box_head.fc6/fc7); it exists only when the CROI losses are on"
        )
    return out


# --------------------------------------------------------------------------------------------
# What the weights are: read from the tensors (and the run's config for the exact norm)
# --------------------------------------------------------------------------------------------
def _trained_norm(config: Any) -> Optional[str]:
    model = config.get("model") if isinstance(config, Mapping) else None
    norm = model.get("norm") if isinstance(model, Mapping) else None
    return norm if norm in NORMS else None


def _source(name: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Where the weights came from: the checkpoint, its run folder (``RUN/checkpoints/x.pt``), step."""
    src: dict[str, Any] = {"checkpoint": None, "run": None, "step": None}
    if name != "state dict":
        ckpt = Path(name).resolve()
        src["checkpoint"] = str(ckpt)
        if ckpt.parent.name == "checkpoints" and (ckpt.parent.parent / "config.yaml").is_file():
            src["run"] = str(ckpt.parent.parent)
    if isinstance(extra.get("step"), int):
        src["step"] = extra["step"]
    return src


def backbone_metadata(
    tensors: Mapping[str, torch.Tensor], *, trained_norm: Optional[str] = None, source: Optional[dict] = None,
    name: str = "state dict",
) -> dict[str, Any]:  # fmt: skip
    """The facts a client needs to use ``tensors`` (torchvision names) right, as plain JSON types.

    Architecture, depth, block, stage blocks, groups / width per group and ``res2_out_channels`` come
    from the tensors' shapes; ``fpn_channels`` from the lateral convs; ``box_head_dim`` from ``fc6``
    (None without a box head); ``norm`` is ``trained_norm`` (the run's ``model.norm``) when it is of
    the tensors' kind, else ``bn`` (running statistics present) or ``gn``.
    """
    stage_blocks = []
    for stage in range(1, 5):
        idx = {int(m[1]) for k in tensors if (m := re.match(rf"^body\.layer{stage}\.(\d+)\.", k))}
        stage_blocks.append(len(idx))
    bottleneck = "body.layer1.0.conv3.weight" in tensors
    conv2 = tensors.get("body.layer1.0.conv2.weight")
    if conv2 is None or 0 in stage_blocks:
        raise UserError(f"{name}: not a ResNet body (no body.layer1..4 blocks)")
    width, per_group = int(conv2.shape[0]), int(conv2.shape[1])
    groups = width // per_group if bottleneck else 1
    key = ("bottleneck" if bottleneck else "basic", tuple(stage_blocks), groups, width // groups if bottleneck else 64)
    if key not in _ARCHS:
        raise UserError(f"{name}: unrecognised ResNet (block {key[0]}, stages {list(key[1])}, groups {groups})")
    kind = "bn" if "body.bn1.running_mean" in tensors else "gn"
    norm = trained_norm if trained_norm in NORMS and (trained_norm == "gn") == (kind == "gn") else kind
    res2 = tensors["body.layer1.0.conv3.weight" if bottleneck else "body.layer1.0.conv2.weight"]
    fc6 = tensors.get("fc6.weight")
    return {
        "architecture": _ARCHS[key],
        "depth": sum(stage_blocks) * (3 if bottleneck else 2) + 2,
        "block": key[0],
        "stage_blocks": stage_blocks,
        "groups": groups,
        "width_per_group": key[3],
        "res2_out_channels": int(res2.shape[0]),
        "fpn_channels": int(tensors["fpn.inner_blocks.0.0.weight"].shape[0]),
        "fpn_levels": ["P2", "P3", "P4", "P5", "P6 (max-pool of P5)"],
        "box_head_dim": None if fc6 is None else int(fc6.shape[0]),
        "norm": norm,
        "input": {"channels": "RGB", "range": "0-1", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "source": source or {"checkpoint": None, "run": None, "step": None},
        "producer": "predet export",
    }


# --------------------------------------------------------------------------------------------
# detectron2
# --------------------------------------------------------------------------------------------
def _d2_name(key: str) -> str:
    for pattern, template in _D2_RULES:
        if pattern.match(key):
            name = pattern.sub(template, key)
            # torchvision layer1..4 = detectron2 res2..5; FPN block i sits on res(i+2)
            name = re.sub(r"^RES(\d)", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}", name)
            name = re.sub(r"^LATERAL(\d)", lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}", name)
            return re.sub(r"^OUTPUT(\d)", lambda m: f"backbone.fpn_output{int(m[1]) + 2}", name)
    raise UserError(f"no detectron2 name for weight '{key}'")


def to_detectron2(tensors: Mapping[str, torch.Tensor], metadata: Optional[dict] = None) -> dict[str, Any]:
    """torchvision names -> detectron2's checkpoint dict (numpy values; BN counters dropped).

    ``metadata`` (:func:`backbone_metadata`, with its ``detectron2`` config) goes beside ``model``
    under ``predet``; detectron2 ignores top-level keys it does not know.
    """
    model = {
        _d2_name(k): v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
        for k, v in tensors.items()
        if not k.endswith("num_batches_tracked")
    }
    out: dict[str, Any] = {"model": model, "__author__": "predet", "matching_heuristics": True}
    if metadata is not None:
        out["predet"] = metadata
    return out


def detectron2_config(meta: Mapping[str, Any], weights: str | Path, norm: Optional[str] = None) -> dict:
    """The detectron2 config keys (nested, as in its YAML) that make it compute what torchvision does.

    ``norm`` (``frozenbn`` | ``bn`` | ``syncbn`` | ``gn``): the layer detectron2 builds; default: the
    trained norm, with BN as FrozenBN. It must be of the weights' kind (BN statistics or GroupNorm).
    """
    trained = meta["norm"]
    if norm is None:
        norm = "frozenbn" if trained == "bn" else trained
    if norm not in NORMS:
        raise UserError(f"--norm: unknown norm '{norm}' (choose from {', '.join(NORMS)})")
    if (norm == "gn") != (trained == "gn"):
        fix = "gn" if trained == "gn" else "frozenbn, bn or syncbn"
        raise UserError(f"--norm {norm}: the weights were trained with {trained}; choose {fix}")
    if meta["depth"] not in (18, 34, 50, 101, 152):
        raise UserError(f"detectron2 has no ResNet of depth {meta['depth']} ({meta['architecture']})")
    resnets = {
        "DEPTH": meta["depth"],
        "STRIDE_IN_1X1": False,  # torchvision strides in the 3x3 conv (detectron2's MSRA default: 1x1)
        "NORM": D2_NORM[norm],
        "NUM_GROUPS": meta["groups"],
        "WIDTH_PER_GROUP": meta["width_per_group"],
        "RES2_OUT_CHANNELS": meta["res2_out_channels"],
    }
    model: dict[str, Any] = {
        "WEIGHTS": str(weights),
        "PIXEL_MEAN": list(D2_PIXEL_MEAN),
        "PIXEL_STD": list(D2_PIXEL_STD),
        "RESNETS": resnets,
        "FPN": {"OUT_CHANNELS": meta["fpn_channels"]},
    }
    if meta["box_head_dim"] is not None:
        model["ROI_BOX_HEAD"] = {"NUM_FC": 2, "FC_DIM": meta["box_head_dim"]}
    return {"MODEL": model, "INPUT": {"FORMAT": "RGB"}}


def train_net_command(d2_cfg: Mapping[str, Any], base: str = D2_BASE_CONFIG) -> str:
    """One shell line: detectron2's ``tools/train_net.py`` on ``base`` with ``d2_cfg``'s keys as options."""
    opts = []
    for key, value in flatten_keys(d2_cfg).items():
        text = "[" + ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]" if isinstance(
            value, list) else str(value)  # fmt: skip
        opts += [key, text]
    return " ".join(shlex.quote(s) for s in ["python", "tools/train_net.py", "--config-file", base, *opts])


class _FlowListDumper(yaml.SafeDumper):
    """Block mappings, one-line lists (``PIXEL_MEAN: [123.675, 116.28, 103.53]``)."""


_FlowListDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def _yaml_fragment(d2_cfg: Mapping[str, Any], pkl: Path) -> str:
    return (
        f"# detectron2 config fragment for {pkl.name} (written by `predet export`): the keys these weights\n"
        "# need. Merge it over a stock config, e.g. cfg.merge_from_file(model_zoo.get_config_file(\n"
        '# "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")); cfg.merge_from_file("<this file>"), or add\n'
        "# `_BASE_: <detectron2>/configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml` above and pass\n"
        "# it to tools/train_net.py --config-file.\n"
        + yaml.dump(dict(d2_cfg), Dumper=_FlowListDumper, sort_keys=False, default_flow_style=False)
    )


def _reduce_ndarray(a: np.ndarray) -> tuple:
    """``numpy.ndarray(shape, dtype, buffer=bytearray(data))``: a writable array, by public names only."""
    a = np.ascontiguousarray(a)
    return np.ndarray, (a.shape, a.dtype.str, bytearray(a.tobytes()))


class _PortablePickler(pickle.Pickler):
    """Pickles ndarrays through :func:`_reduce_ndarray`, not numpy's ``_reconstruct`` (numpy 2 writes
    that as ``numpy._core.multiarray``, which numpy < 1.26 cannot import)."""

    dispatch_table = {**copyreg.dispatch_table, np.ndarray: _reduce_ndarray}


def dump_detectron2(obj: Any) -> bytes:
    """``pickle.dumps(obj)`` (protocol 4) that numpy >= 1.24 loads (and Python 2-style latin1 reads)."""
    buf = io.BytesIO()
    _PortablePickler(buf, protocol=4).dump(obj)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The torchvision sidecar, and checking a fine-tuning config against it
# --------------------------------------------------------------------------------------------
def sidecar_path(weights: str | Path) -> Path:
    """``F.json`` beside a torchvision export ``F.pth`` (``F.yaml`` beside a detectron2 ``F.pkl``)."""
    weights = Path(weights)
    return weights.with_suffix(".yaml" if weights.suffix == ".pkl" else ".json")


def read_sidecar(weights: str | Path) -> Optional[dict]:
    """The ``F.json`` metadata of a torchvision export ``F``, or None when there is none."""
    path = sidecar_path(weights)
    if path.suffix != ".json" or not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict) or meta.get("producer") != "predet export":
        return None  # some other JSON that happens to sit beside the weights
    for key in ("architecture", "fpn_channels", "norm"):
        if key not in meta:
            raise UserError(f"{path}: no '{key}' (expected the metadata `predet export` writes)")
    return meta


def check_init_sidecar(init: str | Path, model_cfg: Any) -> Optional[dict]:
    """Check ``model.backbone`` / ``fpn_channels`` / ``norm`` of a fine-tuning config against the init's
    ``F.json`` (when it has one); a mismatch is a one-line :class:`UserError`. Returns the metadata."""
    if str(init) == "scratch":
        return None
    meta = read_sidecar(init)
    if meta is None:
        return None
    where = f"--init {init}: its {sidecar_path(init).name} says"
    if model_cfg.backbone != meta["architecture"]:
        raise UserError(f"{where} backbone {meta['architecture']}, but model.backbone={model_cfg.backbone}")
    fpn = getattr(model_cfg, "fpn_channels", None)
    if fpn is not None and fpn != meta["fpn_channels"]:
        raise UserError(f"{where} FPN width {meta['fpn_channels']}, but model.fpn_channels={fpn}")
    if (model_cfg.norm == "gn") != (meta["norm"] == "gn"):
        fix = "gn" if meta["norm"] == "gn" else "frozenbn, bn or syncbn"
        raise UserError(f"{where} norm {meta['norm']}, but model.norm={model_cfg.norm} (use {fix})")
    return meta


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------
def _check_out_file(fmt: str, out: Path) -> tuple[Path, Path]:
    """The sidecar and box-head paths of a torchvision / detectron2 export to ``out``, after checking
    that its name suits the format and that none of the three is a folder."""
    if fmt == "detectron2" and out.suffix != ".pkl":
        # detectron2's checkpointer unpickles only a .pkl; any other name goes to torch.load
        raise UserError(f"--out {out}: a detectron2 export must end in .pkl (detectron2 reads other names with torch.load)")
    if fmt == "torchvision" and out.suffix in (".pkl", ".json", ".yaml"):
        raise UserError(f"--out {out}: a torchvision export needs a suffix such as .pth ({out.suffix} is detectron2's "
                        "weights or an export's metadata)")  # fmt: skip
    side, head_path = sidecar_path(out), out.with_name(f"{out.stem}_box_head{out.suffix}")
    for path in (out, side, head_path):
        if path.is_dir():
            raise UserError(f"--out {out}: {path} is a folder; give a file name")
    return side, head_path


def _save_torch(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def export_backbone(
    ckpt_or_state: str | Path | Mapping[str, Any],
    fmt: str,
    out: str | Path,
    box_head: bool = False,
    norm: Optional[str] = None,
) -> list[Path]:
    """Export a PreDet checkpoint (path, checkpoint dict or model state dict) to ``out``.

    Args:
        ckpt_or_state: a training checkpoint (``{"model": ...}``), a PreDet model state dict, or
            a torchvision backbone state dict.
        fmt: ``torchvision``, ``detectron2`` or ``timm``.
        out: the file to write (timm: the folder).
        box_head: also export the box-head MLP (see the module docstring).
        norm: detectron2 only: the norm layer its config asks for (default: as trained, BN as FrozenBN).
    Returns:
        The files written: the weights (and ``_box_head`` sibling) first, then the metadata sidecar
        (``F.json`` for torchvision, the config fragment ``F.yaml`` for detectron2, ``config.json``
        for timm).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}' (choose from {', '.join(FORMATS)})")
    if norm is not None and fmt != "detectron2":
        raise UserError("--norm: only for --format detectron2 (it sets detectron2's MODEL.RESNETS.NORM)")
    if box_head and fmt == "timm":
        raise UserError("--box-head: only for --format torchvision or detectron2 (a timm model is the ResNet body)")
    state, name, extra = _model_state(ckpt_or_state)
    backbone = extract_backbone(state, name)
    head = extract_box_head(state, name) if box_head else {}
    meta = backbone_metadata({**backbone, **head}, trained_norm=_trained_norm(extra.get("config")),
                             source=_source(name, extra), name=name)  # fmt: skip
    out = Path(out)
    if fmt == "timm":
        return export_timm.write_timm(backbone, meta, out, export_timm.run_input_size(extra.get("config")))
    side, head_path = _check_out_file(fmt, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "detectron2":
        d2_cfg = detectron2_config(meta, out.resolve(), norm)
        payload = to_detectron2({**backbone, **head}, {**meta, "format": "detectron2", "detectron2": d2_cfg})
        atomic_write_bytes(out, dump_detectron2(payload))
        atomic_write_text(side, _yaml_fragment(d2_cfg, out))
        return [out, side]
    _save_torch(backbone, out)
    written = [out]
    if head:
        _save_torch(head, head_path)
        written.append(head_path)
    else:  # an earlier export's head beside the file would be read with this backbone (read_init)
        head_path.unlink(missing_ok=True)
    files = {"weights": out.name, "box_head": written[1].name if head else None}
    write_json(side, {"format": "torchvision", **files, **meta})
    return [*written, side]
