"""``predet export --format timm``: the ResNet / ResNeXt body as a timm model folder (DESIGN §4).

``DIR/model.safetensors`` holds the body under timm's own names. timm's ``ResNet`` names its modules
as torchvision's does (``conv1``, ``bn1``, ``layer{1..4}.{i}.conv{1..3}`` / ``bn{1..3}`` /
``downsample.{0,1}``), so torchvision's ``body.X`` is timm's ``X``; the FPN stays out (timm has
none) and so does a classifier (the model is built with ``num_classes=0``).

``DIR/config.json`` is the Hugging Face hub layout timm's ``hf-hub:`` and ``local-dir:`` loaders read:
``architecture``, ``num_classes`` (0), ``num_features``, ``model_args`` (``norm_layer``: timm's name of
the norm the weights need, ``groupnorm`` for a GN run, ``batchnorm2d`` for every BN kind, whose
weights carry running statistics) and ``pretrained_cfg`` (ImageNet mean/std of RGB input in 0-1,
the run's ``model.input_size``, ``num_classes`` 0). ``predet`` beside them carries the export's
metadata (:func:`predet.export.backbone_metadata`: the norm the run trained with, its source);
timm ignores top-level keys it does not know.

How each client loads it (the lines :func:`usage_lines` prints):

- ``timm.create_model("local-dir:DIR", pretrained=True, features_only=True)`` builds the architecture
  and norm from ``config.json`` and loads the file *strictly* (its ``num_classes`` 0 is the model's):
  a missing or misnamed tensor is an error.
- ``timm.create_model("resnet50", pretrained=True, pretrained_cfg_overlay=dict(file=...), ...)``
  loads *non-strictly* (the registry's 1000 classes differ from the model's 0 or from
  ``features_only``): a GN run then needs ``norm_layer="groupnorm"`` too, or timm builds BatchNorm
  layers and keeps their statistics at 0 / 1 without a word. The printed line carries it.
- Hugging Face transformers DETR-family models (``DetrConfig(backbone="local-dir:DIR",
  use_timm_backbone=True)``) build the timm body from the folder; transformers 5 initialises it at
  random (it drops ``use_pretrained_backbone``, and ``backbone_kwargs`` sends the name to the Hub), so
  the printed lines load the file into the timm ``FeatureListNet`` inside with ``strict=True`` (it is
  ``model.model.backbone.model`` in 5.25; searched by type, the line does not depend on that path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from predet.errors import UserError
from predet.utils import atomic_write_bytes, write_json

__all__ = ["to_timm", "timm_config", "usage_lines", "write_timm", "run_input_size"]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# predet's norms -> timm's norm_layer names (timm.layers.get_norm_layer); GroupNorm: 32 groups, as predet's
TIMM_NORM = {"frozenbn": "batchnorm2d", "bn": "batchnorm2d", "syncbn": "batchnorm2d", "gn": "groupnorm"}
# the architectures predet trains, each a timm model name with torchvision's layout (test_export_timm)
TIMM_ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "resnext101_64x4d", "resnext101_32x16d", "wide_resnet50_2", "wide_resnet101_2",
)  # fmt: skip
DEFAULT_INPUT_SIZE = 224  # timm's, for a checkpoint without its run's config


def to_timm(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ``body.*`` names -> timm's ResNet names (``fpn.*`` and box-head tensors left out)."""
    out = {k.removeprefix("body."): v.contiguous() for k, v in tensors.items() if k.startswith("body.")}
    if "conv1.weight" not in out:
        raise UserError("no ResNet body (body.conv1.weight) to export to timm")
    return out


def run_input_size(config: Any) -> Optional[int]:
    """The run's ``model.input_size`` (the square views it pre-trained on), or None when unknown."""
    model = config.get("model") if isinstance(config, Mapping) else None
    size = model.get("input_size") if isinstance(model, Mapping) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def timm_config(meta: Mapping[str, Any], input_size: Optional[int] = None) -> dict[str, Any]:
    """``config.json`` in the hub layout timm reads, for the body that ``meta`` describes.

    Args:
        meta: :func:`predet.export.backbone_metadata` of the weights.
        input_size: the run's pre-training resolution (``pretrained_cfg.input_size``); default 224.
    """
    arch = meta["architecture"]
    if arch not in TIMM_ARCHS:  # backbone_metadata knows no other; a new one must be checked first
        raise UserError(f"--format timm: no timm model checked against {arch}")
    if meta["norm"] not in TIMM_NORM:
        raise UserError(f"--format timm: timm has no layer for the norm '{meta['norm']}' these weights need")
    size = input_size or DEFAULT_INPUT_SIZE
    stride = 32  # C5's
    pretrained_cfg = {
        "custom_load": False,
        "input_size": [3, size, size],
        "fixed_input_size": False,
        "interpolation": "bilinear",  # torchvision's resize
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(meta["input"]["mean"]),
        "std": list(meta["input"]["std"]),
        "num_classes": 0,
        "pool_size": [-(-size // stride)] * 2,
        "first_conv": "conv1",
        "classifier": "fc",
    }
    return {
        "architecture": arch,
        "num_classes": 0,
        "num_features": meta["res2_out_channels"] * 8,  # C5's width: C2's doubled three times
        "global_pool": "avg",
        "model_args": {"num_classes": 0, "norm_layer": TIMM_NORM[meta["norm"]]},
        "pretrained_cfg": pretrained_cfg,
        # what the export is, minus the FPN / box head it leaves out
        "predet": {k: v for k, v in meta.items() if not k.startswith("fpn_") and k != "box_head_dim"},
    }


def usage_lines(meta: Mapping[str, Any], folder: str | Path) -> list[str]:
    """The Python lines (and their comments) a user pastes to load the export in ``folder``."""
    folder = str(Path(folder).resolve())
    weights = f"{folder}/{WEIGHTS}"
    arch, norm = meta["architecture"], TIMM_NORM[meta["norm"]]
    norm_kw = f", norm_layer={norm!r}" if norm != "batchnorm2d" else ""
    return [
        f"# timm >= 1.0.16: C2..C5 of the trained {arch} ({meta['norm']}); config.json gives the architecture and "
        "norm, the weights load strictly",
        "import timm",
        f"backbone = timm.create_model({'local-dir:' + folder!r}, pretrained=True, features_only=True, "
        "out_indices=(1, 2, 3, 4))",
        "# or by name (timm then loads non-strictly: keep the architecture and norm as written here)",
        f"backbone = timm.create_model({arch!r}, pretrained=True, pretrained_cfg_overlay=dict(file={weights!r})"
        f"{norm_kw}, features_only=True, out_indices=(1, 2, 3, 4))",
        "# Hugging Face transformers (checked: 5.25): DETR on this backbone (ConditionalDetr / DeformableDetr alike); "
        "transformers 5 builds the backbone at random, so the file is loaded into it",
        "import timm",
        "from safetensors.torch import load_file",
        "from transformers import DetrConfig, DetrForObjectDetection",
        f"model = DetrForObjectDetection(DetrConfig(backbone={'local-dir:' + folder!r}, use_timm_backbone=True, "
        "num_labels=91))",
        "body = next(m for m in model.modules() if isinstance(m, timm.models.FeatureListNet))  # the timm ResNet inside",
        f"body.load_state_dict(load_file({weights!r}), strict=True)",
    ]


def write_timm(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], out: str | Path, input_size: Optional[int] = None
) -> list[Path]:
    """Write ``out/model.safetensors`` and ``out/config.json``; returns their paths.

    Args:
        tensors: torchvision ``body.*`` (+ ``fpn.*``) names, as :func:`predet.export.extract_backbone` gives.
        meta: their :func:`predet.export.backbone_metadata`.
        out: the folder (made when missing; other files in it are left alone).
        input_size: the run's pre-training resolution, for ``pretrained_cfg``.
    """
    try:
        from safetensors.torch import save as safetensors_bytes
    except ModuleNotFoundError:
        raise UserError("--format timm needs the Python package 'safetensors' (pip install safetensors)") from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a timm export is a folder (model.safetensors + config.json), not a file")
    config = timm_config(meta, input_size)
    body = to_timm(tensors)
    out.mkdir(parents=True, exist_ok=True)
    # {"format": "pt"}: the header Hugging Face's loaders expect of a PyTorch safetensors file
    atomic_write_bytes(out / WEIGHTS, safetensors_bytes(dict(body), metadata={"format": "pt"}))
    config["predet"] = {**config["predet"], "format": "timm", "weights": WEIGHTS}
    write_json(out / CONFIG, config)
    return [out / WEIGHTS, out / CONFIG]
